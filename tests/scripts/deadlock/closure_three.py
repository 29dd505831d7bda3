"""Three threads in a cycle over three Locks captured by closures."""
import threading
import time

start = threading.Barrier(3)


def make_stage(mine, next_stage_lock):
    def stage():
        with mine:  # HOLD stage
            start.wait()
            with next_stage_lock:  # WAIT stage
                print("unreachable")

    return stage


locks = [threading.Lock() for _ in range(3)]
threads = [
    threading.Thread(target=make_stage(locks[i], locks[(i + 1) % 3]), name=f"stage-{i}")
    for i in range(3)
]
for t in threads:
    t.start()
time.sleep(0.2)
print("READY", flush=True)
for t in threads:
    t.join()
