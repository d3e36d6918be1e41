"""`runv features`: the OCI features document (runtime-spec features.md), plus what the VM
adds under the `org.runv.*` annotations."""

from __future__ import annotations

from typing import Any

from .. import __version__

NAMESPACES = ["cgroup", "ipc", "mount", "network", "pid", "user", "uts", "time"]
MOUNT_OPTIONS = ["async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
                 "mand", "noatime", "nodev", "nodiratime", "noexec", "nostrictatime",
                 "nosuid", "private", "rbind", "relatime", "remount", "ro", "rprivate",
                 "rshared", "rslave", "runbindable", "rw", "shared", "slave",
                 "strictatime", "sync", "unbindable"]
HOOKS = ["prestart", "createRuntime", "startContainer", "poststart", "poststop"]


def _capabilities() -> list[str]:
    names = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
             "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
             "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
             "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
             "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
             "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
             "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]
    return ["CAP_" + n for n in names]


def document() -> dict[str, Any]:
    from ..config import load
    from ..vm import accel

    config = load(None)
    choice = accel.choose(config.hypervisor.accelerator)
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": HOOKS,
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": _capabilities(),
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True,
                        "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                                    "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                        "archs": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "org.runv.version": __version__,
            "org.runv.hypervisor": config.hypervisor.backend,
            "org.runv.accelerator": choice.accel,
            "org.runv.machine": config.hypervisor.machine,
            "org.runv.shared-fs": "virtio-9p",
            "org.runv.agent-channel": config.guest.channel,
            "org.runv.note": "containers run in their own VM; hooks.createContainer is not "
                             "supported; process fds cannot be preserved into the VM",
        },
    }
