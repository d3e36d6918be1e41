"""A nat REDIRECT inside a network namespace: every TCP connection made there to 127.0.0.1
goes to one local port instead, where a listener reads the port it was meant for
(SO_ORIGINAL_DST). The rules live in a chain of ours in that namespace; removing them, or the
namespace, undoes it. Run with the host's iptables from a thread inside the namespace."""

from __future__ import annotations

import socket
import struct
import subprocess

from ..errors import NetworkError
from .netns import NetNs

CHAIN = "RUNV-PORT-FORWARD"
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IPTABLES_TIMEOUT_S = 30.0


def install_commands(port: int) -> list[tuple[list[str], bool]]:
    """(iptables arguments, whether a failure is fatal) to send 127.0.0.1 TCP to `port`;
    replaces what an earlier install left."""
    return [
        (["-t", "nat", "-N", CHAIN], False),  # exists already: flushed next
        (["-t", "nat", "-F", CHAIN], True),
        (["-t", "nat", "-A", CHAIN, "-p", "tcp", "-d", "127.0.0.1/32", "-j", "REDIRECT",
          "--to-ports", str(port)], True),
        (["-t", "nat", "-D", "OUTPUT", "-o", "lo", "-j", CHAIN], False),
        (["-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j", CHAIN], True),
    ]


def remove_commands() -> list[tuple[list[str], bool]]:
    return [(["-t", "nat", "-D", "OUTPUT", "-o", "lo", "-j", CHAIN], False),
            (["-t", "nat", "-F", CHAIN], False),
            (["-t", "nat", "-X", CHAIN], False)]


def _run(commands: list[tuple[list[str], bool]]) -> None:
    """In the calling thread's network namespace (iptables inherits it)."""
    for args, fatal in commands:
        try:
            result = subprocess.run(["iptables", "-w", *args], capture_output=True,
                                    timeout=IPTABLES_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetworkError(f"iptables {' '.join(args)}: {exc}") from None
        if fatal and result.returncode != 0:
            raise NetworkError(f"iptables {' '.join(args)} in the pod's network namespace: "
                               f"{result.stderr.decode(errors='replace').strip()}")


async def install(netns: NetNs, port: int) -> None:
    await netns.call(lambda: _run(install_commands(port)))


async def remove(netns: NetNs) -> None:
    await netns.call(lambda: _run(remove_commands()))


def listen_loopback(backlog: int) -> socket.socket:
    """A non-blocking TCP listener on 127.0.0.1 (a free port) of the calling thread's
    network namespace; the socket stays in that namespace."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def original_port(conn: socket.socket) -> int:
    """The destination port a redirected connection was made to."""
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port: int = struct.unpack_from("!H", raw, 2)[0]
    return port
