"""The warm pool: `runv pool serve` keeps idle sandbox supervisors, each with its VM restored
from the template and its shared dir mounted, and a container's create claims one instead of
starting a supervisor (docs/templates.md, Warm pool).

The pool is a service on `<state_dir>/pool/pool.sock` (protocol.py): Claim hands out one idle
supervisor for a template key (removed from the pool before the answer; the claimant then sends
it Adopt on its own control socket), and PoolStatus counts. Pooled VMs are never returned: a
claimed supervisor ends with its container, and the pool starts another."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import child, forked
from ..config import RuntimeConfig
from ..config import load as load_config
from ..errors import ConfigError, RunvError
from . import protocol, vm_dir
from .control import AsyncChannel, listen
from .pool_claim import CLAIM_TIMEOUT_S, key_of
from .pool_member import socket_path
from .protocol import (
    MAX_PACKET,
    POOL_REQUESTS,
    Claim,
    Claimed,
    ClaimReply,
    CreateReply,
    MemberHello,
    PoolKeyStatus,
    PoolMemberStatus,
    PoolStatusReply,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
RETRY_S = (2.0, 60.0)  # back-off after a member failed to start: first, most


@dataclass(frozen=True, slots=True)
class Size:
    memory_mib: int
    vcpus: int

    def config(self, config: RuntimeConfig) -> RuntimeConfig:
        return replace(config, hypervisor=replace(config.hypervisor, memory_mib=self.memory_mib,
                                                  vcpus=self.vcpus))


def sizes(config: RuntimeConfig) -> list[Size]:
    """The default sandbox size first, then [pool] sizes, without repeats."""
    out = [Size(config.hypervisor.memory_mib, config.hypervisor.vcpus)]
    for memory_mib, vcpus in config.pool.sizes:
        if Size(memory_mib, vcpus) not in out:
            out.append(Size(memory_mib, vcpus))
    return out


@dataclass(slots=True)
class Pooled:
    """One supervisor the pool started."""

    sandbox_id: str
    size: Size
    key: str
    proc: child.Child[Any]
    link: socket.socket
    state: str = "starting"  # idle, claimed; retired (its key is stale), gone
    ready: CreateReply | None = None
    since: float = field(default_factory=time.monotonic)


class PoolService:
    def __init__(self, config: RuntimeConfig, config_path: str | None, *,
                 member_main: Callable[[list[str]], int], debug: bool = False) -> None:
        """`member_main`: the supervisor's main, which each member runs (forked from this
        process, so that the members share the pages of its code: the caller imported it)."""
        self.config = config
        self.member_main = member_main
        self.config_path = config_path
        self.debug = debug
        self.root = config.state_dir / "pool"
        self.keys: dict[str, Size] = {}
        self.members: list[Pooled] = []
        self.wake = asyncio.Event()
        self.stopping = False
        self.failures = 0
        self.claims = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def _task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _pooled_memory(self) -> int:
        return sum(m.size.memory_mib for m in self.members if m.state != "claimed")

    def _count(self, key: str, *states: str) -> int:
        return sum(1 for m in self.members if m.key == key and m.state in states)

    # -- serving ------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Until `stop`: keep the pool full, answer claims. Then destroy every idle VM."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another `runv pool serve` runs for state_dir "
                                  f"{self.config.state_dir}") from None
            await self._serve_locked(stop)
            # Nothing left behind. The lock file goes while still held: a service starting
            # meanwhile either fails to lock it (this one still runs) or makes a new one.
            with contextlib.suppress(OSError):
                vm_dir.shares_root(self.config.state_dir).rmdir()
            (self.root / "lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.root.rmdir()
        finally:
            os.close(lock)

    async def _serve_locked(self, stop: asyncio.Event) -> None:
        self._sweep()
        self.keys = self._keys()
        for size in self.keys.values():
            if size.memory_mib > self.config.pool.memory_mib:
                log.warning("a %d MiB VM does not fit under the pool's memory ceiling of %d "
                            "MiB ([pool] memory_mib): none will be kept", size.memory_mib,
                            self.config.pool.memory_mib)
        path = socket_path(self.config.state_dir)
        path.unlink(missing_ok=True)
        listener = listen(path)
        log.info("warm pool on %s: %d per size, ceiling %d MiB, sizes %s", path,
                 self.config.pool.size, self.config.pool.memory_mib,
                 ", ".join(f"{s.memory_mib} MiB/{s.vcpus} vCPU (key {k})"
                           for k, s in self.keys.items()))
        tasks = [asyncio.create_task(self._accept(listener)),
                 asyncio.create_task(self._refill())]
        try:
            await stop.wait()
        finally:
            self.stopping = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            listener.close()
            path.unlink(missing_ok=True)
            await self._destroy_idle()

    def _keys(self) -> dict[str, Size]:
        keys: dict[str, Size] = {}
        for size in sizes(self.config):
            keys.setdefault(key_of(size.config(self.config)), size)
        return keys

    def _rekey(self) -> None:
        """Follow rebuilt assets or an upgraded QEMU (new template keys): the idle VMs of keys
        that no sandbox can ask for any more are destroyed, and the pool fills anew."""
        try:
            keys = self._keys()
        except (RunvError, OSError) as exc:
            log.warning("cannot compute the pool's template keys: %s", exc)
            return
        if keys == self.keys:
            return
        log.info("template keys changed (%s -> %s): replacing the idle VMs",
                 ", ".join(self.keys), ", ".join(keys))
        self.keys = keys
        for member in self.members:
            if member.key not in keys and member.state in ("starting", "idle"):
                self._retire(member)
        self.wake.set()

    def reload(self) -> None:
        """SIGHUP: read the config file again. Idle VMs it no longer wants (a size or VM
        setting changed, fewer per size, a lower ceiling, the other idle mode) are destroyed
        and the pool fills anew; a config that does not load changes nothing."""
        try:
            config = load_config(self.config_path)
        except RunvError as exc:
            log.error("config not reloaded, the pool keeps the one it has: %s", exc)
            return
        if config.state_dir != self.config.state_dir:
            log.error("config not reloaded: state_dir changed (%s -> %s), which needs a "
                      "restart of the pool service", self.config.state_dir, config.state_dir)
            return
        old, self.config = self.config, config
        log.info("config reloaded: %d per size, ceiling %d MiB, idle VMs %s", config.pool.size,
                 config.pool.memory_mib, config.pool.idle)
        live = [m for m in self.members if m.state in ("starting", "idle")]
        if config.pool.idle != old.pool.idle:
            for member in live:
                self._retire(member)
        self._rekey()
        for key in self.keys:
            extra = max(0, self._count(key, "starting", "idle") - config.pool.size)
            for member in [m for m in live if m.key == key and m.state == "idle"][:extra]:
                self._retire(member)
        over = sum(m.size.memory_mib for m in live if m.state == "idle") - config.pool.memory_mib
        for member in reversed([m for m in live if m.state == "idle"]):
            if over <= 0:
                break
            self._retire(member)
            over -= member.size.memory_mib
        self.wake.set()

    @staticmethod
    def _retire(member: Pooled) -> None:
        member.state = "retired"
        member.proc.signal(signal.SIGTERM)

    def _sweep(self) -> None:
        """Shared-dir mount points of supervisors that died without removing them (the
        mounts themselves were in their private mount namespaces)."""
        sandboxes = self.config.state_dir / "sandboxes"
        for entry in list(vm_dir.shares_root(self.config.state_dir).glob("*")):
            if not vm_dir.owner_alive(sandboxes / entry.name):
                with contextlib.suppress(OSError):
                    entry.rmdir()

    async def _destroy_idle(self) -> None:
        pending = [m for m in self.members if m.state != "claimed"]
        for member in pending:
            member.link.close()  # an idle member ends when its link does
        results = await asyncio.gather(*(m.proc.stop(grace_s=20) for m in pending),
                                       return_exceptions=True)
        for member, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("pooled supervisor %d did not stop: %s", member.proc.pid, result)
        log.info("warm pool stopped: %d idle VMs destroyed", len(pending))

    # -- filling ------------------------------------------------------------------------------

    def _wanted(self) -> Size | None:
        """The next size to start a VM of, or None (all full, or the ceiling is reached)."""
        if any(m.state == "starting" for m in self.members):
            return None  # one at a time: a restore is CPU-heavy under TCG
        for key, size in self.keys.items():
            if self._count(key, "starting", "idle") < self.config.pool.size \
                    and self._pooled_memory() + size.memory_mib <= self.config.pool.memory_mib:
                return size
        return None

    async def _refill(self) -> None:
        while True:
            size = self._wanted()
            if size is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            ok = await self._start_member(size)
            if ok:
                self.failures = 0
            else:
                self.failures += 1
                await asyncio.sleep(min(RETRY_S[1], RETRY_S[0] * 2 ** (self.failures - 1)))

    async def _start_member(self, size: Size) -> bool:
        config = size.config(self.config)
        sandbox_id = f"pool-{secrets.token_hex(6)}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = ["--pool-fd", str(theirs.fileno())]
        if self.config_path:
            argv += ["--config", self.config_path]
        if self.debug:
            argv.append("--debug")
        try:
            # A fork of this service where it can be (forked.py); its own session, not killed
            # with the pool: once claimed it is a container's.
            if forked.can_fork(protocol.SUPERVISOR_MODULE):
                proc: child.Child[Any] = await forked.fork_main(
                    self.member_main, protocol.SUPERVISOR_MODULE, argv, pass_fds=(theirs.fileno(),),
                    new_session=True, die_with_parent=False)
            else:
                proc = await child.spawn([sys.executable, "-m", protocol.SUPERVISOR_MODULE, *argv],
                                         stdout=None, stderr=None, pass_fds=(theirs.fileno(),),
                                         new_session=True, die_with_parent=False)
        finally:
            theirs.close()
        member = Pooled(sandbox_id, size, key_of(config), proc, ours)
        self.members.append(member)
        self._task(self._reap(member))
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        ready: CreateReply | None = None
        error = ""
        try:
            hello = MemberHello(id=sandbox_id, memory_mib=size.memory_mib, vcpus=size.vcpus,
                                idle=self.config.pool.idle)
            ours.send(protocol.encode(protocol.to_wire(hello)))
            data = await asyncio.wait_for(loop.sock_recv(ours, MAX_PACKET), READY_TIMEOUT_S)
            if not data:
                raise RunvError("exited")
            ready = CreateReply.from_fields(protocol.raise_for(protocol.decode(data)),
                                            "pooled supervisor report")
        except (OSError, RunvError, TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        if member.state == "retired":
            ours.close()
            await proc.stop()
            return True
        if ready is None or member.state != "starting":
            log.warning("a pooled VM failed to start: %s", error if ready is None else "retired")
            ours.close()  # a member that is still starting ends with its link
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), 10)
            await proc.stop()
            return False
        member.state = "idle"
        member.ready = ready
        log.info("pooled VM %s ready (key %s, QEMU pid %s) in %.1fs", sandbox_id, member.key,
                 ready.qemu_pid, time.monotonic() - member.since)
        return True

    async def _reap(self, member: Pooled) -> None:
        """The pool is the members' parent: collect each one's exit, idle or claimed."""
        code = await member.proc.wait()
        if member.state == "idle" and not self.stopping:
            log.warning("idle pooled supervisor %d exited (%d); replacing it",
                        member.proc.pid, code)
        if member.state == "starting":
            member.state = "gone"
        with contextlib.suppress(ValueError):
            self.members.remove(member)
        member.link.close()
        # What it leaves: its VM directory (with its owner file) and its shared dir's mount
        # point. A claimed one's container may be deleting them too: it found the same dead
        # owner.
        vm_dir.remove(self.config.state_dir / "sandboxes" / member.sandbox_id)
        self.wake.set()

    # -- claims -------------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._task(self._answer(AsyncChannel(conn)))

    async def _answer(self, channel: AsyncChannel) -> None:
        try:
            wire = await channel.recv()
            if wire is None:
                return
            request = protocol.decode_request(wire, POOL_REQUESTS)
            reply = (await self.claim(request.key) if isinstance(request, Claim)
                     else self.status())
            channel.send_nowait(reply.to_wire())
        except Exception as exc:
            log.debug("pool request failed", exc_info=True)
            channel.send_nowait(protocol.error_reply(exc))
        finally:
            channel.close()

    async def claim(self, key: str) -> ClaimReply:
        """Hand out an idle member of `key`: it leaves the pool before anyone else can see it
        and acknowledges the claim; one that does not (dying) is dropped and the next tried."""
        loop = asyncio.get_running_loop()
        if key not in self.keys:
            self._rekey()
        while True:
            member = next((m for m in self.members if m.key == key and m.state == "idle"), None)
            if member is None:
                why = "no such size in the pool" if key not in self.keys else "empty"
                return ClaimReply(why=why)
            member.state = "claimed"
            self.wake.set()
            try:
                member.link.send(protocol.encode(protocol.to_wire(Claimed())))
                data = await asyncio.wait_for(loop.sock_recv(member.link, MAX_PACKET),
                                              CLAIM_TIMEOUT_S)
                acked = bool(data) and protocol.is_ok(protocol.decode(data))
            except (OSError, RunvError, TimeoutError):
                acked = False
            member.link.close()
            if acked and member.ready is not None:
                self.claims += 1
                return ClaimReply(
                    ctl=str(Path(member.ready.vm_dir) / vm_dir.CONTROL_SOCKET),
                    vm_dir=member.ready.vm_dir, pid=member.proc.pid,
                    start=member.proc.start_time or 0, qemu_pid=member.ready.qemu_pid,
                    sandbox=member.sandbox_id)
            log.warning("pooled supervisor %d did not take its claim; dropping it",
                        member.proc.pid)
            member.proc.signal(signal.SIGTERM)

    def status(self) -> PoolStatusReply:
        keys = {key: PoolKeyStatus(memory_mib=size.memory_mib, vcpus=size.vcpus,
                                   idle=self._count(key, "idle"),
                                   starting=self._count(key, "starting"),
                                   claimed_running=self._count(key, "claimed"))
                for key, size in self.keys.items()}
        return PoolStatusReply(
            size=self.config.pool.size, idle_state=self.config.pool.idle,
            memory_mib=self._pooled_memory(), memory_ceiling_mib=self.config.pool.memory_mib,
            claims=self.claims, keys=keys,
            members=tuple(PoolMemberStatus(sandbox=m.sandbox_id, key=m.key, state=m.state,
                                           pid=m.proc.pid,
                                           qemu_pid=m.ready.qemu_pid if m.ready else None)
                          for m in self.members))
