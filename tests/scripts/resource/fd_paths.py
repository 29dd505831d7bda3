"""Descriptors lost on an exception path and on an early return.

`load_config` opens a file and raises on an empty one before closing it;
the caller keeps the exceptions (their tracebacks keep the files open).
`read_magic` opens a raw descriptor and returns early on a bad header
without `os.close`. Well-behaved reads (`with open(...)`) run alongside.
Prints READY, then keeps serving until killed."""
import os
import sys
import tempfile
import time

DIR = tempfile.mkdtemp(prefix="pymedic-fd-")
EMPTY = os.path.join(DIR, "empty.cfg")
TEXT = os.path.join(DIR, "data.txt")
with open(EMPTY, "w"):
    pass
with open(TEXT, "w") as f:
    f.write("not a zip\n" * 10)

failures = []


def load_config(path):
    f = open(path)  # FD-LEAK-EXCEPTION
    data = f.read()
    if not data.strip():
        raise ValueError(path + " is empty")  # FD-EXIT-RAISE
    f.close()
    return data


def read_magic(path):
    fd = os.open(path, os.O_RDONLY)  # FD-LEAK-RETURN
    head = os.read(fd, 4)
    if head != b"PK\x03\x04":
        return None  # FD-EXIT-RETURN
    os.close(fd)
    return head


def healthy(path):
    with open(path) as f:
        return len(f.read())


def serve(rate):
    while True:
        try:
            load_config(EMPTY)
        except ValueError as e:
            failures.append(e)
        read_magic(TEXT)
        for _ in range(5):
            healthy(TEXT)
        time.sleep(1.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 20)
