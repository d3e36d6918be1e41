"""CNI (container network interface) plugins driven as a container manager does: a network
configuration list whose plugins run in order for ADD (each gets the previous one's result)
and in reverse for DEL, with the CNI_* environment and the configuration on stdin. Used to
give a sandbox a network of its own (`hyperctl run --network default`) with Debian's
containernetworking-plugins: bridge + host-local IPAM + portmap."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import child
from ..errors import NetworkError

CNI_VERSION = "1.0.0"
PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
PLUGIN_TIMEOUT_S = 60.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, slots=True)
class PortMapping:
    """Publish container_port of the sandbox on host_port of the host (host_ip: all when
    empty)."""

    host_port: int
    container_port: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_ip: str = ""

    def __post_init__(self) -> None:
        for name, port in (("host port", self.host_port),
                           ("container port", self.container_port)):
            if not 1 <= port <= 65535:
                raise NetworkError(f"port mapping: {name} {port} is not from 1 to 65535")

    @classmethod
    def parse(cls, text: str) -> PortMapping:
        """HOST:GUEST[/tcp|/udp], as `-p` takes it (also IP:HOST:GUEST)."""
        spec, _, protocol = text.partition("/")
        protocol = protocol or "tcp"
        parts = spec.rsplit(":", 2)
        if protocol not in ("tcp", "udp") or len(parts) < 2 or not all(
                p.isdigit() for p in parts[-2:]):
            raise NetworkError(f"port mapping {text!r}: use HOST:GUEST[/tcp|udp] or "
                               "IP:HOST:GUEST")
        host_ip = parts[0] if len(parts) == 3 else ""
        return cls(int(parts[-2]), int(parts[-1]), protocol,  # type: ignore[arg-type]
                   host_ip)

    def runtime_config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"hostPort": self.host_port,
                                 "containerPort": self.container_port,
                                 "protocol": self.protocol}
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry


@dataclass(frozen=True, slots=True)
class BridgeNetwork:
    """A Linux bridge on the host with host-local addresses from `subnet` and, when `ports`
    are wanted, portmap's DNAT. No masquerading and no default route: the sandboxes reach the
    host and each other on the bridge, nothing beyond (set ip_masq for a sandbox that should
    reach the outside through the host's NAT)."""

    name: str
    bridge: str
    subnet: str
    data_dir: Path
    mtu: int = 0
    ip_masq: bool = False
    default_route: bool = False  # a default route via the bridge's address

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise NetworkError(f"network name {self.name!r}: use letters, digits, '_.-'")
        if not 1 <= len(self.bridge) <= 15:
            raise NetworkError(f"bridge name {self.bridge!r}: 1 to 15 characters")
        try:
            ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise NetworkError(f"network {self.name}: subnet {self.subnet!r}: {exc}") from None

    def conflist(self) -> dict[str, Any]:
        bridge: dict[str, Any] = {
            "type": "bridge", "bridge": self.bridge, "isGateway": True,
            "ipMasq": self.ip_masq, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                     "dataDir": str(self.data_dir)}}
        if self.mtu:
            bridge["mtu"] = self.mtu
        if self.default_route:
            bridge["isDefaultGateway"] = True
        # snat: connections from 127.0.0.1 to a published port are masqueraded (and the
        # bridge routes localnet), so `curl localhost:PORT` on the host works.
        portmap = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
        return {"cniVersion": CNI_VERSION, "name": self.name, "plugins": [bridge, portmap]}


def find_plugin(kind: str, dirs: tuple[str, ...] = PLUGIN_DIRS) -> str:
    for directory in dirs:
        path = os.path.join(directory, kind)
        if os.access(path, os.X_OK):
            return path
    raise NetworkError(f"CNI plugin {kind!r} not found in {', '.join(dirs)}: "
                       "apt-get install containernetworking-plugins")


class Cni:
    """One network configuration list applied to container network namespaces."""

    def __init__(self, conflist: dict[str, Any], dirs: tuple[str, ...] = PLUGIN_DIRS) -> None:
        self.conflist = conflist
        self.dirs = dirs

    async def _exec(self, plugin: dict[str, Any], stdin: dict[str, Any], *, command: str,
                    container_id: str, netns: str, ifname: str) -> dict[str, Any]:
        kind = str(plugin["type"])
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
               "CNI_IFNAME": ifname, "CNI_PATH": ":".join(self.dirs),
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        try:
            done = await child.run([find_plugin(kind, self.dirs)], env=env,
                                   input=json.dumps(stdin).encode(), timeout_s=PLUGIN_TIMEOUT_S)
        except TimeoutError:
            raise NetworkError(f"CNI plugin {kind} {command}: no answer within "
                               f"{PLUGIN_TIMEOUT_S:g}s") from None
        text = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            try:
                error = json.loads(text)
                message = f"{error.get('msg', '')} {error.get('details', '')}".strip()
            except (ValueError, AttributeError):
                message = (text or done.stderr.decode(errors="replace")).strip()
            raise NetworkError(f"CNI plugin {kind} {command} failed: {message}")
        try:
            result = json.loads(text) if text else {}
        except ValueError:
            raise NetworkError(f"CNI plugin {kind} {command}: its output is not JSON: "
                               f"{text[:200]!r}") from None
        return result if isinstance(result, dict) else {}

    def _stdin(self, plugin: dict[str, Any], ports: tuple[PortMapping, ...]
               ) -> dict[str, Any]:
        config = {"cniVersion": self.conflist.get("cniVersion", CNI_VERSION),
                  "name": self.conflist["name"], **plugin}
        if plugin.get("capabilities", {}).get("portMappings") and ports:
            config["runtimeConfig"] = {"portMappings": [p.runtime_config() for p in ports]}
        return config

    async def add(self, container_id: str, netns: str, ifname: str = "eth0",
                  ports: tuple[PortMapping, ...] = ()) -> dict[str, Any]:
        """Attach the namespace; the last plugin's result. A failure undoes what ran."""
        result: dict[str, Any] = {}
        try:
            for plugin in self.conflist["plugins"]:
                stdin = self._stdin(plugin, ports)
                if result:
                    stdin["prevResult"] = result
                result = await self._exec(plugin, stdin, command="ADD",
                                          container_id=container_id, netns=netns, ifname=ifname)
        except BaseException:
            await self.delete(container_id, netns, ifname, ports)
            raise
        return result

    async def delete(self, container_id: str, netns: str, ifname: str = "eth0",
                     ports: tuple[PortMapping, ...] = ()) -> None:
        """Detach: every plugin in reverse order, also when some fail (the first failure is
        raised after all ran). Deleting what is not there succeeds."""
        failure: NetworkError | None = None
        for plugin in reversed(self.conflist["plugins"]):
            try:
                await self._exec(plugin, self._stdin(plugin, ports), command="DEL",
                                 container_id=container_id, netns=netns, ifname=ifname)
            except NetworkError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
