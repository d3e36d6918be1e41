"""The record of each container, written once when its create succeeds, and the stores that
keep records. `Store` is runv's: `<root>/<id>/state.json`, under an exclusive flock on
`<root>/<id>/lock` held for a whole operation, so concurrent runv processes see whole records
and serialize on one container. hyperctl keeps its records elsewhere (workload/records.py) with
the same interface. What changes while a container lives (its status, its supervisor) is
never recorded: the supervisor knows it (sandbox/vm_dir.py finds the supervisor)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, ContainerExists, ContainerNotFound

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_id(container_id: str) -> str:
    if not _ID.match(container_id):
        raise ConfigError(f"container id {container_id!r}: use 1-128 letters, digits and "
                          "'_', '.', '+', '-', starting with a letter or digit")
    return container_id


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerRecord:
    id: str
    bundle: str
    rootfs: str
    created: str          # RFC 3339
    annotations: dict[str, str] = field(default_factory=dict)
    pid: int = 0          # the host stand-in of the container process (or its holder)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ContainerRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


class RecordStore(Protocol):
    """Where the runtime keeps its container records."""

    def reserve(self, container_id: str) -> None:
        """Claim the id (ContainerExists if taken); locked() works from now on."""

    def locked(self, container_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold the container's lock (ContainerNotFound if the id is not reserved)."""

    def commit(self, record: ContainerRecord) -> None:
        """Keep the record of a created container."""

    def load(self, container_id: str) -> ContainerRecord:
        """ContainerNotFound if there is no record."""

    def release(self, container_id: str) -> None:
        """The runtime is done with the container (deleted, or its create failed)."""

    def log_path(self, container_id: str) -> Path:
        """Where the container's supervisor logs."""

    def ids(self) -> list[str]:
        """The containers with a record."""


@contextlib.contextmanager
def flocked(lock: Path, missing: str) -> Iterator[None]:
    """Hold an exclusive flock on the file `lock`; ContainerNotFound(`missing`) if it does
    not exist."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ContainerNotFound(missing) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Store:
    """runv's records under its --root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / "state.json").exists())
        except FileNotFoundError:
            return []

    def reserve(self, container_id: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        path = self.dir(container_id)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(f"container {container_id} already exists") from None
        (path / "lock").touch()

    def locked(self, container_id: str) -> contextlib.AbstractContextManager[None]:
        return flocked(self.dir(container_id) / "lock",
                       f"container {container_id} does not exist")

    def commit(self, record: ContainerRecord) -> None:
        path = self.dir(record.id)
        tmp = path / f".state.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, path / "state.json")

    def load(self, container_id: str) -> ContainerRecord:
        try:
            raw = json.loads((self.dir(container_id) / "state.json").read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f"container {container_id} does not exist") from None
        return ContainerRecord.from_json(raw)

    def release(self, container_id: str) -> None:
        shutil.rmtree(self.dir(container_id), ignore_errors=True)

    def log_path(self, container_id: str) -> Path:
        return self.dir(container_id) / "supervisor.log"
