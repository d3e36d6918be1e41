"""OCI runtime spec (config.json) -> frozen dataclasses. Unknown keys are ignored, bad values
are rejected with SpecError naming the field (e.g. `process.user.uid`)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
MAX_ID = 2**32 - 1


class SpecError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Process:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: User = field(default_factory=User)
    terminal: bool = False
    no_new_privileges: bool = False


@dataclass(frozen=True, slots=True)
class Mount:
    destination: str
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Namespace:
    type: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class Spec:
    process: Process
    root_path: str
    root_readonly: bool = False
    hostname: str = ""
    mounts: tuple[Mount, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()

    def namespace(self, kind: str) -> Namespace | None:
        return next((ns for ns in self.namespaces if ns.type == kind), None)


def _obj(value: Any, name: str, required: bool = False) -> dict[str, Any]:
    if value is None:
        if required:
            raise SpecError(name, "is required")
        return {}
    if not isinstance(value, dict):
        raise SpecError(name, "must be an object")
    return value


def _str(value: Any, name: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise SpecError(name, "must be a string")
    if "\0" in value:
        raise SpecError(name, "must not contain NUL")
    return value


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(name, "must be true or false")
    return value


def _uint(value: Any, name: str, default: int = 0, maximum: int = MAX_ID) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise SpecError(name, f"must be an integer from 0 to {maximum}")
    return value


def _strs(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError(name, "must be a list of strings")
    return tuple(_str(v, f"{name}[{i}]") for i, v in enumerate(value))


def _abs_path(value: Any, name: str) -> str:
    path = _str(value, name)
    if not path.startswith("/"):
        raise SpecError(name, f"must be an absolute path, not {path!r}")
    if ".." in path.split("/"):
        raise SpecError(name, f"must not contain '..' ({path!r})")
    return posixpath.normpath(path)


def _user(raw: Any) -> User:
    obj = _obj(raw, "process.user")
    gids = obj.get("additionalGids")
    if gids is not None and not isinstance(gids, list):
        raise SpecError("process.user.additionalGids", "must be a list of integers")
    return User(
        uid=_uint(obj.get("uid"), "process.user.uid"),
        gid=_uint(obj.get("gid"), "process.user.gid"),
        umask=None if obj.get("umask") is None else _uint(obj["umask"], "process.user.umask",
                                                          maximum=0o777),
        additional_gids=tuple(_uint(g, f"process.user.additionalGids[{i}]")
                              for i, g in enumerate(gids or [])),
    )


def parse_process(raw: Any, name: str = "process") -> Process:
    obj = _obj(raw, name, required=True)
    args = _strs(obj.get("args"), f"{name}.args")
    if not args or not args[0]:
        raise SpecError(f"{name}.args", "must name the program to run")
    env = _strs(obj.get("env"), f"{name}.env")
    for i, entry in enumerate(env):
        if "=" not in entry:
            raise SpecError(f"{name}.env[{i}]", f"must be KEY=VALUE, not {entry!r}")
    cwd = _abs_path(obj.get("cwd", "/"), f"{name}.cwd")
    return Process(
        args=args, env=env, cwd=cwd, user=_user(obj.get("user")),
        terminal=_bool(obj.get("terminal"), f"{name}.terminal"),
        no_new_privileges=_bool(obj.get("noNewPrivileges"), f"{name}.noNewPrivileges"),
    )


def _mounts(raw: Any) -> tuple[Mount, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("mounts", "must be a list")
    out = []
    for i, entry in enumerate(raw):
        obj = _obj(entry, f"mounts[{i}]")
        out.append(Mount(
            destination=_abs_path(obj.get("destination"), f"mounts[{i}].destination"),
            type=_str(obj.get("type"), f"mounts[{i}].type"),
            source=_str(obj.get("source"), f"mounts[{i}].source"),
            options=_strs(obj.get("options"), f"mounts[{i}].options"),
        ))
    return tuple(out)


def _namespaces(raw: Any) -> tuple[Namespace, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("linux.namespaces", "must be a list")
    out: list[Namespace] = []
    for i, entry in enumerate(raw):
        obj = _obj(entry, f"linux.namespaces[{i}]")
        kind = _str(obj.get("type"), f"linux.namespaces[{i}].type")
        if kind not in NAMESPACE_TYPES:
            raise SpecError(f"linux.namespaces[{i}].type",
                            f"unknown namespace type {kind!r}")
        if any(ns.type == kind for ns in out):
            raise SpecError(f"linux.namespaces[{i}].type", f"namespace {kind!r} given twice")
        path = obj.get("path")
        out.append(Namespace(kind, _abs_path(path, f"linux.namespaces[{i}].path")
                             if path else ""))
    return tuple(out)


def parse(raw: Any) -> Spec:
    """Parse a decoded config.json; root.path stays as given (the caller resolves it)."""
    obj = _obj(raw, "config", required=True)
    root = _obj(obj.get("root"), "root", required=True)
    root_path = _str(root.get("path"), "root.path")
    if not root_path:
        raise SpecError("root.path", "is required")
    linux = _obj(obj.get("linux"), "linux")
    return Spec(
        process=parse_process(obj.get("process")),
        root_path=root_path,
        root_readonly=_bool(root.get("readonly"), "root.readonly"),
        hostname=_str(obj.get("hostname"), "hostname"),
        mounts=_mounts(obj.get("mounts")),
        namespaces=_namespaces(linux.get("namespaces")),
        masked_paths=tuple(_abs_path(p, f"linux.maskedPaths[{i}]")
                           for i, p in enumerate(_strs(linux.get("maskedPaths"),
                                                       "linux.maskedPaths"))),
        readonly_paths=tuple(_abs_path(p, f"linux.readonlyPaths[{i}]")
                             for i, p in enumerate(_strs(linux.get("readonlyPaths"),
                                                         "linux.readonlyPaths"))),
    )


def loads(text: str | bytes) -> Spec:
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError("config", f"not valid JSON: {exc}") from exc
    return parse(raw)
