"""A sandbox's process audit on the host: the execve reports of the guest's agent, bounded
before anything else sees them. The guest is untrusted, so each record's argv is cut (at most
ARGV_MAX_ARGS arguments of ARG_MAX_CHARS characters each, ARGV_MAX_CHARS in all) and the
sandbox may send `rate` records a second on average, `burst` at once (a token bucket); what is
over is dropped and counted, and the count is published as a "dropped" event at most once a
DROPPED_EVERY_S (and before the container's exit). Counts the agent itself dropped (its
backlog was full) are added to the same count."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..agent import convert
from ..config import AuditConfig
from . import protocol

ARGV_MAX_ARGS = 64
ARG_MAX_CHARS = 1024
ARGV_MAX_CHARS = 4096
DROPPED_EVERY_S = 1.0


def bounded_argv(argv: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """argv within the host's bounds; True when something was cut."""
    out: list[str] = []
    room = ARGV_MAX_CHARS
    cut = len(argv) > ARGV_MAX_ARGS
    for arg in argv[:ARGV_MAX_ARGS]:
        keep = arg[:min(ARG_MAX_CHARS, room)]
        cut = cut or len(keep) < len(arg)
        out.append(keep)
        room -= len(keep)
        if room <= 0:
            cut = cut or len(out) < len(argv)
            break
    return tuple(out), cut


class AuditLimiter:
    def __init__(self, config: AuditConfig,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.rate = config.rate
        self.burst = float(config.burst)
        self._clock = clock
        self._wall = wall
        self._tokens = self.burst
        self._last = clock()
        self._dropped = 0
        self._dropped_since = clock()
        self.total_dropped = 0

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return now

    def admit(self, event: convert.Event) -> list[protocol.Event]:
        """The events to publish for one process report of the agent: none when over the
        bounds; a dropped count first when one is due."""
        started = event.process
        assert started is not None
        self.count_dropped(started.dropped)
        now = self._refill()
        out = []
        if self._dropped and now - self._dropped_since >= DROPPED_EVERY_S:
            out.append(self._dropped_event(event.container_id))
        if self._tokens < 1:
            self.count_dropped(1)
            return out
        self._tokens -= 1
        argv, cut = bounded_argv(started.argv)
        out.append(protocol.Event(type="process", id=event.container_id,
                                  process=protocol.ProcessRecord(
            time=self._wall(), guest_time=started.time_ns / 1e9, role=started.role,
            exec_id=event.exec_id[:128], pid=event.pid, ppid=started.ppid, uid=started.uid,
            euid=started.euid, argv=argv, argv_truncated=cut or started.argv_truncated,
            complete=started.complete, comm=started.comm[:16])))
        return out

    def count_dropped(self, n: int) -> None:
        """`n` records that went nowhere: told in the next dropped count."""
        if n <= 0:
            return
        if not self._dropped:
            self._dropped_since = self._clock()
        self._dropped += n
        self.total_dropped += n

    def _dropped_event(self, container_id: str) -> protocol.Event:
        event = protocol.Event(type="dropped", id=container_id, dropped=self._dropped,
                               time=self._wall())
        self._dropped = 0
        return event

    def flush(self, container_id: str) -> protocol.Event | None:
        """The count not yet published (before an exit)."""
        return self._dropped_event(container_id) if self._dropped else None
