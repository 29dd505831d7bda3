"""Bank transfers lock the source account, then the destination: two
tellers moving money in opposite directions take the same two locks in
opposite orders (they take turns, so it has not deadlocked yet)."""
import threading
import time


class Account:
    def __init__(self, name, balance):
        self.name = name
        self.balance = balance
        self.lock = threading.Lock()


def transfer(src, dst, amount):
    with src.lock:  # OUTER transfer
        time.sleep(0.002)
        with dst.lock:  # INNER transfer
            src.balance -= amount
            dst.balance += amount
            time.sleep(0.02)


checking = Account("checking", 100)
savings = Account("savings", 100)
turns = [threading.Event(), threading.Event()]


def teller(i, src, dst):
    while True:
        turns[i].wait()
        turns[i].clear()
        for _ in range(5):
            transfer(src, dst, 1)
        turns[1 - i].set()


threading.Thread(target=teller, args=(0, checking, savings), name="teller-0", daemon=True).start()
threading.Thread(target=teller, args=(1, savings, checking), name="teller-1", daemon=True).start()
turns[0].set()
print("READY", flush=True)
while True:
    time.sleep(1)
