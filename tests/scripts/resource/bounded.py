"""Bounded churn that must not be reported as a leak: a deque with
maxlen, an lru_cache with maxsize fed unique keys, and JSON documents
built, serialised and dropped. Prints READY, then serves until killed."""
import collections
import functools
import json
import os
import sys
import time

recent = collections.deque(maxlen=500)


@functools.lru_cache(maxsize=256)
def lookup(key):
    return {"key": key, "value": "v" * 64}


def churn(i):
    doc = {"rows": [{"k": j, "v": "x" * 40, "i": i} for j in range(100)]}
    text = json.dumps(doc)
    return len(json.loads(text)["rows"])


def serve(rate):
    i = 0
    while True:
        for _ in range(10):
            recent.append({"i": i, "blob": "b" * 100})
            lookup("key-%d" % i)
            churn(i)
            i += 1
        time.sleep(10.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 300)
