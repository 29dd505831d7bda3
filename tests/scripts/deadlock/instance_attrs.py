"""Bank transfers lock `self._lock` then `other._lock`: two opposite
transfers deadlock. Locks are instance attributes."""
import threading
import time

start = threading.Barrier(2)


class Account:
    def __init__(self, name, balance):
        self.name = name
        self.balance = balance
        self._lock = threading.Lock()

    def deposit(self, amount):
        with self._lock:  # WAIT transfer
            self.balance += amount

    def transfer(self, other, amount):
        with self._lock:  # HOLD transfer
            start.wait()
            self.balance -= amount
            other.deposit(amount)


alice = Account("alice", 100)
bob = Account("bob", 100)
threads = [
    threading.Thread(target=alice.transfer, args=(bob, 10), name="alice-to-bob"),
    threading.Thread(target=bob.transfer, args=(alice, 20), name="bob-to-alice"),
]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
