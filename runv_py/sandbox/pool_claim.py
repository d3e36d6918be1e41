"""Taking a VM from the warm pool (pool.py), as a container's create does, and asking the pool
how it is. A host without a pool service pays none of this: runtime.py imports it only when the
pool's socket exists."""

from __future__ import annotations

from pathlib import Path

from ..config import RuntimeConfig
from ..errors import RunvError
from . import guest_spec
from .client import pool_call
from .guest_vm import clone_key
from .pool_member import socket_path
from .protocol import Claim, ClaimReply, PoolStatus, PoolStatusReply

CLAIM_TIMEOUT_S = 10.0


def key_of(config: RuntimeConfig) -> str:
    """The pool key of a sandbox with this (sized) config: its template's key."""
    return clone_key(config, (guest_spec.SHARED_TAG,))


async def status(state_dir: Path) -> PoolStatusReply:
    """The pool service's counts; ConnectionError if none runs."""
    return await pool_call(socket_path(state_dir), PoolStatus(), CLAIM_TIMEOUT_S + 5)


def unavailable(config: RuntimeConfig) -> str | None:
    """Why a sandbox of this config cannot come from the pool, if that is known up front."""
    if config.template == "off":
        return "template is off"
    if not socket_path(config.state_dir).exists():
        return "no pool service"
    return None


async def claim(config: RuntimeConfig) -> tuple[ClaimReply | None, str]:
    """An idle pooled supervisor for a sandbox of this (sized) config, or (None, why)."""
    why = unavailable(config)
    if why is not None:
        return None, why
    try:
        key = key_of(config)
        reply = await pool_call(socket_path(config.state_dir), Claim(key=key),
                                CLAIM_TIMEOUT_S + 5)
    except (OSError, RunvError) as exc:
        return None, str(exc)
    if reply.ctl is None:
        return None, f"{reply.why or 'empty'} (key {key})"
    return reply, "claimed"
