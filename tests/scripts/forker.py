"""Forks a Python child (no exec, like gunicorn workers), reports its pid,
lets it run briefly, then reaps it."""
import os
import sys
import time

print("READY", flush=True)
time.sleep(1.0)
print("FORK", flush=True)
pid = os.fork()
if pid == 0:
    time.sleep(1.5)
    os._exit(0)
print(f"CHILD {pid}", flush=True)
os.waitpid(pid, 0)
time.sleep(3600)
