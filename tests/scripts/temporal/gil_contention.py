"""Three threads run pure-Python loops: each waits for the GIL most of the
time while another holds it."""
import threading
import time


def checksum(n):
    total = 0
    for i in range(n):  # HOT
        total = (total * 31 + i) % 1000003
    return total


def crunch():
    while True:
        checksum(200000)


for i in range(3):
    threading.Thread(target=crunch, name=f"crunch-{i}", daemon=True).start()
print("READY", flush=True)
while True:
    time.sleep(1)
