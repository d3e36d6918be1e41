"""Helpers forked from an event loop's process (runv_py/forked.py): what the child gets (its
argv, command line, fds, signal dispositions) and how its parent waits for it."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from runv_py import child


def _in_fresh_python(body: str, tmp_path: Path) -> Any:
    """Run `body` (it defines `async def scenario()`) in a new interpreter and return what
    the scenario returned: forking wants a single-threaded process, which pytest's is not
    once other tests started gRPC."""
    script = textwrap.dedent("""
        import asyncio, ast, os, signal, sys, time
        from pathlib import Path
        from runv_py import child, forked
    """) + textwrap.dedent(body) + textwrap.dedent("""
        result = asyncio.run(scenario())
        Path(sys.argv[1]).write_text(repr(result))
    """)
    out = tmp_path / "result"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=60)
    return ast.literal_eval(out.read_text())


def test_the_child_runs_its_main_with_only_the_fds_it_was_given(tmp_path: Path) -> None:
    seen, code = _in_fresh_python("""
        def entry(argv):
            fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
            handlers = {name: str(signal.getsignal(getattr(signal, name)))
                        for name in ("SIGTERM", "SIGINT", "SIGPIPE", "SIGHUP")}
            Path(sys.argv[-1]).write_text(repr({
                "argv": argv, "sys_argv": sys.argv, "fds": fds,
                "cmdline": Path("/proc/self/cmdline").read_bytes(), "handlers": handlers,
                "comm": Path("/proc/self/comm").read_text().strip()}))
            return 7

        async def scenario():
            kept_r, kept_w = os.pipe()
            other_r, other_w = os.pipe()
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
            report = Path(sys.argv[1] + ".child")
            c = await forked.fork_main(entry, "runv_py.example",
                                       ["--flag", "value", str(report)], pass_fds=(kept_w,))
            code = await asyncio.wait_for(c.wait(), 20)
            seen = ast.literal_eval(report.read_text())
            seen["kept"], seen["other"] = kept_w, (other_r, other_w)
            return seen, (code, c.returncode)
    """, tmp_path)
    assert code == (7, 7)
    assert seen["argv"][:2] == ["--flag", "value"]
    assert seen["sys_argv"][:3] == ["runv_py.example", "--flag", "value"]
    # stdio, the kept pipe, and the listing's own fd: not the other pipe, nor the loop's.
    assert seen["kept"] in seen["fds"]
    assert len(set(seen["fds"]) - {0, 1, 2, seen["kept"]}) == 1
    assert not set(seen["other"]) & set(seen["fds"])
    words = [w.decode() for w in seen["cmdline"].split(b"\0") if w]
    assert words[1:5] == ["-m", "runv_py.example", "--flag", "value"]
    assert os.path.basename(words[0]) == os.path.basename(sys.executable)
    assert seen["comm"] == os.path.basename(sys.executable)[:15]
    assert seen["handlers"]["SIGHUP"] == str(signal.SIG_DFL)
    assert seen["handlers"]["SIGTERM"] == str(signal.SIG_DFL)
    assert seen["handlers"]["SIGPIPE"] == str(signal.SIG_IGN)
    assert "default_int_handler" in seen["handlers"]["SIGINT"]


def test_an_exception_or_exit_in_the_child_is_its_status(tmp_path: Path) -> None:
    failed, exited, err = _in_fresh_python("""
        def raises(argv):
            raise RuntimeError("boom")

        def exits(argv):
            raise SystemExit(3)

        async def scenario():
            with open(sys.argv[1] + ".err", "wb") as err:
                failed = await (await forked.fork_main(raises, "m", [], stderr=err)).wait()
            exited = await (await forked.fork_main(exits, "m", [])).wait()
            return failed, exited, Path(sys.argv[1] + ".err").read_text()
    """, tmp_path)
    assert (failed, exited) == (1, 3)
    assert "RuntimeError: boom" in err


def test_a_signal_ends_the_child_by_its_default_action(tmp_path: Path) -> None:
    assert _in_fresh_python("""
        def sleeps(argv):
            time.sleep(30)
            return 0

        async def scenario():
            c = await forked.fork_main(sleeps, "m", [])
            c.signal(signal.SIGTERM)
            return await asyncio.wait_for(c.wait(), 20)
    """, tmp_path) == -signal.SIGTERM


def test_only_a_single_threaded_process_forks(tmp_path: Path) -> None:
    """A thread (here a child watcher's, as asyncio's default in 3.11 starts per child) makes
    can_fork() say no; with pidfd watching a spawned child leaves none."""
    assert _in_fresh_python("""
        import threading

        async def scenario():
            alone = forked.can_fork("m")
            child.watch_children_by_pidfd()
            spawned = await child.spawn(["sleep", "0.3"])
            while_spawned = forked.can_fork("m")
            await spawned.wait()
            stop = threading.Event()
            thread = threading.Thread(target=stop.wait)
            thread.start()
            with_thread = forked.can_fork("m")
            stop.set()
            thread.join()
            return alone, while_spawned, with_thread
    """, tmp_path) == (True, True, False)


def test_a_command_line_that_cannot_show_its_name_is_not_forked(tmp_path: Path) -> None:
    """runv gc finds a helper by the arguments that name its VM directory: a fork whose
    parent's argv area cannot hold them would be invisible to it."""
    assert _in_fresh_python("""
        async def scenario():
            return (forked.can_fork("runv_py.vsock", ["--socket=/run/x/vhost-vsock.sock"]),
                    forked.can_fork("runv_py.vsock", ["--socket=" + "x" * 4000]))
    """, tmp_path) == (True, False)


