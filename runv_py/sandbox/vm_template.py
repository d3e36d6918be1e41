"""VM templates: a guest booted once to "agent ready" and saved (guest RAM in a file, device
state by QEMU migration), from which sandboxes are restored instead of booted.

The store lives in one directory shared by every runv-py process: a template per key (a hash of
everything that makes it valid), built by one process at a time under a per-key flock and
published by rename. See docs/templates.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol

from .. import __version__
from ..agent.client import AgentClient
from ..devices import Share
from ..errors import BootTimeout, ConfigError, HypervisorError, RunvError
from ..vm.qemu.cmdline import AGENT_PORT_ID, VmConfig
from ..vm.qemu.machine import QemuMachine, tail

log = logging.getLogger(__name__)

# Bump when what a template holds, or how it is made, changes meaning.
FORMAT = 4
MACHINE: Final = "pc"
SAVE_TIMEOUT_S = 60.0
MEMORY = "memory"
STATE = "state"
META = "meta.json"
WARMUP_DIR = "/run/hyperstart/template-warm-up"
WARMUP_ID = "template-warm-up"


def _file_identity(path: Path) -> str:
    """A file by its resolved path, size and mtime: a rebuilt asset or an upgraded QEMU
    changes it (hashing hundreds of MB per start would not pay)."""
    real = path.resolve()
    st = real.stat()
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _still(identity: str) -> bool:
    """Whether the file a _file_identity() string names is still that file."""
    path = identity.rsplit(":", 2)[0]
    try:
        return _file_identity(Path(path)) == identity
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class TemplateInputs:
    """Everything a template depends on; two VMs with equal inputs can share a template."""

    format: int
    runv: str
    qemu: str
    kernel: str
    kernel_cmdline: str
    root_image: str
    initrd: str
    agent_version: str
    machine: str
    accel: str
    cpu: str
    vcpus: int
    memory_mib: int
    max_vcpus: int
    max_memory_mib: int
    channel: str
    # The 9p devices' mount tags: the device set must match between template and clone; the
    # directories behind them are the clone's own.
    share_tags: tuple[str, ...]

    @property
    def key(self) -> str:
        raw = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]


def inputs_for(vm: VmConfig, agent_version: str, channel: str) -> TemplateInputs:
    qemu = shutil.which(vm.qemu)
    if qemu is None:
        raise HypervisorError(f"{vm.qemu} not found: apt-get install qemu-system-x86 "
                              "or set [hypervisor] qemu")
    return TemplateInputs(
        format=FORMAT, runv=__version__, qemu=_file_identity(Path(qemu)),
        kernel=_file_identity(vm.kernel), kernel_cmdline=vm.kernel_cmdline,
        root_image=_file_identity(vm.root_image) if vm.root_image else "",
        initrd=_file_identity(vm.initrd) if vm.initrd else "",
        agent_version=agent_version, machine=vm.machine, accel=vm.accel, cpu=vm.cpu,
        vcpus=vm.vcpus, memory_mib=vm.memory_mib, max_vcpus=vm.max_vcpus,
        max_memory_mib=vm.max_memory_mib, channel=channel,
        share_tags=tuple(share.tag for share in vm.shares),
    )


@dataclass(frozen=True, slots=True)
class Template:
    key: str
    root: Path

    @property
    def memory(self) -> Path:
        return self.root / MEMORY

    @property
    def state(self) -> Path:
        return self.root / STATE

    def meta(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / META).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"template {self.key}: unreadable {META}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"template {self.key}: {META} is not an object")
        return data


class SavedRam(Protocol):
    """A template, or a snapshot (vm_snapshot): a VM saved as a RAM file and device state."""

    @property
    def memory(self) -> Path: ...


def clone_vm(template: SavedRam, vm: VmConfig) -> VmConfig:
    """The argv config of a clone of `template`: its RAM mapped privately (copy-on-write over
    the template's pages), waiting for the device state, with a new VM generation id."""
    return replace(vm, memory_file=template.memory, memory_file_shared=False, incoming=True,
                   vmgenid=str(uuid.uuid4()), nics=())


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> Template | None:
        template = Template(key, self.root / key)
        if (template.root / META).is_file() and template.state.is_file() \
                and template.memory.is_file():
            return template
        return None

    def templates(self) -> list[Template]:
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return []
        found = [self.get(entry.name) for entry in entries if not entry.name.startswith(".")]
        return [template for template in found if template is not None]

    def find(self, prefix: str) -> Template:
        """The template whose key starts with `prefix` (as `runv template` takes it)."""
        matches = [t for t in self.templates() if t.key.startswith(prefix)]
        if len(matches) != 1:
            what = "no template" if not matches else f"{len(matches)} templates"
            raise ConfigError(f"{what} in {self.root} with a key starting {prefix!r} "
                              "(see `runv template list`)")
        return matches[0]

    def remove(self, template: Template) -> None:
        """Unpublish, then delete. Clones that run keep their mapping of the old memory file."""
        aside = self.root / f".removed-{template.key}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            template.root.rename(aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """One builder per key across processes (the lock dies with its holder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".lock-{key}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building template %s", key)
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def sweep(self) -> None:
        """Remove build directories of builders that died (their lock is free again)."""
        for entry in self.root.glob(".build-*"):
            key = entry.name.split("-")[1]
            fd = os.open(self.root / f".lock-{key}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(entry, ignore_errors=True)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)

    async def ensure(self, inputs: TemplateInputs, vm: VmConfig, timeout_s: float) -> Template:
        """The template for `inputs`, built from `vm` first if there is none."""
        key = inputs.key
        found = self.get(key)
        if found is not None:
            return found
        try:
            async with self.lock(key):
                found = self.get(key)
                if found is not None:
                    return found
                self.sweep()
                return await self._build(inputs, vm, timeout_s)
        except OSError as exc:
            raise ConfigError(f"template store {self.root}: {exc.strerror or exc} (set "
                              "template_dir to a writable directory, or template = \"off\")"
                              ) from exc

    async def _build(self, inputs: TemplateInputs, vm: VmConfig, timeout_s: float) -> Template:
        key = inputs.key
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.root))
        try:
            t0 = time.monotonic()
            state_size = await _boot_and_save(work, vm, timeout_s)
            meta = {"key": key, "inputs": asdict(inputs), "created": time.time(),
                    "build_s": round(time.monotonic() - t0, 3), "state_bytes": state_size}
            (work / META).write_text(json.dumps(meta, indent=1) + "\n")
            work.chmod(0o755)
            os.rename(work, self.root / key)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.info("built template %s in %.1fs", key, meta["build_s"])
        self.prune_stale()
        return Template(key, self.root / key)

    def prune_stale(self) -> list[str]:
        """Remove the templates made from a QEMU, kernel or image that is no longer there as
        it was (rebuilt assets, upgraded QEMU): nothing can use them again. Returns their keys."""
        removed = []
        for found in self.templates():
            try:
                inputs = found.meta().get("inputs", {})
            except ConfigError:
                continue
            files = [inputs.get(name, "") for name in ("qemu", "kernel", "root_image", "initrd")]
            if any(identity and not _still(identity) for identity in files):
                self.remove(found)
                removed.append(found.key)
        if removed:
            log.info("removed stale templates %s", ", ".join(removed))
        return removed


