"""A method re-acquires the non-reentrant Lock its caller already holds."""
import threading
import time


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._items = {}

    def register(self, key, value):
        with self._lock:  # HOLD register
            self._items[key] = value
            self._evict_old()

    def _evict_old(self):
        with self._lock:  # WAIT evict
            self._items.pop("old", None)


registry = Registry()
t = threading.Thread(target=registry.register, args=("k", 1), name="registrar")
t.start()
time.sleep(0.2)
print("READY", flush=True)
t.join()
