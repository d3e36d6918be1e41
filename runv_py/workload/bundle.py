"""An image plus run options -> an OCI bundle: config.json whose rootfs is the image (read-only,
shared by every container of the image) under a writable layer of the container's own: either
block devices joined by overlayfs in the guest (storage/block.py), or an overlayfs of the
image's unpacked rootfs the supervisor mounts in its private mount namespace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import openat2
from ..errors import ConfigError
from ..oci import default_spec
from ..runtime_annotations import MARKERS, write_marker
from ..sandbox import policy
from ..storage.block import BlockRootfs
from . import seccomp_profile
from .network_mode import configure_network
from .options import RunOptions, parse_user

if TYPE_CHECKING:
    from .images import ResolvedImage

# Docker's default capability set: the VM, not the capability list, is the security boundary.
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD = 100_000


def command(image: ResolvedImage, options: RunOptions) -> list[str]:
    """docker's rule: ENTRYPOINT + CMD, where a given command replaces CMD and --entrypoint
    replaces ENTRYPOINT (and drops the image's CMD)."""
    settings = image.settings
    if options.entrypoint is not None:
        argv = [*options.entrypoint, *options.command]
    else:
        argv = [*settings.entrypoint, *(options.command or settings.cmd)]
    if not argv:
        raise ConfigError(f"image {image.ref} has no command: give one after the image name")
    return argv


# An image's etc/passwd or etc/group is read on the host: a bigger one is refused.
MAX_TABLE_BYTES = 4 << 20


def _table(rootfs: Path, table: str, flag: str, user: str) -> list[str]:
    """The lines of the image's etc/<table>, resolved inside the rootfs as the guest would
    (docs/security.md); no lines when the image has none."""
    try:
        data = openat2.read_in_root(rootfs, f"etc/{table}", MAX_TABLE_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except openat2.NotRegular:
        raise ConfigError(f"{flag} {user!r}: the image's /etc/{table} is not a regular "
                          "file") from None
    except openat2.TooLarge:
        raise ConfigError(f"{flag} {user!r}: the image's /etc/{table} is larger than "
                          f"{MAX_TABLE_BYTES} bytes") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {user!r}: cannot read the image's /etc/{table}: "
                          f"{exc.strerror}") from None
    return data.decode("utf-8", "replace").splitlines()


def _lookup(lines: list[str], name: str) -> int | None:
    for line in lines:
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    return None


def resolve_user(rootfs: Path, user: str, flag: str) -> tuple[int, int]:
    """UID[:GID] numbers, or names looked up in the image's /etc/passwd and /etc/group."""
    name, _, group = user.partition(":")
    if name.isdigit() and (not group or group.isdigit()):
        return parse_user(user)
    passwd = [] if name.isdigit() and group else _table(rootfs, "passwd", flag, user)
    uid = int(name) if name.isdigit() else _lookup(passwd, name)
    if uid is None:
        raise ConfigError(f"{flag} {user!r}: no user {name!r} in the image's /etc/passwd")
    if not group:
        gid = 0
        for line in passwd:
            fields = line.split(":")
            if len(fields) > 3 and fields[2] == str(uid) and fields[3].isdigit():
                gid = int(fields[3])
                break
        return uid, gid
    found = int(group) if group.isdigit() else _lookup(_table(rootfs, "group", flag, user),
                                                        group)
    if found is None:
        raise ConfigError(f"{flag} {user!r}: no group {group!r} in the image's /etc/group")
    return uid, found


def capabilities(options: RunOptions) -> tuple[str, ...]:
    """docker's default set, plus --cap-add, minus --cap-drop."""
    drop = set(options.cap_drop)
    return tuple(c for c in dict.fromkeys((*CAPABILITIES, *options.cap_add)) if c not in drop)


def merge_env(base: tuple[str, ...], extra: tuple[str, ...]) -> list[str]:
    """Later NAME=VALUE entries replace earlier ones of the same name; PATH always exists."""
    merged: dict[str, str] = {}
    for item in (DEFAULT_PATH, *base, *extra):
        merged[item.partition("=")[0]] = item
    return list(merged.values())


def overlay_rootfs(image: ResolvedImage, upper: Path, work: Path) -> dict[str, str]:
    """The annotation of a rootfs the supervisor mounts as an overlayfs on the host."""
    return {policy.ROOTFS_OVERLAY_ANNOTATION: json.dumps(
        {"lower": [str(image.rootfs)], "upper": str(upper), "work": str(work)})}


def block_rootfs(rootfs: BlockRootfs) -> dict[str, str]:
    """The annotation of a rootfs that reaches the guest as two disks."""
    return {policy.ROOTFS_BLOCK_ANNOTATION: rootfs.to_json()}


def spec_document(image: ResolvedImage, options: RunOptions, *, rootfs: dict[str, str],
                  hostname: str, netns: str | None = None, cgroups_path: str = "",
                  resolv_conf: Path | None = None) -> dict[str, Any]:
    """`rootfs`: the annotation saying how the container's root reaches the guest
    (overlay_rootfs or block_rootfs); `cgroups_path`: the sandbox's host cgroup (its limits:
    the VM's memory, the CPU quota, pids and io weight below); `resolv_conf`: a file bound
    read-only to /etc/resolv.conf."""
    spec = default_spec.document()
    process = spec["process"]
    process["terminal"] = options.tty
    process["args"] = command(image, options)
    process["env"] = merge_env(image.settings.env, options.env)
    if options.tty:
        process["env"].append("TERM=xterm")
    process["cwd"] = options.workdir or image.settings.working_dir or "/"
    if not process["cwd"].startswith("/"):
        raise ConfigError(f"--workdir {process['cwd']!r}: must be an absolute path")
    user = options.user or image.settings.user
    if user:
        uid, gid = resolve_user(image.rootfs, user, "--user" if options.user else "image user")
        process["user"] = {"uid": uid, "gid": gid}
    caps = capabilities(options)
    process["capabilities"] = {k: list(caps) for k in ("bounding", "effective", "permitted")}
    process["noNewPrivileges"] = False
    if options.seccomp == "default":
        spec["linux"]["seccomp"] = seccomp_profile.default_profile(caps)
    elif options.seccomp != "unconfined":
        spec["linux"]["seccomp"] = seccomp_profile.load(Path(options.seccomp), caps)
    spec["root"] = {"path": "rootfs", "readonly": options.read_only}
    spec["hostname"] = options.hostname or hostname
    for volume in options.volumes:
        spec["mounts"].append({"destination": volume.guest, "type": "bind",
                               "source": str(volume.host),
                               "options": ["rbind", "ro" if volume.readonly else "rw"]})
    if resolv_conf is not None:
        spec["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind",
                               "source": str(resolv_conf), "options": ["rbind", "ro"]})
    resources = spec["linux"]["resources"]
    if options.memory is not None:
        resources["memory"] = {"limit": options.memory}
    if options.cpus is not None:
        resources["cpu"] = {"quota": round(options.cpus * CPU_PERIOD), "period": CPU_PERIOD}
    if options.pids_limit is not None:
        resources["pids"] = {"limit": options.pids_limit}
    if options.io_weight is not None:
        resources["blockIO"] = {"weight": options.io_weight}
    if cgroups_path:
        spec["linux"]["cgroupsPath"] = cgroups_path
    configure_network(spec, options.network, options.publish, netns)
    spec["annotations"] = {
        **rootfs,
        policy.IMAGE_ANNOTATION: image.ref,
        **{f"{policy.LABEL_ANNOTATION_PREFIX}{k}": v for k, v in options.labels.items()},
    }
    if options.template is not None:
        spec["annotations"][policy.TEMPLATE_ANNOTATION] = options.template
    return spec


def write(bundle: Path, spec: dict[str, Any]) -> None:
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    annotations = spec.get("annotations", {})
    for annotation in MARKERS:
        if annotation in annotations:
            write_marker(bundle, annotation, annotations[annotation])
    (bundle / "config.json").write_text(json.dumps(spec, indent=2) + "\n")
