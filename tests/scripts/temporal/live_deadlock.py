"""Two workers run healthily, then deadlock at a moment the test knows:
each takes one lock and then the other's. Prints `ONSET <unix time>` as
both hold their first lock (the deadlock forms microseconds later)."""
import sys
import threading
import time

delay = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
accounts_lock = threading.Lock()
audit_lock = threading.Lock()
go = threading.Barrier(3)
passed = []  # when each worker left the barrier (stamped by itself)


def settle():
    for _ in range(100):
        with accounts_lock:
            with audit_lock:
                time.sleep(0.001)
    go.wait()
    passed.append(time.time())
    with accounts_lock:  # HOLD settle
        time.sleep(0.05)
        with audit_lock:  # WAIT settle
            pass


def audit():
    go.wait()
    passed.append(time.time())
    with audit_lock:  # HOLD audit
        time.sleep(0.05)
        with accounts_lock:  # WAIT audit
            pass


threads = [
    threading.Thread(target=settle, name="settle"),
    threading.Thread(target=audit, name="audit"),
]
for t in threads:
    t.start()
print("READY", flush=True)
time.sleep(delay)
go.wait()
while len(passed) < 2:
    time.sleep(0.001)
# The second lock of each worker is requested 50 ms after it left the
# barrier (stamped by the workers: this thread may run late on a busy CPU).
print(f"ONSET {max(passed) + 0.05:.3f}", flush=True)
for t in threads:
    t.join()
