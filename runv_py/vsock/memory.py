"""Guest RAM as QEMU shares it (SET_MEM_TABLE): mmap'd regions and address translation.

Everything the guest hands us (descriptor addresses and lengths) is checked here: a range that
is not inside one region raises GuestMemoryError and is never read or written.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass


class GuestMemoryError(Exception):
    pass


@dataclass(slots=True)
class Region:
    gpa: int
    size: int
    uva: int
    map: mmap.mmap
    view: memoryview  # the region's bytes (mmap_offset already applied)


class GuestMemory:
    def __init__(self) -> None:
        self.regions: list[Region] = []

    def set_table(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        """(gpa, size, uva, mmap_offset) per region, one fd each. Takes ownership of the fds."""
        try:
            if len(fds) != len(regions):
                raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
            new: list[Region] = []
            for (gpa, size, uva, offset), fd in zip(regions, fds, strict=True):
                if size <= 0 or offset < 0:
                    raise GuestMemoryError(f"bad region size {size} offset {offset}")
                mapped = mmap.mmap(fd, offset + size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
                view = memoryview(mapped)[offset:offset + size]
                new.append(Region(gpa, size, uva, mapped, view))
        finally:
            for fd in fds:
                os.close(fd)
        self.close()
        self.regions = new

    def close(self) -> None:
        for region in self.regions:
            region.view.release()
            with contextlib.suppress(BufferError):
                region.map.close()
        self.regions = []

    def _find(self, addr: int, length: int, user: bool) -> memoryview:
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for region in self.regions:
            base = region.uva if user else region.gpa
            if base <= addr and addr + length <= base + region.size:
                start = addr - base
                return region.view[start:start + length]
        kind = "user" if user else "guest-physical"
        raise GuestMemoryError(f"{kind} range {addr:#x}+{length:#x} is outside guest memory")

    def guest(self, gpa: int, length: int) -> memoryview:
        """The bytes at guest-physical `gpa` (descriptor addresses)."""
        return self._find(gpa, length, user=False)

    def user(self, uva: int, length: int) -> memoryview:
        """The bytes at QEMU virtual address `uva` (vring addresses from SET_VRING_ADDR)."""
        return self._find(uva, length, user=True)
