"""The loopback REDIRECT of port forwarding (runv_py/network/redirect.py) in a network namespace
of the test's: a TCP connection to any 127.0.0.1 port there reaches the one listener, which
reads the port it was meant for; removing the redirect (or the namespace) undoes it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from runv_py.network import redirect
from runv_py.network.netns import NetNs

from .conftest import Lab, sh


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_connections_to_any_loopback_port_reach_the_listener(lab: Lab) -> None:
    ns = lab.netns("pf")
    netns = NetNs(lab.path(ns))
    listener = netns.run(lambda: redirect.listen_loopback(4))
    try:
        asyncio.run(redirect.install(netns, listener.getsockname()[1]))
        asyncio.run(redirect.install(netns, listener.getsockname()[1]))  # again: replaces
        rules = sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S")
        assert rules.count(f"-j {redirect.CHAIN}") == 1 and "REDIRECT" in rules, rules
        listener.setblocking(True)
        for port in (80, 12001):
            client = netns.run(lambda port=port: _connect(port))  # type: ignore[misc]
            conn, _ = listener.accept()
            with client, conn:
                assert redirect.original_port(conn) == port
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        asyncio.run(redirect.remove(netns))
        assert redirect.CHAIN not in sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S")
        with pytest.raises(ConnectionRefusedError):
            netns.run(lambda: _connect(80))
    finally:
        listener.close()
        netns.close()
