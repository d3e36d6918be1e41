"""The runv CLI's logic without a VM: argv compatibility, signals, resources, stats, the
host-side spec parser, container records, and the spec/features documents."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runv_py.cli import main as cli
from runv_py.errors import ConfigError, ContainerExists, ContainerNotFound, SpecError
from runv_py.oci import default_spec
from runv_py.oci import spec as oci_spec
from runv_py.sandbox import pod, vm_dir
from runv_py.sandbox.guest_spec import GUEST_SHARED, pid_namespace, rewrite
from runv_py.sandbox.runtime import parse_signal, split_standin_report
from runv_py.store.state import ContainerRecord, Store, check_id


def test_single_dash_long_flags_are_accepted() -> None:
    assert cli.normalize(["-no-subreaper", "--root", "/r", "create", "-b", "x", "id"]) == [
        "--no-subreaper", "--root", "/r", "create", "-b", "x", "id"]
    assert cli.normalize(["-log-format=json", "exec", "-t", "c", "--", "-not-a-flag"]) == [
        "--log-format=json", "exec", "-t", "c", "--", "-not-a-flag"]
    args = cli._parser().parse_args(cli.normalize(
        ["--root", "/r", "--log", "/l", "--log-format", "json", "--systemd-cgroup",
         "create", "--bundle", "/b", "--pid-file", "/p", "--console-socket", "/s",
         "--no-pivot", "--no-new-keyring", "c1"]))
    assert (args.root, args.bundle, args.pid_file, args.console_socket, args.container_id) == (
        "/r", "/b", "/p", "/s", "c1")
    args = cli._parser().parse_args(["exec", "--process", "/p.json", "--detach",
                                     "--pid-file", "/e.pid", "c1"])
    assert args.process == "/p.json" and args.detach and args.cmd == []
    args = cli._parser().parse_args(["exec", "-t", "c1", "sh", "-c", "ls -l"])
    assert args.tty and args.cmd == ["sh", "-c", "ls -l"]


def test_signals_by_number_and_name() -> None:
    assert parse_signal("9") == parse_signal("KILL") == parse_signal("SIGKILL") == 9
    assert parse_signal("term") == signal.SIGTERM
    for bad in ("0x9", "BOGUS", "999"):
        with pytest.raises(ConfigError):
            parse_signal(bad)


def _update_args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = dict(resources=None, memory=None, memory_swap=None, cpu_quota=None,
                                cpu_period=None, cpu_shares=None, cpuset_cpus=None,
                                cpuset_mems=None, pids_limit=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_update_flags_become_linux_resources(tmp_path: Path) -> None:
    assert cli._resources(_update_args(memory="64m", cpu_quota=50000, pids_limit=10)) == {
        "memory": {"limit": 64 << 20}, "cpu": {"quota": 50000}, "pids": {"limit": 10}}
    file = tmp_path / "r.json"
    file.write_text(json.dumps({"memory": {"limit": 1000}}))
    assert cli._resources(_update_args(resources=str(file))) == {"memory": {"limit": 1000}}
    file.write_text("[1]")
    with pytest.raises(ConfigError, match="--resources"):
        cli._resources(_update_args(resources=str(file)))
    with pytest.raises(ConfigError, match="--memory"):
        cli._resources(_update_args(memory="lots"))


def test_stats_in_runc_shape() -> None:
    stats = cli._runc_stats("c1", {"cpu.usage_usec": 5, "memory.current": 100,
                                   "memory.max": -1, "pids.current": 2, "pids.max": 7})
    data = stats["data"]
    assert stats["type"] == "stats" and stats["id"] == "c1"
    assert data["cpu"]["usage"]["total"] == 5000
    assert data["memory"]["usage"] == {"usage": 100, "limit": (1 << 64) - 1}
    assert data["pids"] == {"current": 2, "limit": 7}


def _bundle(tmp_path: Path, spec: dict[str, Any]) -> Path:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


def test_host_spec_parser_names_the_bad_field(tmp_path: Path) -> None:
    good = default_spec.document()
    spec = oci_spec.load(_bundle(tmp_path, good))
    assert spec.root == (tmp_path / "rootfs").resolve() and spec.terminal
    cases = [
        (("root", "path"), "nope", "root.path"),
        (("process", "terminal"), "yes", "process.terminal"),
        (("process", "args"), [], "process.args"),
        (("mounts",), {"a": 1}, "mounts"),
        (("linux", "resources"), {"memory": {"limit": "1g"}}, "linux.resources.memory.limit"),
        (("hooks",), {"prestart": [{"path": "relative"}]}, "hooks.prestart[0].path"),
        (("annotations",), {"k": 1}, "annotations['k']"),
    ]
    for path, value, field in cases:
        bad = json.loads(json.dumps(good))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(SpecError) as info:
            oci_spec.load(_bundle(tmp_path, bad))
        assert str(info.value).startswith(field), (field, str(info.value))


def test_guest_spec_points_at_the_share_and_drops_host_parts(tmp_path: Path) -> None:
    doc = default_spec.document()
    doc["mounts"].append({"destination": "/data", "type": "bind", "source": "/srv",
                          "options": ["rbind", "ro"]})
    doc["hooks"] = {"prestart": [{"path": "/bin/true"}],
                    "startContainer": [{"path": "/bin/true"}]}
    doc["linux"]["namespaces"].append({"type": "ipc", "path": "/proc/self/ns/ipc"})
    doc["linux"]["cgroupsPath"] = "/host/path"
    spec = oci_spec.load(_bundle(tmp_path, doc))
    guest = rewrite(spec, {len(doc["mounts"]) - 1: "m0"})
    assert guest["root"]["path"] == f"{GUEST_SHARED}/rootfs"
    assert guest["mounts"][-1]["source"] == f"{GUEST_SHARED}/m0"
    assert set(guest["hooks"]) == {"startContainer"}
    assert {"type": "network"} not in guest["linux"]["namespaces"]
    assert all("path" not in ns for ns in guest["linux"]["namespaces"])
    assert "cgroupsPath" not in guest["linux"]


def test_guest_spec_joins_the_pods_namespaces_named_by_path(tmp_path: Path) -> None:
    doc = default_spec.document()
    doc["linux"]["namespaces"] = [{"type": "ipc", "path": "/proc/self/ns/ipc"}, {"type": "uts"},
                                  {"type": "pid", "path": "/proc/self/ns/pid"}]
    spec = oci_spec.load(_bundle(tmp_path, doc))
    guest = rewrite(spec, {}, rootfs="rootfs-x",
                    joined={"ipc": "/run/hyperstart/sandbox/ns/ipc",
                            "uts": "/run/hyperstart/sandbox/ns/uts"})
    assert guest["root"]["path"] == f"{GUEST_SHARED}/rootfs-x"
    assert guest["linux"]["namespaces"] == [
        {"type": "ipc", "path": "/run/hyperstart/sandbox/ns/ipc"}, {"type": "uts"},
        {"type": "pid"}, {"type": "mount"}]  # a mount namespace always, in the guest


def test_guest_spec_joins_the_pods_pid_namespace_unless_the_container_has_its_own(
        tmp_path: Path) -> None:
    """The CRI names the sandbox's pid namespace (shareProcessNamespace, or critest's
    default pods) or none (a container's own): the former becomes the sandbox container's in
    the guest."""
    pod_pid = {"pid": pid_namespace("sb")}
    doc = default_spec.document()
    doc["linux"]["namespaces"] = [{"type": "pid", "path": "/proc/self/ns/pid"}, {"type": "mount"}]
    guest = rewrite(oci_spec.load(_bundle(tmp_path, doc)), {}, joined=pod_pid)
    assert guest["linux"]["namespaces"][0] == {
        "type": "pid", "path": "/run/hyperstart/containers/sb/ns/pid"}
    doc["linux"]["namespaces"] = [{"type": "pid"}, {"type": "mount"}]
    guest = rewrite(oci_spec.load(_bundle(tmp_path, doc)), {}, joined=pod_pid)
    assert guest["linux"]["namespaces"][0] == {"type": "pid"}


def test_pod_annotations_name_the_sandbox() -> None:
    cri = {pod.CONTAINER_TYPE: "container", pod.SANDBOX_ID: "p1"}
    assert pod.sandbox_of(cri, "c1") == "p1"
    assert pod.sandbox_of(cri, "p1") is None  # never its own sandbox
    assert pod.sandbox_of({**cri, pod.CONTAINER_TYPE: "sandbox"}, "p1") is None
    assert pod.is_sandbox({pod.CONTAINER_TYPE: "sandbox", pod.SANDBOX_ID: "p1"})
    assert pod.sandbox_of({pod.CRIO_CONTAINER_TYPE: "container", pod.CRIO_SANDBOX_ID: "p2"},
                          "c2") == "p2"
    assert pod.sandbox_of({}, "c1") is None


def test_container_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    record = ContainerRecord(id="c1", bundle="/b", rootfs="/b/rootfs", created="now", pid=42)
    store.reserve("c1")
    with pytest.raises(ContainerExists):
        store.reserve("c1")
    with store.locked("c1"):
        with pytest.raises(ContainerNotFound):
            store.load("c1")  # reserved, not yet created
        store.commit(record)
    assert store.load("c1").pid == 42 and store.ids() == ["c1"]
    store.release("c1")
    with pytest.raises(ContainerNotFound):
        store.load("c1")
    with pytest.raises(ContainerNotFound), store.locked("c1"):
        pass
    for bad in ("../x", "", "a/b", "-x", "x" * 200):
        with pytest.raises(ConfigError):
            check_id(bad)
    short = vm_dir.path_for(Path("/run/runv"), tmp_path / ("r" * 200), "c" * 128)
    assert len(str(short / "agent.sock")) < 108


def test_spec_command_writes_a_loadable_template(tmp_path: Path) -> None:
    default_spec.write(tmp_path)
    (tmp_path / "rootfs").mkdir()
    assert oci_spec.load(tmp_path).raw["hostname"] == "runv"
    with pytest.raises(ConfigError, match="already exists"):
        default_spec.write(tmp_path)


@pytest.mark.parametrize("command", [["exec", "c1", "/bin/true"], ["state", "c1"],
                                     ["kill", "c1", "KILL"]])
def test_quick_commands_start_without_an_event_loop(tmp_path: Path, command: list[str]) -> None:
    """containerd's runc shim runs `runv state`/`kill` often and an exec's start-up is its
    latency: these paths load no asyncio (and nothing it pulls in: ssl, selectors' loops),
    nor what only a create needs (the fork machinery, the guest's assets, the pool, the host
    cgroups and the accelerators they probe) or `secrets` (hmac, random and base64)."""
    heavy = ("asyncio", "ssl", "grpc", "secrets", "runv_py.forked", "runv_py.assets",
             "runv_py.sandbox.pool_member", "runv_py.sandbox.host_cgroup", "runv_py.vm.accel")
    probe = ("import sys\nfrom runv_py.cli import main as cli\n"
             "try:\n    code = cli.main(sys.argv[1:])\nexcept SystemExit as exc:\n"
             "    code = exc.code\n"
             f"print(code, *sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, "--root", str(tmp_path), *command],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "c1 does not exist" in done.stderr
    assert done.stdout.split() == ["1"]


def test_a_forked_stand_ins_report_in_either_order() -> None:
    """The process spawned for a stand-in in a new pid namespace reports its child's pid and
    exits while the child attaches; on a starved host the child's report came first (the
    soak's `runv create` failed with "okpid 32044")."""
    assert split_standin_report(b"pid 7\nok") == (7, b"ok")
    assert split_standin_report(b"okpid 32044\n") == (32044, b"ok")
    assert split_standin_report(b"ok") == (None, b"ok")
    assert split_standin_report(b"no such containerpid 9\n") == (9, b"no such container")


RUNV_SCRIPT = str(Path(sys.executable).parent / "runv")
HYPERCTL_SCRIPT = str(Path(sys.executable).parent / "hyperctl")


def test_the_console_scripts_end_without_teardown_and_lose_no_output(tmp_path: Path) -> None:
    """runv and hyperctl end with os._exit (cli/errors.exit_after): what they printed to a
    pipe, their log file and their exit status (argparse's 2 among them) are all there."""
    version = subprocess.run([RUNV_SCRIPT, "--version"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert (version.returncode, version.stdout.splitlines()[0]) == (0, f"runv version "
                                                                       f"{cli.__version__}")
    features = subprocess.run([RUNV_SCRIPT, "features"], capture_output=True, timeout=60,
                              check=True)
    assert json.loads(features.stdout)["ociVersionMax"]
    usage = subprocess.run([RUNV_SCRIPT, "no-such-command"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    log = tmp_path / "log.json"
    missing = subprocess.run([RUNV_SCRIPT, "--root", str(tmp_path), "--log", str(log),
                              "--log-format", "json", "state", "c1"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 1 and "c1 does not exist" in missing.stderr
    assert "c1 does not exist" in json.loads(log.read_text().splitlines()[-1])["msg"]
    hyperctl = subprocess.run([HYPERCTL_SCRIPT, "--help"], capture_output=True, text=True,
                              timeout=60, check=False)
    assert hyperctl.returncode == 0 and "usage: hyperctl" in hyperctl.stdout
