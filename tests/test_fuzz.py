"""Fuzzing the two parsers that take untrusted input: manifests and sandbox requests.

The manifest loader must answer any TOML document (valid keys with wrong types, unknown
keys, out-of-range numbers, odd unicode, huge strings) with a `Manifest` and a report
or a `ManifestError`, never another exception. The sandbox must answer any POST body
with a Runware-shaped JSON error or result envelope and a 200/400/401 status, never a
500.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ManifestError
from pipeline.expand import expand
from pipeline.manifest import load_manifest
from pipeline.sandbox import STATE, SandboxConfig, create_app
from pipeline.validation.check import check_manifest, validate_manifest
from pipeline.wire import Envelope
from tests.conftest import SandboxFactory
from tests.jobkit import make_ref

# ---------------------------------------------------------------------------
# Values: some valid, most of them wrong in one way or another

ODD_TEXT = st.text(
    # Any code point UTF-8 can carry (no lone surrogates): controls, RTL, emoji, NUL.
    st.characters(codec="utf-8"),
    max_size=30,
)
HUGE_TEXT = st.builds(
    lambda c, n: c * n, st.sampled_from('x{é🙂\\"'), st.integers(1990, 2010)
)
IDS = st.one_of(
    st.sampled_from(["r0", "v0", "a", "a.b", "../x", "a/b", "", ".", "x" * 65, "é"]),
    ODD_TEXT,
)
SCALARS = st.one_of(
    st.none(),  # dropped by the writer: TOML has no null
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
    HUGE_TEXT,
    st.dates(),
    st.datetimes(),
    st.times(),
)
JUNK: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.one_of(ODD_TEXT, st.sampled_from(["id", "name"])), inner, max_size=4
        )
    ),
    max_leaves=12,
)
PROMPTS = st.one_of(
    st.sampled_from(["a {thing}", "{place}", "{", "}", "{{x}}", "", "plain", "{thing"]),
    ODD_TEXT,
    HUGE_TEXT,
)
IMAGES = st.one_of(
    st.sampled_from(
        [
            "refs/r0.png",
            "refs/missing.png",
            "refs",
            "https://example.com/x.jpg",
            "http://[::1",
            "data:image/png;base64,AAAA",
            "00000000-0000-4000-8000-000000000000",
            "ftp://x/y.png",
            "",
            "/dev/null",
            "~/nope.png",
            "../../../../etc/passwd",
        ]
    ),
    ODD_TEXT,
)


def either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the valid kind of value, sometimes junk."""
    return st.one_of(valid, valid, JUNK)


IDEOGRAM: Mapping[str, st.SearchStrategy[Any]] = {
    "remixStrength": either(st.integers(-5, 110)),
    "styleType": either(st.sampled_from(["AUTO", "DESIGN", "design", "PHOTO"])),
    "magicPrompt": either(st.sampled_from(["AUTO", "ON", "OFF", "YES"])),
    "renderingSpeed": either(st.sampled_from(["TURBO", "DEFAULT", "QUALITY", "X"])),
    "styleReferenceImages": either(st.lists(IMAGES, max_size=6)),
    "colorPalette": either(
        st.fixed_dictionaries(
            {},
            optional={
                "name": either(st.sampled_from(["EMBER", "NEON"])),
                "members": either(
                    st.lists(
                        st.fixed_dictionaries(
                            {"colorHex": either(st.sampled_from(["#FF5733", "F57"]))},
                            optional={"colorWeight": either(st.floats(0, 1.2))},
                        ),
                        max_size=3,
                    )
                ),
            },
        )
    ),
}
PARAMS: Mapping[str, st.SearchStrategy[Any]] = {
    "positivePrompt": either(PROMPTS),
    "negativePrompt": either(PROMPTS),
    "width": either(st.sampled_from([1024, 1344, 768, 1000, 0, -1])),
    "height": either(st.sampled_from([1024, 768, 1344, 1000])),
    "outputType": either(st.sampled_from(["URL", "dataURI", "base64Data", "file"])),
    "outputFormat": either(st.sampled_from(["JPG", "PNG", "WEBP", "GIF"])),
    "outputQuality": either(st.integers(0, 120)),
    "numberResults": either(st.integers(-1, 25)),
    "ttl": either(st.integers(0, 100)),
    "safety": either(
        st.fixed_dictionaries(
            {},
            optional={
                "mode": either(st.sampled_from(["none", "fast", "x"])),
                "checkContent": either(st.booleans()),
            },
        )
    ),
    "webhookURL": either(st.sampled_from(["https://example.com/h", "nope"])),
    "deliveryMethod": st.sampled_from(["sync", "async"]),
    "taskUUID": st.just("x"),
    "model": st.just("ideogram:3@2"),
    "providerSettings": either(
        st.fixed_dictionaries(
            {},
            optional={
                "ideogram": either(st.fixed_dictionaries({}, optional=dict(IDEOGRAM))),
                "openai": JUNK,
            },
        )
    ),
    "remix_strength": JUNK,
    "seed": JUNK,
}
TEMPLATE_VARS = st.dictionaries(
    st.one_of(st.sampled_from(["thing", "place", "bad-name", ""]), ODD_TEXT),
    either(st.one_of(ODD_TEXT, HUGE_TEXT)),
    max_size=3,
)


