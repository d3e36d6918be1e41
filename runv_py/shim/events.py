"""Task events from the shim to containerd: Events/Forward over ttrpc to $TTRPC_ADDRESS, one at a
time in the order they were published (containerd wants /tasks/start before /tasks/exit), each
retried with backoff while containerd is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from ..errors import TtrpcError
from ._pb import events_pb2
from .ttrpc import NAMESPACE_KEY, Client

log = logging.getLogger(__name__)

SERVICE = "containerd.services.events.ttrpc.v1.Events"
ATTEMPTS = 5
TOPICS = {
    "TaskCreate": "/tasks/create", "TaskStart": "/tasks/start", "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete", "TaskOOM": "/tasks/oom",
    "TaskExecAdded": "/tasks/exec-added", "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused", "TaskResumed": "/tasks/resumed",
}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def pack(message: Message) -> any_pb2.Any:
    """containerd's type URLs are the bare full names (no type.googleapis.com/ prefix)."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name,
                       value=message.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.Envelope] = asyncio.Queue()
        self._client: Client | None = None
        self._task = asyncio.create_task(self._run())

    def publish(self, event: Message) -> None:
        name = event.DESCRIPTOR.name
        self._queue.put_nowait(events_pb2.Envelope(
            timestamp=timestamp(time.time()), namespace=self.namespace, topic=TOPICS[name],
            event=pack(event)))

    async def _run(self) -> None:
        while True:
            envelope = await self._queue.get()
            for attempt in range(ATTEMPTS):
                try:
                    await self._forward(envelope)
                    break
                except TtrpcError as exc:
                    log.warning("publishing %s failed (attempt %d): %s", envelope.topic,
                                attempt + 1, exc)
                    await self._disconnect()
                    await asyncio.sleep(0.1 * 2 ** attempt)
            self._queue.task_done()

    async def _forward(self, envelope: events_pb2.Envelope) -> None:
        if self._client is None or self._client.closed:
            self._client = await Client.connect(self.address)
        request = events_pb2.ForwardRequest(envelope=envelope)
        await self._client.call(SERVICE, "Forward", request.SerializeToString(),
                                metadata={NAMESPACE_KEY: self.namespace})

    async def _disconnect(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (bounded by timeout_s), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._disconnect()
