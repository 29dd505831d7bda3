"""Appends to a module-level list as fast as it can after printing the
address of the list's length field (for the watchpoint test)."""
import os
import sys

items = []
print("READY", os.getpid(), hex(id(items) + 16), flush=True)
sys.stdin.readline() if False else None
while True:
    for i in range(1000):
        items.append(i)
    del items[:]
