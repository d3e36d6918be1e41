"""A container's files in the sandbox's shared directory: its rootfs (a bind, an overlay the
supervisor mounts, or a detached tree) and each bind-mount source, under names of its own."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...errors import SpecError
from ...oci.spec import Spec
from ...runtime_annotations import written_by_hyperctl
from ...storage.shared import Trees
from ..policy import ROOTFS_OVERLAY_ANNOTATION


class Shared(Protocol):
    """storage.shared.SharedDir, as the supervisor uses it."""

    def bind(self, source: Path, field: str, *, readonly: bool = False,
             name: str | None = None, volume: bool = False) -> str: ...
    def overlay(self, lower: list[Path], upper: Path, work: Path, field: str, *,
                name: str) -> str: ...
    def attach(self, tree: int, field: str, *, readonly: bool = False,
               name: str | None = None, volume: bool = False, label: str = "") -> str: ...
    def unbind(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ContainerShares:
    rootfs: str                # the rootfs's name ("": it is not shared, a block rootfs)
    binds: dict[int, str]      # mount index -> its source's name

    @property
    def names(self) -> list[str]:
        return [name for name in (self.rootfs, *self.binds.values()) if name]


def _overlay(shared: Shared, value: str, name: str) -> str:
    field = f"annotations[{ROOTFS_OVERLAY_ANNOTATION!r}]"
    try:
        layers = json.loads(value)
        lower = [Path(p) for p in layers["lower"]]
        upper, work = Path(layers["upper"]), Path(layers["work"])
    except (ValueError, KeyError, TypeError):
        raise SpecError(f'{field}: must be {{"lower": [dirs], "upper": dir, '
                        '"work": dir}') from None
    if not lower or not all(p.is_absolute() for p in (*lower, upper, work)):
        raise SpecError(f"{field}: needs absolute lower, upper and work directories")
    return shared.overlay(lower, upper, work, field, name=name)


def share(shared: Shared, spec: Spec, rootfs: str | None, trees: Trees | None = None
          ) -> ContainerShares:
    """Bind the container's rootfs (under the name `rootfs`; None: it comes another way, a
    block rootfs) and bind-mount sources into the shared directory, or attach their detached
    trees where given. root.readonly is applied in the guest, after the mount points have
    been made in it."""
    trees = trees or Trees()
    # hyperctl's and the API's volumes are host directories their user names: guest root is
    # the host's nobody there (docs/security.md).
    volumes = written_by_hyperctl(spec.bundle)
    overlay = spec.annotations.get(ROOTFS_OVERLAY_ANNOTATION)
    if rootfs is None:
        root = ""
    elif trees.rootfs is not None:
        root = shared.attach(trees.rootfs, "root.path", name=rootfs)
    elif overlay is not None:
        root = _overlay(shared, overlay, rootfs)
    else:
        root = shared.bind(spec.root, "root.path", name=rootfs)
    binds: dict[int, str] = {}
    try:
        for index, source in spec.bind_sources().items():
            field, readonly = f"mounts[{index}].source", spec.mounts[index].readonly
            tree = trees.binds.get(index)
            binds[index] = (shared.bind(source, field, readonly=readonly, volume=volumes)
                            if tree is None else
                            shared.attach(tree, field, readonly=readonly, volume=volumes,
                                          label=source.name))
    except BaseException:
        unshare(shared, [name for name in (root, *binds.values()) if name])
        raise
    return ContainerShares(root, binds)


def unshare(shared: Shared, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            shared.unbind(name)
