"""Healthy: a dispatcher makes one job at a time, each with its own lock,
and hands it to one worker; `loader` nests job.lock inside the shared
lock's region the other way round from `saver`, but no job is ever seen
by both, so there is no inversion. A freed job's lock and the next job's
lock usually share both addresses (object and semaphore, measured on
3.8-3.13 and Debian's 3.11: the dispatcher frees each job itself): a
detector that identified locks by address alone would report a false
inversion."""
import queue
import threading
import time

shared = threading.Lock()


class Job:
    def __init__(self, n):
        self.n = n
        self.lock = threading.Lock()


def saver(jobs, done):
    while True:
        job = jobs.get()
        with job.lock:  # job, then shared
            with shared:
                time.sleep(0.03)
        job = None
        done.put(1)


def loader(jobs, done):
    while True:
        job = jobs.get()
        with shared:  # shared, then job
            with job.lock:
                time.sleep(0.03)
        job = None
        done.put(1)


queues = {}
for name, work in (("saver", saver), ("loader", loader)):
    jobs, done = queue.Queue(), queue.Queue()
    queues[name] = (jobs, done)
    threading.Thread(target=work, args=(jobs, done), name=name, daemon=True).start()

print("READY", flush=True)
while True:
    for name in ("saver", "loader"):
        jobs, done = queues[name]
        job = Job(name)
        jobs.put(job)
        done.get()
        job = None  # freed here, by the thread that made it
