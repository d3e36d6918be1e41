"""The hyperstart.v1 gRPC service."""

from __future__ import annotations

import os
import sys
from concurrent import futures
from typing import Any

import grpc

from . import API_VERSION, __version__
from ._pb import hyperstart_pb2 as pb
from ._pb import hyperstart_pb2_grpc as pb_grpc

FEATURES = ("channel.serial",)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def _self_status_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if rest.endswith("kB\n"):
                out[key] = int(rest.split()[0])
    return out


class AgentService(pb_grpc.AgentServicer):  # type: ignore[misc]
    def __init__(self, boot_timings_ms: dict[str, int]) -> None:
        self.boot_timings_ms = boot_timings_ms

    def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    def Version(self, request: pb.VersionRequest, context: Any) -> pb.VersionResponse:
        return pb.VersionResponse(
            agent_version=__version__,
            api_version=API_VERSION,
            kernel_release=os.uname().release,
            python_version=".".join(map(str, sys.version_info[:3])),
            features=list(FEATURES),
            boot_timings_ms=self.boot_timings_ms,
        )

    def GetGuestDetails(
        self, request: pb.GuestDetailsRequest, context: Any
    ) -> pb.GuestDetailsResponse:
        mem = _meminfo()
        status = _self_status_kib()
        return pb.GuestDetailsResponse(
            mem_total_kib=mem.get("MemTotal", 0),
            mem_available_kib=mem.get("MemAvailable", 0),
            agent_rss_kib=status.get("VmRSS", 0),
            agent_rss_anon_kib=status.get("RssAnon", 0),
            agent_rss_file_kib=status.get("RssFile", 0),
            online_cpus=len(os.sched_getaffinity(0)),
        )


def serve(address: str, boot_timings_ms: dict[str, int]) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpc"))
    pb_grpc.add_AgentServicer_to_server(AgentService(boot_timings_ms), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC server could not listen on {address}")
    server.start()
    return server
