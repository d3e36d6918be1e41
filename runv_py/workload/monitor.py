"""The monitor of one detached container (hyperctl's conmon): boots it, sends its output to the
container's log file, tells `hyperctl run -d` once it runs, waits for its exit, records the
exit status, enforces --timeout and frees the VM. Its own session; if it is killed, the
supervisor kills the container process and `ps -a` shows it exited. For the Python API it also
watches the owning program and kills the container when that program ends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .. import child
from .. import config as config_mod
from ..errors import RunvError
from ..sandbox import protocol
from . import output_log
from .manager import WorkloadManager
from .records import Workload

log = logging.getLogger(__name__)


async def _watch_owner(manager: WorkloadManager, workload: Workload, pid: int,
                       start: int) -> None:
    """The container lives as long as the program that made it (the Python API's sandboxes):
    when that process is gone, however it ended, kill the container; serve() then frees it.
    The wait is on a pidfd: an idle sandbox's monitor does not wake on a timer."""
    await child.wait_gone(pid, start, kill_after_s=None)
    log.info("owner pid %d is gone: killing the container", pid,
             extra={"container": workload.id})
    await manager.kill_all(workload)


async def _monitor(args: argparse.Namespace) -> int:
    manager = WorkloadManager(config_mod.load(args.config), Path(args.state_root),
                              Path(args.data_root), debug=args.debug, tenant=args.tenant)
    ready_fd: int | None = args.ready_fd
    workload = manager.records.load(args.id)
    # The output goes through a pipe of ours into the bounded log (output_log.py).
    output_r, output_w = os.pipe2(os.O_CLOEXEC)
    copier = output_log.Copier(output_r, output_log.RotatingLog(
        manager.records.output_path(args.id), workload.log_max_size))
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), output_w, os.dup(output_w)]

    def started() -> None:
        nonlocal ready_fd
        for fd in fds:
            os.close(fd)
        fds.clear()
        assert ready_fd is not None
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
        ready_fd = None

    watcher = None
    if args.owner:
        pid, _, start = args.owner.partition(":")
        watcher = asyncio.create_task(_watch_owner(manager, workload, int(pid), int(start)))
    try:
        await manager.serve(workload, fds, on_started=started, on_exited=copier.drain)
        return 0
    except Exception as exc:
        log.error("%s", exc, exc_info=args.debug, extra={"container": args.id})
        if ready_fd is not None:  # the error, as the supervisor's control replies carry one
            os.write(ready_fd, protocol.encode(protocol.error_reply(exc)))
        return exc.exit_code if isinstance(exc, RunvError) else 1
    finally:
        if watcher is not None:
            watcher.cancel()
        for fd in fds:
            os.close(fd)
        copier.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperctl-monitor")
    parser.add_argument("--state-root", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--owner", metavar="PID:START",
                        help="kill the container when this process (pid, start time) ends")
    parser.add_argument("--tenant")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    from .. import log as log_setup

    log_setup.setup(debug=args.debug, fmt="json")
    return asyncio.run(_monitor(args))


if __name__ == "__main__":
    sys.exit(main())
