"""A split virtqueue as seen by the device: walk the driver's descriptor chains, return them
through the used ring, notify the driver.

The guest is untrusted: a chain that loops, is too long, points outside guest memory, uses
indirect descriptors (not negotiated) or puts readable after writable buffers raises
RingError; the caller drops it (returning it with used length 0) and logs one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from dataclasses import dataclass, field

from .memory import Area, GuestMemoryError, Memory

log = logging.getLogger(__name__)

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
MAX_QUEUE_SIZE = 32768
NOTIFY = (1).to_bytes(8, "little")


class RingError(Exception):
    pass


@dataclass(slots=True)
class Chain:
    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    writable_gpa: list[int] = field(default_factory=list)

    @property
    def writable_len(self) -> int:
        return sum(len(seg) for seg in self.writable)


@dataclass(slots=True)
class Virtqueue:
    index: int
    size: int = 0
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    addr_set: bool = False
    last_avail: int = 0
    enabled: bool = False
    started: bool = False
    kick_fd: int = -1
    call_fd: int = -1
    # The rings' areas (None until ready()).
    desc: Area | None = None
    avail: Area | None = None
    used: Area | None = None
    mem: Memory | None = None
    used_idx: int = 0
    pending_signal: bool = False
    # Heads taken and not yet returned (with their chain, None for a bad one): a guest offering
    # one again is refused, and the device can never return a head twice (the guest would mark
    # the ring broken).
    inflight: dict[int, Chain | None] = field(default_factory=dict)

    def resolve(self, mem: Memory) -> bool:
        """Find the ring areas; False (and none found) when not set up or not in memory."""
        self.desc = self.avail = self.used = None
        self.mem = mem
        if not (self.addr_set and self.size and mem.mapped):
            return False
        if self.size > MAX_QUEUE_SIZE or self.size & (self.size - 1):
            raise RingError(f"vring {self.index}: bad size {self.size}")
        try:
            self.desc = mem.area(self.desc_uva, 16 * self.size)
            self.avail = mem.area(self.avail_uva, 4 + 2 * self.size)
            self.used = mem.area(self.used_uva, 4 + 8 * self.size)
            self.used_idx = self.used.load_idx()
        except GuestMemoryError as exc:
            self.desc = self.avail = self.used = None
            raise RingError(f"vring {self.index}: {exc}") from None
        return True

    @property
    def ready(self) -> bool:
        return self.enabled and self.started and self.desc is not None

    def avail_count(self) -> int:
        assert self.avail is not None
        avail_idx = self.avail.load_idx()
        return (avail_idx - self.last_avail) & 0xFFFF

    def pop(self, mem: Memory, max_bytes: int) -> Chain | None:
        """The next available chain, or None. Raises RingError for a bad chain; the head, if
        known, is in the exception's `head` attribute so the caller can return it. A chain
        whose buffers add up to more than `max_bytes` is bad: its buffers are not read (with
        a clone's memory, reading is copying)."""
        assert self.avail is not None and self.desc is not None
        avail_idx = self.avail.load_idx()
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise RingError(f"vring {self.index}: avail idx {avail_idx} is {pending} ahead of "
                            f"{self.last_avail} (queue size {self.size})")
        slot = self.last_avail % self.size
        head = self.avail.unpack(_U16, 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise RingError(f"vring {self.index}: head {head} >= queue size {self.size}")
        if head in self.inflight:
            raise RingError(f"vring {self.index}: head {head} offered again while in use")
        self.inflight[head] = None  # a bad chain is returned too (ChainError.head)
        chain = Chain(head)
        index = head
        total = 0
        for _ in range(self.size):
            addr, length, flags, nxt = self.desc.unpack(_DESC, 16 * index)
            total += length
            if total > max_bytes:
                raise ChainError(head, f"vring {self.index}: a chain of more than {max_bytes} "
                                       "bytes")
            if flags & DESC_F_INDIRECT:
                raise ChainError(head, f"vring {self.index}: indirect descriptor (not offered)")
            if not flags & DESC_F_WRITE and chain.writable:
                raise ChainError(head, f"vring {self.index}: readable descriptor after a "
                                       "writable one")
            try:
                if flags & DESC_F_WRITE:
                    chain.writable.append(mem.writable(addr, length))
                    chain.writable_gpa.append(addr)
                else:
                    chain.readable.append(mem.readable(addr, length))
            except GuestMemoryError as exc:
                raise ChainError(head, f"vring {self.index}: descriptor {index}: {exc}") from None
            if not flags & DESC_F_NEXT:
                self.inflight[head] = chain
                return chain
            if nxt >= self.size:
                raise ChainError(head, f"vring {self.index}: next {nxt} >= queue size")
            index = nxt
        raise ChainError(head, f"vring {self.index}: descriptor chain loops")

    def unpop(self, head: int) -> None:
        """Give back the chain pop() returned last (nothing was written to it)."""
        self.inflight.pop(head, None)
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def push(self, head: int, length: int) -> None:
        """Return a chain whose writable buffers hold `length` bytes from the device."""
        assert self.used is not None and self.mem is not None
        if head not in self.inflight:
            log.error("vring %d: not returning head %d: it is not in use (a device bug)",
                      self.index, head)
            return
        chain = self.inflight.pop(head)
        if chain is not None and length:
            try:
                self.mem.commit(chain.writable_gpa, chain.writable, length)
            except GuestMemoryError as exc:
                log.error("vring %d: head %d: %s", self.index, head, exc)
                length = 0
        slot = self.used_idx % self.size
        self.used.pack(_USED_ELEM, 4 + 8 * slot, head, length)
        # x86 is TSO: the element is visible before the index that publishes it.
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.used.store_idx(self.used_idx)
        self.pending_signal = True

    def signal(self) -> None:
        """Interrupt the driver if anything was pushed. The driver's NO_INTERRUPT hint is not
        honoured: reading it safely after the used index store needs a full memory barrier
        (x86 may reorder a store with a later load), which Python cannot issue; a lost
        interrupt hangs the driver, a spurious one costs little."""
        if not self.pending_signal:
            return
        self.pending_signal = False
        if self.call_fd >= 0:
            # A saturated counter (EAGAIN) interrupts the driver anyway.
            with contextlib.suppress(BlockingIOError):
                os.write(self.call_fd, NOTIFY)

    def recover_from_used(self) -> None:
        """After a backend restart: every chain we took was returned at once, so the used
        index is where the avail walk stands."""
        assert self.used is not None
        self.used_idx = self.used.load_idx()
        self.last_avail = self.used_idx
        self.inflight.clear()

    def release(self) -> None:
        """Drop every view into guest memory this ring holds (its areas, the chains taken),
        so that the memory can be unmapped; resolve() finds the areas again."""
        self.desc = self.avail = self.used = None
        self.mem = None
        self.inflight.clear()

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class ChainError(RingError):
    def __init__(self, head: int, message: str) -> None:
        super().__init__(message)
        self.head = head
