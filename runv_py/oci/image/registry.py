"""Pulling from a registry over the OCI distribution API (HTTP or HTTPS; anonymous, basic or
bearer-token auth; image indexes with platform selection; resumable, digest-verified blobs).

The registry is not trusted (docs/security.md): a redirect may not turn HTTPS into plain HTTP,
credentials go only to the registry's own origin and to an HTTPS token realm, no request goes
to a loopback or link-local address unless the registry itself is one (checked on the
resolved addresses, and the connection is made to exactly those), and the sizes a manifest
announces are capped before anything is fetched.

The HTTP exchanges are blocking http.client calls run in worker threads (at most three blobs
at once); a cancelled pull stops its threads at the next chunk and keeps the partial blobs
for the next pull to resume."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import DigestMismatch, ImageError, RegistryError
from .blobs import Ingest
from .model import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ConfigBlob,
    Descriptor,
    Index,
    Manifest,
    Platform,
    media_type_of,
    sha256_digest,
)
from .progress import Progress, ProgressTask
from .reference import DEFAULT_REGISTRY, Reference

if TYPE_CHECKING:
    from .store import ImageStore

log = logging.getLogger(__name__)

ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
TIMEOUT_S = 60.0
CHUNK = 1 << 20
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20
MAX_LAYER = 16 << 30
MAX_IMAGE = 64 << 30   # all layers together (as the unpacker's UnpackLimits.max_bytes)
PARALLEL_BLOBS = 3
RETRIES = 3
_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """`USER:PASSWORD`, as a --creds option takes it (the password may hold ':')."""
        user, sep, password = text.partition(":")
        if not user or not sep:
            raise ImageError("credentials: use USER:PASSWORD")
        return cls(user, password)


class _Cancelled(Exception):
    """Raised in a download thread whose pull was cancelled or failed elsewhere."""


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.find("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _special_kind(address: str) -> str:
    """"loopback", "link-local" or "" for an IP address (IPv4-mapped IPv6 as its IPv4)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    return ""


def _resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (an OSError when it does not)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _connect_to(addresses: list[str], port: int, timeout: float | None) -> socket.socket:
    """A connection to the first of `addresses` that answers (the ones that were checked,
    not whatever the name resolves to by now)."""
    error: OSError = OSError(f"no address to connect to on port {port}")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            error = exc
    raise error


