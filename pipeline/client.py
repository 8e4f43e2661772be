"""The Runware HTTP client: POSTs task arrays, downloads results, maps failures to ours.

One ``aiohttp.ClientSession`` per run. Every API call is one POST of a JSON array to
``settings.api.base_url``. Answers are classified by HTTP status first, then by error
code (runware-protocol.md §2). This is the only module that catches
``aiohttp.ClientError`` or ``pydantic.ValidationError``; it holds no concurrency
policy (that is the ``Pacer``'s and the engine's) and writes nothing to disk.

Submits are never retried here: a submit whose fate is unknown reports its tasks as
*ambiguous*, and the engine settles them (``settle``: poll first, then the same
taskUUID again). What each answer means is ``answers``' to say. Polls, uploads and
downloads are safe to retry and go through ``call_with_retry``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aiohttp
import anyio
import pydantic

from pipeline.answers import (
    AUTH_CODES,
    PollOutcome,
    SubmitOutcome,
    describe,
    is_credit_refusal,
    read_poll,
    read_single_refusal,
    read_submit,
)
from pipeline.config import Settings
from pipeline.errors import (
    ApiError,
    AuthError,
    DownloadError,
    InsufficientCreditError,
    PipelineError,
    ProtocolError,
    RateLimitedError,
    RequestRejectedError,
    RequestTimeoutError,
    ServerError,
    TransportError,
    UnreachableError,
    UnusableImageError,
)
from pipeline.limits import Pacer
from pipeline.retry import call_with_retry, retry_after_s
from pipeline.unreachable import NAME_UNRESOLVED, connection_cause, host_of
from pipeline.wire import (
    AuthenticationRequest,
    Envelope,
    ImageInferenceRequest,
    ImageResult,
    ImageUploadRequest,
    UploadResult,
)

__all__ = [
    "PollOutcome",
    "RunwareClient",
    "SubmitOutcome",
    "UnusableImageError",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

KEY_HINT: Final = (
    "set RUNWARE_API_KEY (or RUNWARE_API_KEY_FILE, a file holding it) to a valid "
    "Runware API key "
    "(create one at https://my.runware.ai/keys), or run with --sandbox"
)
CREDIT_HINT: Final = "top up the account, then rerun the same command to resume"

TRANSIENT_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
CONGESTION_STATUSES: Final = frozenset({429, 503, 504})
_CHUNK_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Reply:
    """One HTTP answer, before classification."""

    status: int
    body: bytes
    retry_after_s: float | None


class RunwareClient:
    """Speaks Runware's REST protocol for one run.

    Use as ``async with RunwareClient(settings) as client:``; the session opens and
    closes with the block. The key is read from ``settings.api_key`` at each request
    and appears in no repr, log line or error message.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pacer: Pacer | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._settings = settings
        self._pacer = pacer
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._url = settings.api.base_url
        api = settings.api
        self._api_timeout = aiohttp.ClientTimeout(
            total=api.request_timeout_s, sock_connect=api.connect_timeout_s
        )
        self._download_timeout = aiohttp.ClientTimeout(
            total=api.download_timeout_s, sock_connect=api.connect_timeout_s
        )
        self.requests_sent = 0
        """API POSTs sent (for requests-per-image figures)."""
        self.retries = 0
        """Retried polls, uploads and downloads."""
        self._answered = False
        """Whether the API has answered once: a name that resolved before and fails
        now is a blip worth retrying; one that never resolved is no network."""

    def __repr__(self) -> str:
        auth = "body" if self._settings.api.auth_in_body else "header"
        state = "open" if self._session is not None else "closed"
        return f"RunwareClient(base_url={self._url!r}, auth={auth}, {state})"

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(raise_for_status=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True):
                await session.close()

    # ------------------------------------------------------------------ public API

    async def submit(self, tasks: Sequence[ImageInferenceRequest]) -> SubmitOutcome:
        """Send many imageInference tasks in ONE request; never retried here.

        Raises:
            AuthError: the key was refused. Credit refusals (402 or a credit code) are
                in the outcome beside any acks, so accepted tasks are still collected.
        """
        return await self.submit_wire([task.wire for task in tasks])

    async def submit_wire(self, wires: Sequence[dict[str, Any]]) -> SubmitOutcome:
        """``submit`` for tasks already in their JSON form (a same-UUID resend)."""
        uuids = [str(wire["taskUUID"]) for wire in wires]
        if not uuids:
            return SubmitOutcome()
        started = time.monotonic()
        try:
            reply = await self._post(list(wires))
            envelope, request_level = self._checked(reply, set(uuids), submit=True)
        except AuthError:
            raise
        except ApiError as exc:
            # The request may have reached the server: its tasks may be running and
            # billed. Only settling can tell (protocol §7 b).
            log.debug(
                "submit %d tasks: outcome unknown (%s); all ambiguous", len(uuids), exc
            )
            return SubmitOutcome(ambiguous=uuids)
        outcome = read_submit(
            envelope, uuids, request_level=request_level, status=reply.status
        )
        log.debug(
            "submit %d tasks: HTTP %d, accepted %d (+%d earlier), results %d, "
            "failed %d, credit refused %d, ambiguous %d in %.3fs",
            len(uuids),
            reply.status,
            len(outcome.accepted),
            len(outcome.already_accepted),
            len(outcome.results),
            len(outcome.failed),
            len(outcome.credit_refused),
            len(outcome.ambiguous),
            time.monotonic() - started,
        )
        return outcome

    async def poll(self, task_uuids: Sequence[str]) -> PollOutcome:
        """Ask for every task's state in ONE getResponse request (the caller chunks).

        Retried on retryable errors. A request-level 4xx for several tasks is
        reported as ``batch_refused`` (batched getResponse is undocumented: the
        caller decides how to ask again).

        Raises:
            AuthError, InsufficientCreditError: run-fatal answers.
            ApiError: a retryable error that outlasted the retry budget.
        """
        uuids = list(dict.fromkeys(task_uuids))
        if not uuids:
            return PollOutcome()
        outcome, _ = await self._retrying(lambda: self._poll_once(uuids))
        return outcome

    async def poll_answer(
        self, task_uuids: Sequence[str]
    ) -> tuple[PollOutcome, Envelope]:
        """``poll``, with the parsed answer beside its reading (for ``remix doctor``,
        which records the very code an API gives an unknown taskUUID). The envelope
        is scrubbed of the key like every answer; it is empty when nothing was asked.
        """
        uuids = list(dict.fromkeys(task_uuids))
        if not uuids:
            return PollOutcome(), Envelope()
        return await self._retrying(lambda: self._poll_once(uuids))

    async def upload_image(self, image: str) -> str:
        """Upload a reference (data URI, base64 or URL) and return its imageUUID.

        Each attempt uses a fresh taskUUID; uploads are free, so a duplicate after a
        lost answer costs nothing.
        """
        return await self._retrying(lambda: self._upload_once(image))

    async def fetch_image(self, result: ImageResult) -> bytes:
        """The bytes of a result image: downloaded from its URL, or decoded.

        Raises:
            UnusableImageError: larger than ``api.max_download_bytes`` or undecodable.
            DownloadError: the download failed after retries.
        """
        try:
            kind, value = result.payload
        except ValueError as exc:
            raise UnusableImageError(str(exc), task_id=result.task_uuid) from exc
        if kind == "url":
            return await self._retrying(lambda: self._download_once(value, result))
        if kind == "data_uri":
            _, sep, value = value.partition(";base64,")
            if not sep:
                raise UnusableImageError(
                    f"result {result.image_uuid}: data URI is not base64",
                    task_id=result.task_uuid,
                )
        return self._decode_base64(value, result)

    # ------------------------------------------------------------------ attempts

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retry(
            fn, self._settings.retry, sleep=self._sleep, on_retry=self._on_retry
        )

    def _on_retry(self, exc: PipelineError, attempt: int, wait_s: float) -> None:
        self.retries += 1
        log.debug("attempt %d failed: %s; retrying in %.2fs", attempt, exc, wait_s)

    async def _poll_once(self, uuids: list[str]) -> tuple[PollOutcome, Envelope]:
        # The shape of wire.GetResponseRequest, built directly: the UUIDs are the
        # engine's own (uuid4 or journaled), and a model per UUID per question is
        # CPU on every poll (bench/README.md).
        tasks = [{"taskType": "getResponse", "taskUUID": u} for u in uuids]
        reply = await self._post(tasks)
        envelope, request_level = self._checked(reply, set(uuids))
        if not request_level:
            return read_poll(envelope, uuids), envelope
        if len(uuids) > 1:
            log.debug(
                "getResponse for %d tasks refused with HTTP %d: %s",
                len(uuids),
                reply.status,
                self._scrub(describe(envelope.errors)),
            )
            return PollOutcome(unanswered=set(uuids), batch_refused=True), envelope
        return read_single_refusal(envelope, uuids[0]), envelope

    async def _upload_once(self, image: str) -> str:
        task_uuid = uuid.uuid4()
        request = ImageUploadRequest(task_uuid=task_uuid, image=image)
        reply = await self._post([request.model_dump(mode="json")])
        wanted = str(task_uuid)
        envelope, request_level = self._checked(reply, {wanted})
        for err in envelope.errors:
            if request_level or err.task_uuid == wanted:
                where = (
                    f" (parameter {', '.join(err.parameters)})"
                    if err.parameters
                    else ""
                )
                raise RequestRejectedError(
                    f"imageUpload rejected: {self._scrub(describe([err]))}{where}; "
                    "check that the reference is a PNG, JPG or WEBP image",
                    url=self._url,
                    status=reply.status,
                    task_id=wanted,
                    code=err.code,
                )
        for item in envelope.data:
            if isinstance(item, UploadResult) and item.task_uuid == wanted:
                return item.image_uuid
        raise ProtocolError(
            f"imageUpload answer (HTTP {reply.status}) has no imageUUID for its task",
            url=self._url,
            status=reply.status,
            task_id=wanted,
        )

    async def _download_once(self, url: str, result: ImageResult) -> bytes:
        session = self._require_session()
        api = self._settings.api
        timeout = self._download_timeout
        cap = api.max_download_bytes
        try:
            # No Authorization header: result URLs need none, and the key must never
            # travel to a host other than the API.
            async with session.get(url, timeout=timeout) as resp:
                if not 200 <= resp.status < 300:
                    raise DownloadError(
                        f"download of result {result.image_uuid} answered HTTP "
                        f"{resp.status}",
                        url=url,
                        status=resp.status,
                        task_id=result.task_uuid,
                    )
                if resp.content_length is not None:
                    if resp.content_length > cap:
                        raise self._too_large(result, url, resp.content_length)
                    return await resp.read()  # exactly content_length bytes
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
                    size += len(chunk)
                    if size > cap:
                        raise self._too_large(result, url, size)
                    chunks.append(chunk)
        except TimeoutError as exc:
            raise DownloadError(
                f"download of result {result.image_uuid} timed out after "
                f"{api.download_timeout_s}s",
                url=url,
                task_id=result.task_uuid,
            ) from exc
        except aiohttp.ClientError as exc:
            raise DownloadError(
                f"download of result {result.image_uuid} from {host_of(url)} "
                f"failed: {connection_cause(exc)}",
                url=url,
                task_id=result.task_uuid,
            ) from exc
        return b"".join(chunks)

    def _too_large(
        self, result: ImageResult, url: str, size: int
    ) -> UnusableImageError:
        cap = self._settings.api.max_download_bytes
        return UnusableImageError(
            f"result {result.image_uuid} is larger than api.max_download_bytes "
            f"({size} > {cap} bytes); raise the limit if this image is expected",
            url=url,
            task_id=result.task_uuid,
        )

    def _decode_base64(self, value: str, result: ImageResult) -> bytes:
        cap = self._settings.api.max_download_bytes
        text = "".join(value.split())
        if len(text) // 4 * 3 > cap + 2:
            raise self._too_large(result, "inline data", len(text) // 4 * 3)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise UnusableImageError(
                f"result {result.image_uuid} carries invalid base64 data",
                task_id=result.task_uuid,
            ) from exc
        if len(data) > cap:
            raise self._too_large(result, "inline data", len(data))
        return data

    # ------------------------------------------------------------------ HTTP core

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use RunwareClient inside 'async with'")
        return self._session

    def _scrub(self, text: str) -> str:
        """Remove the key from server-supplied text before it enters a message."""
        key = self._settings.api_key
        secret = key.get_secret_value() if key is not None else ""
        return text.replace(secret, "***") if secret else text

    async def _post(self, tasks: list[dict[str, Any]]) -> _Reply:
        """POST one task array; transport failures become TransportError."""
        session = self._require_session()
        key = self._settings.api_key
        if key is None or not key.get_secret_value():
            raise AuthError(f"no API key configured: {KEY_HINT}", url=self._url)
        api = self._settings.api
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api.auth_in_body:
            auth = AuthenticationRequest(api_key=key.get_secret_value())
            tasks = [auth.model_dump(mode="json"), *tasks]
        else:
            headers["Authorization"] = f"Bearer {key.get_secret_value()}"
        body = json.dumps(tasks, separators=(",", ":")).encode()
        timeout = self._api_timeout
        if self._pacer is not None:
            await self._pacer.before_request()
        self.requests_sent += 1
        try:
            async with session.post(
                self._url, data=body, headers=headers, timeout=timeout
            ) as resp:
                reply = _Reply(
                    status=resp.status,
                    body=await resp.read(),
                    retry_after_s=retry_after_s(resp.headers.get("Retry-After")),
                )
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"POST {self._url} timed out after {api.request_timeout_s}s; "
                "raise api.request_timeout_s if the API is slow",
                url=self._url,
            ) from exc
        except aiohttp.ClientError as exc:
            raise self._transport_error(exc) from exc
        self._answered = True
        if self._pacer is not None:
            if reply.status in CONGESTION_STATUSES:
                self._pacer.congested(reply.retry_after_s)
            elif 200 <= reply.status < 300:
                self._pacer.relieved()
        return reply

    def _transport_error(self, exc: aiohttp.ClientError) -> TransportError:
        """One plain line naming the host and the cause, never the exception's repr."""
        host = host_of(self._url)
        cause = connection_cause(exc)
        if isinstance(exc, aiohttp.ClientConnectorError):
            message = f"cannot reach {host}: {cause}"
            if not self._answered and cause == NAME_UNRESOLVED:
                return UnreachableError(message, url=self._url)
            return TransportError(message, url=self._url)
        return TransportError(f"connection to {host} failed: {cause}", url=self._url)

    def _parse(self, reply: _Reply) -> Envelope:
        """The envelope, with the key scrubbed from everything the server echoed.

        Error messages travel on into the journal, the ledger, the gallery and the
        logs, so a server that quotes the Authorization header must not leak it.
        """
        key = self._settings.api_key
        body = reply.body
        if key is not None and (secret := key.get_secret_value().encode()):
            body = body.replace(secret, b"***")
        try:
            return Envelope.model_validate_json(body)
        except pydantic.ValidationError as exc:
            snippet = self._scrub(reply.body[:120].decode("utf-8", "replace"))
            raise ProtocolError(
                f"HTTP {reply.status} body from {self._url} is not a Runware "
                f"response ({exc.error_count()} problems): {snippet!r}",
                url=self._url,
                status=reply.status,
            ) from exc

    def _checked(
        self, reply: _Reply, wanted: set[str], *, submit: bool = False
    ) -> tuple[Envelope, bool]:
        """Classify an answer by status, then by code (protocol §2).

        Returns the envelope and whether it is a request-level 4xx (its errors name
        none of the ``wanted`` tasks). Raises the run-fatal and retryable errors;
        for a ``submit``, credit refusals are left to ``read_submit`` (acks beside
        them count).
        """
        status = reply.status
        if submit and status == 402:
            return self._parse_lenient(reply), True
        if status in (401, 403) or status == 402 or status in TRANSIENT_STATUSES:
            envelope = self._parse_lenient(reply)
            self._raise_for_status(reply, envelope)
        envelope = self._parse(reply)
        self._raise_for_codes(reply, envelope, credit=not submit)
        if 200 <= status < 300:
            return envelope, False
        if 400 <= status < 500:
            named = any(err.task_uuid in wanted for err in envelope.errors)
            return envelope, not named
        raise ProtocolError(
            f"unexpected HTTP {status} from {self._url}: "
            f"{self._scrub(describe(envelope.errors))}",
            url=self._url,
            status=status,
        )

    def _parse_lenient(self, reply: _Reply) -> Envelope:
        """The envelope if the error body is one (for its codes), else an empty one."""
        try:
            return self._parse(reply)
        except ProtocolError:
            return Envelope()

    def _raise_for_status(self, reply: _Reply, envelope: Envelope) -> None:
        status = reply.status
        detail = self._scrub(describe(envelope.errors))
        code = envelope.errors[0].code if envelope.errors else None
        if status in (401, 403):
            raise AuthError(
                f"the API refused the key (HTTP {status}, {detail}): {KEY_HINT}",
                url=self._url,
                status=status,
                code=code,
            )
        if status == 402 or any(is_credit_refusal(e) for e in envelope.errors):
            raise self._credit_error(status, detail, code)
        if status == 429:
            raise RateLimitedError(
                f"the API is over capacity (HTTP 429, {detail}); backing off",
                retry_after_s=reply.retry_after_s,
                url=self._url,
                status=status,
                code=code,
            )
        raise ServerError(
            f"the API answered HTTP {status} ({detail}); this is transient",
            retry_after_s=reply.retry_after_s,
            url=self._url,
            status=status,
            code=code,
        )

    def _raise_for_codes(
        self, reply: _Reply, envelope: Envelope, *, credit: bool = True
    ) -> None:
        """Run-fatal codes under any status (e.g. an auth code in a 400)."""
        for err in envelope.errors:
            if err.code in AUTH_CODES:
                raise AuthError(
                    f"the API refused the key ({self._scrub(describe([err]))}): "
                    f"{KEY_HINT}",
                    url=self._url,
                    status=reply.status,
                    code=err.code,
                )
            if credit and is_credit_refusal(err):
                raise self._credit_error(
                    reply.status, self._scrub(describe([err])), err.code
                )

    def _credit_error(
        self, status: int, detail: str, code: str | None
    ) -> InsufficientCreditError:
        return InsufficientCreditError(
            f"the account has insufficient credit (HTTP {status}, {detail}): "
            f"{CREDIT_HINT}",
            url=self._url,
            status=status,
            code=code,
        )
