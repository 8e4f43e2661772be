"""Downloads give way to submits and polls (flow.UrgentRequests).

A submit or poll keeps concurrency slots idle until its answer; a download delayed a
few ms costs nothing. These tests pin the gate's contract with real event-loop
scheduling, no sockets: a waiter goes on once no urgent request is out, never
earlier, and never waits past its bound.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from pipeline.flow import UrgentRequests


async def _spin(turns: int = 20) -> None:
    """Let every ready task run a few times."""
    for _ in range(turns):
        await anyio.lowlevel.checkpoint()


async def test_nothing_out_means_no_wait() -> None:
    urgent = UrgentRequests()
    with anyio.fail_after(1):
        await urgent.wait_none_out(at_most_s=3600)


async def test_a_download_waits_until_the_last_urgent_request_is_answered() -> None:
    urgent = UrgentRequests()
    went: list[str] = []

    async def download() -> None:
        await urgent.wait_none_out(at_most_s=3600)
        went.append("download")

    first, second = urgent.out(), urgent.out()
    first.__enter__()
    second.__enter__()
    async with anyio.create_task_group() as tg:
        tg.start_soon(download)
        await _spin()
        assert went == []
        first.__exit__(None, None, None)
        await _spin()
        assert went == [], "one urgent request is still out"
        second.__exit__(None, None, None)
        await _spin()
        assert went == ["download"]
    assert urgent.count == 0


async def test_an_urgent_request_that_fails_still_lets_downloads_go() -> None:
    urgent = UrgentRequests()
    with pytest.raises(RuntimeError), urgent.out():
        raise RuntimeError("the submit failed")
    assert urgent.count == 0
    with anyio.fail_after(1):
        await urgent.wait_none_out(at_most_s=3600)


async def test_the_wait_is_bounded_when_urgent_requests_never_stop() -> None:
    urgent = UrgentRequests()
    with urgent.out():
        started = anyio.current_time()
        with anyio.fail_after(5):
            await urgent.wait_none_out(at_most_s=0.05)
        assert anyio.current_time() - started >= 0.05
        assert urgent.count == 1


async def test_the_bound_releases_every_waiter_not_only_the_first() -> None:
    """One waiter times the bound for all: when it is up, all of them go."""
    urgent = UrgentRequests()
    went: list[int] = []

    async def download(n: int) -> None:
        await urgent.wait_none_out(at_most_s=0.05)
        went.append(n)

    with urgent.out():
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for n in range(5):
                    tg.start_soon(download, n)
        assert sorted(went) == [0, 1, 2, 3, 4]
        assert urgent.count == 1
    # and the next wait is timed afresh
    with urgent.out(), anyio.fail_after(5):
        await urgent.wait_none_out(at_most_s=0.05)
