"""Benchmark target for `cargo xtask bench dump`: 50 threads, each ~30
Python frames deep, in a mix of states: waiting for a lock held by a
sleeping thread, waiting on events, queues and sleeps, and busy."""
import queue
import threading
import time

DEPTH = 28
held = threading.Lock()
never = threading.Event()
jobs = queue.Queue()
started = threading.Barrier(51)


def holder():
    with held:
        started.wait()
        time.sleep(100000)


def park(kind):
    if kind == 0:
        with held:
            pass
    elif kind == 1:
        never.wait()
    elif kind == 2:
        time.sleep(100000)
    elif kind == 3:
        jobs.get()
    else:
        x = 0
        while True:
            x = (x + 1) % 1000003


def descend(depth, kind):
    if depth:
        return descend(depth - 1, kind)
    started.wait()
    return park(kind)


threads = [threading.Thread(target=holder, name="holder", daemon=True)]
threads += [
    threading.Thread(target=descend, args=(DEPTH, i % 5), name=f"worker-{i}", daemon=True)
    for i in range(49)
]
for t in threads:
    t.start()
started.wait()
time.sleep(0.5)
print("READY", flush=True)
time.sleep(100000)
