"""A native leak: each frame is decoded into a buffer malloc'd through
ctypes and never freed (as a C extension that forgets to free would).
No Python object grows. Prints READY, then runs until killed."""
import ctypes
import ctypes.util
import os
import sys
import time

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.memset.restype = ctypes.c_void_p
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

FRAME = 64 * 1024


def decode_frame(n):
    return libc.memset(libc.malloc(n), 7, n)  # NATIVE-LEAK


def serve(rate):
    while True:
        decode_frame(FRAME)
        time.sleep(1.0 / rate)


if __name__ == "__main__":
    print("READY", os.getpid(), flush=True)
    serve(float(sys.argv[1]) if len(sys.argv) > 1 else 40)
