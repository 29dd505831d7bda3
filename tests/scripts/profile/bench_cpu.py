"""Benchmark target: 5 threads share a fixed amount of pure-Python work
(GIL-bound, so about one CPU), then the process prints the wall time it took
as `ELAPSED <seconds>` and exits. Usage: bench_cpu.py [TOTAL_ITERATIONS].
Prints READY (with its pid) before starting, after a short pause so a
profiler can attach."""
import os
import sys
import threading
import time

TOTAL = int(sys.argv[1]) if len(sys.argv) > 1 else 30_000_000
THREADS = 5


def leaf(i):
    return i * i % 7


def middle(n):
    s = 0
    for i in range(n):
        s += leaf(i)
    return s


def work(n):
    done = 0
    while done < n:
        middle(10_000)
        done += 10_000


print("READY", os.getpid(), flush=True)
time.sleep(float(os.environ.get("BENCH_ATTACH_DELAY", "1.0")))
start = time.perf_counter()
threads = [threading.Thread(target=work, args=(TOTAL // THREADS,)) for _ in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("ELAPSED", time.perf_counter() - start, flush=True)
