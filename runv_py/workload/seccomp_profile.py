"""The seccomp profile hyperctl and the API give a container unless told otherwise: the same
allow-list docker applies by default (everything else fails with EPERM), written here
as data of our own and turned into an OCI `linux.seccomp` object for the container's
capabilities and architecture. `--security-opt seccomp=PATH` reads a profile file instead (the
OCI object, or docker's format with archMap/includes/excludes, resolved the same way);
`seccomp=unconfined` gives none.

The profile is a second wall inside the VM: it keeps the guest kernel's rarely used and
privileged calls (keyrings, bpf, perf, mount, module loading, ...) out of a container's reach
and, as docker's does, refuses `socket(AF_VSOCK)` (the family of the agent's own channel) and
`socket(AF_ALG)`.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MAX_PROFILE_BYTES = 1 << 20
AF_ALG, AF_VSOCK = 38, 40  # AF_NFC (39) lies between them
# clone(2) flags that make namespaces: without CAP_SYS_ADMIN clone is allowed only with none.
NAMESPACE_CLONE_FLAGS = (0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                         | 0x40000000 | 0x02000000)
# personality(2) values a program may set: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE (and both),
# and 0xffffffff, which only queries.
PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

# Allowed for every container, by subject. Names the running kernel or libseccomp does not
# know are skipped by the agent, so 32-bit and time64 variants can stay in the lists.
_ALWAYS = {
    "files": """
        access faccessat faccessat2 open openat openat2 creat close close_range
        read readv pread64 preadv preadv2 write writev pwrite64 pwritev pwritev2
        lseek _llseek dup dup2 dup3 fcntl fcntl64 flock fsync fdatasync sync syncfs
        sync_file_range truncate truncate64 ftruncate ftruncate64 fallocate fadvise64
        fadvise64_64 readahead sendfile sendfile64 splice tee vmsplice copy_file_range
        stat stat64 lstat lstat64 fstat fstat64 fstatat64 newfstatat statx statfs statfs64
        fstatfs fstatfs64 getdents getdents64 getcwd chdir fchdir mkdir mkdirat mknod mknodat
        rmdir rename renameat renameat2 link linkat symlink symlinkat unlink unlinkat
        readlink readlinkat chmod fchmod fchmodat chown chown32 fchown fchown32 fchownat
        lchown lchown32 umask utime utimes utimensat utimensat_time64 futimesat fchmodat2
        name_to_handle_at cachestat
    """,
    "extended attributes": """
        getxattr lgetxattr fgetxattr setxattr lsetxattr fsetxattr listxattr llistxattr
        flistxattr removexattr lremovexattr fremovexattr getxattrat setxattrat listxattrat
        removexattrat
    """,
    "events and polling": """
        select _newselect pselect6 pselect6_time64 poll ppoll ppoll_time64 epoll_create
        epoll_create1 epoll_ctl epoll_ctl_old epoll_wait epoll_wait_old epoll_pwait
        epoll_pwait2 eventfd eventfd2 inotify_init inotify_init1 inotify_add_watch
        inotify_rm_watch fanotify_mark signalfd signalfd4 timerfd_create timerfd_settime
        timerfd_settime64 timerfd_gettime timerfd_gettime64
    """,
    # io_uring is left out, as docker leaves it out since 2023 (much of the kernel's recent
    # attack surface).
    "asynchronous I/O": """
        io_setup io_destroy io_submit io_cancel io_getevents io_pgetevents
        io_pgetevents_time64
    """,
    "memory": """
        brk mmap mmap2 munmap mremap mprotect madvise mincore msync mlock mlock2 mlockall
        munlock munlockall membarrier memfd_create memfd_secret remap_file_pages
        pkey_alloc pkey_free pkey_mprotect map_shadow_stack mseal
    """,
    "processes": """
        execve execveat fork vfork exit exit_group wait4 waitid waitpid kill tkill tgkill
        getpid getppid gettid getpgid setpgid getpgrp getsid setsid set_tid_address
        set_robust_list get_robust_list rseq futex futex_time64 futex_waitv futex_wait
        futex_wake futex_requeue uretprobe
        pidfd_open pidfd_send_signal process_mrelease prctl seccomp capget capset
        get_thread_area set_thread_area restart_syscall
        ptrace process_vm_readv process_vm_writev
    """,
    "credentials": """
        getuid getuid32 geteuid geteuid32 getgid getgid32 getegid getegid32 getresuid
        getresuid32 getresgid getresgid32 getgroups getgroups32 setuid setuid32 setgid
        setgid32 setreuid setreuid32 setregid setregid32 setresuid setresuid32 setresgid
        setresgid32 setfsuid setfsuid32 setfsgid setfsgid32 setgroups setgroups32
    """,
    "signals": """
        rt_sigaction rt_sigprocmask rt_sigpending rt_sigsuspend rt_sigtimedwait
        rt_sigtimedwait_time64 rt_sigqueueinfo rt_tgsigqueueinfo rt_sigreturn sigaltstack
        sigprocmask sigreturn pause alarm
    """,
    "time and timers": """
        time gettimeofday clock_gettime clock_gettime64 clock_getres clock_getres_time64
        clock_nanosleep clock_nanosleep_time64 nanosleep getitimer setitimer timer_create
        timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime
        timer_settime64 times adjtimex clock_adjtime clock_adjtime64
    """,
    "scheduling and limits": """
        sched_yield sched_getaffinity sched_setaffinity sched_getattr sched_setattr
        sched_getparam sched_setparam sched_getscheduler sched_setscheduler
        sched_get_priority_max sched_get_priority_min sched_rr_get_interval
        sched_rr_get_interval_time64 getpriority setpriority ioprio_get ioprio_set getcpu
        getrlimit setrlimit ugetrlimit prlimit64 getrusage
    """,
    "sockets (socket itself: see the rules below)": """
        socketpair socketcall bind listen accept accept4 connect getsockname getpeername
        getsockopt setsockopt shutdown send sendto sendmsg sendmmsg recv recvfrom recvmsg
        recvmmsg recvmmsg_time64
    """,
    "System V and POSIX IPC": """
        ipc msgget msgsnd msgrcv msgctl semget semop semtimedop semtimedop_time64 semctl
        shmget shmat shmdt shmctl mq_open mq_unlink mq_timedsend mq_timedsend_time64
        mq_timedreceive mq_timedreceive_time64 mq_notify mq_getsetattr
    """,
    "pipes": "pipe pipe2",
    "the system, read-only": "uname sysinfo getrandom listmount statmount",
    "Landlock (unprivileged sandboxing)": """
        landlock_create_ruleset landlock_add_rule landlock_restrict_self
    """,
    "terminals and devices (the device cgroup decides which)": "ioctl",
}

# More for a container that has the capability (docker's list of what each one unlocks).
_BY_CAPABILITY = {
    "CAP_SYS_ADMIN": """
        bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount
        mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd setdomainname
        sethostname setns syslog umount umount2 unshare lsm_get_self_attr lsm_list_modules
        lsm_set_self_attr
    """,
    "CAP_SYS_BOOT": "reboot",
    "CAP_SYS_CHROOT": "chroot",
    "CAP_SYS_MODULE": "init_module finit_module delete_module",
    "CAP_SYS_PACCT": "acct",
    "CAP_SYS_PTRACE": """
        kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace
    """,
    "CAP_SYS_RAWIO": "iopl ioperm",
    "CAP_SYS_TIME": "settimeofday stime clock_settime clock_settime64",
    "CAP_SYS_TTY_CONFIG": "vhangup",
    "CAP_SYS_NICE": "get_mempolicy mbind set_mempolicy set_mempolicy_home_node",
    "CAP_SYSLOG": "syslog",
    "CAP_BPF": "bpf",
    "CAP_PERFMON": "perf_event_open",
    "CAP_DAC_READ_SEARCH": "open_by_handle_at",
}

# Per architecture: the libseccomp architectures a filter covers (the native one first), and
# calls only that architecture has. On x86_64 only the native ABI: the guest kernel has neither
# IA32 emulation nor x32 (tests/security/test_guest_kernel.py), so docker's extra X86 and X32
# would only cost (the filter is built for each: 5x the compile time); a call of another ABI
# is refused as a foreign architecture.
_ARCHITECTURES = {
    "x86_64": (("SCMP_ARCH_X86_64",), "arch_prctl modify_ldt"),
    "aarch64": (("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
                "arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint "
                "cacheflush set_tls"),
}


@dataclass(frozen=True, slots=True)
class _Rule:
    """A conditional rule: applies when the container has all of `needs` and none of
    `unless` (capabilities)."""

    names: tuple[str, ...]
    args: tuple[dict[str, int | str], ...] = ()
    action: str = "SCMP_ACT_ALLOW"
    errno_ret: int | None = None
    needs: frozenset[str] = field(default_factory=frozenset)
    unless: frozenset[str] = field(default_factory=frozenset)


def _arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, int | str]:
    """An OCI LinuxSeccompArg (its keys are the spec's, not a control message's)."""
    return dict(index=index, value=value, valueTwo=value_two, op=op)


_RULES = (
    # Any socket family but AF_VSOCK (a container must not reach the host's vsock services
    # nor listen where the agent does) and AF_ALG (the kernel's crypto API): three ranges, as
    # a rule's comparisons must all hold. (32-bit x86's socketcall(2), which would bypass
    # this, does not exist in the guest: no IA32 emulation.)
    _Rule(("socket",), (_arg(0, "SCMP_CMP_LT", AF_ALG),)),
    _Rule(("socket",), (_arg(0, "SCMP_CMP_EQ", AF_ALG + 1),)),
    _Rule(("socket",), (_arg(0, "SCMP_CMP_GT", AF_VSOCK),)),
    # One rule per allowed personality value: a rule's comparisons must all hold.
    *(_Rule(("personality",), (_arg(0, "SCMP_CMP_EQ", value),)) for value in PERSONALITIES),
    _Rule(("clone",), (_arg(0, "SCMP_CMP_MASKED_EQ", NAMESPACE_CLONE_FLAGS, 0),),
          unless=frozenset({"CAP_SYS_ADMIN"})),
    # clone3 passes its flags in memory, out of seccomp's sight: ENOSYS sends libc back to
    # clone, which the rule above can check.
    _Rule(("clone3",), action="SCMP_ACT_ERRNO", errno_ret=errno.ENOSYS,
          unless=frozenset({"CAP_SYS_ADMIN"})),
)


def _names(text: str) -> list[str]:
    return text.split()


def default_profile(capabilities: Collection[str], arch: str | None = None
                    ) -> dict[str, Any]:
    """The default profile (an OCI linux.seccomp object) for a process whose bounding set
    is `capabilities` on `arch` (the host's: the guest runs the same)."""
    architectures, arch_calls = _architecture(arch)
    caps = frozenset(capabilities)
    allowed: list[str] = []
    for group in _ALWAYS.values():
        allowed += _names(group)
    allowed += _names(arch_calls)
    for cap, group in _BY_CAPABILITY.items():
        if cap in caps:
            allowed += _names(group)
    syscalls: list[dict[str, Any]] = [
        {"names": sorted(set(allowed)), "action": "SCMP_ACT_ALLOW"}]
    for rule in _RULES:
        if rule.needs <= caps and not rule.unless & caps:
            entry: dict[str, Any] = {"names": list(rule.names), "action": rule.action}
            if rule.args:
                entry["args"] = [dict(a) for a in rule.args]
            if rule.errno_ret is not None:
                entry["errnoRet"] = rule.errno_ret
            syscalls.append(entry)
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.EPERM,
            "architectures": list(architectures), "syscalls": syscalls}


