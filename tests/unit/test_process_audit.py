"""The host's side of the process audit: the supervisor's bounds on what a guest reports
(sandbox/audit.py), who gets the records (through the real control socket, over the fake
agent), and the audit logs on disk (workload/audit_log.py)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runv_py import config as config_mod
from runv_py.agent import convert
from runv_py.errors import ConfigError
from runv_py.sandbox import audit, protocol
from runv_py.sandbox.protocol import Start
from runv_py.workload import audit_log
from runv_py.workload.records import Workload
from runv_py.workload.tenants import Scope
from tests.unit.test_supervisor import _run, _sandbox


def _exec(argv: tuple[str, ...] = ("ls", "/"), *, container: str = "c1", dropped: int = 0,
          role: str = "execve") -> convert.Event:
    return convert.Event("process", container, "", pid=40, process=convert.ProcessStarted(
        role, 39, 1000, 1000, argv, False, True, 1_700_000_000_000_000_000, dropped, "ls"))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_argv_is_cut_to_the_hosts_bounds() -> None:
    assert audit.bounded_argv(("ls", "-l")) == (("ls", "-l"), False)
    many, cut = audit.bounded_argv(tuple(str(i) for i in range(1000)))
    assert cut and len(many) == audit.ARGV_MAX_ARGS
    long, cut = audit.bounded_argv(("x" * 100_000,))
    assert cut and long == ("x" * audit.ARG_MAX_CHARS,)
    wide, cut = audit.bounded_argv(tuple("y" * 1000 for _ in range(20)))
    assert cut and sum(map(len, wide)) == audit.ARGV_MAX_CHARS


def test_over_the_rate_records_are_dropped_and_counted() -> None:
    clock = Clock()
    limiter = audit.AuditLimiter(config_mod.AuditConfig(rate=10, burst=5), clock, clock)
    published = [e for _ in range(50) for e in limiter.admit(_exec())]
    assert [e.type for e in published] == ["process"] * 5  # the burst; the rest dropped
    clock.now += 1.0   # ten more tokens (the bucket holds five) and the count is due
    published = [e for _ in range(50) for e in limiter.admit(_exec())]
    assert published[0].type == "dropped" and published[0].dropped == 45
    assert [e.type for e in published[1:]] == ["process"] * 5
    # The agent's own drops join the count; the rest goes out before the exit.
    limiter.admit(_exec(dropped=1000))
    flushed = limiter.flush("c1")
    assert flushed is not None and flushed.dropped == 45 + 1000 + 1
    assert limiter.flush("c1") is None
    assert limiter.total_dropped == 45 + 45 + 1001


def test_a_record_carries_the_hosts_time_and_the_guests() -> None:
    clock = Clock()
    (event,) = audit.AuditLimiter(config_mod.AuditConfig(), clock, clock).admit(
        _exec(("a" * 5000,), role="init"))
    p = event.process
    assert p is not None and (p.time, p.guest_time, p.role, p.pid, p.ppid) == (
        100.0, 1_700_000_000.0, "init", 40, 39)
    assert p.argv_truncated and len(p.argv[0]) == audit.ARG_MAX_CHARS


def test_the_audit_section_of_the_config() -> None:
    config = config_mod.parse("[audit]\nrate = 5\nburst = 10\nlog_max_size = 65536\n", "t")
    assert (config.audit.rate, config.audit.burst, config.audit.log_max_size) == (5.0, 10, 65536)
    with pytest.raises(ConfigError, match=r"\[audit\]: burst must be between"):
        config_mod.parse("[audit]\nburst = 0\n", "t")
    with pytest.raises(ConfigError, match=r"\[audit\]: unknown key 'rat'"):
        config_mod.parse("[audit]\nrat = 5\n", "t")


def test_only_audit_listeners_get_process_records(tmp_path: Path) -> None:
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            plain = await box.client.subscribe("c1")
            audited = await box.client.subscribe("c1", audit=True)
            for _ in range(3):
                box.vm.agent.events_queue.put_nowait(_exec())
            # a process of another container of the sandbox is not c1's
            box.vm.agent.events_queue.put_nowait(_exec(("other",), container="c2"))
            box.vm.agent.events_queue.put_nowait(_exec(("gone",), container=""))
            await asyncio.sleep(0.2)
            box.vm.agent.exit("c1", code=0)
            got = [e async for e in audited]
            assert [(e.type, e.id) for e in got] == [("process", "c1")] * 3 + [
                ("process", ""), ("exit", "c1")]
            assert [e.type async for e in plain] == ["exit"]

    _run(test)


def test_a_listener_that_does_not_read_holds_a_bounded_backlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runv_py.sandbox.supervisor import server

    monkeypatch.setattr(server, "AUDIT_LISTENER_BACKLOG", 5)

    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            audited = await box.client.subscribe("c1", audit=True)
            for _ in range(15):
                box.vm.agent.events_queue.put_nowait(_exec())
            await asyncio.sleep(0.3)
            box.vm.agent.exit("c1", code=0)
            got = [(e.type, e.dropped) async for e in audited]
            assert got == [("process", 0)] * 5 + [("dropped", 10), ("exit", 0)]

    _run(test)


def test_the_agents_drops_just_before_an_exit_are_counted(tmp_path: Path) -> None:
    """The agent's backlog overflowed with the container's last execs: no process event
    follows to carry the count, so its exit event does, and the count goes out before the
    exit."""
    async def test() -> None:
        async with _sandbox(tmp_path) as box:
            await box.client.call(Start(container="c1"))
            audited = await box.client.subscribe("c1", audit=True)
            box.vm.agent.events_queue.put_nowait(_exec())
            box.vm.agent.events_queue.put_nowait(convert.Event("exit", "c1", dropped=7))
            await asyncio.sleep(0.2)
            box.vm.agent.exit("c1", code=0)
            got = [(e.type, e.dropped) async for e in audited]
            assert got == [("process", 0), ("dropped", 7), ("exit", 0)]

    _run(test)


def _workload(wid: str = "a" * 32) -> Workload:
    return Workload(id=wid, bundle="/b", rootfs="/r", created="now", name="job", image="i",
                    command=("sh",), created_at=0.0, tenant="acme")


def _record(n: int, t: float = 1000.0) -> protocol.Event:
    return protocol.Event(type="process", id="c", process=protocol.ProcessRecord(
        time=t + n, guest_time=t, role="execve", exec_id="", pid=n, ppid=1, uid=0, euid=0,
        argv=("echo", str(n)), argv_truncated=False, complete=True))


def test_the_audit_log_is_rotated_and_read_back_in_order(tmp_path: Path) -> None:
    scope = Scope(tmp_path, "acme")
    writer = audit_log.AuditWriter(scope, _workload(), max_size=4096, keep=10)
    for n in range(500):
        writer.write(_record(n))
    writer.write(protocol.Event(type="dropped", id="c", dropped=77, time=5000.0))
    writer.close()
    sizes = [p.stat().st_size for p in scope.audit.iterdir()]
    assert len(sizes) == 2 and max(sizes) <= 4096   # the log and one rotation, no more
    records = audit_log.read(scope)
    assert records[-1].type == "dropped" and records[-1].dropped == 77
    pids = [r.pid for r in records[:-1]]
    assert pids == sorted(pids) and pids[-1] == 499 and len(pids) < 500  # the oldest are gone
    assert records[0].to_json()["container"] == "job" and records[0].tenant == "acme"
    assert [r.pid for r in audit_log.read(scope, since=1000.0 + 495)][:5] == [495, 496, 497,
                                                                             498, 499]
    # Another tenant's scope has none of it.
    assert audit_log.read(Scope(tmp_path, "other")) == []
    assert audit_log.read(Scope(tmp_path, None)) == []


def test_only_the_newest_containers_logs_are_kept(tmp_path: Path) -> None:
    scope = Scope(tmp_path, None)
    for i in range(5):
        writer = audit_log.AuditWriter(scope, _workload(f"{i:032x}"), max_size=4096, keep=3)
        writer.write(_record(i))
        writer.close()
        os.utime(audit_log.path_for(scope, f"{i:032x}"), (i, i))
    assert sorted(p.name[:32] for p in scope.audit.iterdir()) == [f"{i:032x}" for i in (2, 3, 4)]


def test_tail_follows_new_records_across_rotation(tmp_path: Path) -> None:
    scope = Scope(tmp_path, "acme")
    writer = audit_log.AuditWriter(scope, _workload(), max_size=4096, keep=10)
    writer.write(_record(0))
    tail = audit_log.Tail(scope, from_start=False)
    assert tail.poll() == []          # what was there before is not followed
    seen = []
    for n in range(1, 200):
        writer.write(_record(n))
        if n % 7 == 0:
            seen += tail.poll()
    later = audit_log.AuditWriter(scope, _workload("b" * 32), max_size=4096, keep=10)
    later.write(_record(1000))
    seen += tail.poll()
    assert [r.pid for r in seen] == [*range(1, 200), 1000]
    tail.close()
    writer.close()
    later.close()


def test_since_accepts_times_and_durations() -> None:
    assert audit_log.parse_since("10m", 1000.0) == 400.0
    assert audit_log.parse_since("1700000000", 0) == 1700000000.0
    assert audit_log.parse_since("2023-11-14T22:13:20Z", 0) == 1700000000.0
    with pytest.raises(ConfigError, match="--since 'yesterday'"):
        audit_log.parse_since("yesterday", 0)
    with pytest.raises(ConfigError, match="time zone"):
        audit_log.parse_since("2023-11-14T22:13:20", 0)


HYPERCTL = str(Path(sys.executable).parent / "hyperctl")


def test_hyperctl_events_follows_and_refuses_a_bad_time(tmp_path: Path) -> None:
    env = dict(os.environ, HYPERCTL_DATA_ROOT=str(tmp_path), HYPERCTL_ROOT=str(tmp_path / "r"))
    bad = subprocess.run([HYPERCTL, "--tenant", "acme", "events", "--since", "soon"], env=env,
                         capture_output=True, check=False)
    assert bad.returncode != 0 and bad.stdout == b""
    assert bad.stderr.decode().strip().count("\n") == 0 and "--since 'soon'" in bad.stderr.decode()
    scope = Scope(tmp_path, "acme")
    old = audit_log.AuditWriter(scope, _workload(), max_size=1 << 20, keep=10)
    old.write(_record(1))
    follower = subprocess.Popen([HYPERCTL, "--tenant", "acme", "events", "-f", "--since",
                                 "1001.5", "--format", "json"], env=env, stdout=subprocess.PIPE)
    try:
        old.write(_record(2))
        new = audit_log.AuditWriter(scope, _workload("b" * 32), max_size=1 << 20, keep=10)
        new.write(_record(3))
        assert follower.stdout is not None
        out = b""
        while out.count(b"\n") < 2:
            assert select.select([follower.stdout], [], [], 30)[0], out
            out += os.read(follower.stdout.fileno(), 65536)
        lines = [json.loads(line) for line in out.splitlines()]
        assert [(r["pid"], r["id"]) for r in lines] == [(2, "a" * 32), (3, "b" * 32)]
        # another tenant's follower sees none of it
        other = subprocess.run([HYPERCTL, "--tenant", "other", "events"], env=env,
                               capture_output=True, check=True)
        assert other.stdout == b""
    finally:
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(10) == 0
        old.close()
