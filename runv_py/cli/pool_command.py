"""`runv pool`: the warm pool of idle sandboxes restored from templates (serve it, show it)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import RuntimeConfig

HELP = """\
The warm pool keeps idle sandboxes ready: each is a supervisor whose VM is already restored
from the template, with its agent connected (docs/templates.md, Warm pool). `runv create`/`run`,
the containerd shim and hyperctl take one from the pool when `runv pool serve` runs for their
state_dir and the sandbox's size is kept warm; otherwise they start a sandbox as usual. A pooled
VM serves one container and is destroyed with it; the pool starts another in the background.
Configure it in the [pool] section of the runtime config (size, memory_mib, sizes, idle).
"""
RECONCILE_INTERVAL_S = 300.0
# The command line the service keeps for its members and their vsock backends, forked from it:
# theirs is written over its own (forked.py), and a `runv pool serve` started as such has room
# for neither a backend's `--socket=<state_dir>/sandboxes/pool-.../vhost-vsock.sock`.
ARGV_ROOM = 1024
ARGV_ROOM_OPTION = "--argv-room"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pool", help="serve or show the warm pool of idle sandboxes",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve", help="run the pool service in the foreground (SIGTERM destroys idle VMs)",
        description="Keep [pool] size idle sandboxes per size until SIGTERM/SIGINT, which "
                    "destroys the idle ones (claimed ones live on with their containers). "
                    "SIGHUP reads the config again: idle sandboxes it no longer wants are "
                    "destroyed and the pool refills. One service per state_dir; see "
                    "contrib/runv-pool.service.")
    # Spaces the service adds to its own command line when it starts (ARGV_ROOM).
    serve.add_argument(ARGV_ROOM_OPTION, help=argparse.SUPPRESS)
    status = actions.add_parser("status", help="idle/starting/claimed counts and memory")
    status.add_argument("--format", choices=("table", "json"), default="table")


def run(args: argparse.Namespace, config: RuntimeConfig) -> int:
    import asyncio

    from ..errors import RunvError
    from ..sandbox import pool_claim

    if args.pool_command == "serve":
        from .. import forked
        from ..vm.hypervisor import check_templates

        forked.exec_with_room(ARGV_ROOM + len(bytes(config.state_dir)), ARGV_ROOM_OPTION)

        check_templates(config.hypervisor)  # the pool is made of template clones
        return asyncio.run(_serve(config, bool(args.debug)))
    try:
        reply = asyncio.run(pool_claim.status(config.state_dir))
    except ConnectionError as exc:
        raise RunvError(f"{exc}: start it with `runv pool serve`") from None
    if args.format == "json":
        print(json.dumps(reply.fields(), indent=2))
        return 0
    print(f"memory {reply.memory_mib} of {reply.memory_ceiling_mib} MiB, "
          f"{reply.size} per size, idle VMs {reply.idle_state}, "
          f"{reply.claims} claimed since start")
    print(f"{'KEY':<18}{'MEMORY':<8}{'VCPUS':<7}{'IDLE':<6}{'STARTING':<10}CLAIMED")
    for key, row in reply.keys.items():
        print(f"{key:<18}{str(row.memory_mib) + 'M':<8}{row.vcpus!s:<7}"
              f"{row.idle!s:<6}{row.starting!s:<10}{row.claimed_running}")
    return 0


async def _serve(config: RuntimeConfig, debug: bool) -> int:
    import asyncio

    from .. import child
    from ..reconcile import reconciler
    from ..sandbox import pool
    from ..sandbox.supervisor.__main__ import main as supervisor_main
    from ..vsock import keeper  # noqa: F401 (its members fork their vsock backends: shared)

    child.watch_children_by_pidfd()  # it forks its members
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    service = pool.PoolService(config, config.file, member_main=supervisor_main, debug=debug)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    print(f"warm pool for state_dir {config.state_dir} (SIGTERM stops it, SIGHUP reloads "
          "the config)", file=sys.stderr, flush=True)
    # The reconciler: what dead sandboxes left goes at start and every few minutes
    # (runv gc; docs/design.md, The reconciler).
    reconciling = asyncio.create_task(reconciler.run_periodically(
        reconciler.default_scope(config), RECONCILE_INTERVAL_S, stop))
    try:
        await service.serve(stop)
    finally:
        stop.set()
        await reconciling
    return 0
