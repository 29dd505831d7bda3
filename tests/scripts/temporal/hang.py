"""The main thread joins a worker that waits on a queue nothing will ever
fill (its producer was never started): the program hangs."""
import queue
import threading
import time

jobs = queue.Queue()


def consume():
    item = jobs.get()  # STUCK worker
    print("got", item)


worker = threading.Thread(target=consume, name="consumer")
worker.start()
time.sleep(0.2)
print("READY", flush=True)
worker.join()  # HANG main
