"""A sandbox's hold on a network namespace: the snapshot of what the guest must reproduce and
one mirrored tap per interface. refresh() follows interfaces added to or removed from the
namespace after start (a second CNI network); close() removes every tap and qdisc it made and
leaves the namespace's own interfaces as they were."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace

from . import endpoint
from .model import Endpoint, Snapshot
from .netns import NetNs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Changes:
    added: tuple[Endpoint, ...] = ()
    removed: tuple[Endpoint, ...] = ()  # their links are gone; their taps stay until forget()


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
            await self.refresh()
        except BaseException:
            await self.close()
            raise

    async def refresh(self) -> Changes:
        """Read the namespace again: new interfaces get a mirrored tap (added), endpoints of
        interfaces that went away are returned (removed) for the caller to unplug and
        forget()."""
        assert self._netns is not None
        work = asyncio.ensure_future(self._netns.call(self._refresh))
        try:
            self.snapshot, changes = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread finishes regardless: keep what it made so that close() removes it.
            self.snapshot, changes = await work
            self._keep(changes)
            raise
        self._keep(changes)
        return changes

    def _keep(self, changes: Changes) -> None:
        kept = [e for e in self.endpoints if e not in changes.removed]
        self.endpoints = (*kept, *changes.added)

    def _refresh(self) -> tuple[Snapshot, Changes]:
        with endpoint.netlink() as ipr:
            snapshot = endpoint.snapshot(ipr)
            links = {link.index: link for link in snapshot.links}
            removed = tuple(e for e in self.endpoints if e.link.index not in links)
            have = {e.link.index for e in self.endpoints}
            added: list[Endpoint] = []
            try:
                for link in snapshot.links:
                    if link.index not in have:
                        added.append(endpoint.create(ipr, link))
            except BaseException:
                for done in added:
                    endpoint.remove(ipr, done)
                    os.close(done.tap_fd)
                raise
        # Endpoints carry the links as they are now (addresses may have changed).
        self.endpoints = tuple(replace(e, link=links[e.link.index]) if e.link.index in links
                               else e for e in self.endpoints)
        return snapshot, Changes(tuple(added), removed)

    async def forget(self, gone: tuple[Endpoint, ...]) -> None:
        """Remove the taps of endpoints whose links went away (after the VM let go of them)."""
        assert self._netns is not None
        await self._netns.call(lambda: self._remove(gone))
        for done in gone:
            os.close(done.tap_fd)

    @staticmethod
    def _remove(endpoints: tuple[Endpoint, ...]) -> None:
        with endpoint.netlink() as ipr:
            for done in endpoints:
                endpoint.remove(ipr, done)

    async def close(self) -> None:
        """Idempotent. Call after the VM is gone (QEMU holds the taps too)."""
        if self._netns is not None and self.endpoints:
            endpoints = self.endpoints
            try:
                await self._netns.call(lambda: self._remove(endpoints))
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


def sweep(path: str, only: str | None = None) -> list[str]:
    """After a sandbox's owner died without closing (SIGKILL): its taps went with it, but the
    redirects on the namespace's interfaces stay and would drop their traffic. Removes them
    (on the interface `only`, if given); the names of the interfaces cleaned. A namespace
    that is gone has nothing to clean."""
    if not os.path.exists(path):
        return []
    netns = NetNs(path)
    try:
        return netns.run(lambda: _sweep(only))
    finally:
        netns.close()


def stale(path: str) -> list[str]:
    """The interfaces of the namespace that carry a killed sandbox's redirect; none is
    changed."""
    if not os.path.exists(path):
        return []
    netns = NetNs(path)
    try:
        return netns.run(_stale)
    finally:
        netns.close()


def _sweep(only: str | None) -> list[str]:
    with endpoint.netlink() as ipr:
        return endpoint.sweep(ipr, only)


def _stale() -> list[str]:
    with endpoint.netlink() as ipr:
        return [link.name for link in endpoint.stale_links(ipr)]