class RegistryClient:
    """One registry, one repository's worth of requests (tokens are scoped to it)."""

    def __init__(self, registry: str, repository: str, *, insecure: bool = False,
                 ca_file: Path | None = None, credentials: Credentials | None = None) -> None:
        self.registry = registry
        self.host = "registry-1.docker.io" if registry == DEFAULT_REGISTRY else registry
        self.repository = repository
        self.insecure = insecure
        self.ca_file = ca_file
        self.credentials = credentials
        self.allow_http = insecure or _is_loopback(self.host)
        self.scheme = ""
        self.auth = ""       # the Authorization header value once we have one
        self._home_kinds: frozenset[str] | None = None   # _special_kind() of the registry
        self.cancel = threading.Event()
        self._scheme_lock = threading.Lock()

    # -- transport -----------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise RegistryError(f"CA file {self.ca_file}: cannot use it ({exc})") from exc

    def _home(self) -> frozenset[str]:
        """What kinds of special address the registry itself has ("loopback", ...)."""
        if self._home_kinds is None:
            parts = urllib.parse.urlsplit(f"//{self.host}")
            addresses = _resolve(parts.hostname or self.host, parts.port or 443)
            self._home_kinds = frozenset(_special_kind(a) for a in addresses) - {""}
        return self._home_kinds

    def _addresses(self, url: str, parts: urllib.parse.SplitResult, port: int) -> list[str]:
        """Where `url` may be fetched from: its host's addresses, unless one of them is a
        loopback or link-local address and the registry is not one (a redirect or a token
        realm that leads to a service on this host or a cloud's metadata address)."""
        home = self._home()
        addresses = _resolve(parts.hostname or "", port)
        for address in addresses:
            kind = _special_kind(address)
            if kind and kind not in home:
                raise RegistryError(f"registry {self.registry}: refusing {url}: "
                                    f"{parts.hostname} is a {kind} address ({address}) and "
                                    "the registry is not")
        return addresses

    def _open(self, url: str, method: str, headers: dict[str, str]
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError(f"registry {self.registry}: unsupported URL {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise RegistryError(f"registry {self.registry}: bad port in {url!r}") from None
        addresses = self._addresses(url, parts, port)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.netloc, timeout=TIMEOUT_S, context=self._ssl_context())
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=TIMEOUT_S)
        conn._create_connection = (  # type: ignore[attr-defined]
            lambda _address, timeout, _source=None: _connect_to(addresses, port, timeout))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target or "/", headers={"User-Agent": "runv-py", **headers})
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _base(self) -> str:
        with self._scheme_lock:
            if not self.scheme:
                self.scheme = self._probe()
        return f"{self.scheme}://{self.host}"

    def _probe(self) -> str:
        """HTTPS, or plain HTTP for loopback/insecure registries that do not speak TLS."""
        try:
            conn, resp = self._open(f"https://{self.host}/v2/", "GET", {})
            resp.read()
            conn.close()
            return "https"
        except ssl.SSLCertVerificationError as exc:
            raise RegistryError(f"registry {self.registry}: its TLS certificate is not trusted "
                                f"({exc.verify_message}); pass the CA (--ca-file) or "
                                "--insecure") from exc
        except (ssl.SSLError, ConnectionResetError, http.client.HTTPException) as exc:
            if self.allow_http:
                log.debug("registry %s: no TLS (%s), using plain HTTP", self.registry, exc)
                return "http"
            raise RegistryError(f"registry {self.registry}: TLS failed ({exc}); for a plain "
                                "HTTP registry pass --insecure") from exc
        except OSError as exc:
            hint = ("without network access, load the image from an archive (hyperctl load)"
                    if isinstance(exc, socket.gaierror) else "is the registry running?")
            raise RegistryError(f"registry {self.registry}: cannot connect ({exc}); "
                                f"{hint}") from exc

    # -- auth ------------------------------------------------------------------------------------

    def _authenticate(self, challenge: str) -> None:
        kind, _, params_text = challenge.partition(" ")
        params = dict(_PARAM.findall(params_text))
        if kind.lower() == "basic":
            if not self.credentials:
                raise RegistryError(f"registry {self.registry}: it asks for a user name and "
                                    "password; pass credentials")
            self.auth = "Basic " + self._basic()
            return
        if kind.lower() != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.registry}: unsupported auth challenge "
                                f"{challenge!r}")
        realm = urllib.parse.urlsplit(params["realm"])
        own_host = urllib.parse.urlsplit(f"//{self.host}").hostname
        if self.credentials and realm.scheme != "https" and not (
                self.scheme == "http" and realm.hostname == own_host):
            raise RegistryError(f"registry {self.registry}: its token realm {params['realm']} "
                                "is not HTTPS; refusing to send credentials to a plain-HTTP "
                                "token realm (only a plain-HTTP registry's own host may have "
                                "one)")
        query = {"service": params.get("service", ""),
                 "scope": params.get("scope", f"repository:{self.repository}:pull")}
        url = params["realm"] + "?" + urllib.parse.urlencode(
            {k: v for k, v in query.items() if v})
        headers = {"Authorization": "Basic " + self._basic()} if self.credentials else {}
        try:
            conn, resp = self._open(url, "GET", headers)
            with contextlib.closing(conn):
                body = resp.read(MAX_MANIFEST)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"registry {self.registry}: token server {params['realm']}: "
                                f"{exc}") from exc
        if resp.status != 200:
            raise RegistryError(f"registry {self.registry}: token server refused "
                                f"({resp.status} {resp.reason}); check the credentials")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {self.registry}: the token server's answer holds "
                                "no token")
        self.auth = f"Bearer {token}"

    def _basic(self) -> str:
        assert self.credentials is not None
        pair = f"{self.credentials.username}:{self.credentials.password}"
        return base64.b64encode(pair.encode()).decode()

    def request(self, path: str, headers: dict[str, str] | None = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET `path` (under /v2/<repository>/), authenticating and following redirects.
        Returns the open connection and its response (2xx or 416); raises otherwise."""
        url = f"{self._base()}/v2/{self.repository}/{path}"
        authed = False
        for _ in range(10):
            send = dict(headers or {})
            parts = urllib.parse.urlsplit(url)
            same_host = parts.scheme == self.scheme and parts.netloc == self.host
            if self.auth and same_host:
                send["Authorization"] = self.auth
            try:
                conn, resp = self._open(url, "GET", send)
            except (OSError, http.client.HTTPException) as exc:
                raise RegistryError(f"registry {self.registry}: GET {path}: {exc}") from exc
            if resp.status == 401 and same_host and not authed:
                challenge = resp.getheader("WWW-Authenticate", "")
                conn.close()
                self._authenticate(challenge)
                authed = True
                continue
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                conn.close()
                target = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                scheme = urllib.parse.urlsplit(target).scheme
                if parts.scheme == "https" and scheme != "https":
                    raise RegistryError(f"registry {self.registry}: GET {path}: redirected "
                                        f"from https to {scheme or 'nothing'} ({target}); "
                                        "refusing the downgrade")
                url = target
                continue
            if 200 <= resp.status < 300 or resp.status == 416:
                return conn, resp
            body = resp.read(4096).decode("utf-8", "replace")
            conn.close()
            raise RegistryError(self._explain(path, resp.status, resp.reason, body))
        raise RegistryError(f"registry {self.registry}: GET {path}: too many redirects")

    def _explain(self, path: str, status: int, reason: str, body: str) -> str:
        detail = ""
        with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, AttributeError):
            detail = ": " + json.loads(body)["errors"][0]["message"]
        what = f"{self.registry}/{self.repository} {path}"
        if status == 404:
            return f"{what}: not found in the registry{detail}"
        if status in (401, 403):
            return f"{what}: access denied ({status}){detail}; check the credentials"
        return f"{what}: the registry answered {status} {reason}{detail}"

    # -- content ---------------------------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """The manifest or index bytes, their media type, and the registry's digest header."""
        conn, resp = self.request(f"manifests/{reference}", {"Accept": ACCEPT})
        with contextlib.closing(conn):
            try:
                data = resp.read(MAX_MANIFEST + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise RegistryError(f"registry {self.registry}: manifest {reference}: "
                                    f"{exc}") from exc
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"registry {self.registry}: manifest {reference} is larger "
                                f"than {MAX_MANIFEST} bytes")
        media_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            media_type = media_type_of(data)
        return data, media_type, resp.getheader("Docker-Content-Digest") or ""

    def fetch_blob(self, store: ImageStore, desc: Descriptor,
                   progress: Progress | None) -> None:
        """Download one blob into the store, resuming a partial file, retrying a broken
        connection from where it stopped, verifying digest and size."""
        with store.blobs.ingest(desc.digest, desc.size) as ingest:
            if ingest is None:
                return
            task = progress.task(f"pull {desc.digest[7:19]}", desc.size, ingest.offset) \
                if progress else None
            if ingest.offset:
                log.info("blob %s: resuming at %d of %d bytes", desc.digest, ingest.offset,
                         desc.size)
            attempt = 0
            while ingest.offset < desc.size:
                headers = {"Range": f"bytes={ingest.offset}-"} if ingest.offset else {}
                conn, resp = self.request(f"blobs/{desc.digest}", headers)
                try:
                    with contextlib.closing(conn):
                        if resp.status == 416 or (resp.status == 200 and ingest.offset):
                            log.warning("blob %s: the registry ignored the range request; "
                                        "downloading it again from the start", desc.digest)
                            ingest.restart()
                            if task:
                                task.done = 0
                            if resp.status == 416:
                                continue
                        if resp.status == 206 and not (resp.getheader("Content-Range") or "") \
                                .startswith(f"bytes {ingest.offset}-"):
                            log.warning("blob %s: the registry answered another range; "
                                        "downloading it again from the start", desc.digest)
                            ingest.restart()
                            continue
                        self._stream(resp, ingest, task)
                except (OSError, http.client.HTTPException) as exc:
                    attempt += 1
                    if attempt >= RETRIES:
                        raise RegistryError(f"registry {self.registry}: blob {desc.digest}: "
                                            f"{exc} (the next pull resumes at "
                                            f"{ingest.offset} bytes)") from exc
                    log.warning("blob %s: %s; resuming at %d bytes", desc.digest, exc,
                                ingest.offset)
                    continue
                if ingest.offset < desc.size:
                    attempt += 1
                    if attempt >= RETRIES:
                        raise RegistryError(f"registry {self.registry}: blob {desc.digest}: "
                                            f"the body ended at {ingest.offset} of {desc.size}"
                                            " bytes (the next pull resumes there)")
                    log.warning("blob %s: the connection ended early; resuming at %d bytes",
                                desc.digest, ingest.offset)
            if task:
                task.finish("pulled")

    def _stream(self, resp: http.client.HTTPResponse, ingest: Ingest,
                task: ProgressTask | None) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            if self.cancel.is_set():
                raise _Cancelled
            n = resp.readinto(buf)
            if not n:
                return
            ingest.write(view[:n])
            if task is not None:
                task.advance(n)


class Puller:
    """One `pull`: resolves the reference to a platform manifest and fetches its blobs."""

    def __init__(self, store: ImageStore, ref: Reference, *, platform: str,
                 insecure: bool, ca_file: Path | None, credentials: Credentials | None,
                 progress: Progress | None) -> None:
        self.store = store
        self.ref = ref
        self.platform = Platform.parse(platform)
        self.client = RegistryClient(ref.registry, ref.repository, insecure=insecure,
                                     ca_file=ca_file, credentials=credentials)
        self.progress = progress

    async def run(self) -> str:
        """Pull; returns the stored manifest's digest (the caller names it)."""
        lock = self.store.writing()
        await asyncio.to_thread(lock.__enter__)
        try:
            return await self._run()
        except BaseException:
            self.client.cancel.set()   # stop the download threads at their next chunk
            raise
        finally:
            lock.__exit__(None, None, None)

    async def _manifest(self, reference: str, expect: str) -> tuple[bytes, str]:
        data, media_type, header = await asyncio.to_thread(self.client.manifest, reference)
        digest = sha256_digest(data)
        want = expect or header
        if want and want != digest:
            raise DigestMismatch(f"{self.ref.registry}/{self.ref.repository}@{reference}: the "
                                 f"manifest's digest is {digest}, expected {want}")
        return data, media_type

    async def _run(self) -> str:
        what = f"{self.ref.registry}/{self.ref.repository}:{self.ref.reference}"
        data, media_type = await self._manifest(self.ref.reference, self.ref.digest)
        for _ in range(3):   # an index may point at a nested index
            if media_type not in INDEX_TYPES:
                break
            desc = Index.parse(data, f"{what} index").select(self.platform, what)
            data, media_type = await self._manifest(desc.digest, desc.digest)
        if media_type not in MANIFEST_TYPES:
            raise ImageError(f"{what}: media type {media_type!r} is not an image manifest")
        manifest = Manifest.parse(data, f"{what} manifest")
        _check_sizes(manifest, f"{what} manifest")
        await asyncio.to_thread(self.client.fetch_blob, self.store, manifest.config, None)
        config = ConfigBlob.parse(self.store.blobs.read(manifest.config.digest),
                                  f"{what} config")
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(f"{what}: the config lists {len(config.diff_ids)} diff_ids for "
                             f"{len(manifest.layers)} layers")
        if config.architecture and config.architecture != self.platform.architecture:
            log.warning("%s is built for %s/%s, not for %s", what, config.os,
                        config.architecture, self.platform)
        limit = asyncio.Semaphore(PARALLEL_BLOBS)

        async def fetch(desc: Descriptor) -> None:
            async with limit:
                await asyncio.to_thread(self.client.fetch_blob, self.store, desc,
                                        self.progress)

        tasks = [asyncio.ensure_future(fetch(layer)) for layer in manifest.layers]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            self.client.cancel.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return await asyncio.to_thread(self.store.blobs.put, data)


def _check_sizes(manifest: Manifest, what: str) -> None:
    """The sizes the manifest announces, against the caps, before anything is fetched."""
    if manifest.config.size > MAX_CONFIG:
        raise ImageError(f"{what}: config of {manifest.config.size} bytes is larger than "
                         f"the limit of {MAX_CONFIG}")
    for i, layer in enumerate(manifest.layers):
        if layer.size > MAX_LAYER:
            raise ImageError(f"{what}: layers[{i}] of {layer.size} bytes is larger than the "
                             f"limit of {MAX_LAYER}")
    total = sum(layer.size for layer in manifest.layers)
    if total > MAX_IMAGE:
        raise ImageError(f"{what}: its layers add up to {total} bytes, more than the limit "
                         f"of {MAX_IMAGE}")
