"""Stack shapes the unwinder must handle, burning CPU forever:
* THREADS threads (default 200), each alternating a 0.2 ms burn and a 100 ms sleep;
* one thread recursing DEPTH (default 200) frames deep before burning;
* an asyncio event loop running a coroutine chain (outer_coro → inner_coro)
  and a generator (gen_producer) that burn CPU.
Usage: shapes.py [THREADS] [DEPTH]. Prints READY when all are running."""
import asyncio
import sys
import threading
import time


def burn(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x


def idle_worker():
    while True:
        burn(0.0002)
        time.sleep(0.1)


def recurse(n):
    if n == 0:
        while True:
            deep_leaf()
    return recurse(n - 1)


def deep_leaf():
    burn(0.01)


def gen_producer():
    while True:
        burn(0.002)
        yield 1


async def inner_coro():
    burn(0.005)
    await asyncio.sleep(0)


async def outer_coro():
    gen = gen_producer()
    while True:
        await inner_coro()
        next(gen)


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    sys.setrecursionlimit(depth + 1000)
    for i in range(threads):
        threading.Thread(target=idle_worker, name=f"idle-{i}", daemon=True).start()
    threading.Thread(target=recurse, args=(depth,), name="deep", daemon=True).start()
    print("READY", flush=True)
    asyncio.run(outer_coro())


main()
