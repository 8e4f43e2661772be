"""How a host that cannot be reached is named and worded: its host (never user info
from the URL) and the cause in a few plain words, never a repr. Shared by runs
(``client``) and ``remix doctor``."""

from __future__ import annotations

import os
import socket
from typing import Final
from urllib.parse import urlsplit

import aiohttp

NAME_UNRESOLVED: Final = "name does not resolve"


def host_of(url: str) -> str:
    """The host (and port, when given) of a URL: what a person checks when it is
    unreachable, without any user info the URL may carry."""
    parts = urlsplit(url)
    host = parts.hostname or url
    return f"{host}:{parts.port}" if parts.port is not None else host


def connection_cause(exc: BaseException) -> str:
    """Why a connection failed, in a few plain words ("name does not resolve",
    "Connection refused"), from ``exc`` and its causes: never a repr."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror | aiohttp.ClientConnectorDNSError):
            return NAME_UNRESOLVED
        if isinstance(seen, OSError):
            if seen.errno is not None and seen.errno > 0:
                return os.strerror(seen.errno)
            if seen.strerror:
                return str(seen.strerror)
        if seen.__cause__ is None:
            text = str(seen) or type(seen).__name__
            return " ".join(text.split())
        seen = seen.__cause__
    return type(exc).__name__
