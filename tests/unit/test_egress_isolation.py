"""Egress policies, the DNS stub's answers and the isolation ruleset: parsed and generated here,
the ruleset checked by the host's nft against its kernel (`nft -c`: nothing is applied)."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess

import pytest

from runv_py.errors import ConfigError, NetworkError
from runv_py.network import dns, egress, isolation


def test_modes_and_rules() -> None:
    assert egress.parse("none").mode == "none"
    assert egress.parse(" all ").mode == "all"
    policy = egress.parse("10.0.0.0/8,192.0.2.7:443,git.example.com:22,mirror.example.")
    assert policy.mode == "list"
    assert [(r.networks, r.port, r.host) for r in policy.rules] == [
        (("10.0.0.0/8",), None, ""), (("192.0.2.7/32",), 443, ""),
        ((), 22, "git.example.com"), ((), None, "mirror.example")]
    assert [r.host for r in policy.unresolved] == ["git.example.com", "mirror.example"]
    assert egress.parse("10.1.2.3/8").rules[0].networks == ("10.0.0.0/8",)


@pytest.mark.parametrize(("text", "words"), [
    ("", "use none, all"),
    ("10.0.0.0/8,,1.2.3.4", "use none, all"),
    ("all,10.0.0.0/8", "cannot be combined"),
    ("10.0.0.1:0", "port must be a number from 1 to 65535"),
    ("10.0.0.1:70000", "port must be"),
    ("host:http", "port must be"),
    ("fd00::/8", "IPv4 only"),
    ("10.0.0.0/33", "not an IPv4 address"),
    ("999.1.1.1", "not an IPv4 address"),
    ("bad_name!", "not an IPv4 address"),
    (":80", "give an address"),
])
def test_a_bad_rule_is_one_line_naming_the_flag_and_rule(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        egress.parse(text)
    message = str(caught.value)
    assert message.startswith("--egress") and words in message and "\n" not in message


def test_dns_servers() -> None:
    assert egress.parse_servers(["10.0.0.53", " 1.1.1.1"]) == ("10.0.0.53", "1.1.1.1")
    with pytest.raises(ConfigError, match="--dns 'x': not an IP address"):
        egress.parse_servers(["x"])


def _answer(ident: int, name: str, records: list[tuple[str, int, bytes]],
            rcode: int = 0) -> bytes:
    def encode(n: str) -> bytes:
        return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"

    out = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(records), 0, 0)
    out += encode(name) + struct.pack("!HH", 1, 1)
    for owner, rtype, rdata in records:
        data = encode(rdata.decode()) if rtype == dns.TYPE_CNAME else rdata
        # the first owner as a compression pointer to the question's name
        owner_bytes = b"\xc0\x0c" if owner == name else encode(owner)
        out += owner_bytes + struct.pack("!HHIH", rtype, 1, 60, len(data)) + data
    return out


def test_dns_answers_follow_cnames_and_ignore_other_names() -> None:
    a = socket.inet_aton
    data = _answer(7, "git.example", [
        ("git.example", dns.TYPE_CNAME, b"real.example"),
        ("real.example", dns.TYPE_A, a("192.0.2.9")),
        ("other.example", dns.TYPE_A, a("198.51.100.1"))])
    assert dns.parse_answer(data, "git.example", 7) == ("192.0.2.9",)
    with pytest.raises(NetworkError, match="not the answer"):
        dns.parse_answer(data, "git.example", 8)
    with pytest.raises(NetworkError, match="NXDOMAIN"):
        dns.parse_answer(_answer(7, "x.example", [], rcode=3), "x.example", 7)
    with pytest.raises(NetworkError, match="past the end"):
        dns.parse_answer(data[:-3], "git.example", 7)
    looping = struct.pack("!HHHHHH", 7, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c"
    with pytest.raises(NetworkError, match="too many name pointers"):
        dns.parse_answer(looping, "x", 7)


def test_resolution_through_the_given_server() -> None:
    """A stub server on loopback answers; the first server, which does not, is skipped."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]

    async def scenario() -> tuple[str, ...]:
        loop = asyncio.get_running_loop()

        def answer() -> None:
            query, client = server.recvfrom(512)
            ident = struct.unpack("!H", query[:2])[0]
            server.sendto(_answer(ident, "mirror.test", [
                ("mirror.test", dns.TYPE_A, socket.inet_aton("192.0.2.44"))]), client)

        loop.add_reader(server.fileno(), answer)
        try:
            return await dns.resolve_a("mirror.test", ("127.0.0.2", "127.0.0.1"),
                                       timeout_s=4, port=port)
        finally:
            loop.remove_reader(server.fileno())

    try:
        assert asyncio.run(scenario()) == ("192.0.2.44",)
    finally:
        server.close()


PORT = isolation.SandboxPort("hc-0123456789ab", "runv0", "veth1234abcd", "02:AA:bb:00:00:01",
                             "10.89.0.7", "10.89.0.0/16")


def _check(script: str) -> None:
    """The host's nft parses the script and checks it against the kernel, applying
    nothing."""
    done = subprocess.run(["nft", "-c", "-f", "-"], input=script.encode(),
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode() + script


@pytest.mark.parametrize("policy", ["none", "all", "10.0.0.0/8,192.0.2.7:443"])
def test_the_ruleset_is_valid_nftables(policy: str) -> None:
    _check(isolation.ruleset(PORT, egress.parse(policy), ("10.89.0.1",)))


def test_what_the_ruleset_says() -> None:
    rules = isolation.ruleset(PORT, egress.parse("192.0.2.0/24,198.51.100.7:443"),
                              ("10.89.0.1",))
    veth = 'iifname "veth1234abcd"'
    # clean traffic: MAC, ARP and IPv4 source pinned, nothing else from the port
    for line in (f"{veth} ether saddr != 02:aa:bb:00:00:01 drop",
                 f"{veth} ether type arp arp saddr ip != 10.89.0.7 drop",
                 f"{veth} ether type ip ip saddr != 10.89.0.7 drop",
                 f"{veth} ether type != {{ ip, arp }} drop",
                 f"{veth} drop", 'oifname "veth1234abcd" drop'):
        assert line in rules
    assert "ip daddr { 192.0.2.0/24 } accept" in rules
    assert "198.51.100.7/32 . tcp . 443" in rules and "10.89.0.1 . udp . 53" in rules
    assert "ip daddr 10.89.0.0/16 reject" in rules
    none = isolation.ruleset(PORT, egress.parse("none"), ("10.89.0.1",))
    assert " . 53" not in none and "ip daddr {" not in none
    assert 'ip saddr 10.89.0.7 accept' not in none
    every = isolation.ruleset(PORT, egress.parse("all"), ("10.89.0.1",))
    assert 'ip saddr 10.89.0.7 accept' in every
    assert every.index("th dport 53 reject") < every.index('ip saddr 10.89.0.7 accept')


def test_names_that_cannot_go_into_a_rule_are_refused() -> None:
    from dataclasses import replace

    with pytest.raises(NetworkError, match="cannot be used in a rule"):
        isolation.ruleset(replace(PORT, host_interface='x" accept'), egress.parse("all"))
    with pytest.raises(ValueError):
        isolation.ruleset(replace(PORT, address="10.89.0.7; flush ruleset"),
                          egress.parse("all"))
