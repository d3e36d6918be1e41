"""The virtio-vsock packet header (44 bytes, little-endian) and its constants."""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
HOST_CID = 2
TYPE_STREAM = 1

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OPS = range(OP_REQUEST, OP_CREDIT_REQUEST + 1)

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = 3

# Linux's largest RW payload (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE): anything longer is malformed.
MAX_PAYLOAD = 64 * 1024


class PacketError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


def parse(data: bytes | memoryview) -> Header:
    """Checks only the framing; whether the addresses fit is the device's business."""
    if len(data) < HEADER_SIZE:
        raise PacketError(f"packet of {len(data)} bytes is shorter than the header")
    header = Header(*HEADER.unpack_from(data))
    if header.len > MAX_PAYLOAD:
        raise PacketError(f"payload length {header.len} exceeds {MAX_PAYLOAD}")
    if header.op not in OPS:
        raise PacketError(f"unknown op {header.op}")
    if header.op != OP_RW and header.len:
        raise PacketError(f"op {header.op} with a payload of {header.len} bytes")
    return header


def pack_into(buf: memoryview, *, src_cid: int, dst_cid: int, src_port: int, dst_port: int,
              length: int, op: int, flags: int, buf_alloc: int, fwd_cnt: int) -> None:
    HEADER.pack_into(buf, 0, src_cid, dst_cid, src_port, dst_port, length, TYPE_STREAM, op,
                     flags, buf_alloc, fwd_cnt & 0xFFFFFFFF)
