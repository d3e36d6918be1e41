"""The container's network, the one place hyperctl and the API decide it. Without the
networking work (tap + tc mirroring into the VM, CNI), a sandbox only has loopback:
`none` is the default and the only mode this build can give."""

from __future__ import annotations

from typing import Any

from ..errors import NotSupported

NETWORK_MODES = ("none", "default")
NOT_AVAILABLE = "networking is not available in this build of runv-py"


def configure_network(spec: dict[str, Any], mode: str, publish: tuple[str, ...]) -> None:
    """Fit the container's OCI spec for network `mode` ("none" or "default") and the published
    ports (-p HOST:GUEST). Raises NotSupported for what this build cannot do."""
    if mode not in NETWORK_MODES:
        raise NotSupported(f"--network {mode!r}: use none or default")
    if mode != "none":
        raise NotSupported(f"--network {mode}: {NOT_AVAILABLE} (use --network none)")
    if publish:
        raise NotSupported(f"-p {publish[0]}: {NOT_AVAILABLE}; ports cannot be published")
