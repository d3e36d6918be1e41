"""runv-vsock in kernel mode: with kernel vhost-vsock the guest is reached by AF_VSOCK, which
grpcio cannot dial, so each --forward unix listener splices its connections to AF_VSOCK
(cid, port). A connection the guest refuses (no listener yet, the agent while the guest boots)
is retried for --connect-wait seconds. One thread per connection: these carry the agent's few
connections."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .keeper import forward_spec, listen_all, remove

log = logging.getLogger("runv-vsock")
RETRY_S = 0.02


def _connect(cid: int, port: int, wait_s: float) -> socket.socket | None:
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.connect((cid, port))
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                log.debug("guest port %d: %s", port, exc.strerror)
                return None
            time.sleep(RETRY_S)


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 18):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)
            src.shutdown(socket.SHUT_RDWR)


def _splice(client: socket.socket, cid: int, port: int, wait_s: float) -> None:
    with client:
        guest = _connect(cid, port, wait_s)
        if guest is None:
            return
        with guest:
            back = threading.Thread(target=_copy, args=(guest, client), daemon=True)
            back.start()
            _copy(client, guest)
            back.join()


def _serve(listener: socket.socket, cid: int, port: int, wait_s: float) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_splice, args=(client, cid, port, wait_s), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runv_py.vsock.forward",
        description="Forward unix sockets to guest vsock ports over kernel vhost-vsock.")
    parser.add_argument("--cid", type=int, required=True, help="the guest's CID")
    parser.add_argument("--forward", type=forward_spec, action="append", required=True,
                        metavar="PATH=PORT")
    parser.add_argument("--connect-wait", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s runv-vsock[%(process)d] %(levelname)s %(message)s")
    paths: list[Path] = [path for path, _ in args.forward]
    try:
        sockets = listen_all(paths)
    except OSError as exc:
        log.error("cannot listen on %s: %s", exc.filename, exc.strerror)
        return 1
    listeners = [(sock, port) for sock, (_, port) in zip(sockets, args.forward, strict=True)]

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        for listener, port in listeners:
            threading.Thread(target=_serve, args=(listener, args.cid, port, args.connect_wait),
                             daemon=True).start()
        log.info("forwarding to guest CID %d", args.cid)
        while True:
            signal.pause()
    finally:
        remove(paths)


if __name__ == "__main__":
    raise SystemExit(main())
