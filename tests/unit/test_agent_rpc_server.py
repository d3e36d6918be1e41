"""The agent's gRPC server (grpc.aio serving the blocking AgentService) on a unix socket of the
test, driven by the host's real AgentClient: errors keep their code and reason, a stream the
client leaves ends in the agent (its subscription is given back), and an idle server does not
poll (the synchronous server woke every 200 ms: an idle guest's wake-ups)."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hyperstart_agent import server as agent_server
from hyperstart_agent.container.engine import Event
from hyperstart_agent.errors import AgentError as GuestAgentError

from runv_py.agent.client import AgentClient
from runv_py.errors import AgentError, CommandNotFound


class _Engine:
    """The calls these tests make: a signal that fails with a reason, events to subscribe."""

    def __init__(self) -> None:
        self.subscribed: list[queue.SimpleQueue[Event | None]] = []
        self.unsubscribed = threading.Event()

    def signal(self, container_id: str, exec_id: str, signum: int, *,
               all_processes: bool = False) -> None:
        raise GuestAgentError("NOT_FOUND", f"no {container_id}: sh", "command-not-found")

    def subscribe(self) -> queue.SimpleQueue[Event | None]:
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        events.put(Event("oom", "c1"))
        self.subscribed.append(events)
        return events

    def unsubscribe(self, events: queue.SimpleQueue[Event | None]) -> None:
        self.unsubscribed.set()


def _with_client(tmp_path: Path, engine: _Engine,
                 body: Callable[[AgentClient], Awaitable[None]]) -> None:
    """The agent's server on a socket of the test, and the host's client of it, for `body`."""
    address = tmp_path / "agent.sock"
    server = agent_server.serve(f"unix:{address}", {}, lambda: engine)  # type: ignore

    async def main() -> None:
        client = AgentClient(address, call_timeout_s=10)
        try:
            await body(client)
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.stop(None)


def test_an_error_keeps_its_code_and_reason(tmp_path: Path) -> None:
    async def body(client: AgentClient) -> None:
        with pytest.raises(CommandNotFound, match="no c1: sh") as caught:
            await client.signal_process("c1", "", 9)
        assert caught.value.code == "NOT_FOUND"
        assert await client.check()  # the server serves on

    _with_client(tmp_path, _Engine(), body)


def test_an_error_without_a_reason_is_an_agent_error(tmp_path: Path) -> None:
    class Failing(_Engine):
        def signal(self, container_id: str, exec_id: str, signum: int, *,
                   all_processes: bool = False) -> None:
            raise GuestAgentError("FAILED_PRECONDITION", "not running")

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentError, match="not running") as caught:
            await client.signal_process("c1", "", 9)
        assert type(caught.value) is AgentError
        assert caught.value.code == "FAILED_PRECONDITION"

    _with_client(tmp_path, Failing(), body)


def test_a_stream_the_client_leaves_ends_in_the_agent(tmp_path: Path) -> None:
    engine = _Engine()

    async def body(client: AgentClient) -> None:
        events = client.events()
        first = await anext(events)
        assert (first.kind, first.container_id) == ("oom", "c1")
        await events.aclose()  # cancels the call
        # The agent's generator was blocked on its queue: the call's end wakes it.
        assert await asyncio.to_thread(engine.unsubscribed.wait, 10)

    _with_client(tmp_path, engine, body)


_IDLE = """
import os, sys, time
from hyperstart_agent import server
srv = server.serve("unix:" + sys.argv[1], {}, lambda: None)
time.sleep(1)
CORE = ("event_engine", "lifeguard", "grpc_global_tim")  # grpc core's own timers

def woken():
    total = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            if f.read().strip() in CORE:
                continue
        with open(f"/proc/self/task/{task}/status") as f:
            total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total

before = woken()
time.sleep(3)
print(woken() - before)
"""


def test_an_idle_server_does_not_poll(tmp_path: Path) -> None:
    """Over 3 s, the server's own threads (not grpc core's timers) do not wake: the
    synchronous server's completion-queue poll woke 15 times."""
    child = subprocess.run([sys.executable, "-c", _IDLE, str(tmp_path / "agent.sock")],
                           capture_output=True, timeout=60, check=False)
    assert child.returncode == 0, child.stderr.decode()
    assert int(child.stdout) <= 3, child.stdout


def test_an_address_it_cannot_listen_on_is_an_error(tmp_path: Path) -> None:
    with pytest.raises((OSError, RuntimeError)):
        agent_server.serve(f"unix:{tmp_path}/no/such/dir/agent.sock", {},
                           lambda: None)  # type: ignore[arg-type, return-value]
