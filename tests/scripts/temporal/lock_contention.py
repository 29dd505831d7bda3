"""Four workers serialise on one lock that is held while doing slow work
(a sleep stands in for I/O under the lock): heavy contention."""
import threading
import time


class Store:
    def __init__(self):
        self._lock = threading.Lock()
        self.items = 0

    def put(self):
        with self._lock:  # CONTENDED
            time.sleep(0.01)  # HELD
            self.items += 1


store = Store()


def worker():
    while True:
        store.put()
        time.sleep(0.001)


for i in range(4):
    threading.Thread(target=worker, name=f"worker-{i}", daemon=True).start()
print("READY", flush=True)
while True:
    time.sleep(1)
