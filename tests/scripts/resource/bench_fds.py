"""`cargo xtask bench leak` fd target: opens and closes files at a paced
10,000 opens per second (with a little work per file). Prints READY; for
each line read from stdin does the same fixed number of opens and prints
`DONE <cpu seconds> <wall seconds>`."""
import os
import select
import sys
import time

RATE = 10_000
PATHS = ["/dev/null", "/proc/self/stat", sys.executable]


def work(total):
    start = time.perf_counter()
    for i in range(total):
        with open(PATHS[i % 3], "rb") as f:
            f.read(16)
        if i % 100 == 99:
            # Pace: sleep until this many opens are due.
            ahead = start + (i + 1) / RATE - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
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
