"""A thread that sleeps 70 % of its wall time at one known line (marked
SLEEP-LINE) and burns CPU the other 30 %, in a loop; the main thread waits.
Usage: sleeper.py. Prints READY when running."""
import threading
import time


def burn(seconds):
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x


def nap(seconds):
    time.sleep(seconds)  # SLEEP-LINE


def worker():
    while True:
        nap(0.07)
        burn(0.03)


t = threading.Thread(target=worker, name="sleeper", daemon=True)
t.start()
print("READY", flush=True)
t.join()
