"""OCI hooks that run in the runtime namespace (on the host): prestart, createRuntime,
poststart, poststop. Each gets the container's state JSON on stdin."""

from __future__ import annotations

import logging
import subprocess

from ..errors import HookError
from .spec import Hook

log = logging.getLogger(__name__)


def run(kind: str, hooks: tuple[Hook, ...], state_json: str, *, fatal: bool = True) -> None:
    """Run the hooks in order; the first failure raises HookError (or, with fatal=False, as
    for poststop, is logged and the rest still run)."""
    for i, hook in enumerate(hooks):
        where = f"hooks.{kind}[{i}] {hook.path}"
        env = dict(item.split("=", 1) for item in hook.env if "=" in item)
        try:
            result = subprocess.run(list(hook.args) or [hook.path], executable=hook.path,
                                    input=state_json.encode(), env=env,
                                    capture_output=True, timeout=hook.timeout, check=False)
            problem = None if result.returncode == 0 else (
                f"exited with status {result.returncode}: "
                + result.stderr.decode(errors="replace").strip()[-500:])
        except subprocess.TimeoutExpired:
            problem = f"timed out after {hook.timeout}s"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem is None:
            continue
        if fatal:
            raise HookError(f"{where}: {problem}")
        log.warning("%s: %s", where, problem)
