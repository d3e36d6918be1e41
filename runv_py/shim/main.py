"""`containerd-shim-runv-v2`: the containerd shim v2 front door (not in this build yet)."""

from __future__ import annotations

import sys


def main() -> int:
    print("containerd-shim-runv-v2: not implemented in this build yet", file=sys.stderr)
    return 1
