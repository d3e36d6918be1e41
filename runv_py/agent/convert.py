"""hyperstart.v1 protobuf messages <-> runv-py's frozen dataclasses (protobuf stops here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._pb import hyperstart_pb2 as pb


@dataclass(frozen=True, slots=True)
class AgentVersion:
    agent_version: str
    api_version: int
    kernel_release: str
    python_version: str
    features: tuple[str, ...]
    boot_timings_ms: dict[str, int]


@dataclass(frozen=True, slots=True)
class GuestDetails:
    mem_total_kib: int
    mem_available_kib: int
    agent_rss_kib: int
    agent_rss_anon_kib: int
    agent_rss_file_kib: int
    online_cpus: int


def version(msg: pb.VersionResponse) -> AgentVersion:
    return AgentVersion(
        agent_version=msg.agent_version,
        api_version=msg.api_version,
        kernel_release=msg.kernel_release,
        python_version=msg.python_version,
        features=tuple(msg.features),
        boot_timings_ms=dict(msg.boot_timings_ms),
    )


def guest_details(msg: pb.GuestDetailsResponse) -> GuestDetails:
    return GuestDetails(
        mem_total_kib=msg.mem_total_kib,
        mem_available_kib=msg.mem_available_kib,
        agent_rss_kib=msg.agent_rss_kib,
        agent_rss_anon_kib=msg.agent_rss_anon_kib,
        agent_rss_file_kib=msg.agent_rss_file_kib,
        online_cpus=msg.online_cpus,
    )


@dataclass(frozen=True, slots=True)
class Storage:
    """A filesystem for the agent to mount before a container: a 9p/virtiofs tag or a block
    device."""

    driver: Literal["9p", "virtiofs", "block"]
    source: str
    mount_point: str
    fstype: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes
    eof: bool


def storage(s: Storage) -> pb.Storage:
    return pb.Storage(driver=s.driver, source=s.source, fstype=s.fstype, options=s.options,
                      mount_point=s.mount_point)


def output(msg: pb.StdioOutput) -> Output:
    return Output("stderr" if msg.stream == pb.StdioOutput.STDERR else "stdout", msg.data,
                  msg.eof)


@dataclass(frozen=True, slots=True)
class Event:
    """A process exit (exit_code, 128+N for a signal) or an OOM kill in a container."""

    kind: Literal["exit", "oom"]
    container_id: str
    exec_id: str = ""
    exit_code: int = 0
    pid: int = 0


def event(msg: pb.Event) -> Event:
    if msg.WhichOneof("kind") == "oom":
        return Event("oom", msg.oom.container_id)
    e = msg.exit
    return Event("exit", e.container_id, e.exec_id, e.exit_code, e.pid)
