"""Condition variables, events and semaphores with threads parked on them;
the main thread joins a sleeping worker."""
import threading
import time

cond = threading.Condition()
ready = threading.Event()
slots = threading.Semaphore(0)
items = []


def waits_on_condition():
    with cond:
        while not items:
            cond.wait()  # COND waiter


def waits_on_event():
    ready.wait()  # EVENT waiter


def waits_on_semaphore():
    slots.acquire()  # SEM waiter


def sleeper():
    time.sleep(1000)  # SLEEP sleeper


threads = [
    threading.Thread(target=waits_on_condition, name="cond-waiter", daemon=True),
    threading.Thread(target=waits_on_event, name="event-waiter", daemon=True),
    threading.Thread(target=waits_on_semaphore, name="sem-waiter", daemon=True),
]
for t in threads:
    t.start()
s = threading.Thread(target=sleeper, name="sleeper", daemon=True)
s.start()
time.sleep(0.3)
print("READY", flush=True)
s.join()  # JOIN main
