"""Locks reached as attributes of an imported module (`shared_locks.orders`),
one Lock and one RLock, in opposite order."""
import threading
import time

import shared_locks

start = threading.Barrier(2)


def place_order():
    with shared_locks.orders:  # HOLD place_order
        start.wait()
        with shared_locks.inventory:  # WAIT place_order
            print("unreachable")


def restock():
    with shared_locks.inventory:  # HOLD restock
        start.wait()
        with shared_locks.orders:  # WAIT restock
            print("unreachable")


threads = [threading.Thread(target=place_order, name="orders"), threading.Thread(target=restock, name="restock")]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
