"""The process audit of hyperctl's containers on disk, one file per container in its tenant's
audit directory (`<scope>/audit/<id>.log`, tenants.py): one JSON object a line, each an execve
the container's guest reported (the supervisor bounded them: sandbox/audit.py) or a count of
records dropped over those bounds. The container's monitor (or a foreground `hyperctl run`)
writes it through output_log.RotatingLog: `[audit] log_max_size`, then one rotation, so at
most twice that per container; the directory keeps the logs of the newest `[audit] keep`
containers. The logs outlive `rm` (an audit trail), and a tenant's `hyperctl events` and the
API read its own directory only."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..sandbox import protocol
from ..timestamps import rfc3339
from .output_log import RotatingLog, replaced, rotated
from .records import Workload
from .tenants import Scope

SUFFIX = ".log"
_DROPPED_FIELDS = ("time", "type", "container", "id", "tenant", "dropped")
CHUNK = 65536


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of an audit log. `type` "process": an execve in container `container` (its
    name; `id` its id) as its guest reported it; "dropped": `dropped` records of that sandbox
    were over its bounds and are not in the log."""

    time: float                  # the host's clock when the supervisor received it
    type: str
    container: str
    id: str
    tenant: str
    role: str = ""               # init, exec or execve
    exec_id: str = ""
    pid: int = 0
    ppid: int = 0
    uid: int = -1
    euid: int = -1
    argv: tuple[str, ...] = ()
    argv_truncated: bool = False
    complete: bool = False
    comm: str = ""               # the task's name: what is left of a process gone too soon
    guest_time: float = 0.0      # the guest's clock: the guest's word, like all of this
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(time=rfc3339(self.time), argv=list(self.argv),
                   guest_time=rfc3339(self.guest_time) if self.guest_time > 0 else None)
        if self.type == "dropped":
            return {k: out[k] for k in _DROPPED_FIELDS}
        del out["dropped"]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AuditRecord:
        """ValueError, KeyError or TypeError for a line that is not a record."""
        values = dict(raw)
        values["time"] = parse_time(raw["time"])
        guest_time = raw.get("guest_time")
        values["guest_time"] = parse_time(guest_time) if guest_time else 0.0
        values["argv"] = tuple(str(a) for a in raw.get("argv", ()))
        return cls(**values)


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def parse_since(text: str, now: float, flag: str = "--since") -> float:
    """An RFC 3339 time, a Unix time, or a duration back from now (10m)."""
    from .options import parse_duration

    with contextlib.suppress(ValueError):
        return float(text)
    with contextlib.suppress(ValueError):
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            raise ConfigError(f"{flag} {text!r}: give a time zone (Z or +HH:MM)")
        return when.timestamp()
    try:
        return now - parse_duration(text, flag)
    except ConfigError:
        raise ConfigError(f"{flag} {text!r}: not a time (2026-12-06T10:00:00Z, a Unix time, "
                          "or a duration back from now such as 10m)") from None


def path_for(scope: Scope, workload_id: str) -> Path:
    return scope.audit / (workload_id + SUFFIX)


class AuditWriter:
    """Appends a container's records to its audit log."""

    def __init__(self, scope: Scope, workload: Workload, max_size: int, keep: int) -> None:
        scope.audit.mkdir(parents=True, exist_ok=True, mode=0o700)
        prune(scope, keep - 1)
        self.workload = workload
        self.log = RotatingLog(path_for(scope, workload.id), max_size)

    def write(self, event: protocol.Event) -> None:
        w = self.workload
        if event.type == "dropped":
            record = AuditRecord(time=event.time, type="dropped", container=w.name, id=w.id,
                                 tenant=w.tenant, dropped=event.dropped)
        elif event.type == "process" and event.process is not None:
            p = event.process
            record = AuditRecord(
                time=p.time, type="process", container=w.name, id=w.id, tenant=w.tenant,
                role=p.role, exec_id=p.exec_id, pid=p.pid, ppid=p.ppid, uid=p.uid,
                euid=p.euid, argv=p.argv, argv_truncated=p.argv_truncated,
                complete=p.complete, comm=p.comm, guest_time=p.guest_time)
        else:
            return
        self.log.write(json.dumps(record.to_json(), separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        self.log.close()


def prune(scope: Scope, keep: int) -> None:
    """Remove the oldest containers' logs beyond the newest `keep`."""
    logs = []
    for path in _logs(scope):
        with contextlib.suppress(FileNotFoundError):
            logs.append((path.stat().st_mtime, path))
    logs.sort(reverse=True)
    for _, path in logs[max(keep, 0):]:
        for gone in (path, rotated(path)):
            with contextlib.suppress(FileNotFoundError):
                gone.unlink()


def _logs(scope: Scope) -> list[Path]:
    try:
        return [p for p in scope.audit.iterdir() if p.name.endswith(SUFFIX)]
    except FileNotFoundError:
        return []


def _parse_lines(data: bytes) -> Iterator[AuditRecord]:
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            yield AuditRecord.from_json(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a rotation of a rotation


def read(scope: Scope, since: float | None = None) -> list[AuditRecord]:
    """Every record of the scope's logs (rotated files first), from `since` on, by time."""
    out: list[AuditRecord] = []
    for path in _logs(scope):
        data = b""
        for part in (rotated(path), path):
            with contextlib.suppress(FileNotFoundError):
                data += part.read_bytes()
        out.extend(r for r in _parse_lines(data) if since is None or r.time >= since)
    out.sort(key=lambda r: r.time)
    return out


class Tail:
    """New records of a scope's logs as they are written (logs of containers started later
    too), across rotations: poll() returns what was added since the last call."""

    def __init__(self, scope: Scope, *, from_start: bool, since: float | None = None) -> None:
        self.scope = scope
        self.since = since
        self._files: dict[Path, tuple[Any, bytes]] = {}  # log -> (open file, partial line)
        self._from_start = from_start
        # Opens what exists now (at its end unless from_start); the first poll() returns it.
        self._pending = self._poll()
        self._from_start = True  # logs that appear later are read whole

    def poll(self) -> list[AuditRecord]:
        out, self._pending = self._pending + self._poll(), []
        return out

    def _poll(self) -> list[AuditRecord]:
        out: list[AuditRecord] = []
        for path in _logs(self.scope):
            if path not in self._files:
                try:
                    stream = open(path, "rb")  # noqa: SIM115
                except FileNotFoundError:
                    continue
                if not self._from_start:
                    stream.seek(0, os.SEEK_END)
                self._files[path] = (stream, b"")
            out.extend(self._read(path))
        out.sort(key=lambda r: r.time)
        return [r for r in out if self.since is None or r.time >= self.since]

    def _read(self, path: Path) -> list[AuditRecord]:
        stream, partial = self._files[path]
        data = partial + stream.read()
        if not path.exists():  # pruned
            stream.close()
            del self._files[path]
            return list(_parse_lines(data))
        if replaced(path, stream.fileno()):  # rotated: the rest of the old file, then the new
            data += stream.read()
            stream.close()
            stream = open(path, "rb")  # noqa: SIM115
            data += stream.read()
        complete, _, partial = data.rpartition(b"\n")
        self._files[path] = (stream, partial)
        return list(_parse_lines(complete))

    def close(self) -> None:
        for stream, _ in self._files.values():
            stream.close()
        self._files.clear()

