"""A busybox OCI bundle for the runtime benchmarks, the same for runv, runc and crun, and a
runner for their CLIs (argv only; each benchmark removes what it created)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RUNV = str(Path(sys.executable).parent / "runv")


def make(top: Path, args: list[str]) -> Path:
    bundle = top / "bundle"
    root = bundle / "rootfs"
    for d in ("bin", "proc", "dev", "tmp", "sys", "etc"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "true", "sleep", "echo", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    spec = {
        "ociVersion": "1.1.0",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bench",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "mode=755"]}],
        "linux": {"namespaces": [{"type": t} for t in
                                 ("pid", "network", "ipc", "uts", "mount")]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def set_args(bundle: Path, args: list[str]) -> None:
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = args
    (bundle / "config.json").write_text(json.dumps(spec))


def runtime(binary: str, root: Path, *args: str, check: bool = True) -> int:
    """Run an OCI runtime command; stderr goes through a file, not a pipe: a detached
    container's stand-in keeps the stdio it was given."""
    with tempfile.TemporaryFile() as err:
        code = subprocess.run([binary, "--root", str(root), *args], check=False,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=err).returncode
        err.seek(0)
        if check and code != 0:
            raise RuntimeError(f"{binary} {' '.join(args)}: {err.read().decode()[-500:]}")
    return code


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {"median": round(statistics.median(ordered), 4),
            "p90": round(ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))], 4),
            "n": len(ordered), "samples": [round(s, 4) for s in samples]}


def report(result: dict[str, Any], json_path: str | None) -> None:
    """Print the result; with --json also write it to that file."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text)
