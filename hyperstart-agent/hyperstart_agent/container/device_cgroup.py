"""The device cgroup of a container: linux.resources.devices compiled into a cgroup v2 BPF
program (BPF_PROG_TYPE_CGROUP_DEVICE) and attached to the container's cgroup with bpf(2).

Rules mean what they meant to cgroup v1's devices controller, as runc and crun read them: an
"a" rule resets the list (allow: every device, deny: none), other rules add or remove
exceptions to that default, later rules win. After the spec's rules come the devices every
container gets (as runc's defaults) and one rwm rule per linux.devices entry, so a spec without
device rules may use only those. The kernel asks the program on mknod and on open of any
device node, wherever the node is (a shared volume included).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from dataclasses import dataclass, field

from .spec import Device, DeviceRule

# What every container may use, after its own rules: mknod of any node (a node it may not
# open is harmless), the memory devices, the terminals and pseudo-terminals, and tun.
DEFAULT_RULES = (
    DeviceRule(True, "c", None, None, "m"),
    DeviceRule(True, "b", None, None, "m"),
    DeviceRule(True, "c", 1, 3),    # null
    DeviceRule(True, "c", 1, 5),    # zero
    DeviceRule(True, "c", 1, 7),    # full
    DeviceRule(True, "c", 1, 8),    # random
    DeviceRule(True, "c", 1, 9),    # urandom
    DeviceRule(True, "c", 5, 0),    # tty
    DeviceRule(True, "c", 5, 2),    # ptmx
    DeviceRule(True, "c", 136, None),  # pts/*
    DeviceRule(True, "c", 10, 200),  # net/tun
)

_ACCESS_BITS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_*
_TYPE_BITS = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_*
_NODE_TYPES = {"b": "b", "c": "c", "u": "c"}  # linux.devices type -> rule type (not fifos)


class DeviceRuleError(ValueError):
    """A rule list cgroup v1 could not have honoured either."""


def container_rules(spec_rules: tuple[DeviceRule, ...] | None,
                    devices: tuple[Device, ...]) -> tuple[DeviceRule, ...]:
    made = tuple(DeviceRule(True, _NODE_TYPES[d.type], d.major, d.minor)
                 for d in devices if d.type in _NODE_TYPES)
    return (*(spec_rules or ()), *DEFAULT_RULES, *made)


_Key = tuple[str, int | None, int | None]  # type, major, minor


@dataclass
class Policy:
    """The state cgroup v1 would be in after the rules: a default and its exceptions (each an
    access set the default does not give)."""

    default_allow: bool = False
    exceptions: dict[_Key, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, rules: tuple[DeviceRule, ...]) -> Policy:
        policy = cls()
        for rule in rules:
            policy.apply(rule)
        return policy

    def apply(self, rule: DeviceRule) -> None:
        if rule.type == "a":
            self.default_allow = rule.allow
            self.exceptions = {}
            return
        key: _Key = (rule.type, rule.major, rule.minor)
        access = frozenset(rule.access)
        if rule.allow != self.default_allow:
            self.exceptions[key] = self.exceptions.get(key, frozenset()) | access
            return
        # Taking access back from an exception. A wider exception (a wildcard) that also
        # covers this device would keep it: cgroup v1 ignores such a rule silently; refuse it.
        for wider in ((rule.type, None, rule.minor), (rule.type, rule.major, None),
                      (rule.type, None, None)):
            if wider != key and self.exceptions.get(wider, frozenset()) & access:
                verb = "deny" if rule.allow is False else "allow"
                raise DeviceRuleError(
                    f"cannot {verb} {_describe(key)} {rule.access}: the wider rule "
                    f"{_describe(wider)} {_access_text(self.exceptions[wider])} covers it")
        left = self.exceptions.get(key, frozenset()) - access
        if left:
            self.exceptions[key] = left
        else:
            self.exceptions.pop(key, None)

    def allows(self, kind: str, major: int, minor: int, access: str) -> bool:
        """The decision for one request, from the policy itself (what the program must
        answer)."""
        wanted = frozenset(access)
        for (t, ma, mi), given in self.exceptions.items():
            if t == kind and ma in (None, major) and mi in (None, minor):
                if self.default_allow and given & wanted:
                    return False  # a deny exception matches even in part
                if not self.default_allow and wanted <= given:
                    return True  # an allow exception must cover the whole request
        return self.default_allow


def _access_text(access: frozenset[str]) -> str:
    return "".join(a for a in "rwm" if a in access)


def _describe(key: _Key) -> str:
    kind, major, minor = key
    return f"{kind} {'*' if major is None else major}:{'*' if minor is None else minor}"


# --- the program -------------------------------------------------------------------------
# struct bpf_cgroup_dev_ctx { u32 access_type (access << 16 | type); u32 major; u32 minor; }
_LDX_W = 0x61       # dst = *(u32 *)(src + off)
_AND32_K = 0x54     # dst &= imm
_RSH32_K = 0x74     # dst >>= imm
_MOV32_K = 0xB4     # dst = imm
_MOV32_X = 0xBC     # dst = src
_JNE32_K = 0x56     # if dst != imm: pc += off
_JNE32_X = 0x5E     # if dst != src: pc += off
_JEQ32_K = 0x16     # if dst == imm: pc += off
_EXIT = 0x95
_R0, _R1, _TYPE, _ACCESS, _MAJOR, _MINOR = range(6)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def compile_program(policy: Policy) -> bytes:
    """BPF instructions that answer as `policy` does: returns 1 to allow, 0 to deny."""
    out = [
        _insn(_LDX_W, _TYPE, _R1, 0), _insn(_AND32_K, _TYPE, imm=0xFFFF),
        _insn(_LDX_W, _ACCESS, _R1, 0), _insn(_RSH32_K, _ACCESS, imm=16),
        _insn(_LDX_W, _MAJOR, _R1, 4), _insn(_LDX_W, _MINOR, _R1, 8),
    ]
    verdict = 0 if policy.default_allow else 1
    for (kind, major, minor), access in sorted(policy.exceptions.items(), key=_order):
        bits = sum(_ACCESS_BITS[a] for a in access)
        # Each test jumps to the next block when it fails; the offsets are filled in below.
        block: list[tuple[int, int, int, int]] = [(_JNE32_K, _TYPE, 0, _TYPE_BITS[kind])]
        if policy.default_allow:  # deny if any requested access is in the exception
            block += [(_MOV32_X, _R1, _ACCESS, 0), (_AND32_K, _R1, 0, bits),
                      (_JEQ32_K, _R1, 0, 0)]
        elif bits != 7:  # allow only if every requested access is in it
            block += [(_MOV32_X, _R1, _ACCESS, 0), (_AND32_K, _R1, 0, bits),
                      (_JNE32_X, _R1, _ACCESS, 0)]
        if major is not None:
            block.append((_JNE32_K, _MAJOR, 0, major))
        if minor is not None:
            block.append((_JNE32_K, _MINOR, 0, minor))
        block += [(_MOV32_K, _R0, 0, verdict), (_EXIT, 0, 0, 0)]
        for i, (code, dst, src, imm) in enumerate(block):
            jumps = code in (_JNE32_K, _JNE32_X, _JEQ32_K)
            out.append(_insn(code, dst, src, len(block) - i - 1 if jumps else 0, imm))
    out += [_insn(_MOV32_K, _R0, imm=1 if policy.default_allow else 0), _insn(_EXIT)]
    return b"".join(out)


def _order(item: tuple[_Key, frozenset[str]]) -> tuple[str, int, int]:
    (kind, major, minor), _ = item
    return kind, -1 if major is None else major, -1 if minor is None else minor


# --- bpf(2) ------------------------------------------------------------------------------
_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD, _BPF_PROG_ATTACH, _BPF_PROG_DETACH = 5, 8, 9
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_ATTR_SIZE = 128
_LOG_SIZE = 64 * 1024
_LICENSE = b"Apache-2.0\0"
_NAME = b"runv_devices"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    rc = _libc.syscall(ctypes.c_long(_SYS_BPF), ctypes.c_int(cmd), attr,
                       ctypes.c_uint(_ATTR_SIZE))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(rc)


def load(program: bytes) -> int:
    """Load a device program; its fd. The verifier's log goes into the error if it refuses."""
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(_LICENSE, len(_LICENSE))
    log = ctypes.create_string_buffer(_LOG_SIZE)
    for log_level in (0, 1):
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("<IIQQIIQ", attr, 0, _BPF_PROG_TYPE_CGROUP_DEVICE, len(program) // 8,
                         ctypes.addressof(insns), ctypes.addressof(license_), log_level,
                         _LOG_SIZE if log_level else 0,
                         ctypes.addressof(log) if log_level else 0)
        struct.pack_into("16s", attr, 48, _NAME)  # prog_name
        try:
            return _bpf(_BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD) of the device program")
        except OSError as exc:
            if log_level or exc.errno not in (errno.EACCES, errno.EINVAL):
                message = log.value.decode(errors="replace").strip().splitlines()[-3:]
                raise OSError(exc.errno, f"{exc.strerror} {' / '.join(message)}".strip()
                              ) from None
    raise AssertionError("unreachable")


