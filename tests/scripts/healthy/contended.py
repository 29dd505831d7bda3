"""Busy and contended, but consistent: 8 threads hammer two locks, always
in the same order, plus a shared RLock taken recursively."""
import threading
import time

a = threading.Lock()
b = threading.Lock()
r = threading.RLock()
counter = {"n": 0}


def nested(depth):
    with r:
        if depth:
            nested(depth - 1)
        else:
            counter["n"] += 1


def hammer():
    while True:
        with a:
            with b:
                counter["n"] += 1
        nested(3)
        with a:
            x = sum(range(200))
            counter["n"] += x % 2


threads = [threading.Thread(target=hammer, name=f"hammer-{i}", daemon=True) for i in range(8)]
for t in threads:
    t.start()
time.sleep(0.3)
print("READY", flush=True)
time.sleep(1000)
