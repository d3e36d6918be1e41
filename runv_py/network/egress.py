"""A sandbox's egress policy: where it may open connections beyond its bridge network.

    none                      nothing beyond the bridge (published ports still answer)
    all                       anything the host routes, except the host itself and other
                              sandboxes (those only through published ports)
    RULE,RULE,...             only these; a RULE is CIDR[:PORT] or HOST[:PORT]
                              (10.0.0.0/8, 192.0.2.7:443, git.example.com:22, mirror.example)

A PORT allows that TCP and UDP port only, else every port. HOST names are resolved once, when
the sandbox starts (through the configured DNS servers, else the host's resolver), and the
addresses they had then are the rule. In every mode but `none`, DNS (port 53) goes only to the
configured servers. A rule naming a host address is the explicit allow of that host service."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass, replace
from typing import Literal

from ..errors import ConfigError, NetworkError
from . import dns

Mode = Literal["none", "all", "list"]
_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
MAX_RULES = 256
RESOLVE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Rule:
    """Addresses (IPv4 networks) and an optional port; `host` is the name it came from."""

    networks: tuple[str, ...]
    port: int | None = None
    host: str = ""

    def describe(self) -> str:
        where = self.host or ",".join(self.networks)
        return f"{where}:{self.port}" if self.port else where


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    mode: Mode
    rules: tuple[Rule, ...] = ()

    @property
    def unresolved(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.host and not r.networks)

    def describe(self) -> str:
        return self.mode if self.mode != "list" else ",".join(r.describe() for r in self.rules)


NONE = EgressPolicy("none")
ALL = EgressPolicy("all")


def _port(text: str, item: str, flag: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{flag} {item!r}: the port must be a number from 1 to 65535")
    return int(text)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text.removeprefix("[").removesuffix("]"), strict=False)
    except ValueError:
        return None


def _rule(item: str, flag: str) -> Rule:
    if _network(item) is not None:   # an IPv6 network has colons of its own
        where, sep, port_text = item, "", ""
    else:
        where, sep, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    port = _port(port_text, item, flag) if sep else None
    if not where:
        raise ConfigError(f"{flag} {item!r}: give an address, a network or a host name")
    network = _network(where)
    if network is not None:
        if network.version != 4:
            raise ConfigError(f"{flag} {item!r}: the sandbox network is IPv4 only; an IPv6 "
                              "rule would match nothing")
        return Rule((str(network),), port)
    if "/" in where or not _HOST.match(where) or where.replace(".", "").isdigit():
        raise ConfigError(f"{flag} {item!r}: not an IPv4 address, network (CIDR) or host name")
    return Rule((), port, where.rstrip(".").lower())


def parse(text: str, flag: str = "--egress") -> EgressPolicy:
    """none, all, or comma-separated CIDR[:PORT] / HOST[:PORT] rules; ConfigError naming the
    bad rule and `flag`."""
    value = text.strip()
    if value in ("none", "all"):
        return EgressPolicy(value)  # type: ignore[arg-type]
    items = [item.strip() for item in value.split(",")]
    if not value or any(not item for item in items):
        raise ConfigError(f"{flag} {text!r}: use none, all, or CIDR[:PORT],HOST[:PORT],...")
    if len(items) > MAX_RULES:
        raise ConfigError(f"{flag}: at most {MAX_RULES} rules")
    for item in items:
        if item in ("none", "all"):
            raise ConfigError(f"{flag} {text!r}: {item} cannot be combined with rules")
    return EgressPolicy("list", tuple(_rule(item, flag) for item in items))


async def _lookup(name: str, servers: tuple[str, ...]) -> tuple[str, ...]:
    if servers:
        return await dns.resolve_a(name, servers, timeout_s=RESOLVE_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise NetworkError(f"cannot resolve {name}: {exc}") from None
    return tuple(sorted({str(info[4][0]) for info in infos}))


async def resolve(policy: EgressPolicy, servers: tuple[str, ...],
                  flag: str = "--egress") -> EgressPolicy:
    """The policy with every host name replaced by the IPv4 addresses it has now (through
    `servers`, else the host's resolver); NetworkError naming the rule if one has none."""
    rules = []
    for rule in policy.rules:
        if rule.host and not rule.networks:
            try:
                addresses = await _lookup(rule.host, servers)
            except NetworkError as exc:
                raise NetworkError(f"{flag} {rule.describe()}: {exc}") from None
            if not addresses:
                raise NetworkError(f"{flag} {rule.describe()}: {rule.host} has no IPv4 "
                                   "address")
            rules.append(replace(rule, networks=tuple(f"{a}/32" for a in addresses)))
        else:
            rules.append(rule)
    return replace(policy, rules=tuple(rules))


def parse_servers(items: tuple[str, ...] | list[str], flag: str = "--dns") -> tuple[str, ...]:
    """DNS server addresses (IPv4)."""
    out = []
    for item in items:
        try:
            address = ipaddress.ip_address(item.strip())
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: not an IP address") from None
        if address.version != 4:
            raise ConfigError(f"{flag} {item!r}: the sandbox network is IPv4 only")
        out.append(str(address))
    return tuple(out)
