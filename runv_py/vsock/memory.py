"""Guest RAM as QEMU describes it (SET_MEM_TABLE), and address translation.

Two ways to reach it:

- `GuestMemory` maps each region's fd (MAP_SHARED): the guest's RAM is a shared memfd (cold
  boots). Ring areas and buffers are live views into the mapping; nothing is copied.
- `ProcessMemory` reads and writes through QEMU's address space (`/proc/<qemu pid>/mem`): a
  template clone's RAM is a private copy-on-write mapping of the template's file, which no
  other process can map. Writes land in QEMU's private pages (breaking copy-on-write there)
  and never in the file. The region fds are closed unused.

Everything the guest hands us (descriptor addresses and lengths) is checked here: a range that
is not inside one region raises GuestMemoryError and is never read or written.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Protocol


class GuestMemoryError(Exception):
    pass


# The 4 bytes a ring starts with: its flags and its index.
FLAGS_IDX = struct.Struct("<HH")


class Area(Protocol):
    """A fixed range of guest memory (a ring), read and written with structs; its index (the
    16 bits at offset 2, after the flags) in one access."""

    def unpack(self, fmt: struct.Struct, offset: int) -> tuple[Any, ...]: ...

    def pack(self, fmt: struct.Struct, offset: int, *values: int) -> None: ...

    def load_idx(self) -> int:
        """The ring's index, which the guest may be storing meanwhile (avail)."""
        ...

    def store_idx(self, idx: int) -> None:
        """Publish the ring's index (used): the guest, reading it meanwhile, sees either the
        old value or the new one. The flags beside it are the device's and stay 0."""
        ...


