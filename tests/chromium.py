"""A small driver of headless Chromium over the DevTools protocol, for gallery tests
and ``bench/gallery_page.py``: real key presses, clicks, reloads and downloads, which
a one-shot ``--dump-dom`` cannot do. Speaks CDP over aiohttp's websocket client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

KEYS = {
    "ArrowRight": ("ArrowRight", 39),
    "ArrowLeft": ("ArrowLeft", 37),
    "ArrowDown": ("ArrowDown", 40),
    "ArrowUp": ("ArrowUp", 38),
    "Escape": ("Escape", 27),
    "Enter": ("Enter", 13),
    "s": ("KeyS", 83),
}
"""The keys the gallery answers to: CDP wants their code and virtual key code."""


def chromium() -> str | None:
    """The Chromium binary, when there is one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def headless_args(binary: str, profile: Path) -> list[str]:
    """A one-shot headless run (``--dump-dom``, ``--screenshot``): no network of its
    own, the page's console in the log on stderr, virtual time for its scripts."""
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--enable-logging=stderr",
        "--v=0",
    ]


class CdpError(RuntimeError):
    """Chromium refused a command, or a wait ran out."""


class Tab:
    """One page of a running Chromium: commands answered by id, events ignored."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        wanted = self._next
        await self._ws.send_json({"id": wanted, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), 60)
            if message.get("id") != wanted:
                continue
            if "error" in message:
                raise CdpError(f"{method}: {message['error']}")
            result = message.get("result", {})
            assert isinstance(result, dict)
            return result

    async def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (promises awaited)."""
        answer = await self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in answer:
            raise CdpError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, within: float = 30) -> Any:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(CdpError):
                if value := await self.eval(expression):
                    return value
            await asyncio.sleep(0.05)
        raise CdpError(f"waited {within}s for {expression}")

    async def goto(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded (images included)."""
        await self.send("Page.navigate", url=url)
        await self.wait_for(
            "location.href === " + json.dumps(url) + " && "
            "document.readyState === 'complete'"
        )

    async def reload(self) -> None:
        await self.eval("window.__before_reload = true")
        await self.send("Page.reload", ignoreCache=True)
        await self.wait_for(
            "!window.__before_reload && document.readyState === 'complete'"
        )

    async def key(self, key: str) -> None:
        """Press and release ``key`` (a name of :data:`KEYS`) on the focused element."""
        code, vk = KEYS[key]
        text = {"text": key} if len(key) == 1 else {}
        for kind in ("keyDown", "keyUp"):
            await self.send(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=code,
                windowsVirtualKeyCode=vk,
                **(text if kind == "keyDown" else {}),
            )

    async def click(self, selector: str) -> None:
        """A real mouse click at the middle of the first element ``selector`` finds."""
        rect = await self.eval(
            f"(function () {{ var el = document.querySelector({json.dumps(selector)});"
            " el.scrollIntoView({block: 'center', inline: 'center'});"
            " var r = el.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        x, y = rect
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=x,
                y=y,
                button="left",
                clickCount=1,
            )

    async def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        shot = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


async def _wait_port(profile: Path, process: subprocess.Popen[bytes]) -> int:
    active = profile / "DevToolsActivePort"
    for _ in range(600):
        if active.is_file() and (text := active.read_text().split()):
            return int(text[0])
        if process.poll() is not None:
            raise CdpError(f"chromium exited with {process.returncode}")
        await asyncio.sleep(0.05)
    raise CdpError("chromium did not open its DevTools port")


@contextlib.asynccontextmanager
async def open_tab(
    profile: Path,
    *,
    width: int = 1400,
    height: int = 900,
    downloads: Path | None = None,
) -> AsyncIterator[Tab]:
    """A headless Chromium (its profile in ``profile``, kept between runs so
    localStorage is too) and its page at ``width`` x ``height``; downloads go to
    ``downloads``."""
    process = _launch(profile, width, height, downloads)
    try:
        port = await _wait_port(profile, process)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/json/list") as reply:
                targets = await reply.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.get(f"{base}/json/version") as reply:
                browser_url = (await reply.json())["webSocketDebuggerUrl"]
            async with (
                http.ws_connect(browser_url, max_msg_size=0) as browser_ws,
                http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws,
            ):
                if downloads is not None:
                    await Tab(browser_ws).send(
                        "Browser.setDownloadBehavior",
                        behavior="allow",
                        downloadPath=str(downloads),
                    )
                tab = Tab(ws)
                await tab.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield tab
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _launch(
    profile: Path, width: int, height: int, downloads: Path | None
) -> subprocess.Popen[bytes]:
    if downloads is not None:
        downloads.mkdir(parents=True, exist_ok=True)
    binary = chromium()
    if binary is None:
        raise CdpError("no chromium binary")
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    return subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"HOME": str(profile), "PATH": "/usr/bin:/bin"},
    )
