"""OCI hooks that run in the runtime namespace (on the host): prestart, createRuntime,
poststart, poststop. Each gets the container's state JSON on stdin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess

from ..errors import HookError
from .spec import Hook

log = logging.getLogger(__name__)


async def run(kind: str, hooks: tuple[Hook, ...], state_json: str, *,
              fatal: bool = True) -> None:
    """Run the hooks in order; the first failure raises HookError (or, with fatal=False, as
    for poststop, is logged and the rest still run)."""
    for i, hook in enumerate(hooks):
        where = f"hooks.{kind}[{i}] {hook.path}"
        problem = await _run_one(hook, state_json)
        if problem is None:
            continue
        if fatal:
            raise HookError(f"{where}: {problem}")
        log.warning("%s: %s", where, problem)


async def _run_one(hook: Hook, state_json: str) -> str | None:
    """None if the hook succeeded, else what went wrong."""
    env = dict(item.split("=", 1) for item in hook.env if "=" in item)
    try:
        process = await asyncio.create_subprocess_exec(
            *(hook.args or (hook.path,)), executable=hook.path, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(state_json.encode()),
                                           hook.timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return f"timed out after {hook.timeout}s"
    if process.returncode == 0:
        return None
    return (f"exited with status {process.returncode}: "
            + stderr.decode(errors="replace").strip()[-500:])
