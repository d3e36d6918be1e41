"""Hostile containers in a real guest, driven through the agent: specs whose process is the
guest's own python3 (bound into a busybox root), and a runner that collects their output."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Output, Storage

MOUNT = "/run/hyperstart/storage/{}"
SHARE_TAG = "r"


def python_spec(container_id: str, script: str, *args: str,
                namespaces: tuple[str, ...] = ("pid", "mount", "ipc", "uts"),
                linux: dict[str, Any] | None = None) -> bytes:
    """A container running /work/<script> (copied in with the agent's CopyFile) with the
    guest's python3, as root with all of root's capabilities."""
    spec: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": ["python3", "-I", f"/work/{script}", *args],
                    "env": ["PATH=/bin:/usr/bin"], "cwd": "/"},
        "root": {"path": MOUNT.format(container_id), "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
            {"destination": "/work", "type": "bind", "source": "/run/hyperstart/files",
             "options": ["rbind", "ro"]},
            *({"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro"]}
              for d in ("/usr", "/lib", "/lib64"))],
        "linux": {"namespaces": [{"type": t} for t in namespaces], **(linux or {})},
    }
    return json.dumps(spec).encode()


def storages(container_id: str) -> tuple[Storage, ...]:
    return (Storage("9p", SHARE_TAG, MOUNT.format(container_id)),)


async def collect(stream: AsyncIterator[Output]) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    async for chunk in stream:
        out[chunk.stream] += chunk.data
    return out


async def run_script(agent: AgentClient, container_id: str, script: str, source: str,
                     *args: str, timeout_s: float = 120, **spec: Any
                     ) -> tuple[int, dict[str, bytes]]:
    """Copy `source` in, run it in a new container, remove the container; (status, output)."""
    await agent.copy_file(f"/run/hyperstart/files/{script}", source.encode())
    await agent.create_container(container_id, python_spec(container_id, script, *args, **spec),
                                 storages=storages(container_id))
    stream = agent.stdio(container_id)
    await agent.start_container(container_id)
    output = await collect(stream)
    status = await agent.wait_process(container_id, timeout_s=timeout_s)
    await agent.remove_container(container_id)
    return status, output


@pytest.fixture
def python_rootfs(busybox_rootfs: Path, tmp_path: Path) -> Path:
    """A busybox root with mount points for the guest's /usr, /lib and /lib64."""
    rootfs = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, rootfs, symlinks=True)
    for d in ("usr", "lib", "lib64"):
        (rootfs / d).mkdir()
    return rootfs
