"""Hypervisor-neutral descriptions of what a sandbox's VM gets attached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory the guest mounts by `tag` (virtio-9p now; virtio-fs later)."""

    tag: str
    path: Path
    readonly: bool = False
