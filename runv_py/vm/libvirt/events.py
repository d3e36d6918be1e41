"""libvirt's event loop for this process: its default implementation, run by one daemon thread.
It must be registered before the first connection opens, or that connection delivers no
events. Callbacks run on that thread; they hand their news to asyncio with
call_soon_threadsafe."""

from __future__ import annotations

import threading
from typing import Any

import libvirt

_lock = threading.Lock()
_running = False


def _quiet(_context: Any, _error: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


def ensure_running() -> None:
    global _running  # noqa: PLW0603 (one event loop per process, by libvirt's design)
    with _lock:
        if _running:
            return
        libvirt.registerErrorHandler(_quiet, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run, name="libvirt-events", daemon=True).start()
        _running = True


def _run() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()
