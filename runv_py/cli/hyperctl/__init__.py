"""`hyperctl`: runv-py's daemonless user CLI. Runs images as containers, each in its own VM,
through the same machinery as `runv` (see runv_py.workload); no daemon: state lives under
--root (runtime, default /run/hyperctl) and --data-root (containers, logs, images, default
/var/lib/hyperctl)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ... import __version__
from ..errors import exit_after, run_guarded

DESCRIPTION = """\
Run workloads in their own lightweight VM: every container gets its own guest kernel
and a hyperstart agent, so the host kernel is never shared with the workload.

  hyperctl run --rm busybox echo hello        # exit status = the container's
  hyperctl run -d --name web busybox httpd -f # detached; output in `hyperctl logs web`
  hyperctl exec web ps;  hyperctl stop web;  hyperctl rm web
"""
EPILOG = """\
environment: HYPERCTL_ROOT and HYPERCTL_DATA_ROOT set the default roots; RUNV_CONFIG the
runtime config; RUNV_TENANT the tenant. docs/hyperctl.md has every command with examples."""


def _parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(prog="hyperctl", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hyperctl {__version__}")
    parser.add_argument("--debug", action="store_true", help="log debug lines and phase timings")
    parser.add_argument("--log", metavar="FILE", help="write log lines to FILE instead of stderr")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log line format (json: logrus-style objects)")
    parser.add_argument("--config", metavar="FILE",
                        help="runtime config (default $RUNV_CONFIG or /etc/runv/config.toml)")
    parser.add_argument("--root", metavar="DIR",
                        help="runtime state (default $HYPERCTL_ROOT or /run/hyperctl)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="containers, logs and images (default $HYPERCTL_DATA_ROOT or "
                             "/var/lib/hyperctl)")
    parser.add_argument("--tenant", metavar="NAME",
                        help="act in this tenant's scope: its containers, names, logs, audit "
                             "events and image tags only (default $RUNV_TENANT, else the "
                             "operator's scope)")
    commands.add_all(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def entry() -> NoReturn:
    """The `hyperctl` console script."""
    exit_after(main)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from ... import log
    from . import commands

    log.setup(debug=args.debug, fmt=args.log_format, path=args.log)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return run_guarded("hyperctl", lambda: commands.dispatch(args), log_file=args.log)
