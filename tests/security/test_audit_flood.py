"""The process audit through real guests: a job's init, an exec and every execve inside it
reach `hyperctl events` with argv, uid, ppid and the container; another tenant sees none of
it; a flood of execs is bounded on the host (records dropped and counted, the log's size
capped); the API reads the same records."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from runv_py import api
from tests.hyperctl.conftest import Hyperctl

pytestmark = pytest.mark.vm

# Tight bounds, so that a flood a TCG guest can make in seconds goes over them; a log large
# enough to keep every record of the test (its rotation: tests/unit/test_process_audit.py).
AUDIT_TOML = "\n[audit]\nrate = 20\nburst = 40\nlog_max_size = 262144\n"
FLOOD = 2000


def _events(hyperctl: Hyperctl, *tenant: str, of: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    out = hyperctl(*tenant, "events", "--format", "json", *of).stdout
    return [json.loads(line) for line in out.splitlines()]


def _until(hyperctl: Hyperctl, tenant: tuple[str, ...], found: Any,
           timeout_s: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = _events(hyperctl, *tenant)
        if found(records) or time.monotonic() > deadline:
            return records
        time.sleep(1)


def test_a_jobs_processes_are_audited_per_tenant_and_bounded(
        hyperctl: Hyperctl, monkeypatch: pytest.MonkeyPatch) -> None:
    with hyperctl.config.open("a") as config:
        config.write(AUDIT_TOML)
    a = ("--tenant", "a")
    # By path: busybox's sh runs its own applets named without a path in a fork, without
    # execve (nothing to audit there; docs/ci.md, Audit); the image has no /bin/id.
    hyperctl(*a, "run", "-d", "--name", "job", "busybox", "sh", "-c",
             "/bin/ls /; /bin/busybox id; exec sleep 600")
    hyperctl(*a, "exec", "-u", "1000", "job", "id", "-u")
    script = ["sh", "-c", "/bin/ls /; /bin/busybox id; exec sleep 600"]

    def named(records: list[dict[str, Any]], argv: list[str]) -> dict[str, Any] | None:
        """The record of that exec: by its argv, or, for a process gone before the agent
        read it (complete: false), by the task's name the kernel keeps."""
        for r in records:
            if r["type"] == "process" and (r["argv"] == argv or (
                    not r["complete"] and r["comm"] == argv[0].rpartition("/")[2])):
                return r
        return None

    def exact(records: list[dict[str, Any]], argv: list[str]) -> dict[str, Any] | None:
        return next((r for r in records if r["type"] == "process" and r["argv"] == argv),
                    None)

    wanted = [script, ["/bin/ls", "/"], ["/bin/busybox", "id"], ["sleep", "600"]]
    records = _until(hyperctl, a, lambda rs: all(named(rs, w) for w in wanted)
                     and exact(rs, ["id", "-u"]) is not None)
    found = [*(named(records, w) for w in wanted), exact(records, ["id", "-u"])]
    assert all(found), records
    init, ls, id_, sleep, exec_ = (r for r in found if r is not None)
    cid = init["id"]
    for r in (init, ls, id_, sleep, exec_):
        assert (r["container"], r["id"], r["tenant"]) == ("job", cid, "a"), r
    # The init and what it exec'd into, and the host's exec, live long enough to be read.
    assert init["complete"] and sleep["complete"] and exec_["complete"]
    assert init["role"] == "init" and sleep["role"] == "init"   # sh exec'd sleep: same pid
    assert sleep["pid"] == init["pid"]
    assert ls["role"] == id_["role"] == "execve"
    assert ls["ppid"] == id_["ppid"] == init["pid"]              # forked by the job's sh
    assert init["uid"] == ls["uid"] == id_["uid"] == 0
    assert exec_["role"] == "exec" and exec_["exec_id"] and exec_["uid"] == 1000
    assert exec_["argv"] == ["id", "-u"] and exec_["pid"] not in (init["pid"], ls["pid"],
                                                                   id_["pid"])

    # Another tenant, and the operator's scope, see none of it; naming it is an error.
    assert _events(hyperctl, "--tenant", "b") == []
    assert _events(hyperctl) == []
    other = hyperctl("--tenant", "b", "events", "job", check=False)
    assert other.returncode != 0 and b"no such container" in other.stderr.lower()

    # A flood of execs: over 20 a second (40 at once) the records are dropped and counted,
    # and the log stays within twice its 16 KiB.
    t_flood = time.time()
    flood = hyperctl(*a, "exec", "job", "sh", "-c",
                     f"i=0; while [ $i -lt {FLOOD} ]; do /bin/true $i; i=$((i+1)); done; "
                     "echo flooded", timeout=600)
    t_end = time.time()
    assert flood.stdout == b"flooded\n"
    cid_records = _events(hyperctl, *a, of=("job",))   # by name, while it exists
    hyperctl(*a, "stop", "-t", "1", "job")         # its monitor records the exit ...
    hyperctl(*a, "rm", "job")                      # ... and rm waits for it: the log is whole
    records = _events(hyperctl, *a, of=(cid,))           # by id, after rm: the audit outlives it
    assert cid_records and {r["id"] for r in cid_records} == {cid}
    since_flood = [r for r in records if r["time"] >= _rfc3339(t_flood)]
    kept = [r for r in since_flood if r["type"] == "process" and r["role"] == "execve"]
    dropped = sum(r["dropped"] for r in since_flood if r["type"] == "dropped")
    assert dropped > 0 and kept, since_flood[-5:]
    assert len(kept) <= 40 + 20 * (t_end - t_flood + 3), len(kept)
    assert all(r["argv"][:1] == ["/bin/true"] or not r["complete"] for r in kept), kept
    # Every exec of the flood is either kept or counted.
    assert dropped + len(kept) == FLOOD, (dropped, len(kept))
    logs = list((hyperctl.data / "tenants" / "a" / "audit").iterdir())
    assert 1 <= len(logs) <= 2 and sum(p.stat().st_size for p in logs) <= 2 * 262144, logs

    # The API reads the same records, scoped the same; a sandbox's own records.
    assert _events(hyperctl, *a, of=("--since", "1h")) == _events(hyperctl, *a) != []
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    from_api = list(api.audit_events(tenant="a"))
    assert [r.to_json() for r in from_api] == _events(hyperctl, *a)
    assert list(api.audit_events(tenant="b")) == []
    with api.Sandbox.create("busybox", tenant="b") as box:
        assert box.run(["id", "-un"]).stdout == b"root\n"
        deadline = time.monotonic() + 60
        while not any(r.argv == ("id", "-un") for r in box.audit_events()) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        mine = list(box.audit_events())
        assert {r.id for r in mine} == {box.id}
        (run,) = [r for r in mine if r.argv == ("id", "-un")]
        assert (run.role, run.uid, run.tenant, run.container) == ("exec", 0, "b", box.name)
    assert [r.id for r in api.audit_events(tenant="b")] == [box.id] * len(list(
        api.audit_events(tenant="b")))
    assert all(r.tenant == "a" for r in api.audit_events(tenant="a"))


def _rfc3339(when: float) -> str:
    from runv_py.timestamps import rfc3339

    return rfc3339(when)
