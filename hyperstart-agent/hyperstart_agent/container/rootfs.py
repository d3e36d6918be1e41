"""The container's root filesystem, made by the init helper before pivot_root: the spec's mounts
in the spec's order, /dev, the devices, sysctls, masked and read-only paths.

Every path that the spec or the image names is resolved inside the rootfs (openat2 with
RESOLVE_IN_ROOT, no magic links), and mounts are made on the resolved target through
/proc/self/fd/N: a symlink in the image (`/d -> /run/hyperstart`) resolves as it would after
pivot_root, inside the container, and cannot point a mount or a device node at the guest."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator

from . import spec as specmod
from . import syscalls as sc

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_DEVICES = (  # name, major, minor
    ("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
_DEVICE_KINDS = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def proc_path(fd: int) -> str:
    """A path that names what `fd` refers to, for calls that take paths (mount(2))."""
    return f"/proc/self/fd/{fd}"


class Root:
    """The rootfs as a directory fd; paths in it are resolved as the container will see them."""

    RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def open(self, path: str, flags: int = os.O_PATH, mode: int = 0) -> int:
        """An fd of `path` (absolute, as the container sees it) resolved inside the rootfs."""
        return sc.openat2(self.fd, path.lstrip("/") or ".", flags, self.RESOLVE, mode)

    def opened(self, path: str, flags: int = os.O_PATH) -> contextlib.AbstractContextManager[int]:
        return _closing(self.open(path, flags))

    def mkdirs(self, path: str, _links: int = 0) -> int:
        """The directory `path`, made (mode 0755) where missing: an O_PATH fd of it. A
        dangling symlink on the way is followed, its target made (inside the rootfs)."""
        parts = [p for p in path.split("/") if p and p != "."]
        fd = os.dup(self.fd)
        try:
            for i, part in enumerate(parts):
                prefix = "/".join(parts[:i + 1])
                try:
                    next_fd = self.open(prefix, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        link = os.readlink(part, dir_fd=fd)  # OSError if not a symlink
                        if _links >= 40:
                            raise OSError(errno.ELOOP, f"/{prefix}: too many symlinks") from None
                        rest = "/".join([link if link.startswith("/") else
                                         "/".join([*parts[:i], link]), *parts[i + 1:]])
                        os.close(fd)
                        fd = -1
                        return self.mkdirs(rest, _links + 1)
                    next_fd = self.open(prefix, os.O_PATH | os.O_DIRECTORY)
                os.close(fd)
                fd = next_fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd

    def target(self, path: str, directory: bool) -> int:
        """An O_PATH fd of the mount point `path`: as it is, or made as a directory or an
        empty file (with its parent directories)."""
        with contextlib.suppress(FileNotFoundError):
            return self.open(path)
        if directory:
            return self.mkdirs(path)
        parent, name = posixpath.split(path)
        parent_fd = self.mkdirs(parent)
        try:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o644, dir_fd=parent_fd))
        except FileExistsError:
            pass  # made meanwhile, or a symlink: resolved below like any other path
        finally:
            os.close(parent_fd)
        return self.open(path)


def _own_cgroup() -> str:
    """This process's cgroup v2 path (the agent placed it in the container's cgroup)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise OSError("no cgroup v2 membership in /proc/self/cgroup")


def _copy_tree(source: int, target: int) -> None:
    """Copy the directory open as `source` into the directory open as `target`, by fd only
    (no path is walked): symlinks as they are, the rest with its mode, owner and times."""
    for entry in os.scandir(source):
        name = entry.name
        info = os.stat(name, dir_fd=source, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=target)
        elif stat.S_ISDIR(info.st_mode):
            os.mkdir(name, 0o700, dir_fd=target)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            with _closing(os.open(name, flags, dir_fd=source)) as sub_source, \
                    _closing(os.open(name, flags, dir_fd=target)) as sub_target:
                _copy_tree(sub_source, sub_target)
        elif stat.S_ISREG(info.st_mode):
            with _closing(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=source)) as src, \
                    _closing(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                     0o600, dir_fd=target)) as dst:
                while os.sendfile(dst, src, None, 1 << 20):
                    pass
        else:
            os.mknod(name, info.st_mode, info.st_rdev, dir_fd=target)
        os.chown(name, info.st_uid, info.st_gid, dir_fd=target, follow_symlinks=False)
        if not stat.S_ISLNK(info.st_mode):
            os.chmod(name, stat.S_IMODE(info.st_mode), dir_fd=target)
            os.utime(name, ns=(info.st_atime_ns, info.st_mtime_ns), dir_fd=target)


