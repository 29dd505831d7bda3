"""An audit trail kept in a class attribute: every session records its
events in `Session.history`, shared by all instances and never trimmed.
Prints READY, then serves until killed."""
import os
import sys
import time


class Event:
    def __init__(self, user, action):
        self.user = user
        self.action = action
        self.detail = {"user": user, "action": action, "trace": list(range(16))}


class Session:
    history = []

    def __init__(self, user):
        self.user = user

    def record(self, action):
        event = Event(self.user, action)  # ALLOC
        self.history.append(event)  # RETAIN


def serve(rate):
    i = 0
    while True:
        s = Session("user-%d" % i)
        for action in ("login", "view", "logout"):
            s.record(action)
        i += 1
        time.sleep(1.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 100)
