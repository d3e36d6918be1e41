"""`runv gc` and `hyperctl system prune`: the reconciler (runv_py/reconcile) from the
command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import RuntimeConfig
    from ..reconcile.reconciler import Outcome

WHAT = """\
What no live owner holds, as a crash of the whole host side (every runv-py process
SIGKILLed at once) leaves it: QEMU, virtiofsd, vsock backend and stand-in processes whose
supervisor is gone, mounts and VM directories of dead sandboxes (with the host cgroups they
recorded), shared-dir mount points, sockets of containerd shims that died, tc redirects
to taps that are gone, hyperctl sandboxes' network namespaces, nftables tables, CNI IPAM
leases, portmap chains and MASQUERADE rules,
hyperctl's host cgroups, and hyperctl records half made, half removed, or of a container that
never started and whose maker died. An owner is proved alive by its pid and start time (a
VM directory's owner file, a record's maker, a workload's creator or monitor), never by age:
a sandbox still starting is never touched. An exited hyperctl container keeps its record
(hyperctl rm removes it) but its network is released."""

RUNV_HELP = f"""\
Find and remove what dead sandboxes left, printing one line per object removed (one JSON
object per line with --log-format json). It looks under the config's state_dir, hyperctl's
roots ($HYPERCTL_ROOT, $HYPERCTL_DATA_ROOT or their defaults) and /run/netns. `runv pool
serve` runs the same pass when it starts and every few minutes.

{WHAT}"""

PRUNE_HELP = f"""\
List what dead sandboxes left, as a table (a dry run, as docker's prune asks first); -f
removes it. --images also frees image data no image name uses.

{WHAT}"""


def add_runv_parser(sub: Any) -> None:
    p = sub.add_parser("gc", help="remove what dead sandboxes left (processes, mounts, "
                                  "network state, cgroups, state)",
                       description=RUNV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list, remove nothing")


def add_prune_parser(sub: Any) -> None:
    p = sub.add_parser("system", help="host-wide maintenance (prune)")
    actions = p.add_subparsers(dest="system_command", metavar="ACTION", required=True)
    prune = actions.add_parser("prune", help="list (-f: remove) what dead sandboxes left",
                               description=PRUNE_HELP,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("-f", "--force", action="store_true", help="remove what is found")
    prune.add_argument("--images", action="store_true",
                       help="also image data (blobs, layers) no image name uses")
    prune.add_argument("--format", choices=("table", "json"), default="table")


def _json(outcome: Outcome, dry_run: bool) -> str:
    item: dict[str, Any] = {"kind": outcome.orphan.kind, "name": outcome.orphan.name,
                            "owner": outcome.orphan.owner}
    if not dry_run:
        item["removed"] = outcome.removed
    if outcome.error:
        item["error"] = outcome.error
    return json.dumps(item)


def run_gc(args: argparse.Namespace, config: RuntimeConfig) -> int:
    from ..reconcile import reconciler

    as_json = args.log_format == "json"
    dry_run = bool(args.dry_run)

    def report(outcome: Outcome) -> None:
        if as_json:
            print(_json(outcome, dry_run), flush=True)
        elif outcome.error:
            print(f"runv gc: could not remove {outcome.orphan.kind} {outcome.orphan.name}: "
                  f"{outcome.error}", file=sys.stderr, flush=True)
        else:
            verb = "found" if dry_run else "removed"
            print(f"{verb} {outcome.orphan.kind} {outcome.orphan.name} "
                  f"({outcome.orphan.owner})", flush=True)

    import asyncio

    outcomes = asyncio.run(reconciler.run(reconciler.default_scope(config), dry_run=dry_run,
                                          report=report))
    return 1 if any(o.error for o in outcomes) else 0


def run_prune(args: argparse.Namespace, config: RuntimeConfig) -> int:
    from ..reconcile import reconciler

    scope = reconciler.default_scope(
        config, hyperctl_root=Path(args.root) if args.root else None,
        data_root=Path(args.data_root) if args.data_root else None)
    import asyncio

    dry_run = not args.force
    outcomes = asyncio.run(reconciler.run(scope, include_images=args.images, dry_run=dry_run))
    if args.format == "json":
        for outcome in outcomes:
            print(_json(outcome, dry_run))
    else:
        _table(outcomes, dry_run)
    return 1 if any(o.error for o in outcomes) else 0


def _table(outcomes: list[Outcome], dry_run: bool) -> None:
    rows = [(o.orphan.kind, o.orphan.name, o.orphan.owner,
             "" if dry_run else ("removed" if o.removed else f"failed: {o.error}"))
            for o in outcomes]
    head = ("KIND", "NAME", "OWNER (DEAD)", "" if dry_run else "STATUS")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    for row in [head, *rows]:
        print(("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
               + (f"  {row[3]}" if row[3] else "")).rstrip())
    if dry_run:
        print(f"{len(rows)} object(s) no live owner holds"
              + ("; hyperctl system prune -f removes them" if rows else ""))
    else:
        print(f"removed {sum(o.removed for o in outcomes)} of {len(rows)} object(s)")
