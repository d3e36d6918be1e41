"""A registry of our own that misbehaves on purpose: an HTTP(S) server on a local address that
answers each path from a table (redirects, auth challenges, manifests with lying sizes,
endless blobs) and records every request it gets, with the scheme it came over."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TLS_HANDSHAKE = 0x16


@dataclass(frozen=True)
class Request:
    scheme: str
    path: str
    headers: dict[str, str]


Responder = Callable[["_Handler"], None]


@dataclass
class HostileRegistry:
    """Serves until close(). With `cert` (a (cert, key) pair) every connection speaks TLS, or,
    with `dual`, TLS or plain HTTP on the same port as the client opens it."""

    address: str = "127.0.0.1"
    port: int = 0
    cert: tuple[Path, Path] | None = None
    dual: bool = False
    routes: dict[str, Responder] = field(default_factory=dict)
    seen: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self
        context = None
        if self.cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.cert)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                sock.settimeout(10)
                first = b""
                with contextlib.suppress(OSError):
                    first = sock.recv(1, socket.MSG_PEEK)
                if context is not None and (not owner.dual or first[:1] == bytes([TLS_HANDSHAKE])):
                    sock = context.wrap_socket(sock, server_side=True)
                return sock, addr

        self.routes.setdefault("/v2/", json_answer({}))
        self.server = Server((self.address, self.port), _Handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def paths(self, prefix: str = "") -> list[str]:
        return [r.path for r in self.seen if r.path.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        owner: HostileRegistry = self.server.owner  # type: ignore[attr-defined]
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        owner.seen.append(Request(scheme, self.path, dict(self.headers.items())))
        path = self.path.split("?")[0]
        responder = owner.routes.get(path)
        if responder is None:
            answer(self, 404, {}, b'{"errors":[{"message":"no such thing"}]}')
            return
        responder(self)

    def log_message(self, *args: object) -> None:
        pass


def answer(handler: _Handler, status: int, headers: dict[str, str], body: bytes) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def json_answer(doc: Any, content_type: str = "application/json") -> Responder:
    body = json.dumps(doc).encode()
    return lambda h: answer(h, 200, {"Content-Type": content_type}, body)


def redirect(location: str) -> Responder:
    return lambda h: answer(h, 307, {"Location": location}, b"")


def challenge(www_authenticate: str, *, then: Responder | None = None) -> Responder:
    """401 with this challenge to requests without an Authorization header; `then` for the
    others (404 without)."""
    def respond(h: _Handler) -> None:
        if h.headers.get("Authorization") and then is not None:
            then(h)
        elif h.headers.get("Authorization"):
            answer(h, 404, {}, b"")
        else:
            answer(h, 401, {"WWW-Authenticate": www_authenticate}, b"")
    return respond


def endless(announce: int, send: int) -> Responder:
    """A blob that announces `announce` bytes and sends `send` zero bytes before it hangs up."""
    def respond(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(announce))
        h.end_headers()
        chunk = bytes(1 << 16)
        left = send
        with contextlib.suppress(OSError):
            while left > 0:
                h.wfile.write(chunk[:left])
                left -= len(chunk)
        h.close_connection = True
    return respond


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers]}
