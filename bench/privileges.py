"""bench/privileges: what running QEMU unprivileged costs on the start path (docs/security.md):
`runv run` of a busybox bundle to its first line, from a template and cold, with this tree's
code against a baseline tree (a checkout of the code before, e.g. a worktree of main), the two
alternating in the same run so that load from elsewhere on the host hits both alike. The
first round of each (which may build a template) is not counted.

    python bench/privileges.py --baseline /path/to/old/tree [--n 6] [--json FILE]

Prints the median seconds per tree and path and the ratio this tree / baseline (> 1: slower).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bundle import make

OURS = Path(__file__).resolve().parent.parent
RUNV = ("import sys; sys.argv[0] = 'runv'; from runv_py.cli.main import main; "
        "sys.exit(main())")


def to_line(tree: Path, top: Path, bundle: Path, template: str, name: str) -> float:
    config = top / f"config-{template}.toml"
    config.write_text(f'state_dir = "{top / "state"}"\ntemplate = "{template}"\n'
                      '[hypervisor]\nboot_timeout_s = 120\n')
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(tree),
           "RUNV_CONFIG": str(config)}
    for key in ("RUNV_ASSETS_DIR", "RUNV_TEMPLATE_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", RUNV, "--root", str(top / "root"), "run",
                             "--bundle", str(bundle), name], env=env, cwd=tree,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    elapsed = time.monotonic() - start
    proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0 or line != b"bench-line\n":
        raise RuntimeError(f"{tree}: runv run exited {proc.returncode}: {err[-800:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="bench-priv-"))
    trees = {"baseline": args.baseline.resolve(), "ours": OURS}
    times: dict[str, dict[str, list[float]]] = {t: {"template": [], "cold": []} for t in trees}
    try:
        bundle = make(top, ["echo", "bench-line"])
        for round_ in range(args.n + 1):
            for label, tree in trees.items():
                for path, template in (("template", "auto"), ("cold", "off")):
                    seconds = to_line(tree, top, bundle, template, f"b{round_}{label}{path}")
                    if round_:
                        times[label][path].append(seconds)
        result: dict[str, Any] = {}
        for path in ("template", "cold"):
            base = statistics.median(times["baseline"][path])
            ours = statistics.median(times["ours"][path])
            result[path] = {"baseline_s": round(base, 3), "ours_s": round(ours, 3),
                            "ratio": round(ours / base, 3), "n": args.n,
                            "runs": {t: [round(x, 3) for x in times[t][path]] for t in trees}}
            print(f"{path:8s} baseline {base:.3f}s  ours {ours:.3f}s  ratio {ours / base:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
