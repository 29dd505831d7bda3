"""A response cache keyed by a unique request id: every request adds an
entry and nothing ever evicts. JSON churn (garbage that is freed) runs
alongside. Prints READY, then serves until killed."""
import json
import os
import sys
import time
import uuid

_responses = {}


def render(request_id):
    body = {"id": request_id, "items": [{"n": i, "label": "item-%d" % i} for i in range(8)]}  # ALLOC
    return body


def handle(request_id):
    response = render(request_id)
    _responses[request_id] = response  # RETAIN
    return json.dumps(response)


def churn():
    doc = {"rows": [{"k": i, "v": "x" * 40} for i in range(50)]}
    return len(json.loads(json.dumps(doc)))


def serve(rate):
    while True:
        for _ in range(10):
            handle(uuid.uuid4().hex)
            churn()
        time.sleep(10.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 300)
