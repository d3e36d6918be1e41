"""The guest's container engine, run on the host (as root) in throw-away namespaces through
`python -m hyperstart_agent.container.run`: asserts what the process inside sees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def rootfs(busybox_rootfs: Path) -> Path:
    return busybox_rootfs


def _spec(rootfs: Path, args: list[str], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": str(rootfs)},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "size=1m"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in
                                 ("pid", "mount", "ipc", "uts", "network")]},
    }
    for key, value in overrides.items():
        if key in ("env", "cwd", "user", "noNewPrivileges", "capabilities", "rlimits",
                   "oomScoreAdj"):
            spec["process"][key] = value
        else:
            spec[key] = value
    return spec


def run(tmp_path: Path, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec))
    agent = Path(__file__).resolve().parents[2] / "hyperstart-agent"
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
         "from hyperstart_agent.container.run import main; sys.exit(main())",
         str(agent), str(bundle)],
        capture_output=True, text=True, timeout=60, check=False)


def test_output_and_exit_status(tmp_path: Path, rootfs: Path) -> None:
    result = run(tmp_path, _spec(rootfs, ["sh", "-c", "echo hello; echo oops >&2; exit 7"]))
    assert (result.stdout, result.stderr, result.returncode) == ("hello\n", "oops\n", 7)


def test_death_by_signal_is_128_plus_n(tmp_path: Path, rootfs: Path) -> None:
    # Without its own pid namespace (PID 1 of one is immune to its own SIGKILL).
    spec = _spec(rootfs, ["sh", "-c", "kill -9 $$"])
    spec["linux"]["namespaces"] = [{"type": "mount"}]
    assert run(tmp_path, spec).returncode == 137


def test_pid_namespace_hostname_and_isolated_network(tmp_path: Path, rootfs: Path) -> None:
    result = run(tmp_path, _spec(rootfs, [
        "sh", "-c", "echo pid=$$; hostname; ls /sys/class/net 2>/dev/null || cat /proc/net/dev"]))
    lines = result.stdout.splitlines()
    assert lines[0] == "pid=1" and lines[1] == "box", result
    assert "eth0" not in result.stdout and "lo" in result.stdout


def test_the_process_starts_with_default_signal_dispositions(tmp_path: Path,
                                                            rootfs: Path) -> None:
    """Not Python's ignored SIGPIPE and SIGXFSZ, not the agent's blocked SIGCHLD (an exec
    keeps ignored and blocked signals): a writer to a closed pipe dies of SIGPIPE, as under
    runc, instead of failing with EPIPE."""
    result = run(tmp_path, _spec(rootfs, [
        "sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status; "
                    "(yes; echo yes=$? >&2) | head -c 1 >/dev/null"]))
    fields = dict(line.split(":\t") for line in result.stdout.splitlines() if "\t" in line)
    ignored, blocked = int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)
    for signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
        assert not (ignored | blocked) & (1 << (signum - 1)), (signum, result.stdout)
    assert "yes=141" in result.stderr, result  # died of SIGPIPE (128 + 13)


def test_env_cwd_and_user(tmp_path: Path, rootfs: Path) -> None:
    result = run(tmp_path, _spec(
        rootfs, ["sh", "-c", "echo $FOO; pwd; id -u; id -g; id -G; umask"],
        env=["PATH=/bin", "FOO=bar"], cwd="/work",
        user={"uid": 1000, "gid": 1001, "additionalGids": [5, 6], "umask": 0o027}))
    assert result.stdout.split() == ["bar", "/work", "1000", "1001", "1001", "5", "6", "0027"], \
        result


def test_mounts_with_options_and_readonly_root(tmp_path: Path, rootfs: Path) -> None:
    result = run(tmp_path, _spec(
        rootfs, ["sh", "-c", "grep -E ' /(tmp|dev) ' /proc/self/mountinfo; "
                             "touch /x 2>&1; touch /tmp/y && echo tmp-writable; ls /dev"],
        root={"path": str(rootfs), "readonly": True}))
    out = result.stdout
    tmp_line = next(line for line in out.splitlines() if " /tmp " in line)
    assert "nosuid" in tmp_line and "nodev" in tmp_line and "size=1024k" in tmp_line
    assert "Read-only file system" in out and "tmp-writable" in out
    for dev in ("null", "zero", "urandom", "tty", "fd"):
        assert dev in out.split(), out


def test_masked_and_readonly_paths(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["sh", "-c", "cat /proc/kcore | wc -c; "
                                      "(echo 1 > /proc/sys/kernel/ns_last_pid) 2>&1; echo done"])
    spec["linux"]["maskedPaths"] = ["/proc/kcore"]
    spec["linux"]["readonlyPaths"] = ["/proc/sys"]
    out = run(tmp_path, spec).stdout.split("\n")
    assert out[0].strip() == "0"
    assert "Read-only file system" in out[1] and out[2] == "done"


def test_bind_mount_read_only(tmp_path: Path, rootfs: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "file").write_text("from host\n")
    spec = _spec(rootfs, ["sh", "-c", "cat /mnt/file; (echo x > /mnt/new) 2>&1; echo end"])
    spec["mounts"].append({"destination": "/mnt", "type": "bind", "source": str(shared),
                           "options": ["rbind", "ro"]})
    out = run(tmp_path, spec).stdout
    assert out.startswith("from host\n") and "Read-only file system" in out
    assert not (shared / "new").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("process", {"args": []}, "process.args: must name the program"),
    ("process", {"args": ["sh"], "user": {"uid": -1}}, "process.user.uid: must be an integer"),
    ("process", {"args": ["sh"], "cwd": "rel"}, "process.cwd: must be an absolute path"),
    ("linux", {"namespaces": [{"type": "bogus"}]}, "unknown namespace type 'bogus'"),
    ("root", {"path": "/nonexistent-root"}, "root.path: /nonexistent-root is not a directory"),
])
def test_bad_specs_name_the_field(tmp_path: Path, rootfs: Path, field: str, value: Any,
                                  message: str) -> None:
    spec = _spec(rootfs, ["true"])
    spec[field] = value
    result = run(tmp_path, spec)
    assert result.returncode == 125 and message in result.stderr, result.stderr


def test_a_missing_program_fails_at_start(tmp_path: Path, rootfs: Path) -> None:
    result = run(tmp_path, _spec(rootfs, ["/bin/nonexistent"]))
    assert result.returncode == 125 and "No such file" in result.stderr, result


def test_nothing_is_left_mounted(tmp_path: Path, rootfs: Path) -> None:
    run(tmp_path, _spec(rootfs, ["true"]))
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(rootfs) not in mounts
    assert not [p for p in os.listdir("/tmp") if p.startswith("hyperstart-run-")]


def _status_field(text: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith(name + ":"))


def test_capabilities_all_five_sets(tmp_path: Path, rootfs: Path) -> None:
    caps = {"bounding": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_KILL"],
            "permitted": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
            "effective": ["CAP_CHOWN"],
            "inheritable": ["CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_NET_BIND_SERVICE"]}
    result = run(tmp_path, _spec(rootfs, ["cat", "/proc/self/status"], capabilities=caps,
                                 user={"uid": 1000, "gid": 1000}))
    status = result.stdout
    # cat's own sets after exec as uid 1000: ambient caps become permitted and effective.
    assert int(_status_field(status, "CapBnd"), 16) == (1 << 0) | (1 << 10) | (1 << 5)
    assert int(_status_field(status, "CapInh"), 16) == 1 << 10
    assert int(_status_field(status, "CapAmb"), 16) == 1 << 10
    assert int(_status_field(status, "CapPrm"), 16) == 1 << 10
    assert int(_status_field(status, "CapEff"), 16) == 1 << 10


def test_root_without_capabilities_cannot_chown(tmp_path: Path, rootfs: Path) -> None:
    caps: dict[str, list[str]] = {k: [] for k in
                                  ("bounding", "permitted", "effective", "inheritable", "ambient")}
    result = run(tmp_path, _spec(rootfs, ["sh", "-c", "touch /tmp/f; chown 5 /tmp/f; id -u"],
                                 capabilities=caps))
    assert "Operation not permitted" in result.stderr and result.stdout.strip() == "0"


def test_rlimits_oom_score_and_no_new_privileges(tmp_path: Path, rootfs: Path) -> None:
    result = run(tmp_path, _spec(
        rootfs, ["sh", "-c", "ulimit -Sn; ulimit -Hn; cat /proc/self/oom_score_adj; "
                             "grep NoNewPrivs /proc/self/status"],
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}], oomScoreAdj=500,
        noNewPrivileges=True))
    lines = result.stdout.split("\n")
    assert lines[:3] == ["123", "456", "500"], result
    assert lines[3].split() == ["NoNewPrivs:", "1"]


def test_namespaced_sysctl(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["cat", "/proc/sys/kernel/shmmni"])
    spec["linux"]["sysctl"] = {"kernel.shmmni": "1234"}
    spec["linux"]["readonlyPaths"] = ["/proc/sys"]
    assert run(tmp_path, spec).stdout.strip() == "1234"
    assert Path("/proc/sys/kernel/shmmni").read_text().strip() != "1234"


@pytest.mark.parametrize(("process", "message"), [
    ({"capabilities": {"bounding": ["CAP_BOGUS"]}}, "unknown capability 'CAP_BOGUS'"),
    ({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]}, "above hard limit"),
    ({"rlimits": [{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}]}, "unknown rlimit"),
    ({"oomScoreAdj": 5000}, "process.oomScoreAdj: must be an integer from -1000 to 1000"),
])
def test_bad_process_fields(tmp_path: Path, rootfs: Path, process: dict[str, Any],
                            message: str) -> None:
    result = run(tmp_path, _spec(rootfs, ["true"], **process))
    assert result.returncode == 125 and message in result.stderr, result.stderr


def test_domainname_and_devices(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["sh", "-c", "cat /proc/sys/kernel/domainname; "
                                      "ls -ln /dev/mydev /dev/sub/fifo"])
    spec["domainname"] = "example.org"
    spec["linux"]["devices"] = [
        {"path": "/dev/mydev", "type": "c", "major": 1, "minor": 3, "fileMode": 0o640,
         "uid": 7, "gid": 8},
        {"path": "/dev/sub/fifo", "type": "p"}]
    lines = run(tmp_path, spec).stdout.splitlines()
    assert lines[0] == "example.org"
    mydev = lines[1].split()
    assert mydev[0] == "crw-r-----" and mydev[2:6] == ["7", "8", "1,", "3"], lines
    assert lines[2].startswith("prw-rw-rw-"), lines


def test_devices_outside_dev_are_refused(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["true"])
    spec["linux"]["devices"] = [{"path": "/etc/evil", "type": "c", "major": 1, "minor": 3}]
    result = run(tmp_path, spec)
    assert result.returncode == 125
    assert "linux.devices[0].path: must be under /dev" in result.stderr


def test_start_container_hooks_run_inside_before_the_process(tmp_path: Path,
                                                            rootfs: Path) -> None:
    spec = _spec(rootfs, ["cat", "/tmp/state"])
    spec["hooks"] = {"startContainer": [
        {"path": "/bin/sh", "args": ["sh", "-c",
                                            "cat > /tmp/state; echo >> /tmp/state; "
                                            "hostname >> /tmp/state"]}]}
    result = run(tmp_path, spec)
    state_line, hostname = result.stdout.splitlines()
    assert json.loads(state_line)["id"] == "run" and hostname == "box"


def test_a_failing_start_container_hook_fails_the_start(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["echo", "must not run"])
    spec["hooks"] = {"startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}]}
    result = run(tmp_path, spec)
    assert result.returncode == 125 and "must not run" not in result.stdout
    assert "hooks.startContainer[0] /bin/sh exited with 3" in result.stderr


@pytest.fixture
def reachable_rootfs(rootfs: Path) -> Iterator[Path]:
    """A copy of the rootfs whose parent directories the unmapped host root can traverse
    (pytest's temp dirs are 0700): the container's root must reach its rootfs."""
    parent = Path(tempfile.mkdtemp(prefix="runv-userns-", dir="/var/tmp"))
    parent.chmod(0o755)
    shutil.copytree(rootfs, parent / "rootfs", symlinks=True)
    yield parent / "rootfs"
    shutil.rmtree(parent)


def test_user_namespace_with_mappings(tmp_path: Path, reachable_rootfs: Path) -> None:
    rootfs = reachable_rootfs
    spec = _spec(rootfs, ["sh", "-c", "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; "
                                      "touch /tmp/x && ls -ln /tmp/x"])
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    result = run(tmp_path, spec)
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["0"] and lines[1] == ["0"], result
    assert lines[2] == ["0", "100000", "65536"] and lines[3] == ["0", "200000", "65536"]
    assert lines[4][2:4] == ["0", "0"]  # root inside owns what it creates


def test_a_new_user_namespace_needs_mappings(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["true"])
    spec["linux"]["namespaces"].append({"type": "user"})
    result = run(tmp_path, spec)
    assert result.returncode == 125 and "linux.uidMappings: a new user namespace" in result.stderr


def _seccomp(**extra: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["chmod"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 1, "value": 0o777, "op": "SCMP_CMP_EQ"}]},
                {"names": ["fchmodat"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 2, "value": 0o777, "op": "SCMP_CMP_EQ"}]},
                {"names": ["not_a_syscall_anywhere"], "action": "SCMP_ACT_ERRNO"},
            ], **extra}


@pytest.mark.parametrize("nnp", [False, True])
def test_seccomp_actions_and_argument_filters(tmp_path: Path, rootfs: Path, nnp: bool) -> None:
    spec = _spec(rootfs, ["sh", "-c", "mkdir /tmp/d 2>&1; touch /tmp/f; chmod 755 /tmp/f && "
                                      "echo chmod-755-ok; chmod 777 /tmp/f 2>&1; "
                                      "grep Seccomp: /proc/self/status"],
                 noNewPrivileges=nnp)
    spec["linux"]["seccomp"] = _seccomp()
    out = run(tmp_path, spec).stdout.splitlines()
    assert "Operation not permitted" in out[0]
    assert out[1] == "chmod-755-ok" and "Operation not permitted" in out[2]
    assert out[3].split() == ["Seccomp:", "2"]  # filter mode


def test_seccomp_kill_and_bad_profiles(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["sh", "-c", "echo before; exec mkdir /tmp/d"])
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]}
    result = run(tmp_path, spec)
    assert result.stdout == "before\n" and result.returncode == 128 + 31  # SIGSYS
    for profile, message in [
        ({"defaultAction": "SCMP_ACT_BOGUS"}, "linux.seccomp.defaultAction: unknown"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [],
                                                            "action": "SCMP_ACT_ALLOW"}]},
         "linux.seccomp.syscalls[0].names"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["X86"]},
         "linux.seccomp.architectures[0]"),
    ]:
        spec["linux"]["seccomp"] = profile
        result = run(tmp_path, spec)
        assert result.returncode == 125 and message in result.stderr, result.stderr


def test_time_namespace_offsets(tmp_path: Path, rootfs: Path) -> None:
    year = 365 * 86400
    spec = _spec(rootfs, ["sh", "-c", "cat /proc/uptime /proc/self/timens_offsets; "
                                      "readlink /proc/self/ns/time"])
    spec["linux"]["namespaces"].append({"type": "time"})
    spec["linux"]["timeOffsets"] = {"boottime": {"secs": year, "nanosecs": 5},
                                    "monotonic": {"secs": 1000}}
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    result = run(tmp_path, spec)
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result
    uptime = float(lines[0].split()[0])
    assert before + year - 1 <= uptime <= after + year + 1, (before, uptime)
    offsets = {line.split()[0]: line.split()[1:] for line in lines[1:3]}
    assert offsets == {"monotonic": ["1000", "0"], "boottime": [str(year), "5"]}
    assert lines[3] != os.readlink("/proc/self/ns/time")


@pytest.mark.parametrize(("namespaces", "offsets", "message"), [
    ([], {"boottime": {"secs": 1}}, "linux.timeOffsets: needs a new time namespace"),
    ([{"type": "time"}], {"realtime": {"secs": 1}}, "linux.timeOffsets.realtime: is not a"),
    ([{"type": "time"}], {"boottime": {"secs": "1"}}, "linux.timeOffsets.boottime.secs"),
    ([{"type": "time"}], {"boottime": {"nanosecs": 10**9}},
     "linux.timeOffsets.boottime.nanosecs"),
    # The kernel refuses a clock that would go below zero.
    ([{"type": "time"}], {"monotonic": {"secs": -(10**12)}}, "linux.timeOffsets: "),
])
def test_bad_time_offsets(tmp_path: Path, rootfs: Path, namespaces: list[dict[str, str]],
                          offsets: dict[str, Any], message: str) -> None:
    spec = _spec(rootfs, ["true"])
    spec["linux"]["namespaces"] += namespaces
    spec["linux"]["timeOffsets"] = offsets
    result = run(tmp_path, spec)
    assert result.returncode == 125 and message in result.stderr, result.stderr


def test_image_symlinks_resolve_inside_the_rootfs(tmp_path: Path, rootfs: Path) -> None:
    """Mount targets and device paths go through the image's symlinks as the container will
    see them (absolute ones from its root, `..` stopping there), never to the host's paths."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "marker").write_text("volume\n")
    (rootfs / "d").symlink_to("/tmp")
    (rootfs / "e").symlink_to("../../../../../../../../srv")
    try:
        spec = _spec(rootfs, ["sh", "-c", "cat /tmp/x/marker; ls -d /srv/y"])
        spec["mounts"] += [
            {"destination": "/d/x", "type": "bind", "source": str(volume),
             "options": ["rbind"]},
            {"destination": "/e/y", "type": "tmpfs", "source": "tmpfs", "options": []}]
        result = run(tmp_path, spec)
        assert result.stdout == "volume\n/srv/y\n", result
        assert not os.path.exists("/srv/y")
    finally:
        (rootfs / "d").unlink()
        (rootfs / "e").unlink()
        shutil.rmtree(rootfs / "srv", ignore_errors=True)
        shutil.rmtree(rootfs / "tmp" / "x", ignore_errors=True)


def test_tmpfs_copied_up_from_the_image(tmp_path: Path, rootfs: Path) -> None:
    spec = _spec(rootfs, ["sh", "-c", "cat /etc/group; ls -l /etc/passwd | cut -c1-10; "
                                      "touch /etc/new; awk '$5 == \"/etc\" {print $9}' "
                                      "/proc/self/mountinfo"])
    spec["mounts"].append({"destination": "/etc", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "tmpcopyup"]})
    result = run(tmp_path, spec)
    assert result.stdout == "root:x:0:\n-rw-r--r--\ntmpfs\n", result
    assert not (rootfs / "etc" / "new").exists()


def test_recursive_read_only_and_refused_options(tmp_path: Path, rootfs: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    spec = _spec(rootfs, ["sh", "-c", "touch /v/x 2>&1; echo end"])
    spec["mounts"].append({"destination": "/v", "type": "bind", "source": str(volume),
                           "options": ["rbind", "rro"]})
    assert "Read-only file system" in run(tmp_path, spec).stdout
    assert not (volume / "x").exists()
    spec["mounts"][-1]["options"] = ["rbind", "bogus"]
    result = run(tmp_path, spec)
    assert result.returncode == 125 and "'bogus' is not known for a bind mount" in result.stderr
