"""A sandbox's hold on a network namespace: the snapshot of what the guest must reproduce and
one mirrored tap per interface. close() removes every tap and qdisc it made and leaves the
namespace's own interfaces as they were."""

from __future__ import annotations

import logging
import os

from . import endpoint
from .model import Endpoint, Snapshot
from .netns import NetNs

log = logging.getLogger(__name__)


class Attachment:
    def __init__(self, path: str) -> None:
        self.path = path
        self.snapshot = Snapshot()
        self.endpoints: tuple[Endpoint, ...] = ()
        self._netns: NetNs | None = None

    async def open(self) -> None:
        """Read the namespace and mirror each of its interfaces to a new tap. On failure
        nothing stays behind."""
        self._netns = NetNs(self.path)
        try:
            self.snapshot, self.endpoints = await self._netns.call(self._setup)
        except BaseException:
            self.close_sync()
            raise

    def _setup(self) -> tuple[Snapshot, tuple[Endpoint, ...]]:
        made: list[Endpoint] = []
        with endpoint.netlink() as ipr:
            snapshot = endpoint.snapshot(ipr)
            try:
                for link in snapshot.links:
                    made.append(endpoint.create(ipr, link))
            except BaseException:
                for done in made:
                    endpoint.remove(ipr, done)
                    os.close(done.tap_fd)
                raise
        return snapshot, tuple(made)

    def _teardown(self) -> None:
        with endpoint.netlink() as ipr:
            for done in self.endpoints:
                endpoint.remove(ipr, done)

    async def close(self) -> None:
        """Idempotent. Call after the VM is gone (QEMU holds the taps too)."""
        if self._netns is not None and self.endpoints:
            try:
                await self._netns.call(self._teardown)
            except Exception:
                log.warning("removing the taps from %s failed", self.path, exc_info=True)
        self.close_sync()

    def close_sync(self) -> None:
        for done in self.endpoints:
            os.close(done.tap_fd)
        self.endpoints = ()
        if self._netns is not None:
            self._netns.close()
            self._netns = None


def sweep(path: str) -> list[str]:
    """After a sandbox's owner died without closing (SIGKILL): its taps went with it, but the
    redirects on the namespace's interfaces stay and would drop their traffic. Removes them;
    the names of the interfaces cleaned. A namespace that is gone has nothing to clean."""
    if not os.path.exists(path):
        return []
    netns = NetNs(path)
    try:
        return netns.run(_sweep)
    finally:
        netns.close()


def _sweep() -> list[str]:
    with endpoint.netlink() as ipr:
        return endpoint.sweep(ipr)
