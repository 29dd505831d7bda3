"""A healthy idle Python process: starts a few named threads, says READY,
then sleeps until killed (or for argv[1] seconds)."""
import sys
import threading
import time


def worker(stop):
    while not stop.wait(0.2):
        pass


stop = threading.Event()
for i in range(3):
    threading.Thread(target=worker, args=(stop,), name=f"idle-worker-{i}", daemon=True).start()
print("READY", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 3600)
