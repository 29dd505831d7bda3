"""Threads started per request and never joined: each waits for a reply
on its own queue that nobody ever answers. Prints READY, then serves
until killed."""
import os
import queue
import sys
import threading
import time

workers = []


def wait_for_reply(inbox):
    inbox.get()  # nobody ever puts: the thread never ends


def handle(request_id):
    inbox = queue.Queue()
    t = threading.Thread(target=wait_for_reply, args=(inbox,), name=f"reply-{request_id}", daemon=True)
    t.start()  # THREAD-LEAK
    workers.append(t)


def short_job():
    time.sleep(0.01)


def serve(rate):
    i = 0
    while True:
        handle(i)
        done = threading.Thread(target=short_job)
        done.start()
        done.join()
        i += 1
        time.sleep(1.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 5)