class Memory(Protocol):
    """What the rings and the device need from guest memory."""

    @property
    def mapped(self) -> bool:
        """A memory table is set."""
        ...

    def set_table(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None: ...

    def close(self) -> None: ...

    def area(self, uva: int, length: int) -> Area: ...

    def readable(self, gpa: int, length: int) -> memoryview: ...

    def writable(self, gpa: int, length: int) -> memoryview: ...

    def commit(self, gpas: list[int], views: list[memoryview], length: int) -> None:
        """The device wrote the first `length` bytes of these writable buffers."""
        ...


def _check_table(regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
    if len(fds) != len(regions):
        raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
    for _gpa, size, _uva, offset in regions:
        if size <= 0 or offset < 0:
            raise GuestMemoryError(f"bad region size {size} offset {offset}")


def _outside(addr: int, length: int, user: bool) -> GuestMemoryError:
    kind = "user" if user else "guest-physical"
    return GuestMemoryError(f"{kind} range {addr:#x}+{length:#x} is outside guest memory")


@dataclass(slots=True)
class Region:
    gpa: int
    size: int
    uva: int
    map: mmap.mmap
    view: memoryview  # the region's bytes (mmap_offset already applied)


class ViewArea:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        # struct's "<H" stores byte by byte, low byte first: publishing 0x0100 after 0x00FF
        # showed a guest polling the index 0x0000 for a moment, and it took the previous
        # lap's used elements for new ones ("rx:id N is not a head!", docs/vsock.md). An item
        # of a native 16-bit view is one load or store (little-endian x86, as the backend).
        self.header = view[:4].cast("H")

    def unpack(self, fmt: struct.Struct, offset: int) -> tuple[Any, ...]:
        return fmt.unpack_from(self.view, offset)

    def pack(self, fmt: struct.Struct, offset: int, *values: int) -> None:
        fmt.pack_into(self.view, offset, *values)

    def load_idx(self) -> int:
        return self.header[1]

    def store_idx(self, idx: int) -> None:
        self.header[1] = idx


class GuestMemory:
    def __init__(self) -> None:
        self.regions: list[Region] = []

    @property
    def mapped(self) -> bool:
        return bool(self.regions)

    def set_table(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        """(gpa, size, uva, mmap_offset) per region, one fd each. Takes ownership of the fds."""
        try:
            _check_table(regions, fds)
            new: list[Region] = []
            for (gpa, size, uva, offset), fd in zip(regions, fds, strict=True):
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
        raise _outside(addr, length, user)

    def guest(self, gpa: int, length: int) -> memoryview:
        """The bytes at guest-physical `gpa` (descriptor addresses)."""
        return self._find(gpa, length, user=False)

    def user(self, uva: int, length: int) -> memoryview:
        """The bytes at QEMU virtual address `uva` (vring addresses from SET_VRING_ADDR)."""
        return self._find(uva, length, user=True)

    def area(self, uva: int, length: int) -> Area:
        return ViewArea(self.user(uva, length))

    readable = writable = guest

    def commit(self, gpas: list[int], views: list[memoryview], length: int) -> None:
        pass  # the views are the guest's memory


class ProcessArea:
    def __init__(self, fd: int, uva: int, length: int) -> None:
        self.fd = fd
        self.uva = uva
        self.length = length

    def unpack(self, fmt: struct.Struct, offset: int) -> tuple[Any, ...]:
        if not 0 <= offset <= self.length - fmt.size:
            raise GuestMemoryError(f"offset {offset} outside a ring of {self.length} bytes")
        return fmt.unpack(_pread(self.fd, fmt.size, self.uva + offset))

    def pack(self, fmt: struct.Struct, offset: int, *values: int) -> None:
        if not 0 <= offset <= self.length - fmt.size:
            raise GuestMemoryError(f"offset {offset} outside a ring of {self.length} bytes")
        _pwrite(self.fd, fmt.pack(*values), self.uva + offset)

    # The kernel copies 2 bytes of a pread/pwrite of /proc/<pid>/mem as two byte moves where
    # its memcpy does not use `rep movsb` (no FSRM), and 4 bytes as one: the index goes with
    # the flags before it, as one aligned 32-bit word.
    def load_idx(self) -> int:
        idx: int = FLAGS_IDX.unpack(_pread(self.fd, 4, self.uva))[1]
        return idx

    def store_idx(self, idx: int) -> None:
        _pwrite(self.fd, FLAGS_IDX.pack(0, idx), self.uva)


# The longest buffer copied in or out of a clone's memory: a guest's vsock packets are at
# most 64 KiB of payload, and a longer descriptor would only make us allocate what the
# guest asks for.
MAX_COPY = 128 * 1024


def check_reachable(pid: int) -> None:
    """OSError unless this process may open QEMU `pid`'s memory (ProcessMemory's way in)."""
    os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC))


class ProcessMemory:
    """Guest RAM through /proc/<pid>/mem of QEMU (pread/pwrite at QEMU's virtual addresses).
    Measured faster than process_vm_readv through ctypes for ring-sized accesses, and the same
    for 64 KiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = -1
        # (gpa, size, uva) per region
        self.regions: list[tuple[int, int, int]] = []

    @property
    def mapped(self) -> bool:
        return bool(self.regions)

    def set_table(self, regions: list[tuple[int, int, int, int]], fds: list[int]) -> None:
        """The fds (the template's memory file for a clone) are closed without being mapped:
        a shared writable mapping of them would write into the template."""
        try:
            _check_table(regions, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if self.fd < 0:
            try:
                self.fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise GuestMemoryError(f"QEMU's memory (pid {self.pid}): {exc.strerror}") from None
        self.regions = [(gpa, size, uva) for gpa, size, uva, _offset in regions]

    def close(self) -> None:
        self.regions = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _uva(self, addr: int, length: int, user: bool) -> int:
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for gpa, size, uva in self.regions:
            base = uva if user else gpa
            if base <= addr and addr + length <= base + size:
                return uva + (addr - base)
        raise _outside(addr, length, user)

    def area(self, uva: int, length: int) -> Area:
        return ProcessArea(self.fd, self._uva(uva, length, user=True), length)

    def readable(self, gpa: int, length: int) -> memoryview:
        """A copy of the bytes at guest-physical `gpa`."""
        return memoryview(_pread(self.fd, length, self._buffer(gpa, length)))

    def writable(self, gpa: int, length: int) -> memoryview:
        """A scratch buffer for the bytes at `gpa`, written to the guest by commit()."""
        self._buffer(gpa, length)
        return memoryview(bytearray(length))

    def _buffer(self, gpa: int, length: int) -> int:
        if length > MAX_COPY:
            raise GuestMemoryError(f"a buffer of {length} bytes (at most {MAX_COPY})")
        return self._uva(gpa, length, user=False)

    def commit(self, gpas: list[int], views: list[memoryview], length: int) -> None:
        for gpa, view in zip(gpas, views, strict=True):
            if length <= 0:
                return
            n = min(len(view), length)
            _pwrite(self.fd, view[:n], self._uva(gpa, n, user=False))
            length -= n


def _pread(fd: int, length: int, offset: int) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise GuestMemoryError(f"reading QEMU's memory at {offset:#x}: {exc.strerror}") from None
    if len(data) != length:
        raise GuestMemoryError(f"short read of QEMU's memory at {offset:#x}")
    return data


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    try:
        n = os.pwrite(fd, data, offset)
    except OSError as exc:
        raise GuestMemoryError(f"writing QEMU's memory at {offset:#x}: {exc.strerror}") from None
    if n != len(data):
        raise GuestMemoryError(f"short write of QEMU's memory at {offset:#x}")
