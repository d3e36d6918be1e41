"""`runv`: the OCI runtime CLI (runc's command set). This build has the global flags and
--version; the container commands arrive with the runv issue and fail clearly until then."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import NotSupported
from .errors import run_guarded

OCI_SPEC_VERSION = "1.1.0"
COMMANDS = ("create", "start", "run", "state", "kill", "delete", "exec", "ps", "list", "spec",
            "features", "pause", "resume", "update", "events")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runv", description="OCI runtime that runs every container in its own VM.")
    parser.add_argument("-v", "--version", action="store_true", help="print the version")
    parser.add_argument("--root", default="/run/runv", help="state directory")
    parser.add_argument("--log", help="log file (JSON lines with --log-format json)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--systemd-cgroup", action="store_true")
    parser.add_argument("--rootless", default="auto")
    parser.add_argument("command", nargs="?", choices=COMMANDS, metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .. import log

    log.setup(debug=args.debug, fmt=args.log_format, path=args.log)
    if args.version:
        print(f"runv version {__version__}\nspec: {OCI_SPEC_VERSION}")
        return 0
    if args.command is None:
        _parser().print_help(sys.stderr)
        return 2

    def unsupported() -> int:
        raise NotSupported(f"runv {args.command} is not implemented in this build yet")

    return run_guarded("runv", unsupported, log_file=args.log)
