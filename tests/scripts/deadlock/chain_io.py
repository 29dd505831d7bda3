"""Not a deadlock: a thread waits for a lock whose holder blocks reading a
pipe nobody writes to."""
import os
import threading
import time

io_lock = threading.Lock()
taken = threading.Event()
read_end, write_end = os.pipe()


def reader():
    io_lock.acquire()  # HOLD reader
    taken.set()
    data = os.read(read_end, 1)  # READ reader
    io_lock.release()
    return data


def waiter():
    taken.wait()
    with io_lock:  # WAIT waiter
        print("finally")


threads = [threading.Thread(target=reader, name="reader"), threading.Thread(target=waiter, name="waiter")]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
