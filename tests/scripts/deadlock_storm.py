"""Makes deadlocks at a high rate: keeps CONCURRENCY forked children alive,
each of which deadlocks two threads (opposite lock order) and exits after
LIFETIME seconds; every child is a new process, so a new finding that opens
and then resolves. Prints READY once the first children run; runs until
killed (the parent kills its children when it gets SIGTERM).

    deadlock_storm.py [CONCURRENCY] [LIFETIME]
"""
import os
import signal
import sys
import threading
import time

concurrency = int(sys.argv[1]) if len(sys.argv) > 1 else 8
lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 1.5


def child():
    a, b = threading.Lock(), threading.Lock()
    both = threading.Barrier(2)

    def forward():
        with a:
            both.wait()
            with b:  # WAIT forward
                pass

    def backward():
        with b:
            both.wait()
            with a:  # WAIT backward
                pass

    for fn in (forward, backward):
        threading.Thread(target=fn, name=fn.__name__, daemon=True).start()
    time.sleep(lifetime)
    os._exit(0)


children = set()


def stop(*_):
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


signal.signal(signal.SIGTERM, stop)
ready = False
while True:
    while len(children) < concurrency:
        pid = os.fork()
        if pid == 0:
            child()
        children.add(pid)
        time.sleep(lifetime / concurrency)
    if not ready:
        print("READY", flush=True)
        ready = True
    pid, _ = os.wait()
    children.discard(pid)
