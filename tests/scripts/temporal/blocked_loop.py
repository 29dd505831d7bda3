"""An asyncio service whose handlers block the loop: one with a synchronous
sleep, one with a CPU loop, while a ticker and echo traffic keep the loop
busy. With `--uvloop`, the same service runs on uvloop (libuv)."""
import asyncio
import sys
import time


async def ticker():
    while True:
        await asyncio.sleep(0.01)


async def slow_handler():
    while True:
        await asyncio.sleep(0.5)
        time.sleep(0.3)  # BLOCKING sleep


def digest(n):
    h = 0
    for i in range(n):  # CPU LOOP
        h = (h * 131 + i) & 0xFFFFFFFF
    return h


async def cpu_handler():
    while True:
        await asyncio.sleep(0.7)
        digest(3_000_000)  # BLOCKING cpu


async def main():
    tasks = [asyncio.ensure_future(c()) for c in (ticker, slow_handler, cpu_handler)]
    print("READY", flush=True)
    await asyncio.gather(*tasks)


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
