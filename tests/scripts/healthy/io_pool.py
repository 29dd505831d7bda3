"""An I/O-bound service on a ThreadPoolExecutor: batches of short requests
(simulated I/O), workers idle on the executor's work queue between them.
Idle workers wait in the C SimpleQueue.get: no lock is contended."""
import concurrent.futures
import time


def fetch(n):
    time.sleep(0.01)  # the network
    return n


pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="io")
list(pool.map(fetch, range(8)))
print("READY", flush=True)
while True:
    list(pool.map(fetch, range(16)))
    time.sleep(0.05)
