"""bench/exec: `runv exec` of /bin/true into a running container, through the CLI, against
`runc exec` and `crun exec` into the same bundle on the same machine, in the same run.

    python bench/exec.py [--n 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import RUNV, make, report, runtime, summary

# crun refuses these machines' hybrid cgroup layout unless it leaves cgroups alone.
OCI_FLAGS = {"crun": ["--cgroup-manager=disabled"]}


def exec_times(binary: str, root: Path, bundle: Path, n: int) -> dict[str, Any] | str:
    if shutil.which(binary) is None:
        return f"{binary} not installed"
    flags = OCI_FLAGS.get(binary, [])
    try:
        runtime(binary, root, *flags, "run", "--detach", "--bundle", str(bundle), "ex")
    except RuntimeError as exc:
        return f"not usable here: {str(exc).strip()}"
    try:
        samples = []
        for _ in range(n):
            t = time.monotonic()
            runtime(binary, root, *flags, "exec", "ex", "/bin/true")
            samples.append(time.monotonic() - t)
        return summary(samples)
    finally:
        runtime(binary, root, *flags, "delete", "--force", "ex", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    try:
        bundle = make(top, ["sleep", "3600"])
        result: dict[str, Any] = {
            name: exec_times(binary, top / f"{name}-root", bundle, args.n)
            for name, binary in (("runv", RUNV), ("runc", "runc"), ("crun", "crun"))
        }
        runv = result["runv"]
        for base in ("crun", "runc"):
            if isinstance(result[base], dict) and isinstance(runv, dict):
                result[f"runv_over_{base}"] = round(runv["median"] / result[base]["median"], 1)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
