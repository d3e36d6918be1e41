"""PID 1 of the guest: early mounts, the gRPC server, the channel splice, zombie reaping.

PID 1 must never exit (its death is a kernel panic): every failure is logged to the console and
the agent goes on serving what it can.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .container.engine import Engine
    from .options import Options
    from .stdio import StreamListener


def _boottime_ms() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000)


def main() -> None:
    timings = {"agent_start": _boottime_ms()}
    _no_signal_handlers()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO,
        format="hyperstart[%(relativeCreated)d]: %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("hyperstart")
    try:
        _run(log, timings)
    except BaseException:
        log.exception("fatal error in PID 1; keeping the guest alive")
    # PID 1 must not return: park, still reaping orphans.
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(3600)
        except BaseException:
            time.sleep(1)


def _no_signal_handlers() -> None:
    """Catch no signal. The kernel drops a signal to PID 1 from its own pid namespace (where a
    container that shares the guest's lives) unless PID 1 handles it; Python handles SIGINT
    (KeyboardInterrupt), which would end the reaper. SIGCHLD stays blocked for sigwaitinfo and
    ignored signals (Python's SIGPIPE) stay ignored."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signum, signal.SIG_DFL)


def _run(log: logging.Logger, timings: dict[str, int]) -> None:
    from . import mounts, options
    from .reaper import Reaper

    for failure in mounts.mount_early():
        log.error("early mount failed: %s", failure)
    from .guest import loopback_up

    try:
        loopback_up()
    except OSError as exc:
        log.error("cannot bring up lo: %s", exc)
    Reaper.block_sigchld()
    reaper = Reaper()

    with open("/proc/cmdline") as f:
        cmdline = f.read()
    opts = options.parse(cmdline)
    if opts.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    for key in options.unknown_keys(cmdline):
        log.warning("ignoring unknown kernel option %s", key)

    os.makedirs(os.path.dirname(options.SERVER_SOCKET), exist_ok=True)
    from . import server as server_mod  # grpc + protobuf: the bulk of start-up time

    timings["imports_done"] = _boottime_ms()
    def make_engine() -> Engine:
        """The container engine, made on the first container call (its imports and the
        cgroup set-up are not needed to answer Check)."""
        from .container import cgroups
        from .container.engine import Engine

        try:
            cgroup_parent: str | None = cgroups.setup()
        except (OSError, cgroups.CgroupError) as exc:
            log.error("cgroups unavailable, containers run without limits: %s", exc)
            cgroup_parent = None
        engine = Engine(cgroup_parent=cgroup_parent, audit=opts.audit)
        reaper.add_listener(engine.on_exit)
        return engine

    # Referenced for the life of PID 1: a collected grpc.Server stops serving.
    server = server_mod.serve("unix:" + options.SERVER_SOCKET, timings,  # noqa: F841
                              make_engine, _stdio_streams(opts))
    timings["server_listening"] = _boottime_ms()
    log.debug("timings %s", timings)

    for kind, name in opts.channels:
        if kind == "serial":
            from .channel import SerialSplice

            splice = SerialSplice(name, options.SERVER_SOCKET)
            threading.Thread(target=splice.run_forever, name="channel", daemon=True).start()
        elif kind == "vsock" and name.isdigit():
            # Listening needs no vsock device yet (Linux >= 5.5): a template's clone hot-plugs
            # it after restore, and the listener then takes connections.
            from .channel import VsockSplice

            vsock = VsockSplice(int(name), options.SERVER_SOCKET)
            threading.Thread(target=vsock.run_forever, name="channel", daemon=True).start()
        else:
            log.error("unsupported channel %r; serving on %s only", f"{kind}:{name}",
                      options.SERVER_SOCKET)

    log.info("agent ready (%d ms after boot)", timings["server_listening"])
    reaper.run_forever()


def _stdio_streams(opts: Options) -> StreamListener | None:
    """With a vsock channel on port P, processes' stdio streams are served on P + 1 (bound
    now, before any container exists; listening needs no device yet, as for the channel)."""
    port = next((int(name) for kind, name in opts.channels
                 if kind == "vsock" and name.isdigit()), None)
    if port is None:
        return None
    from .stdio import StreamListener

    try:
        streams = StreamListener(port + 1)
    except OSError as exc:
        logging.getLogger(__name__).error(
            "cannot listen on vsock port %d for stdio streams (Stdio only): %s", port + 1, exc)
        return None
    threading.Thread(target=streams.run_forever, name="stdio-streams", daemon=True).start()
    return streams