def _tmpfs_copied_up(root: Root, destination: str, flags: int, data: str) -> None:
    """A tmpfs at `destination` that starts with a copy of what the image has there (podman's
    --tmpfs): the image's directory stays reachable through an fd opened before the tmpfs
    covers it."""
    with _closing(root.mkdirs(destination)) as target:
        original = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=target)
        with _closing(original):
            sc.mount("tmpfs", proc_path(target), "tmpfs", flags & ~sc.MS_RDONLY, data)
            with root.opened(destination, os.O_RDONLY | os.O_DIRECTORY) as fresh:
                _copy_tree(original, fresh)
                info = os.fstat(original)
                if "mode=" not in data:
                    os.fchmod(fresh, stat.S_IMODE(info.st_mode))
                os.fchown(fresh, info.st_uid, info.st_gid)
    if flags & sc.MS_RDONLY:
        with root.opened(destination) as mounted:
            sc.mount("", proc_path(mounted), "", sc.MS_REMOUNT | flags, data)


def mount_one(root: Root, m: specmod.Mount, *, new_cgroup_ns: bool) -> None:
    """One entry of the spec's mounts, at its destination resolved inside the rootfs."""
    options = sc.parse_mount_options(m.options, bind=m.type == "bind")
    flags = options.flags
    recursive_set, recursive_clear = options.recursive_set, options.recursive_clear
    if options.is_bind:
        source_is_dir = stat.S_ISDIR(os.stat(m.source).st_mode)
        with _closing(root.target(m.destination, source_is_dir)) as target:
            sc.mount(m.source, proc_path(target), "", sc.MS_BIND | (flags & sc.MS_REC))
        rest = flags & ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT | sc.MS_RDONLY)
        if rest:  # a bind mount takes flags only on remount
            with root.opened(m.destination) as mounted:
                sc.mount("", proc_path(mounted), "", sc.MS_BIND | sc.MS_REMOUNT | rest)
        if flags & sc.MS_RDONLY:
            # Read-only all the way down: a read-write mount under a read-only volume would
            # be a way around it.
            recursive_set, recursive_clear = (recursive_set | sc.MOUNT_ATTR_RDONLY,
                                              recursive_clear & ~sc.MOUNT_ATTR_RDONLY)
    elif m.type == "cgroup" and not new_cgroup_ns:
        # Without a cgroup namespace the whole guest hierarchy would show: bind the
        # container's own cgroup instead, so that /sys/fs/cgroup/memory.max is its limit (as
        # runc binds the container's cgroup of each v1 hierarchy).
        with _closing(root.mkdirs(m.destination)) as target:
            sc.mount(CGROUP_ROOT + _own_cgroup(), proc_path(target), "", sc.MS_BIND)
        if flags & ~sc.MS_REMOUNT:
            with root.opened(m.destination) as mounted:  # the bind, not what it covers
                sc.mount("", proc_path(mounted), "", sc.MS_BIND | sc.MS_REMOUNT | flags)
    else:
        # The guest has only the unified hierarchy: "cgroup" means cgroup2, as runc does.
        fstype = "cgroup2" if m.type == "cgroup" else m.type
        if options.tmpcopyup and fstype == "tmpfs":
            _tmpfs_copied_up(root, m.destination, flags, options.data)
        else:
            with _closing(root.mkdirs(m.destination)) as target:
                try:
                    sc.mount(m.source or m.type, proc_path(target), fstype, flags, options.data)
                except OSError:
                    if m.type != "sysfs":
                        raise
                    # sysfs cannot be mounted without a new network namespace: bind the
                    # guest's.
                    sc.mount("/sys", proc_path(target), "", sc.MS_BIND | sc.MS_REC)
                    with root.opened(m.destination) as mounted:
                        sc.mount("", proc_path(mounted), "",
                                 sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | flags)
    if recursive_set or recursive_clear:
        with root.opened(m.destination) as mounted:
            sc.mount_setattr(mounted, recursive_set, recursive_clear, recursive=True,
                             what=m.destination)
    if options.propagation:
        with root.opened(m.destination) as mounted:
            sc.mount("", proc_path(mounted), "", options.propagation)


