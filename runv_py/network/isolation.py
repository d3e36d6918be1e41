"""Isolation of a sandbox on a shared bridge network, enforced on the host (the guest is
untrusted), as nftables tables of the sandbox's own (`runv-<sandbox>`, families bridge and
inet), made before its VM starts and deleted with its network lease:

- bridge, on the host end of its veth (libvirt's clean-traffic, as nftables): frames from the
  sandbox must carry its MAC, ARP its MAC and IPv4 address, IPv4 its address; no other
  protocol (no IPv6, no VLANs). Nothing is bridged from or to its port: it reaches no other
  sandbox on the bridge, only the host (members of one pod share one VM and one port).
- inet, for what it sends to the host and through it (identified by its address, which the
  bridge rules pinned): answers to connections made to it, connections to published ports
  (DNAT), DNS to the configured servers, and what the egress policy allows; everything else
  is refused (TCP reset, ICMP administratively prohibited) so that a denied connection fails
  at once. The host's own addresses are reached only through published ports or a rule
  naming them. Connections routed to the sandbox from elsewhere must be answers or published
  ports too. A connection to a published port of a sandbox on the same bridge leaves the
  host masqueraded, so that the answer comes back through the host.

Each table's rules match only the sandbox's port and address: two sandboxes' tables never
decide about each other's traffic, and deleting one touches nothing else."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from .. import child
from ..errors import NetworkError
from .egress import EgressPolicy

log = logging.getLogger(__name__)

NFT = "nft"
TABLE_PREFIX = "runv-"
FAMILIES = ("bridge", "inet")
DNS_PORT = 53
# The packet mark bit of connections from a sandbox to a published port, for the bridge rules
# (a host with br_netfilter bridges them; the bridge family has no conntrack to ask).
PUBLISHED_MARK = 0x10000000


@dataclass(frozen=True, slots=True)
class SandboxPort:
    """A sandbox on a bridge: its host-side interface and the MAC and IPv4 address the
    bridge network gave it."""

    sandbox_id: str
    bridge: str
    host_interface: str
    mac: str
    address: str          # IPv4, without prefix
    subnet: str           # the bridge network's

    @property
    def table(self) -> str:
        return table_name(self.sandbox_id)


def table_name(sandbox_id: str) -> str:
    return f"{TABLE_PREFIX}{sandbox_id}"


def _quote(name: str) -> str:
    if not name or any(c in name for c in '"\\ \n;{}'):
        raise NetworkError(f"isolation: interface name {name!r} cannot be used in a rule")
    return f'"{name}"'


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _allowed(policy: EgressPolicy, resolvers: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(networks with every port, network . protocol . port elements) the sandbox may reach
    beyond the bridge, DNS servers included."""
    anywhere: list[str] = []
    ports = [f"{r} . {proto} . {DNS_PORT}" for r in resolvers for proto in ("udp", "tcp")]
    if policy.mode == "list":
        for rule in policy.rules:
            for network in rule.networks:
                if rule.port is None:
                    anywhere.append(network)
                else:
                    ports += [f"{network} . {proto} . {rule.port}" for proto in ("udp", "tcp")]
    return anywhere, ports


def _refuse(match: str) -> list[str]:
    return [f"{match} meta l4proto tcp reject with tcp reset",
            f"{match} reject with icmpx type admin-prohibited"]


