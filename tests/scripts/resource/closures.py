"""Event handlers registered per message and never removed: a module-level
list of closures, each keeping its message's payload alive. Prints READY,
then serves until killed."""
import os
import sys
import time

callbacks = []


def on_message(msg_id):
    payload = ("event-%08d;" % msg_id) * 40
    callbacks.append(lambda: len(payload))  # RETAIN ALLOC


def serve(rate):
    i = 0
    while True:
        for _ in range(10):
            on_message(i)
            i += 1
        time.sleep(10.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 300)
