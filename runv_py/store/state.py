"""One container's record under --root: `<root>/<id>/state.json`, written atomically (temp file
and rename) under an exclusive flock on `<root>/<id>/lock` held for the whole operation, so
concurrent runv processes see whole records and serialize on one container."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, ContainerExists, ContainerNotFound

# Only whether the supervisor has reported; the live status is always the supervisor's.
Status = Literal["creating", "created"]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_id(container_id: str) -> str:
    if not _ID.match(container_id):
        raise ConfigError(f"container id {container_id!r}: use 1-128 letters, digits and "
                          "'_', '.', '+', '-', starting with a letter or digit")
    return container_id


def vm_dir(state_dir: Path, root: Path, container_id: str) -> Path:
    """Where the container's VM keeps its sockets and logs. Short and unique per (root, id):
    QEMU's unix socket paths must stay under 108 bytes."""
    name = hashlib.sha256(f"{root.resolve()}\0{container_id}".encode()).hexdigest()[:16]
    return state_dir / "sandboxes" / name


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    id: str
    bundle: str
    rootfs: str
    created: str
    status: Status = "creating"
    pid: int = 0             # the host stand-in of the container process
    supervisor_pid: int = 0
    supervisor_start: int = 0
    vm_dir: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    def with_(self, **changes: Any) -> ContainerRecord:
        return replace(self, **changes)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir()
                          if (p / "state.json").exists())
        except FileNotFoundError:
            return []

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[Path]:
        """Hold the container's lock; raises ContainerNotFound if it does not exist."""
        path = self.dir(container_id)
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not (path / "state.json").exists():
                raise ContainerNotFound(f"container {container_id} does not exist")
            yield path
        finally:
            os.close(fd)

    def create(self, record: ContainerRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        path = self.dir(record.id)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(f"container {record.id} already exists") from None
        (path / "lock").touch()
        self.save(record)

    def load(self, container_id: str) -> ContainerRecord:
        try:
            raw = json.loads((self.dir(container_id) / "state.json").read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None
        return ContainerRecord(**raw)

    def save(self, record: ContainerRecord) -> None:
        path = self.dir(record.id)
        tmp = path / f".state.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, path / "state.json")

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.dir(container_id), ignore_errors=True)
