"""A thread that spends 70 % of its wall time sleeping at one known line
(the line marked with the SLEEP-LINE comment) and the rest burning CPU, in a
loop; the main thread waits for it. Usage: sleeper.py. Prints READY.

Burning 30 ms of wall time can take longer when the machine is busy (the
thread is preempted near the end of the loop), so each sleep is sized from
the time actually slept and spent so far: over any window of a few cycles
the sleeping share stays 70 %."""
import threading
import time

SHARE = 0.7


def burn(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x


def nap(seconds):
    time.sleep(seconds)  # SLEEP-LINE


def worker():
    start = time.perf_counter()
    slept = 0.0
    while True:
        burn(0.03)
        elapsed = time.perf_counter() - start
        want = (SHARE * elapsed - slept) / (1 - SHARE)
        t0 = time.perf_counter()
        nap(min(max(want, 0.0), 0.5))
        slept += time.perf_counter() - t0


t = threading.Thread(target=worker, name="sleeper", daemon=True)
t.start()
print("READY", flush=True)
t.join()
