"""`hyperctl`: runv-py's daemonless user CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .. import __version__
from .errors import run_guarded

DESCRIPTION = """\
Run workloads in their own lightweight VM: every sandbox gets its own guest kernel
and a hyperstart agent, so the host kernel is never shared with the workload.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperctl", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hyperctl {__version__}")
    parser.add_argument("--debug", action="store_true", help="log debug lines and phase timings")
    parser.add_argument("--log", metavar="FILE", help="write log lines to FILE instead of stderr")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log line format (json: logrus-style objects)")
    parser.add_argument("--config", metavar="FILE",
                        help="runtime config (default $RUNV_CONFIG or /etc/runv/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser(
        "version", help="show host and guest versions (boots a throw-away VM)",
        description="Print the versions of hyperctl, QEMU, the accelerator in use, the guest "
                    "kernel and image, then boot a throw-away VM and print what its agent "
                    "reports. Exit status 0 means a VM booted and its agent answered.")
    version.add_argument("--format", choices=("text", "json"), default="text")
    return parser


async def _version(args: argparse.Namespace) -> int:
    from .. import config as config_mod
    from ..sandbox.sandbox import Sandbox

    config = config_mod.load(args.config)
    async with await Sandbox.boot(config, debug=args.debug) as sandbox:
        assert sandbox.agent is not None and sandbox.accel is not None
        agent = await sandbox.agent.version()
        details = await sandbox.agent.guest_details()
    report: dict[str, Any] = {
        "hyperctl": __version__,
        "accelerator": sandbox.accel.accel,
        "accelerator_reason": sandbox.accel.reason,
        "machine": config.hypervisor.machine,
        "agent": agent.agent_version,
        "agent_api": agent.api_version,
        "guest_kernel": agent.kernel_release,
        "guest_python": agent.python_version,
        "guest_memory_mib": details.mem_total_kib // 1024,
        "boot_ms": {k: round(v * 1000) for k, v in sandbox.timings.items()},
    }
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key + ':':<{width + 1}} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .. import log

    log.setup(debug=args.debug, fmt=args.log_format, path=args.log)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return 2
    return run_guarded("hyperctl", lambda: asyncio.run(_version(args)), log_file=args.log)
