"""Shutdown joins a worker while holding the lock the worker needs to see
the shutdown: the main thread waits for the worker to end, the worker
waits for the lock the main thread holds."""
import threading
import time

state_lock = threading.Lock()
state = {"running": True}


def flusher():
    while True:
        time.sleep(0.05)
        with state_lock:  # WAIT flusher
            if not state["running"]:
                return


def shutdown(worker):
    with state_lock:  # HOLD shutdown
        state["running"] = False
        worker.join()  # WAIT shutdown


t = threading.Thread(target=flusher, name="flusher")
t.start()
time.sleep(0.1)
threading.Timer(0.3, lambda: print("READY", flush=True)).start()
shutdown(t)
