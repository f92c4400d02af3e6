"""Running asyncio client libraries (nats-py, aio-pika) from the agent's trio code.

The agent runs on trio; some well-kept clients only exist for asyncio. Rather than each plugin
inventing its own bridge, the core offers one: `open_asyncio_loop()` starts a private asyncio event
loop in a worker thread for as long as the `async with` block lasts, and the `AsyncioLoop` it yields
runs coroutines there and hands their results back to trio:

    from agent.asyncio_bridge import open_asyncio_loop

    async with open_asyncio_loop("nats-in") as aio:
        nc = await aio.run(nats.connect, "nats://127.0.0.1:4222")
        msgs = await aio.run(sub.fetch, 100, timeout=1.0)
        await aio.run(nc.close)

Why a thread rather than trio-asyncio: trio-asyncio replaces the asyncio loop policy for the whole
process and follows trio's releases with a lag; a loop in a thread needs nothing beyond the standard
library, isolates each plugin's client (one loop per `open_asyncio_loop`), and costs one thread hop per
call, which is small next to a network round trip. Libraries with a blocking API (psycopg) do not need
this at all: `trio.to_thread.run_sync` is enough for them.

Rules that keep it correct:
- Every object of the asyncio library (connections, subscriptions, messages) is used only through
  `run` (or `run_sync`), so that it is only ever touched on the loop's thread.
- Cancelling the trio caller cancels the asyncio task and waits (briefly) for it to finish, so no
  asyncio work outlives the trio code that asked for it. A callback that the asyncio library calls
  (an error handler, a message handler) may post to trio with `AsyncioLoop.to_trio`.
- Leaving the `async with` block cancels what still runs on the loop, closes it and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a cancelled trio caller waits for the asyncio task to wind down.
CANCEL_WAIT = 5.0


class AsyncioLoop:
    """An asyncio event loop running in its own thread; made by `open_asyncio_loop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=f"asyncio-{name}", daemon=True)
        self._trio_token = trio.lowlevel.current_trio_token()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Runs `await fn(*args, **kwargs)` on the asyncio loop and returns its result (or raises its
        exception) in trio. Cancelling the caller cancels the asyncio task."""

        task: list[asyncio.Task[Any] | None] = [None]

        async def call() -> T:
            task[0] = asyncio.current_task()
            return await fn(*args, **kwargs)

        future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        return await self._wait(future, task)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Calls the plain function `fn(*args)` on the loop's thread (for library calls that must
        happen there but do not await: a synchronous getter, scheduling a callback)."""

        async def call() -> T:
            return fn(*args)

        return await self.run(call)

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the asyncio thread: schedules `fn(*args)` on the trio loop (no waiting). Does nothing
        if trio is gone already."""
        try:
            self._trio_token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    async def _wait(self, future: concurrent.futures.Future[T], task: list[asyncio.Task[Any] | None]) -> T:
        done = trio.Event()
        token = self._trio_token

        def wake(_: concurrent.futures.Future[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            # Cancel the asyncio task itself (cancelling the concurrent future would report "done" at
            # once, before the task had unwound); before it started, the future's cancel stops it.
            running = task[0]
            if running is None or not self.loop.is_running():
                future.cancel()
            else:
                self.loop.call_soon_threadsafe(running.cancel)
            # Let the asyncio task see its cancellation and finish (close what it opened) before the
            # trio side moves on; shielded, and bounded so a stuck library cannot hold shutdown.
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_WAIT):
                await done.wait()
            raise
        return future.result()


@contextlib.asynccontextmanager
async def open_asyncio_loop(name: str) -> AsyncIterator[AsyncioLoop]:
    """Starts an asyncio loop in a worker thread named `asyncio-NAME`, yields it, and stops it on exit
    (cancelling whatever still runs there, then joining the thread)."""
    bridge = AsyncioLoop(name)
    bridge._thread.start()
    try:
        yield bridge
    finally:
        bridge.loop.call_soon_threadsafe(bridge.loop.stop)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(bridge._thread.join, CANCEL_WAIT)
        if bridge._thread.is_alive():
            log.warning("asyncio loop %s did not stop within %.0fs", name, CANCEL_WAIT)


__all__ = ["AsyncioLoop", "open_asyncio_loop"]
