"""Content-addressed blob storage: `blobs/sha256/<hex>` holds only verified content. New content
is written to `tmp/<hex>.partial` under an flock (two processes fetching one blob take turns;
the second finds it done), checked against its digest and size, then renamed into place. A
partial file left by a killed or failed download is resumed by the next one."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ...errors import DigestMismatch
from .model import check_digest, sha256_digest

CHUNK = 1 << 20


class Ingest:
    """An open partial blob: `write()` appends and hashes; `offset` says where to resume."""

    def __init__(self, fd: int, digest: str, size: int) -> None:
        self.fd = fd
        self.digest = digest
        self.size = size
        self.hasher = hashlib.sha256()
        self.offset = 0
        while chunk := os.read(fd, CHUNK):
            self.hasher.update(chunk)
            self.offset += len(chunk)
        if size >= 0 and self.offset > size:
            self.restart()
        self.resumed_at = self.offset

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hasher = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        if self.size >= 0 and self.offset + len(data) > self.size:
            raise DigestMismatch(f"blob {self.digest}: more than the {self.size} bytes its "
                                 "descriptor announces")
        self.hasher.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.offset += len(data)

    def copy_from(self, src: IO[bytes]) -> None:
        while chunk := src.read(CHUNK):
            self.write(chunk)

    def check(self) -> None:
        actual = "sha256:" + self.hasher.hexdigest()
        if self.size >= 0 and self.offset != self.size:
            raise DigestMismatch(f"blob {self.digest}: got {self.offset} bytes, its descriptor "
                                 f"says {self.size}")
        if actual != self.digest:
            raise DigestMismatch(f"blob {self.digest}: the content's digest is {actual}; "
                                 "it was corrupted on the way or at the source")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / check_digest(digest, "blob")[7:]

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def digests(self) -> list[str]:
        return [f"sha256:{p.name}" for p in self.dir.iterdir()] if self.dir.is_dir() else []

    @contextlib.contextmanager
    def ingest(self, digest: str, size: int = -1) -> Iterator[Ingest | None]:
        """Yields None if the blob is already stored, else an Ingest to fill. A clean exit
        verifies and commits it; DigestMismatch throws the partial file away; any other error
        keeps it for a later resume."""
        final = self.path(digest)
        if final.is_file():
            yield None
            return
        partial = self.tmp / f"{digest[7:]}.partial"
        while True:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The holder before us may have committed (renamed) or discarded the file.
            try:
                same = os.stat(partial).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same or final.is_file():
                break
            os.close(fd)
        try:
            if final.is_file():
                yield None
                return
            ingest = Ingest(fd, digest, size)
            try:
                yield ingest
                ingest.check()
            except DigestMismatch:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                raise
            os.fsync(fd)   # a name in blobs/ must mean verified content, even after a crash
            os.chmod(partial, 0o644)
            os.rename(partial, final)
        finally:
            os.close(fd)

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store `data` (checked against `digest` if given); returns its digest."""
        digest = digest or sha256_digest(data)
        with self.ingest(digest, len(data)) as ingest:
            if ingest is not None:
                ingest.restart()
                ingest.write(data)
        return digest

    def put_stream(self, src: IO[bytes], digest: str, size: int = -1) -> None:
        with self.ingest(digest, size) as ingest:
            if ingest is not None:
                ingest.restart()
                ingest.copy_from(src)
