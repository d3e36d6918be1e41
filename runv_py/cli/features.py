"""`runv features`: the OCI features document (runtime-spec features.md), plus what the VM
adds under the `org.runv.*` annotations."""

from __future__ import annotations

import asyncio
from typing import Any

from .. import __version__
from ..config import RuntimeConfig
from ..errors import RunvError
from ..oci.spec import CAPABILITIES

NAMESPACES = ["cgroup", "ipc", "mount", "network", "pid", "user", "uts", "time"]
MOUNT_OPTIONS = sorted([
    "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "mand",
    "noatime", "nodev", "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime",
    "nosuid", "nosymfollow", "private", "rbind", "relatime", "remount", "ro", "rprivate",
    "rshared", "rslave", "runbindable", "rw", "shared", "slave", "strictatime", "suid",
    "symfollow", "sync", "unbindable",
    # recursive attributes (mount_setattr), and tmpfs content copied from the image
    "ratime", "rdev", "rdiratime", "rexec", "rnoatime", "rnodev", "rnodiratime", "rnoexec",
    "rnorelatime", "rnostrictatime", "rnosuid", "rnosymfollow", "rrelatime", "rro", "rrw",
    "rstrictatime", "rsuid", "rsymfollow", "tmpcopyup", "notmpcopyup"])
HOOKS = ["prestart", "createRuntime", "startContainer", "poststart", "poststop"]


def _template_state(config: RuntimeConfig) -> str:
    """Whether sandboxes of the default size start from a template, and if one is ready."""
    if config.template == "off":
        return "off (cold boot)"
    from ..sandbox import guest_spec, guest_vm, vm_template

    try:
        key = guest_vm.clone_key(config, (guest_spec.SHARED_TAG,))
    except Exception as exc:  # no assets, KVM asked for but unusable: say so, do not fail
        return f"unavailable: {exc}"
    found = vm_template.TemplateStore(config.template_dir).get(key) is not None
    return f"auto ({'ready' if found else 'built on first use'}, key {key})"


def _pool_state(config: RuntimeConfig) -> str:
    from ..sandbox import pool_claim, pool_member

    if not pool_member.socket_path(config.state_dir).exists():
        return "not running"
    try:
        reply = asyncio.run(asyncio.wait_for(pool_claim.status(config.state_dir), 5))
    except (OSError, RunvError, TimeoutError):
        return "not running"
    return f"running ({sum(row.idle for row in reply.keys.values())} idle)"


def document(config: RuntimeConfig) -> dict[str, Any]:
    """What this runtime, with its configuration, does here (not what it could do)."""
    from ..vm import accel

    hv = config.hypervisor
    accelerator: str
    try:
        accelerator = accel.choose(hv.accelerator).accel
    except RunvError as exc:
        accelerator = f"unusable: {exc}"
    templates = _template_state(config)
    template_on = templates.startswith("auto (")
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": HOOKS,
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": list(CAPABILITIES),
            # cgroupsPath is honoured on the host (the sandbox's host processes) in v1 and v2
            # hierarchies; systemd's slice:prefix:name form becomes the same directories.
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
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
            "org.runv.config": config.source,
            "org.runv.hypervisor": hv.backend,
            "org.runv.accelerator": accelerator,
            # A template's clones use machine pc and 9p (docs/templates.md); a cold boot
            # uses the configured machine and shared fs.
            "org.runv.machine": "pc" if template_on else hv.machine,
            "org.runv.machine.cold-boot": hv.machine,
            "org.runv.shared-fs": "9p" if template_on else config.guest.shared_fs,
            "org.runv.shared-fs.cold-boot": config.guest.shared_fs,
            "org.runv.agent-channel": config.guest.channel,
            "org.runv.vcpus": str(hv.vcpus),
            "org.runv.memory-mib": str(hv.memory_mib),
            "org.runv.template": templates,
            "org.runv.pool": _pool_state(config),
            "org.runv.note": "containers run in their own VM; hooks.createContainer is not "
                             "supported; process fds cannot be preserved into the VM; host "
                             "devices are not passed into the VM",
        },
    }
