"""Guest memory as the device reaches it: a ring's index, which the guest reads (used) or
writes (avail) while the device works, goes in one access either way. A guest that polls a
used index caught half-stored takes stale entries of the ring's previous lap for new ones."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from runv_py.vsock.memory import GuestMemory, Memory, ProcessMemory

PAGE = 4096
UVA = 0x7F00_0000_0000
# Words for the other process's state and its progress (thousands of loads or stores), then
# the ring's flags and index.
CONTROL, PROGRESS, RING = 0, 8, 64
READY, STOP = 1, 2
# Both sides work at once for at least this long and this many thousand of the other's
# accesses (a starved second process shows nothing), and at most for the cap.
BUSY_S, BUSY_THOUSANDS, BUSY_CAP_S = 0.3, 100, 30.0
# Stored one after the other, the two values differ in both bytes: a byte-wise store or load
# shows 0x0000 or 0x01FF in between.
VALUES = (0x00FF, 0x0100)

# The guest's side, in a process of its own: single 16-bit loads or stores of the index.
GUEST = r"""
import ctypes, mmap, sys
fd, role, control_at, progress_at, index_at = sys.argv[1:]
page = mmap.mmap(int(fd), 4096)
control = ctypes.c_uint16.from_buffer(page, int(control_at))
progress = ctypes.c_uint32.from_buffer(page, int(progress_at))
index = ctypes.c_uint16.from_buffer(page, int(index_at))
control.value = 1
done = other = 0
while control.value != 2:
    for _ in range(1000):
        if role == "poll":
            value = index.value
            if value != 0x00FF and value != 0x0100:
                other += 1
        else:
            index.value = 0x0100
            index.value = 0x00FF
    done += 1000
    progress.value = done // 1000
print(done, other)
"""


@dataclass(frozen=True)
class SharedPage:
    fd: int
    page: mmap.mmap
    mem: Memory
    uva: int  # the page's address in QEMU's terms (that of the ring areas)


@pytest.fixture(params=["mapped", "process"])
def shared(request: pytest.FixtureRequest) -> Iterator[SharedPage]:
    """A memfd page shared with another process, and the device's way into it: mapped (cold
    boots) or through /proc/<pid>/mem (template clones; here this process's own mapping)."""
    fd = os.memfd_create("ring")
    os.ftruncate(fd, PAGE)
    page = mmap.mmap(fd, PAGE)
    mem: Memory
    if request.param == "mapped":
        uva = UVA
        mem = GuestMemory()
    else:
        anchor = ctypes.c_char.from_buffer(page)
        uva = ctypes.addressof(anchor)
        del anchor
        mem = ProcessMemory(os.getpid())
    mem.set_table([(0, PAGE, uva, 0)], [os.dup(fd)])
    try:
        yield SharedPage(fd, page, mem, uva)
    finally:
        mem.close()
        page.close()
        os.close(fd)


def _guest(shared: SharedPage, role: str) -> subprocess.Popen[str]:
    offsets = (CONTROL, PROGRESS, RING + 2)
    guest = subprocess.Popen([sys.executable, "-c", GUEST, str(shared.fd), role,
                              *map(str, offsets)],
                             pass_fds=(shared.fd,), stdout=subprocess.PIPE, text=True)
    control = memoryview(shared.page)[CONTROL:CONTROL + 2].cast("H")
    deadline = time.monotonic() + 30
    while control[0] != READY:
        assert time.monotonic() < deadline, "the guest process did not start"
        time.sleep(0.01)
    control.release()
    return guest


def _both_busy(shared: SharedPage) -> Iterator[None]:
    """Yields while this side should go on: until both minimums are met."""
    progress = memoryview(shared.page)[PROGRESS:PROGRESS + 4].cast("I")
    start = time.monotonic()
    try:
        while time.monotonic() - start < BUSY_S or progress[0] < BUSY_THOUSANDS:
            assert time.monotonic() - start < BUSY_CAP_S, "the guest process hardly ran"
            yield
    finally:
        progress.release()


def _stop(shared: SharedPage, guest: subprocess.Popen[str]) -> tuple[int, int]:
    control = memoryview(shared.page)[CONTROL:CONTROL + 2].cast("H")
    control[0] = STOP
    control.release()
    out, _ = guest.communicate(timeout=30)
    done, other = out.split()
    return int(done), int(other)


def test_a_guest_polling_the_used_index_sees_only_stored_values(shared: SharedPage) -> None:
    used = shared.mem.area(shared.uva + RING, 4 + 8)
    used.store_idx(VALUES[0])
    guest = _guest(shared, "poll")
    try:
        for _ in _both_busy(shared):
            for _ in range(1000):
                used.store_idx(VALUES[1])
                used.store_idx(VALUES[0])
    finally:
        reads, other = _stop(shared, guest)
    assert other == 0, f"{other} of {reads} polls saw a half-stored index"


def test_an_avail_index_the_guest_is_storing_is_read_whole(shared: SharedPage) -> None:
    avail = shared.mem.area(shared.uva + RING, 4 + 2)
    guest = _guest(shared, "store")
    seen: set[int] = set()
    try:
        for _ in _both_busy(shared):
            for _ in range(1000):
                seen.add(avail.load_idx())
    finally:
        _stop(shared, guest)
    assert seen <= set(VALUES), f"read {sorted(seen - set(VALUES))} half-stored"
