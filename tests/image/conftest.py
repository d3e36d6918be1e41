"""Fixtures for the image tests: Debian's docker-registry on 127.0.0.1 (plain HTTP, HTTPS with
a test CA, or token auth with a test token server), filled with skopeo from local layouts."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runv_py.oci.image import ImageStore

USER, PASSWORD = "tester", "s3cret"


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, cwd=cwd)
    if result.returncode:
        raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Certs:
    dir: Path
    ca: Path
    cert: Path
    key: Path


def make_certs(dir: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    dir.mkdir()
    (dir / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "2", "-subj", "/CN=runv-py test CA", cwd=dir)
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=dir)
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf", cwd=dir)
    return Certs(dir, dir / "ca.crt", dir / "server.crt", dir / "server.key")


class TokenServer:
    """Issues registry JWTs (RS256, signed by a test key with openssl) to callers presenting
    USER/PASSWORD by basic auth; refuses everyone else."""

    def __init__(self, dir: Path) -> None:
        dir.mkdir()
        self.dir = dir
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "token.key",
            "-out", "token.crt", "-days", "2", "-subj", "/CN=runv-py test token issuer", cwd=dir)
        der = run("openssl", "x509", "-in", "token.crt", "-outform", "PEM", cwd=dir)
        self.x5c = "".join(line for line in der.splitlines() if "CERTIFICATE" not in line)
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": owner.token(query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": "runv-py-test", "sub": USER, "aud": "runv-py-registry",
                  "exp": now + 600, "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
                  "access": access}
        signing_input = ".".join(b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.dir / "token.key")],
            input=signing_input.encode(), capture_output=True, check=True, timeout=30).stdout
        return f"{signing_input}.{b64url(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Registry:
    host: str                 # "127.0.0.1:PORT"
    data: Path                # its storage root
    process: subprocess.Popen[bytes]
    log: Path
    certs: Certs | None = None
    token: TokenServer | None = None
    basic: bool = False
    pushed: list[str] = field(default_factory=list)

    def push(self, layout: Path, tag: str, dest: str, *, all_platforms: bool = False) -> None:
        """skopeo copy oci:<layout>:<tag> docker://<host>/<dest>."""
        argv = ["skopeo", "--insecure-policy", "copy", "-q"]
        if all_platforms:
            argv.append("--all")
        if self.certs:
            argv += ["--dest-cert-dir", str(self.certs.dir / "skopeo")]
        else:
            argv.append("--dest-tls-verify=false")
        if self.token or self.basic:
            argv += ["--dest-creds", f"{USER}:{PASSWORD}"]
        run(*argv, f"oci:{layout}:{tag}", f"docker://{self.host}/{dest}")
        self.pushed.append(dest)

    def blob_file(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.data / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """start(tls=False, token=False) runs a docker-registry on a free 127.0.0.1 port."""
    started: list[Registry] = []

    def start(*, tls: bool = False, token: bool = False, basic: bool = False) -> Registry:
        n = len(started)
        port = free_port()
        data = tmp_path / f"registry{n}"
        data.mkdir()
        config = [
            "version: 0.1",
            "log:", "  level: warn", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {data}",
            "http:", f"  addr: 127.0.0.1:{port}",
        ]
        certs = server = None
        if tls:
            certs = make_certs(tmp_path / f"certs{n}")
            (certs.dir / "skopeo").mkdir()
            (certs.dir / "skopeo" / "ca.crt").write_bytes(certs.ca.read_bytes())
            config += ["  tls:", f"    certificate: {certs.cert}", f"    key: {certs.key}"]
        if token:
            server = TokenServer(tmp_path / f"token{n}")
            config += ["auth:", "  token:", f"    realm: {server.url}",
                       "    service: runv-py-registry", "    issuer: runv-py-test",
                       f"    rootcertbundle: {server.dir / 'token.crt'}"]
        if basic:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt
            hashed = crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
            (data / "htpasswd").write_text(f"{USER}:{hashed}\n")
            config += ["auth:", "  htpasswd:", "    realm: runv-py-test",
                       f"    path: {data / 'htpasswd'}"]
        (data / "config.yml").write_text("\n".join(config) + "\n")
        log = tmp_path / f"registry{n}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(["docker-registry", "serve", str(data / "config.yml")],
                                       stdout=out, stderr=subprocess.STDOUT)
        reg = Registry(f"127.0.0.1:{port}", data, process, log, certs, server, basic)
        started.append(reg)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not start: {log.read_text()}")
            time.sleep(0.05)
        return reg

    yield start
    for reg in started:
        reg.process.send_signal(signal.SIGTERM)
        try:
            reg.process.wait(10)
        except subprocess.TimeoutExpired:
            reg.process.kill()
            reg.process.wait()
        if reg.token:
            reg.token.close()
