"""The agent's gRPC server: grpc.aio on an event loop of its own thread, serving AgentService,
whose methods stay plain blocking functions run in a pool of threads (as grpcio's synchronous
server runs them). Why aio: the synchronous server polls its completion queue every 200 ms
to look for signals, which woke an idle guest five times a second (bench/wakeups); aio's
loop and poller sleep until something happens.

A method sees its call through BlockingContext: abort() raises (the loop then aborts the
call), add_callback()/is_active() follow the call's end, time_remaining() its deadline. A
client-streaming method reads the requests as a blocking iterator. A response stream is
pulled from the method's generator one item at a time in the pool; when the call ends early
(the client went away) the generator is closed once the item in progress returns, which the
call's end brings about (the callbacks: an Events queue gets None, a Stdio stream's flare
fires, a request read ends)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from types import SimpleNamespace
from typing import Any, NoReturn

import grpc

log = logging.getLogger(__name__)
_END = object()


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallEnded(ConnectionAbortedError):
    """A request read after the call ended (the client cancelled, or went away)."""


class BlockingContext:
    """What a method running in the pool sees of its call."""

    def __init__(self, context: Any) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []  # None once the call ended
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        context.add_done_callback(lambda _: self.end())

    def end(self) -> None:
        """The call ended (on the loop): run the callbacks."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception:
                log.exception("a callback of a call's end failed")

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """`callback` runs once the call ends; False (and it never runs) if it has."""
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        with self._lock:
            return self._callbacks is not None

    def time_remaining(self) -> float | None:
        """Seconds to the call's deadline; None without one."""
        if self._deadline is None:
            return None
        return max(0.0, float(self._deadline - time.monotonic()))

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing_metadata = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)


class _BlockingRequests:
    """The call's request stream as a blocking iterator, for a method in the pool (one
    reader at a time); a read pending when the call ends fails with CallEnded."""

    def __init__(self, requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop,
                 context: BlockingContext) -> None:
        self._requests = requests
        self._loop = loop
        self._lock = threading.Lock()
        self._read: concurrent.futures.Future[Any] | None = None
        self._ended = False
        if not context.add_callback(self._end):
            self._ended = True

    def _end(self) -> None:
        with self._lock:
            self._ended = True
            if self._read is not None:
                self._read.cancel()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._ended:
                raise CallEnded("the call ended")
            read = self._read = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
        try:
            request = read.result()
        except concurrent.futures.CancelledError:
            raise CallEnded("the call ended") from None
        finally:
            with self._lock:
                self._read = None
        if request is _END:
            raise StopIteration
        return request

    async def _next(self) -> Any:
        return await anext(self._requests, _END)


async def _abort(context: Any, aborted: _Aborted, blocking: BlockingContext) -> NoReturn:
    await context.abort(aborted.code, aborted.details, blocking.trailing_metadata)
    raise AssertionError("unreachable")  # abort() raises


def _close_when_done(item: concurrent.futures.Future[Any] | None,
                     generator: Generator[Any, None, None],
                     pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Close the generator in the pool once its item in progress (if any) has returned (in
    the calling thread once the pool is shut down: the server is stopping)."""
    def close() -> None:
        with contextlib.suppress(Exception):
            generator.close()

    def close_in_pool(_: object = None) -> None:
        try:
            pool.submit(close)
        except RuntimeError:
            close()

    if item is None:
        close_in_pool()
    else:
        item.add_done_callback(close_in_pool)


def _wrap(method: Callable[..., Any], client_streaming: bool, server_streaming: bool,
          pool: concurrent.futures.ThreadPoolExecutor, inline: bool) -> Callable[..., Any]:
    def request_for(request: Any, blocking: BlockingContext) -> Any:
        if client_streaming:
            return _BlockingRequests(request, asyncio.get_running_loop(), blocking)
        return request

    if not server_streaming:
        async def unary(request: Any, context: Any) -> Any:
            blocking = BlockingContext(context)
            try:
                if inline:
                    return method(request, blocking)
                return await asyncio.get_running_loop().run_in_executor(
                    pool, method, request_for(request, blocking), blocking)
            except _Aborted as exc:
                await _abort(context, exc, blocking)

        return unary

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        blocking = BlockingContext(context)
        generator = None
        item: concurrent.futures.Future[Any] | None = None
        try:
            generator = method(request_for(request, blocking), blocking)
            while True:
                item = pool.submit(next, generator, _END)
                response = await asyncio.wrap_future(item)
                item = None
                if response is _END:
                    return
                yield response
        except _Aborted as exc:
            await _abort(context, exc, blocking)
        finally:
            if generator is not None:
                _close_when_done(item, generator, pool)

    return stream


def async_servicer(servicer: Any, service: Any, pool: concurrent.futures.ThreadPoolExecutor,
                   inline: frozenset[str] = frozenset()) -> SimpleNamespace:
    """`servicer`'s methods of `service` (its descriptor) as grpc.aio handlers. The unary
    methods named in `inline` run on the loop's thread, not in the pool: each must answer at
    once, never waiting on another thread (it would hold every other call meanwhile); it saves
    a hand-over between threads, which under TCG is milliseconds."""
    for name in inline:
        method = service.methods_by_name[name]
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{name} streams: it cannot run on the loop")
    return SimpleNamespace(**{
        m.name: _wrap(getattr(servicer, m.name), m.client_streaming, m.server_streaming, pool,
                      m.name in inline)
        for m in service.methods})


class RpcServer:
    """A grpc.aio server on a loop of its own thread. Referenced for the life of PID 1."""

    def __init__(self, address: str, options: list[tuple[str, Any]],
                 register: Callable[[grpc.aio.Server, concurrent.futures.ThreadPoolExecutor],
                                    None], max_workers: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers,
                                                          thread_name_prefix="rpc")
        self._loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[grpc.aio.Server] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="grpc",
                                        args=(address, options, register, started),
                                        daemon=True)
        self._thread.start()
        self._server = started.result()

    def _run(self, address: str, options: list[tuple[str, Any]],
             register: Callable[[grpc.aio.Server, concurrent.futures.ThreadPoolExecutor],
                                None],
             started: concurrent.futures.Future[grpc.aio.Server]) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> grpc.aio.Server:
            server = grpc.aio.server(options=options)
            register(server, self.pool)
            if server.add_insecure_port(address) == 0:
                raise OSError(f"gRPC server could not listen on {address}")
            await server.start()
            return server

        try:
            started.set_result(self._loop.run_until_complete(start()))
        except BaseException as exc:
            started.set_exception(exc)
            return
        self._loop.run_forever()

    def stop(self, grace: float | None) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self.pool.shutdown(wait=False)
