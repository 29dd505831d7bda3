"""Lock-heavy load for `cargo xtask bench locks`: 4 threads acquire and
release locks (plain, nested in a consistent order, and an RLock) for
DURATION seconds after READY; prints `PAIRS <acquire/release pairs> <secs>`."""
import sys
import threading
import time

duration = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
locks = [threading.Lock() for _ in range(4)]
shared = threading.Lock()
rlock = threading.RLock()
counts = [0] * 4
start = threading.Event()
stop = False


def work(i):
    mine = locks[i]
    n = 0
    start.wait()
    while not stop:
        for _ in range(100):
            with mine:
                n += 1
            with shared:
                with mine:
                    n += 2
            with rlock:
                n += 1
            x = 0
            for k in range(6):
                x += k
    counts[i] = n


threads = [threading.Thread(target=work, args=(i,), name=f"locker-{i}") for i in range(4)]
for t in threads:
    t.start()
print("READY", flush=True)
# Wait for the observer to attach, then run the timed part.
sys.stdin.readline()
t0 = time.perf_counter()
start.set()
time.sleep(duration)
stop = True
for t in threads:
    t.join()
print(f"PAIRS {sum(counts)} {time.perf_counter() - t0:.3f}", flush=True)
