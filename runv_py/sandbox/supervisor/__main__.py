"""`python -m runv_py.sandbox.supervisor`: the supervisor process's entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from ... import child
from ...errors import RunvError
from ...storage.shared import enter_private_mount_namespace
from . import launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runv-supervisor")
    parser.add_argument("--root")
    parser.add_argument("--id")
    parser.add_argument("--bundle")
    parser.add_argument("--config")
    parser.add_argument("--status-fd", type=int)
    parser.add_argument("--pool-fd", type=int,
                        help="a warm pool's idle supervisor: its link to `runv pool serve`")
    parser.add_argument("--restore", metavar="DIR",
                        help="restore the sandbox saved in DIR (a checkpoint) instead of "
                             "creating the container")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--spawned-at", type=float, default=time.time())
    args = parser.parse_args(argv)
    if args.pool_fd is None and None in (args.root, args.id, args.bundle, args.status_fd):
        parser.error("--root, --id, --bundle and --status-fd are required (or --pool-fd)")
    if args.status_fd is not None and not child.has_reader(args.status_fd):
        return 1  # its starter died before the parent-death signal was set (spawn_detached)
    from ... import log

    # Before any thread exists: unshare(CLONE_NEWNS) refuses a process with threads.
    enter_private_mount_namespace()
    log.setup(debug=args.debug, fmt="json")
    settings = launch.Args(config=args.config, debug=args.debug, spawned_at=args.spawned_at,
                           root=Path(args.root or "/"), container_id=args.id or "",
                           bundle=Path(args.bundle or "/"), pool_fd=args.pool_fd,
                           snapshot=Path(args.restore) if args.restore else None)
    child.watch_children_by_pidfd()  # it forks its vsock backend
    try:
        if args.pool_fd is not None:
            return asyncio.run(launch.pooled(settings))
        return asyncio.run(launch.for_container(settings, args.status_fd))
    except RunvError as exc:
        logging.getLogger(__name__).error("%s", exc, extra={"container": args.id})
        return exc.exit_code
    except Exception:
        logging.getLogger(__name__).exception("supervisor failed", extra={"container": args.id})
        return 1


if __name__ == "__main__":
    sys.exit(main())
