"""Two threads take the same two locks in opposite orders, but never at the
same time (they take turns through Events), so the program does not
deadlock — yet. A lock-order inversion."""
import threading
import time

orders_lock = threading.Lock()
stock_lock = threading.Lock()
turn_a = threading.Event()
turn_b = threading.Event()


def place_order():
    with orders_lock:  # OUTER place_order
        time.sleep(0.002)
        with stock_lock:  # INNER place_order
            time.sleep(0.02)


def restock():
    with stock_lock:  # OUTER restock
        time.sleep(0.002)
        with orders_lock:  # INNER restock
            time.sleep(0.02)


def run(work, mine, other):
    while True:
        mine.wait()
        mine.clear()
        for _ in range(5):
            work()
            time.sleep(0.005)
        other.set()


threading.Thread(target=run, args=(place_order, turn_a, turn_b), name="orders", daemon=True).start()
threading.Thread(target=run, args=(restock, turn_b, turn_a), name="stock", daemon=True).start()
turn_a.set()
print("READY", flush=True)
while True:
    time.sleep(1)