def _architecture(arch: str | None) -> tuple[tuple[str, ...], str]:
    machine = arch or platform.machine()
    try:
        return _ARCHITECTURES[machine]
    except KeyError:
        raise ConfigError(f"seccomp: no default profile for the {machine} architecture; "
                          "use --security-opt seccomp=PATH or seccomp=unconfined") from None


def load(path: Path, capabilities: Collection[str], arch: str | None = None,
         where: str = "--security-opt seccomp") -> dict[str, Any]:
    """A profile file as an OCI linux.seccomp object. docker's format (archMap, and syscalls
    with includes/excludes by caps, arches and minKernel) is resolved for `capabilities` and
    the architecture as docker does; an OCI object is passed on as it is."""
    label = f"{where}={path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{label}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{label}: not a regular file")
        data = f.read(MAX_PROFILE_BYTES + 1)
    if len(data) > MAX_PROFILE_BYTES:
        raise ConfigError(f"{label}: larger than {MAX_PROFILE_BYTES} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{label}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("defaultAction"), str):
        raise ConfigError(f"{label}: not a seccomp profile (no defaultAction)")
    if not isinstance(raw.get("syscalls", []), list):
        raise ConfigError(f"{label}: syscalls must be a list")
    return _resolve_docker_format(raw, frozenset(capabilities), arch, label)


def _resolve_docker_format(raw: dict[str, Any], caps: frozenset[str], arch: str | None,
                           label: str) -> dict[str, Any]:
    machine = arch or platform.machine()
    docker_arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    profile = {k: v for k, v in raw.items() if k not in ("archMap", "syscalls")}
    arch_map = raw.get("archMap")
    if isinstance(arch_map, list) and "architectures" not in raw:
        native = _architecture(arch)[0][0]
        for entry in arch_map:
            if isinstance(entry, dict) and entry.get("architecture") == native:
                profile["architectures"] = [native, *(entry.get("subArchitectures") or [])]
    kernel = _kernel_version()
    syscalls = []
    for i, rule in enumerate(raw.get("syscalls") or []):
        if not isinstance(rule, dict):
            raise ConfigError(f"{label}: syscalls[{i}] must be an object")
        if not _applies(rule.get("includes") or {}, caps, docker_arch, kernel, True) or \
                _applies(rule.get("excludes") or {}, caps, docker_arch, kernel, False):
            continue
        syscalls.append({k: v for k, v in rule.items()
                         if k not in ("includes", "excludes", "comment")})
    profile["syscalls"] = syscalls
    return profile


def _applies(condition: Mapping[str, Any], caps: frozenset[str], arch: str,
             kernel: tuple[int, int], empty: bool) -> bool:
    """docker's filter: includes need all of their conditions, excludes any of them."""
    tests = []
    if condition.get("caps"):
        wanted = set(condition["caps"])
        tests.append(wanted <= caps if empty else bool(wanted & caps))
    if condition.get("arches"):
        tests.append(arch in condition["arches"])
    if condition.get("minKernel"):
        major, _, minor = str(condition["minKernel"]).partition(".")
        tests.append(kernel >= (int(major), int(minor or 0)))
    if not tests:
        return empty
    return all(tests) if empty else any(tests)


def _kernel_version() -> tuple[int, int]:
    """The guest kernel's version: the one runv-py builds (Debian's 6.1)."""
    return (6, 1)
