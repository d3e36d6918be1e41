"""QMP to a libvirt domain's QEMU through libvirt itself (qemu-monitor-command, with fds where a
command takes one, and qemu-monitor-event for QMP events): never a second monitor socket.
Errors are HypervisorError, as from vm/qemu/qmp.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import libvirt
import libvirt_qemu
from qemu.qmp import EventListener, Message

from ...errors import HypervisorError


def libvirt_message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc)


class LibvirtMonitor:
    """One domain's monitor. Events (registered for the connection, filtered by the domain's
    name) arrive on libvirt's event thread and are queued on `loop`."""

    def __init__(self, conn: libvirt.virConnect, domain_name: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._name = domain_name
        self._loop = loop
        self.domain: libvirt.virDomain | None = None
        self._listeners: list[EventListener] = []
        self._callbacks: list[int] = []

    def watch(self, *events: str) -> None:
        """Deliver these QMP events to listeners from now on (before the domain exists)."""
        for event in events:
            self._callbacks.append(libvirt_qemu.qemuMonitorEventRegister(
                self._conn, None, event, self._on_event, None, 0))

    def _on_event(self, _conn: Any, dom: Any, event: str, seconds: int, micros: int,
                  details: str | None, _opaque: Any) -> None:
        if dom.name() != self._name:
            return
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        message = Message({"event": event, "data": data,
                           "timestamp": {"seconds": seconds, "microseconds": micros}})
        self._loop.call_soon_threadsafe(self._deliver, message)

    def _deliver(self, message: Message) -> None:
        for listener in self._listeners:
            if listener.accept(message):
                asyncio.ensure_future(listener.put(message))  # noqa: RUF006 (put never waits)

    def listen(self, *names: str) -> EventListener:
        listener = EventListener(names)
        self._listeners.append(listener)
        return listener

    def unlisten(self, listener: EventListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._command(command, arguments, None)

    async def execute_with_fd(self, fd: int, command: str, arguments: dict[str, Any]) -> Any:
        return await self._command(command, arguments, fd)

    async def _command(self, command: str, arguments: dict[str, Any] | None,
                       fd: int | None) -> Any:
        if self.domain is None:
            raise HypervisorError(f"QMP {command}: domain {self._name} is not running")
        domain = self.domain
        request = json.dumps({"execute": command, **({"arguments": arguments}
                                                      if arguments else {})})

        def call() -> str:
            if fd is None:
                return str(libvirt_qemu.qemuMonitorCommand(domain, request, 0))
            reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(domain, request, [fd], 0)
            return str(reply)

        try:
            text = await asyncio.to_thread(call)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"QMP {command} through libvirt failed: "
                                  f"{libvirt_message(exc)}") from exc
        reply = json.loads(text)
        if "error" in reply:
            raise HypervisorError(f"QMP {command} failed: "
                                  f"{reply['error'].get('desc', 'no reason given')}")
        return reply.get("return")

    def close(self) -> None:
        """Deregister the events (the connection stays the machine's)."""
        for callback in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_qemu.qemuMonitorEventDeregister(self._conn, callback)
        self._callbacks.clear()
        self._listeners.clear()
