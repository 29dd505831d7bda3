"""Holds a Lock and an RLock (twice) in the main thread and prints their
addresses and the thread ident, for the live lock-layout test."""
import threading
import time

lock = threading.Lock()
free_lock = threading.Lock()
rlock = threading.RLock()
lock.acquire()
rlock.acquire()
rlock.acquire()
print(f"READY {id(lock)} {id(free_lock)} {id(rlock)} {threading.get_ident()}", flush=True)
time.sleep(1000)  # SLEEP main
