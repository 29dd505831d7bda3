"""A service that leaks file descriptors: load() raises on an empty config
and the caller keeps the exceptions (their tracebacks keep the open files
alive). Prints READY once it has leaked, then sleeps until killed."""
import os
import sys
import tempfile
import time


def load(path):
    f = open(path)
    data = f.read()
    if not data.strip():
        raise ValueError(path + " is empty")
    f.close()
    return data


errors = []
empty = os.path.join(tempfile.mkdtemp(), "empty.cfg")
open(empty, "w").close()
for _ in range(50):
    try:
        load(empty)
    except ValueError as e:
        errors.append(e)
print("READY", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 3600)
