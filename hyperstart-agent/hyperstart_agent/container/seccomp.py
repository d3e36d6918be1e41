"""OCI linux.seccomp -> a BPF filter compiled with libseccomp (ctypes), like runc does.

The agent compiles a container's profile once, when it creates the container (and keeps the
last few it compiled: containers of one runtime share its default profile); the container's
init and every exec'd process install the compiled program with one seccomp(2) call. Built
with libseccomp in each of them, a docker-sized profile (~440 syscall names) added ~90 ms to
every exec in the guest under TCG."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

from .spec import SpecError

ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
             "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 4, "SECCOMP_FILTER_FLAG_LOG": 6,
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 7}  # libseccomp filter attributes
# libseccomp's filter attributes of FLAGS -> the seccomp(2) flags they stand for.
_KERNEL_FLAGS = {4: 1, 6: 2, 7: 4}  # TSYNC, LOG, SPEC_ALLOW
_ATTR_NNP = 3
_NR_SCMP_ERROR = -1
KEPT = 8  # compiled profiles the agent keeps
FILTER_FILE = "seccomp.bpf"  # in a container's state directory: the compiled profile
_SYS_SECCOMP = 317  # x86_64
_SECCOMP_SET_MODE_FILTER = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True, slots=True)
class Arg:
    index: int
    value: int
    value_two: int
    op: int


@dataclass(frozen=True, slots=True)
class Rule:
    names: tuple[str, ...]
    action: int
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True, slots=True)
class Profile:
    default_action: int
    architectures: tuple[str, ...] = ()
    flags: tuple[int, ...] = ()
    rules: tuple[Rule, ...] = ()


def _action(obj: dict[str, Any], name: str, key: str = "action") -> int:
    action = obj.get(key)
    if action not in ACTIONS:
        raise SpecError(f"{name}.{key}", f"unknown or unsupported action {action!r}")
    value = ACTIONS[action]
    if action in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        ret = obj.get("errnoRet", errno.EPERM if action == "SCMP_ACT_ERRNO" else 0)
        if isinstance(ret, bool) or not isinstance(ret, int) or not 0 <= ret <= 0xFFFF:
            raise SpecError(f"{name}.errnoRet", "must be an integer from 0 to 65535")
        value |= ret
    return value


def parse(raw: Any) -> Profile | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError("linux.seccomp", "must be an object")
    name = "linux.seccomp"
    archs = []
    for i, arch in enumerate(raw.get("architectures") or []):
        if not isinstance(arch, str) or not arch.startswith("SCMP_ARCH_"):
            raise SpecError(f"{name}.architectures[{i}]", f"unknown architecture {arch!r}")
        archs.append(arch.removeprefix("SCMP_ARCH_").lower())
    flags = []
    for i, flag in enumerate(raw.get("flags") or []):
        if flag not in FLAGS:
            raise SpecError(f"{name}.flags[{i}]", f"unknown flag {flag!r}")
        flags.append(FLAGS[flag])
    rules = []
    for i, entry in enumerate(raw.get("syscalls") or []):
        where = f"{name}.syscalls[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(where, "must be an object")
        names = entry.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise SpecError(f"{where}.names", "must be a non-empty list of syscall names")
        args = []
        for j, arg in enumerate(entry.get("args") or []):
            if not isinstance(arg, dict) or arg.get("op") not in OPERATORS:
                raise SpecError(f"{where}.args[{j}].op", f"unknown operator {arg!r}")
            index = arg.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
                raise SpecError(f"{where}.args[{j}].index", "must be 0 to 5")
            args.append(Arg(index, int(arg.get("value", 0)), int(arg.get("valueTwo", 0)),
                            OPERATORS[arg["op"]]))
        rules.append(Rule(tuple(names), _action(entry, where), tuple(args)))
    return Profile(_action(raw, name, "defaultAction"), tuple(archs), tuple(flags),
                   tuple(rules))


def comparisons(args: tuple[Arg, ...]) -> list[tuple[Arg, ...]]:
    """The argument comparisons of one rule as libseccomp rules: all of them in one rule
    (they must all hold), unless one argument is compared more than once, which libseccomp
    refuses (EINVAL): then each comparison is a rule of its own, so any of them matches. That
    is how runc reads such rules (the default profile compares personality's argument with
    0, 8 and 0xffffffff)."""
    indexes = [a.index for a in args]
    if len(set(indexes)) == len(indexes):
        return [args]
    return [(a,) for a in args]


class _ArgCmp(ctypes.Structure):
    _fields_ = (("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64))


@functools.cache
def _libseccomp() -> ctypes.CDLL:
    return ctypes.CDLL("libseccomp.so.2", use_errno=True)


@dataclass(frozen=True, slots=True)
class Filter:
    """A profile compiled: the BPF program and the seccomp(2) flags to install it with."""

    program: bytes
    flags: int = 0

    def encode(self) -> bytes:
        return struct.pack("<I", self.flags) + self.program

    @classmethod
    def decode(cls, data: bytes) -> Filter:
        if len(data) < 4 or (len(data) - 4) % 8:
            raise ValueError("not a compiled seccomp filter")
        return cls(data[4:], struct.unpack_from("<I", data)[0])


def compile_filter(profile: Profile) -> Filter:
    """The program seccomp_load would install for `profile`. Syscall names libseccomp does
    not know are skipped, as runc does; so are rules whose action is the default."""
    lib = _libseccomp()
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    lib.seccomp_arch_add.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    ctx = lib.seccomp_init(profile.default_action)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        lib.seccomp_attr_set(ctx, _ATTR_NNP, 0)  # noNewPrivileges is the spec's decision
        for arch in profile.architectures:
            token = lib.seccomp_arch_resolve_name(arch.encode())
            if token == 0:
                raise OSError(f"seccomp: architecture {arch!r} is unknown to libseccomp")
            rc = lib.seccomp_arch_add(ctx, token)
            if rc not in (0, -errno.EEXIST):
                raise OSError(-rc, f"seccomp_arch_add {arch}")
        for rule in profile.rules:
            if rule.action == profile.default_action:
                continue
            for args in comparisons(rule.args):
                cmps = (_ArgCmp * max(len(args), 1))(
                    *(_ArgCmp(a.index, a.op, a.value, a.value_two) for a in args))
                for name in rule.names:
                    number = lib.seccomp_syscall_resolve_name(name.encode())
                    if number == _NR_SCMP_ERROR:
                        continue
                    rc = lib.seccomp_rule_add_array(ctx, rule.action, number, len(args), cmps)
                    if rc != 0:
                        raise OSError(-rc, f"seccomp rule for {name}: "
                                      f"{errno.errorcode.get(-rc)}")
        out = os.memfd_create("seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, out)
            if rc != 0:
                raise OSError(-rc, f"seccomp_export_bpf: {errno.errorcode.get(-rc)}")
            program = os.pread(out, os.fstat(out).st_size, 0)
        finally:
            os.close(out)
    finally:
        lib.seccomp_release(ctx)
    flags = 0
    for attr in profile.flags:
        flags |= _KERNEL_FLAGS[attr]
    return Filter(program, flags)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install(compiled: Filter) -> None:
    """Install the filter on this thread (inherited through exec), as seccomp_load does."""
    program = ctypes.create_string_buffer(compiled.program, len(compiled.program))
    fprog = _SockFprog(len(compiled.program) // 8, ctypes.addressof(program))
    rc = _libc.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                       ctypes.c_uint(compiled.flags), ctypes.byref(fprog))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")


@functools.lru_cache(maxsize=KEPT)
def compiled(profile: Profile) -> Filter:
    """`profile` compiled, once while it is among the last KEPT distinct ones: containers of
    one runtime share its default profile."""
    return compile_filter(profile)


def read_filter(path: str) -> Filter | None:
    """The compiled filter the agent left at `path`; None if the container has no profile."""
    try:
        with open(path, "rb") as f:
            return Filter.decode(f.read())
    except FileNotFoundError:
        return None