def ruleset(port: SandboxPort, policy: EgressPolicy, resolvers: tuple[str, ...] = ()) -> str:
    """The nftables script that makes the sandbox's tables (replacing older ones)."""
    for value in (port.address, *resolvers):
        ipaddress.IPv4Address(value)
    subnet = str(ipaddress.ip_network(port.subnet, strict=False))
    veth, bridge = _quote(port.host_interface), _quote(port.bridge)
    mac, addr = port.mac.lower(), port.address
    if policy.mode == "none":
        resolvers = ()
    anywhere, ports = _allowed(policy, resolvers)
    sent = f"iifname {bridge} ip saddr {addr}"
    lines = [*_drop_existing(port.table),
             f"table bridge {port.table} {{",
             "  chain anti_spoof {",
             "    type filter hook prerouting priority -200; policy accept;",
             f"    iifname {veth} ether saddr != {mac} drop",
             f"    iifname {veth} ether type arp arp saddr ether != {mac} drop",
             f"    iifname {veth} ether type arp arp saddr ip != {addr} drop",
             f"    iifname {veth} ether type ip ip saddr != {addr} drop",
             f"    iifname {veth} ether type != {{ ip, arp }} drop",
             "  }",
             "  chain isolate {",
             "    type filter hook forward priority 0; policy accept;",
             # A host with br_netfilter bridges a connection DNATed to a sandbox on the same
             # bridge (a published port) instead of routing it: the inet table marked it.
             f"    iifname {veth} meta mark & {PUBLISHED_MARK:#x} != 0 accept",
             f"    oifname {veth} meta mark & {PUBLISHED_MARK:#x} != 0 accept",
             f"    iifname {veth} drop",
             f"    oifname {veth} drop",
             "  }",
             "}",
             f"table inet {port.table} {{",
             "  chain published {",
             "    type filter hook prerouting priority dstnat + 1; policy accept;",
             f"    {sent} ct status dnat meta mark set meta mark | {PUBLISHED_MARK:#x}",
             "  }",
             "  chain to_host {",
             "    type filter hook input priority 0; policy accept;",
             f"    {sent} ct state established,related accept",
             f"    {sent} ct status dnat accept"]
    allow = []
    if anywhere:
        allow.append(f"{sent} ip daddr {_set(anywhere)} accept")
    if ports:
        allow.append(f"{sent} ip daddr . meta l4proto . th dport {_set(ports)} accept")
    lines += [f"    {rule}" for rule in (*allow, *_refuse(sent))]
    lines += ["  }",
              "  chain through_host {",
              "    type filter hook forward priority 0; policy accept;",
              f"    {sent} ct state established,related accept",
              f"    {sent} ct status dnat accept"]
    beyond = [f"{sent} ip daddr {subnet} reject with icmpx type admin-prohibited", *allow]
    if policy.mode == "all":
        beyond += [f"{sent} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} "
                   "reject with icmpx type admin-prohibited",
                   f"{sent} accept"]
    beyond += _refuse(sent)
    received = f"oifname {bridge} ip daddr {addr}"
    beyond += [f"{received} ct state established,related accept",
               f"{received} ct status dnat accept",
               f"{received} reject with icmpx type admin-prohibited"]
    lines += [f"    {rule}" for rule in beyond]
    lines += ["  }",
              # Another sandbox's published port is this one's neighbour on the bridge: its
              # answer would go straight back (and be dropped above) unless the connection
              # comes from the host's address.
              "  chain hairpin {",
              "    type nat hook postrouting priority srcnat; policy accept;",
              f"    oifname {bridge} ip saddr {addr} ct status dnat masquerade",
              "  }",
              "}"]
    return "\n".join(lines) + "\n"


def _drop_existing(table: str) -> list[str]:
    """Delete the tables if they exist (an add first makes the delete never fail)."""
    return [line for family in FAMILIES for line in
            (f"add table {family} {table}", f"delete table {family} {table}")]


async def _nft(script: str, what: str) -> None:
    try:
        done = await child.run([NFT, "-f", "-"], input=script.encode(), timeout_s=30)
    except FileNotFoundError:
        raise NetworkError("isolation: nft not found: apt-get install nftables") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise NetworkError(f"isolation: nft could not {what}: "
                           f"{message[0] if message else done.returncode}")


async def apply(port: SandboxPort, policy: EgressPolicy,
                resolvers: tuple[str, ...] = ()) -> None:
    """Make (or remake) the sandbox's tables, in one transaction."""
    if policy.unresolved:
        raise NetworkError(f"isolation: egress rule {policy.unresolved[0].describe()} was "
                           "not resolved")
    await _nft(ruleset(port, policy, resolvers), f"isolate sandbox {port.sandbox_id}")
    log.debug("isolation: %s on %s (%s %s), egress %s", port.table, port.host_interface,
              port.mac, port.address, policy.describe())


async def remove(sandbox_id: str) -> None:
    """Delete the sandbox's tables; nothing to do when they are gone. Idempotent."""
    await _nft("\n".join(_drop_existing(table_name(sandbox_id))) + "\n",
               f"remove the tables of sandbox {sandbox_id}")