def params(required: Mapping[str, st.SearchStrategy[Any]] | None = None) -> Any:
    return st.fixed_dictionaries(dict(required or {}), optional=dict(PARAMS))


REFERENCE = either(
    st.fixed_dictionaries(
        {"id": IDS, "image": IMAGES},
        optional={"vars": either(TEMPLATE_VARS), "extra": JUNK},
    )
)
VARIANT = either(
    params({"id": IDS}).flatmap(
        lambda d: st.fixed_dictionaries(
            {k: st.just(v) for k, v in d.items()},
            optional={"only": either(st.lists(IDS, max_size=3))},
        )
    )
)
MATRIX = st.dictionaries(
    st.one_of(
        st.sampled_from(
            [
                "providerSettings.ideogram.remixStrength",
                "providerSettings.ideogram.styleType",
                "providerSettings.ideogram",
                "providerSettings.ideogram.colorPalette.name",
                "providerSettings.ideogram.styleReferenceImages",
                "outputQuality",
                "deliveryMethod",
                "width",
                "a..b",
                "",
            ]
        ),
        ODD_TEXT,
    ),
    either(st.lists(JUNK, max_size=3)),
    max_size=3,
)
LIST_FILE = st.one_of(
    st.sampled_from(
        [
            "id,image,thing\nr9,https://example.com/a.jpg,dog\n",
            "id,image\nr9,refs/r0.png\nr9,refs/r0.png\n",
            "id,image,my var\n",
            '{"id": "r9", "image": "refs/r0.png", "vars": {"thing": "x"}}\n',
            '[1, 2]\n{"id": 5}\n',
            "",
            "\ufeffid,image\n",
            'id,image\n"unterminated,x\n',
        ]
    ),
    st.text(max_size=200),
)
DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "job": either(
            st.fixed_dictionaries(
                {"name": IDS},
                optional={
                    "model": either(st.sampled_from(["ideogram:3@2", "x"])),
                    "budget_usd": either(st.floats(-10, 10)),
                    "budget": JUNK,
                },
            )
        ),
        "defaults": either(params()),
        "references": either(st.lists(REFERENCE, max_size=3)),
        "references_from": either(
            st.fixed_dictionaries(
                {},
                optional={
                    "csv": either(st.sampled_from(["list.csv", "nope.csv", "refs"])),
                    "jsonl": either(st.sampled_from(["list.csv", "nope.jsonl"])),
                },
            )
        ),
        "variants": either(st.lists(VARIANT, max_size=3)),
        "matrix": either(MATRIX),
        "extras": JUNK,
    },
)


# ---------------------------------------------------------------------------
# A TOML writer: everything inline (one line per top-level key)


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str | None:
    """The TOML spelling of value, or None for what TOML cannot say (null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        items = [v for v in (toml_value(x) for x in value) if v is not None]
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        pairs = [
            f"{toml_key(k)} = {v}"
            for k, v in ((k, toml_value(x)) for k, x in value.items())
            if v is not None
        ]
        return "{ " + ", ".join(pairs) + " }"
    raise TypeError(value)


def to_toml(doc: Mapping[str, Any]) -> str:
    lines = []
    for key, value in doc.items():
        text = toml_value(value)
        if text is not None:
            lines.append(f"{toml_key(key)} = {text}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a real reference image; each example writes its files here."""
    root = tmp_path_factory.mktemp("fuzz")
    make_ref(root / "refs" / "r0.png")
    return root


