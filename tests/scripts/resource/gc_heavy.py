"""Long garbage-collector pauses: a large heap of long-lived container
objects, and requests whose results survive long enough to reach the
oldest generation, so full collections keep walking the whole heap.
Prints READY, then serves until killed."""
import os
import sys
import time

heap = [[i] for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1_500_000)]
recent = []


def handle(i):
    result = {"id": i, "parts": [[i], [i + 1], [i + 2]]}  # GC-TRIGGER
    recent.append(result)
    if len(recent) >= 200_000:
        del recent[:100_000]


def serve(rate):
    i = 0
    while True:
        for _ in range(1000):
            handle(i)
            i += 1
        time.sleep(1000.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