def populate_dev(root: Root) -> None:
    """The default device nodes and links in a /dev that the spec made a tmpfs."""
    with _closing(root.mkdirs("/dev")) as dev:
        for name, major, minor in DEFAULT_DEVICES:
            if _exists(name, dev):
                continue
            try:
                os.mknod(name, 0o666 | stat.S_IFCHR, os.makedev(major, minor), dir_fd=dev)
                os.chmod(name, 0o666, dir_fd=dev)
            except PermissionError:  # in a user namespace: bind the guest's node
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                                 0o666, dir_fd=dev))
                with _closing(root.open(f"/dev/{name}")) as node:
                    sc.mount(f"/dev/{name}", proc_path(node), "", sc.MS_BIND)
        for name, link in DEV_LINKS:
            if not _exists(name, dev):
                os.symlink(link, name, dir_fd=dev)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def make_device(root: Root, device: specmod.Device) -> None:
    """A linux.devices node, in its directory as resolved inside the rootfs."""
    parent, name = posixpath.split(device.path)
    with _closing(root.mkdirs(parent)) as directory:
        if _exists(name, directory):
            os.unlink(name, dir_fd=directory)
        os.mknod(name, device.file_mode | _DEVICE_KINDS[device.type],
                 os.makedev(device.major, device.minor), dir_fd=directory)
        os.chmod(name, device.file_mode, dir_fd=directory)
        os.chown(name, device.uid, device.gid, dir_fd=directory, follow_symlinks=False)


def write_sysctl(root: Root, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with _closing(root.open(path, os.O_WRONLY)) as fd:
        os.write(fd, value.encode())


def mask(root: Root, path: str) -> None:
    """linux.maskedPaths: an empty read-only tmpfs over a directory, /dev/null over a file."""
    try:
        fd = root.open(path)
    except FileNotFoundError:
        return
    with _closing(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            sc.mount("tmpfs", proc_path(fd), "tmpfs", sc.MS_RDONLY)
        else:
            sc.mount("/dev/null", proc_path(fd), "", sc.MS_BIND)


def make_readonly(root: Root, path: str) -> None:
    """linux.readonlyPaths: the path and every mount below it read-only."""
    try:
        fd = root.open(path)
    except FileNotFoundError:
        return
    with _closing(fd):
        sc.mount(proc_path(fd), proc_path(fd), "", sc.MS_BIND | sc.MS_REC)
    with root.opened(path) as mounted:
        sc.mount_setattr(mounted, sc.MOUNT_ATTR_RDONLY, 0, recursive=True, what=path)


def setup(spec: specmod.Spec, *, new_cgroup_ns: bool) -> None:
    """Everything up to pivot_root (which the caller does), in the spec's order."""
    rootfs = spec.root_path
    sc.mount("", "/", "", sc.MS_REC | sc.MS_PRIVATE)
    sc.mount(rootfs, rootfs, "", sc.MS_BIND | sc.MS_REC)
    root = Root(rootfs)
    try:
        dev_is_tmpfs = False
        for m in spec.mounts:
            mount_one(root, m, new_cgroup_ns=new_cgroup_ns)
            dev_is_tmpfs = dev_is_tmpfs or (m.destination == "/dev" and m.type == "tmpfs")
        if dev_is_tmpfs:
            populate_dev(root)
        for device in spec.devices:
            make_device(root, device)
        for key, value in spec.sysctl:  # before readonlyPaths, which usually cover /proc/sys
            write_sysctl(root, key, value)
        for path in spec.masked_paths:
            mask(root, path)
        for path in spec.readonly_paths:
            make_readonly(root, path)
    finally:
        root.close()
