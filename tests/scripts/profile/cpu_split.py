"""Burns CPU in three functions with a known split (60/30/10 %) in several
threads, forever. Usage: cpu_split.py [THREADS]. Prints READY when running.

Each thread repeats: burn_a for 6 ms, burn_b for 3 ms, burn_c for 1 ms of
its own CPU time (time.thread_time), so whatever the GIL does, the share of
CPU each function gets is 60/30/10."""
import sys
import threading
import time


def spin(ms):
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i
    return x


def burn_a():
    return spin(6)


def burn_b():
    return spin(3)


def burn_c():
    return spin(1)


def worker():
    while True:
        burn_a()
        burn_b()
        burn_c()


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for i in range(n - 1):
        threading.Thread(target=worker, name=f"burner-{i}", daemon=True).start()
    print("READY", flush=True)
    worker()


main()
