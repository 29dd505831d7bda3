"""Two threads take two module-level Locks in opposite order (with-blocks)."""
import threading
import time

lock_a = threading.Lock()
lock_b = threading.Lock()
both_hold_one = threading.Barrier(2)


def forward():
    with lock_a:  # HOLD forward
        both_hold_one.wait()
        with lock_b:  # WAIT forward
            print("unreachable")


def backward():
    with lock_b:  # HOLD backward
        both_hold_one.wait()
        with lock_a:  # WAIT backward
            print("unreachable")


threads = [
    threading.Thread(target=forward, name="forward"),
    threading.Thread(target=backward, name="backward"),
]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
