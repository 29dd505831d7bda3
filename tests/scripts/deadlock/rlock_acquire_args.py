"""RLocks passed as function arguments, taken with explicit acquire() and
release() in opposite orders."""
import threading
import time

start = threading.Barrier(2)


def worker(first, second):
    first.acquire()  # HOLD worker
    try:
        start.wait()
        second.acquire()  # WAIT worker
        second.release()
    finally:
        first.release()


config_lock = threading.RLock()
cache_lock = threading.RLock()
threads = [
    threading.Thread(target=worker, args=(config_lock, cache_lock), name="loader"),
    threading.Thread(target=worker, args=(cache_lock, config_lock), name="refresher"),
]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
