"""A healthy daemon at rest: the main thread waits for a shutdown Event, a
listener sits in accept(), workers idle on a job queue, a poller sleeps,
and a supervisor joins a thread that is sleeping."""
import queue
import socket
import threading
import time

stop = threading.Event()
jobs = queue.Queue()


def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    while not stop.is_set():
        conn, _ = srv.accept()
        jobs.put(conn)


def worker():
    while True:
        conn = jobs.get()
        conn.close()


def poller():
    while True:
        time.sleep(0.5)


def napper():
    time.sleep(1000)


def supervisor():
    t = threading.Thread(target=napper, name="napper", daemon=True)
    t.start()
    t.join()


for target, name in [(listener, "listener"), (poller, "poller"), (supervisor, "supervisor")]:
    threading.Thread(target=target, name=name, daemon=True).start()
for i in range(3):
    threading.Thread(target=worker, name=f"worker-{i}", daemon=True).start()
time.sleep(0.2)
print("READY", flush=True)
stop.wait()
