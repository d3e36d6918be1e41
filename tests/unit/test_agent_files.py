from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hyperstart_agent import files
from hyperstart_agent.errors import AgentError


@dataclass
class Chunk:
    data: bytes
    path: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0


def test_a_file_arrives_whole_with_mode_and_owner(tmp_path: Path) -> None:
    root = str(tmp_path)
    path = files.copy_in([Chunk(b"ab", f"{root}/d/f", 0o750, 12, 34, 5), Chunk(b"cde")], root)
    st = os.stat(path)
    assert Path(path).read_bytes() == b"abcde"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 12, 34)


@pytest.mark.parametrize(("chunks", "message"), [
    ([Chunk(b"x", "/etc/passwd", size=1)], "must be an absolute path under"),
    ([Chunk(b"x", "{root}/../x", size=1)], "must be an absolute path under"),
    ([Chunk(b"x", "rel", size=1)], "must be an absolute path under"),
    ([Chunk(b"", "{root}/big", size=files.MAX_SIZE + 1)], "over the"),
    ([Chunk(b"abc", "{root}/short", size=5)], "3 bytes arrived, 5 announced"),
    ([Chunk(b"abc", "{root}/long", size=2)], "more than the announced 2 bytes"),
    ([Chunk(b"a", "{root}/m", mode=0o17777, size=1)], "is not a mode"),
    ([], "no chunks"),
])
def test_bad_copies_are_refused_and_leave_nothing(tmp_path: Path, chunks: list[Chunk],
                                                   message: str) -> None:
    root = str(tmp_path)
    for chunk in chunks:
        chunk.path = chunk.path.format(root=root)
    with pytest.raises(AgentError, match=message) as info:
        files.copy_in(chunks, root)
    assert info.value.code == "INVALID_ARGUMENT"
    assert list(tmp_path.iterdir()) == []
