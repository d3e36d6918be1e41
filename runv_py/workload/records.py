"""hyperctl's record of each container under `<data root>/containers/<id>/`: the runtime's
container record (store/state.py) extended with what was run (image, command, name), how it
ended (exit status, timeout), and its files (bundle, writable layer, output log). It is the
only record of the container: the runtime keeps nothing of its own for it (`Records` is the
runtime's store for hyperctl), and it stays until `rm`. Names are unique through
`<data root>/names/<name>` symlinks. A tenant's containers and names live under its own
directory (tenants.py) and no other tenant's `Records` sees them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import child, disk
from ..errors import ConfigError, ContainerExists, ContainerNotFound
from ..store.state import ContainerRecord, flocked
from ..timestamps import rfc3339
from .tenants import Scope

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NEW_PREFIX = ".new-"    # .new-<id>-<pid>-<start time>: a record being made by that process
GONE_PREFIX = ".gone-"  # .gone-<id>: a record being removed


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload(ContainerRecord):
    name: str
    image: str
    command: tuple[str, ...]
    created_at: float
    detached: bool = False
    auto_remove: bool = False
    tty: bool = False
    timeout_s: float | None = None
    stop_signal: str = ""
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    timed_out: bool = False
    monitor_pid: int = 0
    monitor_start: int = 0
    # The process that made the record (pid, start time): until the container starts, the
    # workload is its (the reconciler's proof of a starting container's owner).
    creator_pid: int = 0
    creator_start: int = 0
    tenant: str = ""
    log_max_size: int = 0    # output.log's rotation size (0: never rotated, older records)
    # The snapshot directory it was restored from (hyperctl restore): its VM starts from
    # there, its process runs already.
    restored_from: str = ""

    def with_(self, **changes: Any) -> Workload:
        return replace(self, **changes)


class Records:
    """One tenant's workloads under a data root; also the runtime's record store for them."""

    def __init__(self, data_root: Path, tenant: str | None = None) -> None:
        self.scope = Scope(data_root, tenant)
        self.root = self.scope.containers
        self.names = self.scope.names

    def dir(self, workload_id: str) -> Path:
        return self.root / workload_id

    def bundle(self, workload_id: str) -> Path:
        return self.dir(workload_id) / "bundle"

    def log_path(self, workload_id: str) -> Path:
        """The runtime's: where the container's supervisor logs."""
        return self.dir(workload_id) / "supervisor.log"

    def output_path(self, workload_id: str) -> Path:
        """A detached container's output."""
        return self.dir(workload_id) / "output.log"

    def create(self, workload: Workload) -> None:
        """The workload's name, directories and its record (written here, the only time the
        record is written before the container starts)."""
        if not _NAME.match(workload.name):
            raise ConfigError(f"--name {workload.name!r}: use 1-63 letters, digits, '_', '.', "
                              "'-', starting with a letter or digit")
        with disk.writing(self.scope.root, "data root"):
            self._create(workload)

    def _create(self, workload: Workload) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.names.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Made whole under a name that says who makes it, then renamed into place: a record
        # directory is never seen half-made, and the reconciler knows whose a partial one is.
        pid = os.getpid()
        new = self.root / f"{NEW_PREFIX}{workload.id}-{pid}-{child.proc_start_time(pid)}"
        name = self.names / workload.name
        linked = False
        try:
            for sub in ("upper", "work", "bundle/rootfs"):
                (new / sub).mkdir(parents=True, mode=0o755)
            (new / "lock").touch()
            self._write_meta(new, workload)
            try:
                os.symlink(workload.id, name)
            except FileExistsError:
                raise ContainerExists(f"the name {workload.name!r} is already in use: remove "
                                      f"that container first (hyperctl rm {workload.name})"
                                      ) from None
            linked = True
            os.rename(new, self.dir(workload.id))
        except BaseException:
            if linked:
                name.unlink(missing_ok=True)
            shutil.rmtree(new, ignore_errors=True)
            raise

    def save(self, workload: Workload) -> None:
        self._write_meta(self.dir(workload.id), workload)

    @staticmethod
    def _write_meta(path: Path, workload: Workload) -> None:
        tmp = path / f".meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(workload)))
        os.replace(tmp, path / "meta.json")

    def load(self, workload_id: str) -> Workload:
        try:
            raw = json.loads((self.dir(workload_id) / "meta.json").read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f"no such container: {workload_id}") from None
        if not isinstance(raw.get("created"), str):  # written before the runtime record
            raw["created_at"] = float(raw.pop("created", 0.0))
            raw["created"] = rfc3339(raw["created_at"])
            raw.setdefault("bundle", str(self.bundle(workload_id)))
            raw.setdefault("rootfs", str(self.bundle(workload_id) / "rootfs"))
        known = {f.name for f in fields(Workload)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["command"] = tuple(raw["command"])
        return Workload(**raw)

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir()
                          if not p.name.startswith(".") and (p / "meta.json").exists())
        except FileNotFoundError:
            return []

    def find(self, key: str) -> Workload:
        """By name, full id, or a unique id prefix."""
        link = self.names / key
        if _NAME.match(key) and link.is_symlink():
            return self.load(os.readlink(link))
        matches = [i for i in self.ids() if i.startswith(key)] if key else []
        if len(matches) == 1:
            return self.load(matches[0])
        if len(matches) > 1:
            raise ConfigError(f"container id prefix {key!r} is ambiguous: give more of it")
        raise ContainerNotFound(f"no such container: {key} (see hyperctl ps -a)")

    def all(self) -> list[Workload]:
        out = []
        for workload_id in self.ids():
            with contextlib.suppress(ContainerNotFound, ValueError, TypeError, KeyError):
                out.append(self.load(workload_id))
        return sorted(out, key=lambda w: w.created_at, reverse=True)

    def remove(self, workload: Workload) -> None:
        link = self.names / workload.name
        with contextlib.suppress(OSError):
            if os.readlink(link) == workload.id:
                link.unlink()
        # Renamed out of sight first: an interrupted removal leaves a directory that is
        # plainly nobody's (the reconciler removes it).
        path = self.dir(workload.id)
        gone = self.root / f"{GONE_PREFIX}{workload.id}"
        try:
            os.rename(path, gone)
        except OSError:
            gone = path
        shutil.rmtree(gone, ignore_errors=True)

    # -- the runtime's record store (store.state.RecordStore) -------------------------------

    def reserve(self, container_id: str) -> None:
        """hyperctl made the workload (create()) before it asks for its container."""
        self.load(container_id)

    def locked(self, container_id: str) -> contextlib.AbstractContextManager[None]:
        return flocked(self.dir(container_id) / "lock", f"no such container: {container_id}")

    def commit(self, record: ContainerRecord) -> None:
        """The workload, written by create(), is the record already."""

    def release(self, container_id: str) -> None:
        """The workload outlives its container (until `rm`)."""
