"""Producers and consumers on bounded queues: consumers of an empty queue
and producers into a full one block in Queue.get/put."""
import queue
import threading
import time

jobs = queue.Queue(maxsize=2)
never = queue.Queue()
full = queue.Queue(maxsize=1)
full.put("x")


def consumer():
    while True:
        item = jobs.get()  # GET consumer
        jobs.task_done()
        if item is None:
            break


def idle_consumer():
    never.get()


def blocked_producer():
    full.put("y")  # PUT producer


threads = [threading.Thread(target=consumer, name=f"consumer-{i}", daemon=True) for i in range(3)]
threads.append(threading.Thread(target=idle_consumer, name="idle-consumer", daemon=True))
threads.append(threading.Thread(target=blocked_producer, name="blocked-producer", daemon=True))
for t in threads:
    t.start()
for i in range(20):
    jobs.put(i)
time.sleep(0.3)
print("READY", flush=True)
time.sleep(1000)
