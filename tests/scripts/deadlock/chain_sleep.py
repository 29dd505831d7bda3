"""Not a deadlock: two threads wait for a lock whose holder sleeps."""
import threading
import time

state_lock = threading.Lock()
taken = threading.Event()


def slow_holder():
    with state_lock:  # HOLD holder
        taken.set()
        time.sleep(1000)  # SLEEP holder


def waiter():
    taken.wait()
    with state_lock:  # WAIT waiter
        print("finally")


threads = [threading.Thread(target=slow_holder, name="holder")]
threads += [threading.Thread(target=waiter, name=f"waiter-{i}") for i in range(2)]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
