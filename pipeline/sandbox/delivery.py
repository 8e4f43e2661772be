"""Background completion of accepted tasks: render, bill, refund, deliver."""

from __future__ import annotations

import functools
import logging

import aiohttp
import anyio
import anyio.to_thread
from yarl import URL

from pipeline.sandbox.answers import failure_error
from pipeline.sandbox.images import Images, render_slot
from pipeline.sandbox.runtime import JsonObject
from pipeline.sandbox.state import SandboxTask

log = logging.getLogger(__name__)


class Delivery(Images):
    """Background completion: every accepted task's images finish, are billed and
    delivered (webhook, uploadEndpoint) at their ready time, polled or not."""

    def _start_completion(self, tasks: list[SandboxTask]) -> None:
        """Background jobs that finish, bill and deliver the tasks of one request:
        one for all those with nothing to deliver (a job per task woke hundreds at
        once when a cohort finished, just as the client's polls and next submit
        arrived), one per task with a webhook or an upload endpoint."""
        if self.jobs is None or not tasks:
            return
        quiet: list[SandboxTask] = []
        for task in tasks:
            if _delivers(task):
                self.jobs.send_nowait(functools.partial(self._complete, task))
            else:
                quiet.append(task)
        if quiet:
            self.jobs.send_nowait(functools.partial(self._complete_quietly, quiet))

    async def _complete_quietly(self, tasks: list[SandboxTask]) -> None:
        """Render ahead, then publish and bill each image at its ready time (and
        refund each failed task at its done time).

        The request's images render in one worker-thread hop, not a hop and a task
        per image, and halfway to their ready time, not at once: a submit comes
        just when a cohort finished and the client's polls and next submit arrive,
        and a render thread holds the GIL against the loop (at L = 5 s, a hop per
        image or 4 threads: 17-21 ms before the next submit was accepted, 12-15 ms
        with one hop at once, 5 with one hop midway; poll lag 18-20 -> 14-16 ms). A
        full-size render takes ~23 ms, so a 50-task submit takes ~1.2 s; a poll
        renders any image whose turn has not come (the same bytes: rendering is
        deterministic).
        """
        todo = sorted(
            ((task, slot) for task in tasks for slot in task.images),
            key=lambda pair: pair[1].ready_at,
        )
        if todo:  # render midway: the moment of a submit is a busy one
            now = self.clock()
            await self._sleep_until(now + (todo[0][1].ready_at - now) / 2)

        def render_each() -> list[bytes | ValueError]:
            out: list[bytes | ValueError] = []
            for task, slot in todo:
                try:
                    out.append(render_slot(task, slot))
                except ValueError as exc:
                    out.append(exc)
            return out

        rendered = await anyio.to_thread.run_sync(render_each)
        for (task, slot), result in zip(todo, rendered, strict=True):
            if isinstance(result, ValueError):
                self._render_failed(task, result)
            elif slot.rendered is None:
                slot.rendered = result
        for task, slot in todo:
            await self._sleep_until(slot.ready_at)
            await self._ensure_image(task, slot)
            if task.failed and slot.ready_at >= task.done_at:
                self.state.refund(task)  # the failure is out now

    async def _prerender_all(self, task: SandboxTask) -> None:
        for slot in task.images:
            async with task.lock:
                await self._prerender(task, slot)

    async def _complete(self, task: SandboxTask) -> None:
        """Background job: finish, bill and deliver (webhook, upload endpoint) each
        image as it becomes ready; refund a failed task when its failure is out."""
        req = task.request
        await self._prerender_all(task)
        for slot in task.images:
            await self._sleep_until(slot.ready_at)
            item = await self._success_item(task, slot)
            if item is None:
                break
            if req.webhook_url is not None:
                await self._send("POST", req.webhook_url, json_body={"data": [item]})
            if req.upload_endpoint is not None and slot.data is not None:
                await self._send("PUT", req.upload_endpoint, data=slot.data)
        if not task.failed:
            return
        await self._sleep_until(task.done_at)
        self.state.refund(task)  # the failure is out now
        if req.webhook_url is not None:
            await self._send(
                "POST", req.webhook_url, json_body={"errors": [failure_error(task)]}
            )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        json_body: JsonObject | None = None,
        data: bytes | None = None,
    ) -> None:
        if self.session is None:
            return
        host = URL(url).host  # never log the full URL: presigned ones carry credentials
        try:
            async with self.session.request(
                method, url, json=json_body, data=data
            ) as resp:
                await resp.read()
                if resp.status >= 300:
                    log.warning("%s to %s answered %d", method, host, resp.status)
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s to %s failed: %s", method, host, exc)
            return
        if method == "POST":
            self.state.webhooks_sent += 1
        else:
            self.state.upload_endpoint_puts += 1


def _delivers(task: SandboxTask) -> bool:
    """Whether finished images go somewhere besides polls (a webhook, an upload)."""
    req = task.request
    return req.webhook_url is not None or req.upload_endpoint is not None
