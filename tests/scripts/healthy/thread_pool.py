"""A ThreadPoolExecutor with busy and idle workers; the main thread waits
for results."""
import concurrent.futures
import threading
import time

lock = threading.Lock()
total = [0]


def task(n):
    end = time.time() + 1000
    while time.time() < end:
        with lock:
            total[0] += n
        sum(i * i for i in range(500))


def short(n):
    return n * 2


pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="pool")
futures = [pool.submit(task, i) for i in range(3)]
print([f.result() for f in [pool.submit(short, i) for i in range(20)]][:1])
time.sleep(0.3)
print("READY", flush=True)
concurrent.futures.wait(futures)  # WAIT main
