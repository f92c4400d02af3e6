"""agent.asyncio_bridge: results and exceptions come back to trio, cancellation reaches asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from agent.asyncio_bridge import open_asyncio_loop


async def test_results_and_exceptions_come_back_and_the_work_runs_on_the_loop_thread() -> None:
    async def where(x: int) -> tuple[int, str]:
        await asyncio.sleep(0)
        return x * 2, threading.current_thread().name

    async def boom() -> None:
        raise KeyError("nope")

    async with open_asyncio_loop("t1") as aio:
        assert await aio.run(where, 21) == (42, "asyncio-t1")
        with pytest.raises(KeyError, match="nope"):
            await aio.run(boom)
        assert await aio.run_sync(lambda: threading.current_thread().name) == "asyncio-t1"


async def test_cancelling_the_trio_caller_cancels_the_asyncio_task_and_waits_for_it() -> None:
    unwound = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            unwound.set()

    async with open_asyncio_loop("t2") as aio:
        with trio.move_on_after(0.2):
            await aio.run(forever)
        # The cancelled call returned only once the asyncio side had finished its cleanup.
        assert unwound.is_set()


async def test_leaving_the_block_stops_the_thread() -> None:
    async with open_asyncio_loop("t3") as aio:
        thread = aio._thread
        aio.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(asyncio.sleep(3600)))
    assert not thread.is_alive()
    assert aio.loop.is_closed()


async def test_to_trio_runs_a_callback_on_the_trio_thread() -> None:
    seen = trio.Event()
    names: list[str] = []

    def record() -> None:
        names.append(threading.current_thread().name)
        seen.set()

    async with open_asyncio_loop("t4") as aio:
        await aio.run_sync(aio.to_trio, record)
        await seen.wait()
    assert names == [threading.current_thread().name]
