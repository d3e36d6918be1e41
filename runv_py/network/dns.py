"""A stub resolver for A records, asking given DNS servers over UDP: egress rules naming hosts
are resolved through the servers the sandbox itself is given, so that the policy and the
sandbox see the same answers (the host's own resolver may know other names)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct

from ..errors import NetworkError

TYPE_A = 1
TYPE_CNAME = 5
CLASS_IN = 1
MAX_POINTERS = 32
MAX_RESPONSE = 4096


def query(name: str, ident: int) -> bytes:
    """A recursive query for the A records of `name`."""
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + \
        struct.pack("!HH", TYPE_A, CLASS_IN)


def _name(data: bytes, offset: int) -> tuple[str, int]:
    """The (possibly compressed) name at `offset`, and the offset after it in place."""
    labels: list[str] = []
    end = -1
    for _ in range(MAX_POINTERS):
        if offset >= len(data):
            raise NetworkError("DNS answer: a name runs past the end")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise NetworkError("DNS answer: a name runs past the end")
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length == 0:
            return ".".join(labels).lower(), (offset + 1 if end < 0 else end)
        labels.append(data[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise NetworkError("DNS answer: too many name pointers")


def parse_answer(data: bytes, name: str, ident: int) -> tuple[str, ...]:
    """The IPv4 addresses `name` has in the answer (following CNAMEs); NetworkError for an
    error answer."""
    if len(data) < 12:
        raise NetworkError("DNS answer: shorter than its header")
    got_ident, flags, qdcount, ancount = struct.unpack("!HHHH", data[:8])
    if got_ident != ident or not flags & 0x8000:
        raise NetworkError("DNS answer: not the answer to our query")
    rcode = flags & 0xF
    if rcode == 3:
        raise NetworkError(f"{name}: no such name (NXDOMAIN)")
    if rcode:
        raise NetworkError(f"{name}: the DNS server answered with error {rcode}")
    offset = 12
    for _ in range(qdcount):
        _, offset = _name(data, offset)
        offset += 4
    wanted = {name.rstrip(".").lower()}
    records: list[tuple[str, int, bytes]] = []
    for _ in range(ancount):
        owner, offset = _name(data, offset)
        if offset + 10 > len(data):
            raise NetworkError("DNS answer: a record runs past the end")
        rtype, rclass, _ttl, length = struct.unpack("!HHIH", data[offset:offset + 10])
        offset += 10
        rdata_offset = offset
        offset += length
        if offset > len(data):
            raise NetworkError("DNS answer: a record runs past the end")
        if rclass != CLASS_IN:
            continue
        if rtype == TYPE_CNAME:
            target, _ = _name(data, rdata_offset)
            records.append((owner, rtype, target.encode()))
        elif rtype == TYPE_A and length == 4:
            records.append((owner, rtype, data[rdata_offset:offset]))
    for _ in range(MAX_POINTERS):  # CNAME chains, in any order
        grown = {r[2].decode() for r in records if r[1] == TYPE_CNAME and r[0] in wanted}
        if grown <= wanted:
            break
        wanted |= grown
    return tuple(sorted({socket.inet_ntoa(r[2]) for r in records
                         if r[1] == TYPE_A and r[0] in wanted}))


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.answer.done():
            self.answer.set_result(data[:MAX_RESPONSE])

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _ask(server: str, name: str, timeout_s: float, port: int) -> tuple[str, ...]:
    ident = secrets.randbelow(1 << 16)
    loop = asyncio.get_running_loop()
    transport, exchange = await loop.create_datagram_endpoint(
        _Exchange, remote_addr=(server, port), family=socket.AF_INET)
    try:
        transport.sendto(query(name, ident))
        data = await asyncio.wait_for(exchange.answer, timeout_s)
    finally:
        transport.close()
    return parse_answer(data, name, ident)


async def resolve_a(name: str, servers: tuple[str, ...], *, timeout_s: float = 10.0,
                    port: int = 53) -> tuple[str, ...]:
    """The IPv4 addresses of `name` from the first of `servers` that answers."""
    failures = []
    for server in servers:
        try:
            return await _ask(server, name, timeout_s / len(servers), port)
        except NetworkError as exc:
            if "NXDOMAIN" in str(exc):
                raise
            failures.append(f"{server}: {exc}")
        except (OSError, TimeoutError) as exc:
            failures.append(f"{server}: {exc or 'no answer'}")
    raise NetworkError(f"cannot resolve {name}: {'; '.join(failures)}")
