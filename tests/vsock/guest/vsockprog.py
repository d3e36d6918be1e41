"""Runs in the guest (shipped by copy_file, run in a container with the guest's python3).

serve PORT: echo every connection on vsock PORT; a connection that starts with "SUM <n>\\n"
  instead gets n bytes read to EOF (the host half-closes) and answers their sha256.
send PORT NBYTES: connect to the host (CID 2) on PORT, send NBYTES of a pattern, half-close,
  print the sha256 of what was sent and the host's reply.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading


def pattern(size: int) -> bytes:
    return hashlib.sha256(b"runv").digest() * (size // 32)


def handle(conn: socket.socket) -> None:
    with conn:
        first = conn.recv(65536)
        if first.startswith(b"SUM "):
            _line, _, rest = first.partition(b"\n")
            digest = hashlib.sha256(rest)
            total = len(rest)
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
            return
        data = first
        while data:
            conn.sendall(data)
            data = conn.recv(65536)


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def send(port: int, size: int) -> None:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((socket.VMADDR_CID_HOST, port))
    block = pattern(1 << 20)
    digest = hashlib.sha256()
    left = size
    while left:
        part = block[:min(left, len(block))]
        sock.sendall(part)
        digest.update(part)
        left -= len(part)
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    print(digest.hexdigest(), reply.decode().strip(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        send(int(sys.argv[2]), int(sys.argv[3]))