def load_and_validate(path: Path) -> None:
    """What `remix plan` does: only ManifestError may come out, each problem once.

    `check_manifest` (a file) and `validate_manifest` (a loaded model) are two ways in
    to the same checks: on a manifest that loads they agree line for line.
    """
    try:
        manifest, report = check_manifest(path)
    except ManifestError as exc:
        problems = exc.problems
        assert problems
        assert all(line.startswith(f"{path.parent}") for line in problems), problems
        assert len(set(problems)) == len(problems), problems
        try:
            loaded = load_manifest(path)
        except ManifestError:
            return
        again = validate_manifest(loaded, path)
        assert list(again.problems) == problems
        return
    assert report.ok
    assert validate_manifest(manifest, path).ok
    keys = [spec.key for spec in itertools.islice(expand(manifest), 20)]
    assert all(keys)
    assert len(set(keys)) == len(keys)


@settings(max_examples=300, deadline=None)
@given(doc=DOCUMENT, list_file=LIST_FILE)
def test_manifest_loader_never_crashes(
    doc: dict[str, Any], list_file: str, job_dir: Path
) -> None:
    """Any mix of valid and wrong keys and values gives a report or ManifestError."""
    (job_dir / "list.csv").write_text(list_file, encoding="utf-8")
    path = job_dir / "job.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    load_and_validate(path)


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_manifest_loader_survives_arbitrary_bytes(data: bytes, job_dir: Path) -> None:
    """Random bytes or text as a manifest: a ManifestError, never a crash."""
    path = job_dir / "raw.toml"
    path.write_bytes(data)
    load_and_validate(path)


# ---------------------------------------------------------------------------
# Sandbox request parsing

TASK_TYPES = st.one_of(
    st.sampled_from(
        [
            "imageInference",
            "getResponse",
            "imageUpload",
            "authentication",
            "IMAGEINFERENCE",
        ]
    ),
    JUNK,
)
UUIDS = st.one_of(st.uuids(version=4).map(str), st.uuids().map(str), JUNK)
WIRE_KEYS = [
    "taskUUID",
    "model",
    "positivePrompt",
    "negativePrompt",
    "width",
    "height",
    "inputs",
    "outputType",
    "outputFormat",
    "outputQuality",
    "deliveryMethod",
    "safety",
    "ttl",
    "includeCost",
    "numberResults",
    "providerSettings",
    "image",
    "apiKey",
    "task_uuid",
]


def tiny_png_b64() -> str:
    return base64.b64encode(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
        )
    ).decode()


REF_IMAGES = st.one_of(
    st.sampled_from(
        [
            "https://example.com/a.jpg",
            "00000000-0000-4000-8000-000000000000",
            "data:image/png;base64," + tiny_png_b64(),
            "data:image/png;base64,%%%%",
            "QUFBQUFBQUFBQUFBQUFBQUFB",
            "http://",
        ]
    ),
    JUNK,
)


