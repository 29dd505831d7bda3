"""A client that opens a connection per request and never closes it (the
responses keep their sockets). A local echo server answers in a thread
and closes its side properly. Prints READY, then runs until killed."""
import os
import socket
import sys
import threading
import time

responses = []


def echo_server(srv):
    while True:
        conn, _ = srv.accept()
        with conn:
            data = conn.recv(64)
            conn.sendall(data)


class Response:
    def __init__(self, sock, body):
        self.sock = sock
        self.body = body


def fetch(addr, payload):
    sock = socket.create_connection(addr)  # SOCKET-LEAK
    sock.sendall(payload)
    body = sock.recv(64)
    return Response(sock, body)


def serve(addr, rate):
    while True:
        responses.append(fetch(addr, b"ping"))
        time.sleep(1.0 / rate)


if __name__ == "__main__":
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    threading.Thread(target=echo_server, args=(srv,), daemon=True).start()
    print("READY", os.getpid(), flush=True)
    serve(srv.getsockname(), float(sys.argv[1]) if len(sys.argv) > 1 else 20)
