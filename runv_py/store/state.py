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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from .. import child
from ..errors import ConfigError, ContainerExists, ContainerNotFound, InvalidState

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


LOCK_POLL_S = 0.05
# A holder stopped this long (SIGSTOP, a debugger) is reported instead of waited for.
STOPPED_HOLDER_S = 2.0


@contextlib.contextmanager
def flocked(lock: Path, missing: str) -> Iterator[None]:
    """Hold an exclusive flock on the file `lock`; ContainerNotFound(`missing`) if it does
    not exist. Waits while another process holds it, unless that process is stopped: then
    InvalidState names it (a stopped `runv create` would otherwise hang every later command
    on the container)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ContainerNotFound(missing) from None
    try:
        stopped_since: float | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            holder = _flock_holder(fd)
            if holder is not None and child.state_letter(holder) in ("T", "t"):
                stopped_since = stopped_since or time.monotonic()
                if time.monotonic() - stopped_since > STOPPED_HOLDER_S:
                    raise InvalidState(
                        f"{lock.parent.name}: locked by process {child.describe(holder)}, "
                        f"which is stopped: continue it (kill -CONT {holder}) or kill it, "
                        "then retry")
            else:
                stopped_since = None
            time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)


def _flock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open at `fd`, from /proc/locks."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 24513 fe:00:2228551 0 EOF"; waiters have "->" after "1:".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            return int(fields[4])
    return None


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