def near_valid_inference() -> st.SearchStrategy[dict[str, Any]]:
    """A valid async imageInference with one parameter replaced by random JSON."""
    base = st.fixed_dictionaries(
        {
            "taskType": st.just("imageInference"),
            "taskUUID": st.uuids(version=4).map(str),
            "model": st.just("ideogram:3@2"),
            "positivePrompt": st.just("a cat"),
            "width": st.just(1024),
            "height": st.just(1024),
            "deliveryMethod": st.just("async"),
            "inputs": st.fixed_dictionaries(
                {"referenceImages": st.lists(REF_IMAGES, min_size=1, max_size=2)}
            ),
        }
    )
    replaced = st.sampled_from(
        [
            "taskUUID",
            "positivePrompt",
            "width",
            "numberResults",
            "outputQuality",
            "outputType",
            "ttl",
            "providerSettings",
            "safety",
            "inputs",
            "includeCost",
        ]
    )

    def mutate(task: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
        return {**task, key: value}

    return st.builds(mutate, base, replaced, JUNK)


TASK = st.one_of(
    st.builds(
        lambda head, rest: {**rest, **head},
        st.fixed_dictionaries({"taskType": TASK_TYPES}, optional={"taskUUID": UUIDS}),
        st.dictionaries(
            st.one_of(st.sampled_from(WIRE_KEYS), ODD_TEXT), JUNK, max_size=5
        ),
    ),
    st.builds(
        lambda u, image: {"taskType": "imageUpload", "taskUUID": u, "image": image},
        st.uuids(version=4).map(str),
        REF_IMAGES,
    ),
    near_valid_inference(),
    st.dictionaries(ODD_TEXT, JUNK, max_size=3),
)


def to_json(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


BODIES = st.one_of(
    st.lists(TASK, min_size=1, max_size=4).map(to_json),
    st.lists(TASK, min_size=0, max_size=3).map(
        lambda ts: to_json([{"taskType": "authentication", "apiKey": "sandbox"}, *ts])
    ),
    JUNK.map(to_json),  # non-arrays, arrays of non-objects, nulls
    st.binary(max_size=200),  # not JSON at all
    st.integers(min_value=10**300, max_value=10**310).map(lambda n: f"[{n}]".encode()),
    st.sampled_from([b"[1e999]", b"[NaN]", b"[-Infinity]", b"[]", b"{}", b""]),
    st.integers(1, 200).map(lambda n: b"[" * n + b"]" * n),  # nested, within limits
)
HEADERS = st.sampled_from(
    [
        {"Authorization": "Bearer sandbox"},
        {"Authorization": "Bearer sandbox"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic c2FuZGJveA=="},
        {},
    ]
)


async def assert_runware_answer(resp: aiohttp.ClientResponse) -> None:
    assert resp.status in (200, 400, 401), (resp.status, await resp.text())
    assert resp.content_type == "application/json"
    raw = await resp.read()
    body = json.loads(raw)
    assert isinstance(body, dict)
    assert set(body) <= {"data", "errors"}
    data = body.get("data", [])
    assert isinstance(data, list)
    assert all(isinstance(item, dict) for item in data)
    if any(item.get("taskType") == "authentication" for item in data):
        # An authentication-only request is answered with a bare acknowledgement,
        # which the client never asks for (it always sends tasks after it).
        assert data == [{"taskType": "authentication"}]
        return
    envelope = Envelope.model_validate_json(raw)
    if resp.status != 200:
        assert envelope.errors
        assert all(err.code and err.message for err in envelope.errors)


@settings(max_examples=150, deadline=None)
@given(body=BODIES, headers=HEADERS)
async def test_sandbox_answers_any_body_with_a_runware_envelope(
    body: bytes, headers: dict[str, str]
) -> None:
    """Random bodies get 200/400/401 and a Runware-shaped JSON body, never a 500."""
    # A fresh server per example: no state leaks from one body into the next.
    server = TestServer(
        create_app(SandboxConfig(seed=0, latency_s=0, render_scale=0.05))
    )
    async with (
        server,
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1"),
            data=body,
            headers={"Content-Type": "application/json", **headers},
        ) as resp,
    ):
        await assert_runware_answer(resp)
    assert server.app[STATE].http_requests == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="array-100k-deep"),
        pytest.param(b'[{"a":' * 5_000 + b"1" + b"}]" * 5_000, id="object-5k-deep"),
    ],
)
async def test_sandbox_answers_deeply_nested_body_with_400(
    body: bytes, make_sandbox: SandboxFactory
) -> None:
    """A body nested past the recursion limit is a 400 invalidRequestBody."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1"),
            data=body,
            headers={"Authorization": "Bearer sandbox"},
        ) as resp,
    ):
        await assert_runware_answer(resp)


@pytest.mark.parametrize("task_type", ["imageUpload", "imageInference"])
async def test_sandbox_rejects_unparseable_url_with_400(
    task_type: str, make_sandbox: SandboxFactory
) -> None:
    """A reference URL yarl cannot parse is the task's invalidParameter error."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    bad = "http://[::1"
    task: dict[str, Any] = {"taskType": task_type, "taskUUID": str(uuid.uuid4())}
    if task_type == "imageUpload":
        task["image"] = bad
    else:
        task.update(
            model="ideogram:3@2",
            positivePrompt="a cat",
            width=1024,
            height=1024,
            deliveryMethod="async",
            inputs={"referenceImages": [bad]},
        )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1"),
            json=[task],
            headers={"Authorization": "Bearer sandbox"},
        ) as resp,
    ):
        await assert_runware_answer(resp)
        assert resp.status == 400
