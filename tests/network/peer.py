"""Servers the network tests run inside their peer namespaces (python3 peer.py MODE ...):

  http ADDR PORT SIZE   answers every GET with "mss=<TCP_MAXSEG of the connection>" and SIZE
                        bytes of 'x' (the MSS shows the MTU both ends agreed on)
  dns ADDR NAME IP      answers A queries for NAME with IP, NXDOMAIN for anything else"""

from __future__ import annotations

import socket
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def http(addr: str, port: int, size: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            mss = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            body = f"mss={mss}\n".encode() + b"x" * size
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    Server((addr, port), Handler).serve_forever()


def dns(addr: str, name: str, ip: str) -> None:
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    while True:
        query, client = sock.recvfrom(512)
        ident, _flags, qdcount = struct.unpack("!HHH", query[:6])
        end = 12
        labels = []
        while query[end]:
            labels.append(query[end + 1:end + 1 + query[end]].decode())
            end += query[end] + 1
        qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
        question = query[12:end + 5]
        found = ".".join(labels).lower() == name
        answers = b""
        if found and qtype == 1:
            answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(ip)
        flags = 0x8180 if found else 0x8183
        header = struct.pack("!HHHHHH", ident, flags, qdcount, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, client)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "http":
        http(args[0], int(args[1]), int(args[2]))
    else:
        dns(*args)
