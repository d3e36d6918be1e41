"""hyperctl's own record of each container under `<data root>/containers/<id>/`: what was run
(image, command, name), how it ended (exit status, timeout), and its files (bundle, writable
layer, output log). The runtime record under the state root exists only while a VM does; this
one stays until `rm`. Names are unique through `<data root>/names/<name>` symlinks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ContainerExists, ContainerNotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Workload:
    id: str
    name: str
    image: str
    command: tuple[str, ...]
    created: float
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

    def with_(self, **changes: Any) -> Workload:
        return replace(self, **changes)


class Records:
    def __init__(self, data_root: Path) -> None:
        self.root = data_root / "containers"
        self.names = data_root / "names"

    def dir(self, workload_id: str) -> Path:
        return self.root / workload_id

    def bundle(self, workload_id: str) -> Path:
        return self.dir(workload_id) / "bundle"

    def log_path(self, workload_id: str) -> Path:
        return self.dir(workload_id) / "output.log"

    def create(self, workload: Workload) -> None:
        if not _NAME.match(workload.name):
            raise ConfigError(f"--name {workload.name!r}: use 1-63 letters, digits, '_', '.', "
                              "'-', starting with a letter or digit")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.names.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.symlink(workload.id, self.names / workload.name)
        except FileExistsError:
            raise ContainerExists(f"the name {workload.name!r} is already in use: remove that "
                                  f"container first (hyperctl rm {workload.name})") from None
        path = self.dir(workload.id)
        for sub in ("upper", "work", "bundle/rootfs"):
            (path / sub).mkdir(parents=True, mode=0o755)
        self.save(workload)

    def save(self, workload: Workload) -> None:
        path = self.dir(workload.id)
        tmp = path / f".meta.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(workload)))
        os.replace(tmp, path / "meta.json")

    def load(self, workload_id: str) -> Workload:
        try:
            raw = json.loads((self.dir(workload_id) / "meta.json").read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f"no such container: {workload_id}") from None
        raw["command"] = tuple(raw["command"])
        return Workload(**raw)

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / "meta.json").exists())
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
        return sorted(out, key=lambda w: w.created, reverse=True)

    def remove(self, workload: Workload) -> None:
        link = self.names / workload.name
        with contextlib.suppress(OSError):
            if os.readlink(link) == workload.id:
                link.unlink()
        shutil.rmtree(self.dir(workload.id), ignore_errors=True)
