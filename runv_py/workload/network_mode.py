"""The container's network, the one place hyperctl and the API decide it:

  none     a spec without a namespace path: the VM has loopback only (the default);
  default  a network namespace of the container's own on runv-py's CNI bridge network
           ([network] in config.toml; bridge + host-local + portmap), with -p ports published.

The namespace lives as long as the container's VM: attach() before the bundle is written (the
lease goes to the container's record directory), release() when the VM is freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import NotSupported
from ..network import managed
from ..network.cni import BridgeNetwork, PortMapping

NETWORK_MODES = ("none", "default")
LEASE_FILE = "network.json"


def check(mode: str, publish: tuple[str, ...]) -> tuple[PortMapping, ...]:
    """The port mappings; NotSupported/NetworkError naming a bad flag."""
    if mode not in NETWORK_MODES:
        raise NotSupported(f"--network {mode!r}: use none or default")
    ports = tuple(PortMapping.parse(text) for text in publish)
    if ports and mode == "none":
        raise NotSupported(f"-p {publish[0]}: --network none has no ports to publish "
                           "(use --network default)")
    return ports


def configure_network(spec: dict[str, Any], mode: str, publish: tuple[str, ...],
                      netns: str | None = None) -> None:
    """Fit the container's OCI spec: a new, empty network namespace, or `netns` (default)."""
    check(mode, publish)
    namespaces = spec["linux"].setdefault("namespaces", [])
    for ns in namespaces:
        if ns.get("type") == "network":
            ns.pop("path", None)
            if netns:
                ns["path"] = netns
            return
    namespaces.append({"type": "network", **({"path": netns} if netns else {})})


async def attach(workload_id: str, mode: str, publish: tuple[str, ...], record_dir: Path,
                 settings: config_mod.NetworkConfig) -> str | None:
    """For --network default: the namespace path for the spec, its lease saved in
    record_dir. None for --network none."""
    ports = check(mode, publish)
    if mode == "none":
        return None
    network = BridgeNetwork(name="runv", bridge=settings.bridge, subnet=settings.subnet,
                            data_dir=settings.cni_data_dir)
    lease = await managed.attach(f"hc-{workload_id[:12]}", network, ports)
    try:
        (record_dir / LEASE_FILE).write_text(lease.to_json())
    except BaseException:
        await managed.detach(lease)
        raise
    return lease.netns


async def release(record_dir: Path) -> None:
    """Undo attach() (CNI DEL, the namespace); nothing to do without a lease. Idempotent."""
    path = record_dir / LEASE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    await managed.detach(managed.Lease.from_json(text))
    path.unlink(missing_ok=True)
