"""The bounded output log: rotation at its size, the copier from a pipe, and reading both files
back in order (also while following across a rotation)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from runv_py.workload import output_log


def test_rotation_keeps_at_most_twice_the_size(tmp_path: Path) -> None:
    path = tmp_path / "output.log"
    log = output_log.RotatingLog(path, 1000)
    data = b"".join(b"%05d\n" % i for i in range(2000))  # 12000 bytes
    for start in range(0, len(data), 700):
        log.write(data[start:start + 700])
    log.close()
    newest, older = path.read_bytes(), output_log.rotated(path).read_bytes()
    assert len(older) == 1000 and 0 < len(newest) <= 1000
    assert (older + newest) == data[-len(older + newest):]


def test_copier_and_reader_follow_a_rotating_log(tmp_path: Path) -> None:
    path = tmp_path / "output.log"
    lines = [b"line %06d\n" % i for i in range(3000)]  # 36000 bytes, log of 16 KiB

    async def scenario() -> bytes:
        read_r, write_w = os.pipe2(os.O_CLOEXEC)
        copier = output_log.Copier(read_r, output_log.RotatingLog(path, 16384))
        finished = False

        async def done() -> bool:
            return finished

        async def writer() -> None:
            nonlocal finished
            for i in range(0, len(lines), 50):
                os.write(write_w, b"".join(lines[i:i + 50]))
                await asyncio.sleep(0.01)
            copier.drain()
            finished = True

        got = []
        task = asyncio.create_task(writer())
        async for chunk in output_log.follow(path, done, follow=True):
            got.append(chunk)
        await task
        os.close(write_w)
        copier.close()
        return b"".join(got)

    path.touch()
    followed = asyncio.run(scenario())
    assert followed == b"".join(lines)   # a reader at a 0.1 s pace saw every rotation

    async def read_back() -> bytes:
        async def done() -> bool:
            return True
        return b"".join([c async for c in output_log.follow(path, done, follow=False)])

    kept = asyncio.run(read_back())
    assert len(kept) <= 2 * 16384 and b"".join(lines).endswith(kept)
