"""`cargo xtask bench leak` target: allocation-heavy work (many small
objects, JSON encode/decode churn, a bounded working set). Prints READY;
for each line read from stdin runs the same fixed amount of work and
prints `DONE <cpu seconds> <wall seconds>`."""
import json
import os
import select
import sys
import time


def work(n):
    keep = []
    for i in range(n):
        batch = [{"id": i, "tags": ["a", "b", str(j)], "at": (i, j)} for j in range(20)]
        text = json.dumps(batch)
        back = json.loads(text)
        keep.append(back[i % 20])
        if len(keep) > 2000:
            del keep[:1000]
    return len(keep)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40_000
    print("READY", os.getpid(), flush=True)
    while True:
        # Wait for an order while running Python code now and then: tools
        # that attach through the interpreter (memray attach) need that.
        while not select.select([sys.stdin], [], [], 0.05)[0]:
            pass
        if not sys.stdin.readline():
            break
        c0, t0 = time.process_time(), time.perf_counter()
        work(n)
        print("DONE", time.process_time() - c0, time.perf_counter() - t0, flush=True)
