"""Tenants: the scope of hyperctl's and the API's objects on a host shared by several CI
customers. A tenant has its own containers, names, output logs, audit log and image tags; the
image store's blobs and unpacked layers stay shared (deduplicated) by all of them.

    <data root>/containers, names, audit/          the operator's (no tenant)
    <data root>/tenants/<name>/containers, names, audit/
    <data root>/images/refs.json                   shared image names (the operator's)
    <data root>/images/tenants/<name>/refs.json    a tenant's own image names

A tenant sees and acts on its own objects only: `ps`, `exec`, `stop`, `rm`, `logs`, `events`
find nothing of another tenant's. It may run the operator's shared images but not retag or
remove them. The tenant is a scope chosen by whoever runs hyperctl (a CI driver, as root),
not a login: the jobs themselves run in VMs and never reach hyperctl."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

ENV = "RUNV_TENANT"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Tenant names become directory names, host cgroup path parts and nftables comments.
TENANTS_DIR = "tenants"


def parse(name: str, flag: str = "--tenant") -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{flag} {name!r}: use 1-32 lower-case letters, digits, '_' or '-', "
                          "starting with a letter or digit")
    return name


def from_environment(given: str | None, flag: str = "--tenant") -> str | None:
    """`given` (a flag or an argument), else $RUNV_TENANT; None for the operator's scope."""
    if given:
        return parse(given, flag)
    value = os.environ.get(ENV, "")
    return parse(value, f"${ENV}") if value else None


@dataclass(frozen=True, slots=True)
class Scope:
    """Where one tenant's objects live under a data root (tenant None: the operator's)."""

    data_root: Path
    tenant: str | None = None

    @property
    def root(self) -> Path:
        return self.data_root if self.tenant is None else \
            self.data_root / TENANTS_DIR / self.tenant

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    @property
    def names(self) -> Path:
        return self.root / "names"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def label(self) -> str:
        """As logs and cgroup paths name it."""
        return self.tenant or "_"

    def describe(self) -> str:
        return f"tenant {self.tenant}" if self.tenant else "the operator's scope (no tenant)"


def all_tenants(data_root: Path) -> list[str]:
    """Every tenant with a directory under `data_root`."""
    try:
        return sorted(p.name for p in (data_root / TENANTS_DIR).iterdir()
                      if p.is_dir() and _NAME.match(p.name))
    except FileNotFoundError:
        return []
