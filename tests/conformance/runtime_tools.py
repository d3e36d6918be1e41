"""Running the OCI runtime-tools validation programs (built by scripts/assets.sh into
$RUNV_ASSETS_DIR/runtime-tools) against a runtime, and reading their TAP.

`prove` cannot read their output (JSON inside the YAML blocks, several TAP documents per
program), so a program's verdict is decided here: it passes when it exits 0, no test point is
`not ok`, and no YAML block reports an `error` outside a test point (the lifecycle programs
report failure only that way, before `1..0`). The `*_fail` programs print nothing when the
runtime refused what it had to refuse."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TEST_POINT = re.compile(r"^(not ok|ok)\b")


@dataclass(frozen=True, slots=True)
class Verdict:
    program: str
    passed: bool
    ok: int
    not_ok: int
    seconds: float
    why: str = ""  # the first reason it failed


def _yaml_error(block: list[str]) -> str | None:
    """The `error` of a YAML diagnostic block (runtime-tools writes JSON there), or None."""
    text = "\n".join(block)
    try:
        data = json.loads(text)
    except ValueError:
        return "error" if '"error"' in text else None
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return None


def verdict(program: str, output: str, returncode: int, seconds: float = 0.0) -> Verdict:
    ok = not_ok = 0
    why = ""
    after_point = False  # a YAML block belongs to the test point just before it
    block: list[str] | None = None
    for line in output.splitlines():
        if block is not None:
            if line.strip() == "...":
                error = _yaml_error(block)
                if error and not after_point and not why:
                    why = error.splitlines()[0]
                block = None
            else:
                block.append(line)
            continue
        if line.strip() == "---":
            block = []
            continue
        match = TEST_POINT.match(line)
        if match:
            after_point = True
            if match[1] == "ok":
                ok += 1
            else:
                not_ok += 1
                why = why or line
        elif line.startswith("TAP version") or line.startswith("1.."):
            after_point = False
    if returncode != 0 and not why:
        tail = [line for line in output.splitlines() if line.strip()]
        why = f"exit status {returncode}" + (f": {tail[-1]}" if tail else "")
    passed = returncode == 0 and not_ok == 0 and not why
    return Verdict(program, passed, ok, not_ok, seconds, why)


def programs(suite: Path) -> list[str]:
    return sorted(p.name.removesuffix(".t") for p in (suite / "validation").glob("*.t"))


def run(suite: Path, program: str, runtime: Path, env: dict[str, str], *, workdir: Path,
        bundles: Path, timeout_s: float) -> Verdict:
    """Run validation/PROGRAM.t with RUNTIME in WORKDIR, which gets copies of the suite's
    runtimetest and rootfs tarball (the programs copy them from their working directory
    into each bundle: a symlink would be copied as one). PROGRAM.out keeps its output. The
    bundles go under BUNDLES, which a container's unmapped user (linux_ns_nopath maps ids to
    1000) must be able to reach: every directory above it world-searchable."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("runtimetest", "rootfs-amd64.tar.gz"):
        if not (workdir / name).exists():
            shutil.copy2(suite / name, workdir / name)
    tmp = bundles / program  # the bundles the program unpacks (it removes them)
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    # In a mount namespace of its own: a container without one (linux_ns_itype) makes its
    # mounts (/proc, /dev, /sys on the bundle) in its runtime's, and under runc that would be
    # the host's, left behind (and the program's clean-up then recurses into that /proc).
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            str(suite / "validation" / f"{program}.t")]
    proc = subprocess.Popen(argv, cwd=workdir,
                            env={**env, "RUNTIME": str(runtime), "TMPDIR": str(tmp)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\ntimed out after {timeout_s:.0f} s".encode()
        code = -signal.SIGKILL
    output = out.decode(errors="replace")
    (workdir / f"{program}.out").write_text(output)
    return verdict(program, output, code, time.monotonic() - t0)