async def _boot_and_save(work: Path, vm: VmConfig, timeout_s: float) -> int:
    """Boot `vm` to agent ready (its sockets and logs in a short-lived directory of their own:
    unix socket paths are short), let the guest's agent go back to waiting for a host, then
    save the paused VM into `work`. Returns the device state's size."""
    run = Path(tempfile.mkdtemp(prefix="runv-template-"))
    try:
        return await _boot_and_save_in(work, run, vm, timeout_s)
    finally:
        shutil.rmtree(run, ignore_errors=True)


async def _boot_and_save_in(work: Path, run: Path, vm: VmConfig, timeout_s: float) -> int:
    shares = []
    for i, share in enumerate(vm.shares):
        placeholder = run / f"share{i}"
        placeholder.mkdir()
        shares.append(Share(share.tag, placeholder, readonly=share.readonly))
    vm = replace(vm, name=f"template-{work.name[-8:]}", console_log=run / "console.log",
                 qmp_socket=run / "qmp.sock", agent_socket=run / "agent.sock",
                 shares=tuple(shares), nics=(), memory_file=work / MEMORY,
                 memory_file_shared=True, incoming=False, vmgenid=str(uuid.uuid4()))
    assert vm.agent_socket is not None
    fd = os.open(work / STATE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    machine = QemuMachine(vm, run / "qemu.log")
    agent = AgentClient(vm.agent_socket, handshake_timeout_s=timeout_s, serial=True)
    try:
        await machine.start()
        ready = asyncio.create_task(agent.wait_ready(timeout_s))
        await asyncio.wait({ready, machine.exited}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready
            raise HypervisorError("template VM stopped before its agent answered: "
                                  + machine.describe_exit())
        try:
            ready.result()
        except TimeoutError:
            raise BootTimeout(f"template VM: the agent did not answer within {timeout_s:g}s; "
                              "guest console:\n" + tail(vm.console_log)) from None
        await warm_up(agent)
        # The agent must be waiting for a host session when saved, so that each clone's
        # first connection is a fresh session.
        machine.forget_port_events()
        await agent.close()
        try:
            await machine.wait_port_open(AGENT_PORT_ID, timeout_s)
        except TimeoutError as exc:
            raise BootTimeout(f"template VM: the guest did not reopen its agent port within "
                              f"{timeout_s:g}s ({exc}); guest console:\n"
                              + tail(vm.console_log)) from None
        await machine.save_state(fd, SAVE_TIMEOUT_S)
    except RunvError as exc:
        raise HypervisorError(f"building a template failed: {exc}") from exc
    finally:
        os.close(fd)
        await agent.close()
        await machine.close()
    return (work / STATE).stat().st_size


async def warm_up(agent: AgentClient) -> None:
    """Do once in the template what each sandbox's first container would: the agent imports
    its container engine, storage and network modules on first use, and the init
    helper's files come from the (compressed) root image; clones inherit all of it in memory.
    Best effort: the container has an empty root, so its process cannot start."""
    root = f"{WARMUP_DIR}/root"
    spec = {
        "ociVersion": "1.1.0", "root": {"path": root, "readonly": True},
        "process": {"args": ["/template-warm-up"], "env": ["PATH=/"], "cwd": "/"},
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }
    steps: list[str] = []
    try:
        await agent.copy_file(f"{root}/.keep", b"")
        # No stdio stream, and no process that runs: a warm-up that also ran a real process
        # with its output streamed made clones' agent connection ~80 ms slower and their first
        # container no faster (docs/templates.md, Measured).
        await agent.create_container(WARMUP_ID, json.dumps(spec).encode(), stdio=False)
        steps.append("create")
        with contextlib.suppress(RunvError):
            await agent.start_container(WARMUP_ID)
            await agent.wait_process(WARMUP_ID, timeout_s=30)
        await agent.remove_container(WARMUP_ID, force=True)
        steps.append("run")
        await agent.list_interfaces()
        steps.append("network")
    except (RunvError, TimeoutError) as exc:
        log.info("template warm-up stopped after %s: %s", steps or "nothing", exc)