def test_the_child_dies_with_the_process_that_forked_it(tmp_path: Path) -> None:
    """die_with_parent: a SIGKILL of the parent kills the child too (the parent-death signal,
    as setpriv gave the spawned helpers)."""
    pid_file = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import asyncio, os, time
        from runv_py import forked

        def sleeps(argv):
            time.sleep(60)
            return 0

        async def main():
            c = await forked.fork_main(sleeps, "runv_py.example", [])
            open({str(pid_file)!r}, "w").write(str(c.pid))
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child was not forked"
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        start = child.proc_start_time(grandchild)
        assert start is not None
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while child.is_running(grandchild, start):
            assert time.monotonic() < deadline, "the forked child outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("area", [20, 30, 36, 40, 80])
def test_the_command_line_keeps_what_fits_its_area(tmp_path: Path, area: int) -> None:
    """The new argv overwrites the old one in place: the program's directory goes first, then
    arguments from the end; /proc still reads NUL-separated words, over the same length."""
    (tmp_path / "t.py").write_text(textwrap.dedent("""
        import sys
        from pathlib import Path
        from runv_py import forked
        forked.set_command_line(["/usr/bin/python3", "-m", "runv_py.example", "--a=1", "--b=2"])
        sys.stdout.buffer.write(Path("/proc/self/cmdline").read_bytes())
    """))
    argv = ["p", "-c", "import t"]
    argv.append("x" * (area - len("\0".join(argv)) - 2))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(argv, executable=sys.executable, capture_output=True, check=True,
                            env=env)
    assert len(result.stdout) == area
    words = [w.decode() for w in result.stdout.split(b"\0") if w]
    full = ["/usr/bin/python3", "-m", "runv_py.example", "--a=1", "--b=2"]
    if area >= len("\0".join(full)) + 1:
        assert words == full
    else:
        assert words == ["python3", *full[1:len(words)]]
        assert len(words) == {20: 2, 30: 3, 36: 4, 40: 5}[area]


def test_a_program_runs_again_with_room_on_its_command_line(tmp_path: Path) -> None:
    """exec_with_room: the same pid, its arguments and the padding option, once; a program
    that already has the room is not run again."""
    (tmp_path / "t.py").write_text(textwrap.dedent("""
        import os, sys
        from runv_py import forked
        forked.exec_with_room(int(sys.argv[1]), "--room")
        start, end = forked._argv_area()
        print(repr((os.getpid(), end - start, sys.argv[1:])))
    """))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "t.py"), "600"], env=env,
                            stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    pid, area, args = ast.literal_eval(out.decode())
    assert pid == proc.pid and area >= 600
    assert args[0] == "600" and len(args) == 2 and args[1].startswith("--room=")
    assert args[1].removeprefix("--room=").strip() == ""
    again = subprocess.run([sys.executable, str(tmp_path / "t.py"), "10"], env=env,
                           capture_output=True, check=True, timeout=60)
    assert ast.literal_eval(again.stdout.decode())[2] == ["10"]
