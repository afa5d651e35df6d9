"""Subscription: the latest value of something that changes (a download's progress), for readers
in other threads and in asyncio.

Theory of operation
-------------------
The owner (an I/O thread) `publish`es snapshots; a reader iterates. Only the newest unread
snapshot is kept: a slow reader skips snapshots but never falls behind, and the owner never
blocks or grows a queue, whatever the reader does. `close(final)` publishes a last snapshot and
ends the iteration after it. Iterate with `for snap in sub:` (blocking), `sub.get(timeout)`, or
`async for snap in sub:` inside a running event loop (Jupyter): the async side waits on a
`concurrent.futures.Future` bridged with `asyncio.wrap_future`, so no thread blocks an event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The subscription ended and its last value was read."""


class Subscription(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None
        self._fresh = False
        self._closed = False
        self._waiters: list[Future[None]] = []
        self.last: T | None = None  # the newest value published, read or not

    # ---- owner side

    def publish(self, value: T) -> None:
        with self._lock:
            if self._closed:
                return
            self._value, self._fresh, self.last = value, True, value
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self, final: T | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            if final is not None:
                self._value, self._fresh, self.last = final, True, final
            self._closed = True
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- reader side

    def _take(self) -> tuple[bool, T | None, Future[None] | None]:
        """(got a value, the value, a future to wait on when there is none yet)."""
        with self._lock:
            if self._fresh:
                self._fresh = False
                return True, self._value, None
            if self._closed:
                raise Closed
            waiter: Future[None] = Future()
            self._waiters.append(waiter)
            return False, None, waiter

    def get(self, timeout: float | None = None) -> T:
        """The next unread value; raises Closed after the last one, TimeoutError after `timeout`."""
        got, value, waiter = self._take()
        if got:
            return value  # type: ignore[return-value]
        assert waiter is not None
        waiter.result(timeout)
        got, value, _ = self._take()
        if got:
            return value  # type: ignore[return-value]
        raise TimeoutError

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                yield self.get()
            except Closed:
                return

    async def __aiter__(self) -> AsyncIterator[T]:
        while True:
            try:
                got, value, waiter = self._take()
            except Closed:
                return
            if got:
                yield value  # type: ignore[misc]
                continue
            assert waiter is not None
            await asyncio.wrap_future(waiter)
