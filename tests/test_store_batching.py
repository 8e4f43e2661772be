"""The collector's batches (collector.gather_batch).

Each batch of images costs two worker-thread hops whatever its size, so images that
trickle in are gathered for a short window while downloads are still out; once none
is, what has arrived is written at once. Real memory streams and the real event loop.
"""

from __future__ import annotations

import anyio
import pytest

from pipeline.collector import gather_batch

WINDOW_S = 0.2
"""Long against the few ms the senders below wait, short for a test."""


async def test_items_arriving_within_the_window_join_one_batch() -> None:
    send, receive = anyio.create_memory_object_stream[int](16)

    async def trickle() -> None:
        for item in (2, 3, 4):
            await anyio.sleep(0.005)
            await send.send(item)

    async with send, receive, anyio.create_task_group() as tg:
        tg.start_soon(trickle)
        batch = await gather_batch(
            1, receive, more_coming=lambda: True, window_s=WINDOW_S, most=4
        )
    assert batch == [1, 2, 3, 4]


async def test_nothing_more_coming_means_no_wait() -> None:
    send, receive = anyio.create_memory_object_stream[int](16)
    async with send, receive:
        send.send_nowait(2)
        with anyio.fail_after(60):  # a wait would be the hour-long window
            batch = await gather_batch(
                1, receive, more_coming=lambda: False, window_s=3600.0
            )
    assert batch == [1, 2]  # what was queued still goes along


async def test_the_window_bounds_the_wait() -> None:
    send, receive = anyio.create_memory_object_stream[int](16)
    async with send, receive:
        started = anyio.current_time()
        batch = await gather_batch(1, receive, more_coming=lambda: True, window_s=0.05)
        waited = anyio.current_time() - started
        send.send_nowait(2)  # too late for this batch: it stays queued for the next
        assert receive.receive_nowait() == 2
    assert batch == [1]
    assert 0.04 <= waited < 1.0


async def test_a_closed_stream_ends_the_batch() -> None:
    send, receive = anyio.create_memory_object_stream[int](16)
    async with receive:
        send.send_nowait(2)
        send.close()
        with anyio.fail_after(1):
            batch = await gather_batch(
                1, receive, more_coming=lambda: True, window_s=10.0
            )
    assert batch == [1, 2]


@pytest.mark.parametrize("queued", [3, 10])
async def test_a_batch_holds_at_most_most_items(queued: int) -> None:
    send, receive = anyio.create_memory_object_stream[int](16)
    async with send, receive:
        for item in range(2, 2 + queued):
            send.send_nowait(item)
        batch = await gather_batch(
            1, receive, more_coming=lambda: True, window_s=WINDOW_S, most=4
        )
    assert batch == [1, 2, 3, 4]