_SHARED_MAX = 16
_shared: dict[bytes, int] = {}
_shared_lock = threading.Lock()


def load_shared(program: bytes) -> int:
    """A new fd of `program`, which is loaded (and verified) once while it is among the
    last _SHARED_MAX distinct programs: containers with the same device rules, the usual
    case, share it (a loaded program cannot change). The template's warm-up loads the default
    rules' program, so a clone's first container does not run the verifier (~25 ms under
    TCG)."""
    with _shared_lock:
        fd = _shared.pop(program, None)
        if fd is None:
            fd = load(program)
            if len(_shared) >= _SHARED_MAX:
                os.close(_shared.pop(next(iter(_shared))))
        _shared[program] = fd  # the most recently used last
        return os.dup(fd)


def _attach_attr(cgroup_fd: int, program_fd: int, flags: int) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIII", attr, 0, cgroup_fd, program_fd, _BPF_CGROUP_DEVICE, flags)
    return attr


def attach(cgroup_fd: int, program_fd: int) -> None:
    """Attach beside whatever is attached already (BPF_F_ALLOW_MULTI: every program must
    allow; a program attached inside the container's cgroup cannot widen this one)."""
    _bpf(_BPF_PROG_ATTACH, _attach_attr(cgroup_fd, program_fd, _BPF_F_ALLOW_MULTI),
         "bpf(BPF_PROG_ATTACH) of the device program")


def detach(cgroup_fd: int, program_fd: int) -> None:
    _bpf(_BPF_PROG_DETACH, _attach_attr(cgroup_fd, program_fd, 0),
         "bpf(BPF_PROG_DETACH) of the device program")
