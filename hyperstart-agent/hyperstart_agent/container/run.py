"""`python -m hyperstart_agent.container.run BUNDLE`: run one container with the engine, like
`runc run`, with our stdio, and exit with its status (128+N for a signal). For tests and
debugging of the engine without a VM; needs root."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from . import syscalls as sc
from .engine import Engine, EngineError


def main() -> int:
    parser = argparse.ArgumentParser(prog="hyperstart-run", description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("--id", default="run")
    args = parser.parse_args()
    with open(os.path.join(args.bundle, "config.json"), "rb") as f:
        raw = json.loads(f.read())
    root = raw.get("root", {}).get("path", "")
    if isinstance(root, str) and root and not root.startswith("/"):
        raw["root"]["path"] = os.path.abspath(os.path.join(args.bundle, root))
    # Orphans (the container's init once the helper exits) come to us to be reaped.
    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    with tempfile.TemporaryDirectory(prefix="hyperstart-run-") as state:
        engine = Engine(state_root=state)
        try:
            container = engine.create(args.id, json.dumps(raw).encode(), stdio="inherit")
            engine.start(args.id)
        except EngineError as exc:
            print(f"hyperstart-run: {exc.code}: {exc}", file=sys.stderr)
            if args.id in engine.containers:  # created, failed to start: its mounts go
                engine.remove(args.id, force=True)
            return 125
        while not container.init.exited.is_set():
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            engine.on_exit(pid, status)
        code = engine.wait(args.id)
        engine.remove(args.id)
        return code


if __name__ == "__main__":
    sys.exit(main())
