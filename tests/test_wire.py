"""The wire models: round trips, camelCase on the wire, every documented limit."""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.wire import (
    ALLOWED_SIZES,
    REQUEST_ADAPTER,
    Envelope,
    ImageInferenceRequest,
    ImageResult,
    Processing,
    UploadResult,
)

CAMEL = re.compile(r"^(?:[a-z][a-zA-Z0-9]*|taskUUID|webhookURL|NSFWContent)$")
UUID4 = str(uuid.UUID(int=1, version=4))
REF = "https://example.com/ref.jpg"


def base(**extra: Any) -> dict[str, Any]:
    """A valid request as wire JSON, plus overrides."""
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": UUID4,
        "model": "ideogram:3@2",
        "positivePrompt": "a lighthouse at dawn",
        "width": 1344,
        "height": 768,
        "inputs": {"referenceImages": [REF]},
    }
    body.update(extra)
    return body


def ideogram(**settings_: Any) -> dict[str, Any]:
    return base(providerSettings={"ideogram": settings_})


def parse(body: dict[str, Any]) -> ImageInferenceRequest:
    """Parse as the sandbox does: JSON, by alias only."""
    model = REQUEST_ADAPTER.validate_json(json.dumps(body), by_name=False)
    assert isinstance(model, ImageInferenceRequest)
    return model


def field_of(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in err["loc"]) for err in exc.errors()}


sizes = st.sampled_from(sorted(ALLOWED_SIZES))
palettes = st.one_of(
    st.builds(
        lambda name: {"name": name},
        st.sampled_from(["EMBER", "FRESH", "JUNGLE", "MAGIC", "MELON", "MOSAIC"]),
    ),
    st.builds(
        lambda members: {"members": members},
        st.lists(
            st.fixed_dictionaries(
                {"colorHex": st.from_regex(r"\A#[0-9A-F]{6}\Z")},
                optional={
                    "colorWeight": st.integers(5, 100).map(lambda n: round(n / 100, 2))
                },
            ),
            min_size=1,
            max_size=4,
        ),
    ),
)
ideogram_settings = st.fixed_dictionaries(
    {},
    optional={
        "colorPalette": palettes,
        "magicPrompt": st.sampled_from(["AUTO", "ON", "OFF"]),
        "remixStrength": st.integers(1, 100),
        "renderingSpeed": st.sampled_from(["TURBO", "DEFAULT", "QUALITY"]),
        "styleReferenceImages": st.lists(st.just(UUID4), min_size=1, max_size=4),
        "styleType": st.sampled_from(
            ["AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION"]
        ),
    },
)
requests = st.builds(
    lambda size, prompt, opts, ps: base(
        width=size[0],
        height=size[1],
        positivePrompt=prompt,
        **opts,
        **({"providerSettings": {"ideogram": ps}} if ps else {}),
    ),
    sizes,
    st.text(min_size=1, max_size=300).filter(str.strip),
    st.fixed_dictionaries(
        {},
        optional={
            "negativePrompt": st.text(min_size=1, max_size=200),
            "outputType": st.sampled_from(["URL", "dataURI", "base64Data"]),
            "outputFormat": st.sampled_from(["JPG", "PNG", "WEBP"]),
            "outputQuality": st.integers(20, 99),
            "deliveryMethod": st.sampled_from(["sync", "async"]),
            "includeCost": st.booleans(),
            "numberResults": st.integers(1, 20),
            "safety": st.fixed_dictionaries(
                {},
                optional={
                    "checkContent": st.booleans(),
                    "mode": st.sampled_from(["none", "fast"]),
                },
            ),
            "webhookURL": st.just("https://hooks.example.com/remix"),
            "uploadEndpoint": st.just("https://bucket.example.com/put?sig=1"),
        },
    ),
    ideogram_settings,
)


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return list(value) + [k for v in value.values() for k in _keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in _keys(v)]
    return []


@settings(max_examples=150, deadline=None)
@given(requests)
def test_request_round_trips_and_dumps_camel_case(body: dict[str, Any]) -> None:
    """Any valid request parses by alias, dumps camelCase and parses back equal."""
    model = parse(body)
    wire = model.to_wire()
    assert all(CAMEL.match(key) for key in _keys(wire)), _keys(wire)
    assert ImageInferenceRequest.model_validate_json(model.model_dump_json()) == model
    assert parse(wire) == model


def test_snake_case_is_rejected_on_the_wire() -> None:
    """The sandbox's by-alias parsing refuses a client that sends snake_case."""
    body = base()
    body["positive_prompt"] = body.pop("positivePrompt")
    with pytest.raises(ValidationError):
        parse(body)


def at(path: str, value: Any) -> dict[str, Any]:
    """A valid request with one dotted wire path set to ``value``."""
    body = base()
    node = body
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return body


IDEO = "providerSettings.ideogram"
PALETTE = f"{IDEO}.colorPalette"


def members(**member: Any) -> dict[str, Any]:
    return {"members": [{"colorHex": "#FF0000", **member}]}


# (case, dotted wire path, value just inside the limit, value just outside it)
LIMITS: list[tuple[str, str, Any, Any]] = [
    ("outputQuality low", "outputQuality", 20, 19),
    ("outputQuality high", "outputQuality", 99, 100),
    ("numberResults low", "numberResults", 1, 0),
    ("numberResults high", "numberResults", 20, 21),
    ("ttl", "ttl", 60, 59),
    ("positivePrompt long", "positivePrompt", "x" * 2000, "x" * 2001),
    ("positivePrompt empty", "positivePrompt", "x", ""),
    ("negativePrompt long", "negativePrompt", "x" * 2000, "x" * 2001),
    ("negativePrompt empty", "negativePrompt", "x", ""),
    ("referenceImages two", "inputs.referenceImages", [REF], [REF, REF]),
    ("referenceImages none", "inputs.referenceImages", [REF], []),
    ("referenceImages form", "inputs.referenceImages", [UUID4], ["ref.jpg"]),
    ("remixStrength low", f"{IDEO}.remixStrength", 1, 0),
    ("remixStrength high", f"{IDEO}.remixStrength", 100, 101),
    ("styleRefs many", f"{IDEO}.styleReferenceImages", [UUID4] * 4, [UUID4] * 5),
    ("styleRefs none", f"{IDEO}.styleReferenceImages", [UUID4], []),
    ("colorWeight low", PALETTE, members(colorWeight=0.05), members(colorWeight=0.04)),
    ("colorWeight high", PALETTE, members(colorWeight=1.0), members(colorWeight=1.01)),
    (
        "colorWeight step",
        PALETTE,
        members(colorWeight=0.56),
        members(colorWeight=0.555),
    ),
    ("colorHex", PALETTE, members(colorHex="#A1b2C3"), members(colorHex="#A1B2C")),
    ("palette empty", PALETTE, {"name": "PASTEL"}, {"members": []}),
    ("palette both", PALETTE, {"name": "MELON"}, {"name": "MELON", **members()}),
    ("palette neither", PALETTE, {"name": "MOSAIC"}, {}),
    ("palette name", PALETTE, {"name": "ULTRAMARINE"}, {"name": "NEON"}),
    ("styleType", f"{IDEO}.styleType", "RENDER_3D", "PHOTO"),
    ("magicPrompt", f"{IDEO}.magicPrompt", "OFF", "MAYBE"),
    ("renderingSpeed", f"{IDEO}.renderingSpeed", "QUALITY", "SLOW"),
    ("outputType", "outputType", "base64Data", "base64"),
    ("outputFormat", "outputFormat", "WEBP", "GIF"),
    ("deliveryMethod", "deliveryMethod", "async", "later"),
    ("safety mode", "safety", {"checkContent": True, "mode": "fast"}, {"mode": "full"}),
    ("height", "height", 768, 800),
    ("model", "model", "ideogram:3@2", "ideogram:3@1"),
    ("taskUUID", "taskUUID", UUID4, "not-a-uuid"),
    ("webhookURL", "webhookURL", "https://h.example.com/x", "ftp://h.example.com/x"),
    ("unknown parameter", "inputs.referenceImages", [REF], None),
]


@pytest.mark.parametrize(
    ("path", "inside", "outside"),
    [pytest.param(p, i, o, id=name) for name, p, i, o in LIMITS],
)
def test_limits_reject_just_outside_accept_just_inside(
    path: str, inside: Any, outside: Any
) -> None:
    """Each documented limit: the edge value passes, one step past it fails by name."""
    parse(at(path, inside))
    body = at(path, outside) if outside is not None else base(seed=42)
    with pytest.raises(ValidationError) as exc:
        parse(body)
    named = field_of(exc.value)
    leaf = "seed" if outside is None else path.split(".")[-1]
    if path == "height":  # the pair is checked together, on the whole model
        assert any("not a size" in e["msg"] for e in exc.value.errors())
        return
    assert any(leaf in loc for loc in named), named


def test_every_allowed_size_passes_and_others_fail() -> None:
    """All 73 documented/inferred sizes pass; Ideogram-only sizes are refused."""
    assert len(ALLOWED_SIZES) == 73
    for width, height in ALLOWED_SIZES:
        parse(base(width=width, height=height))
    for width, height in [(1024, 768), (1152, 768), (1280, 800), (512, 512)]:
        with pytest.raises(ValidationError, match="not a size"):
            parse(base(width=width, height=height))


def test_ttl_only_with_url_output() -> None:
    """ttl applies to URL output only (the seed page)."""
    parse(base(ttl=120, outputType="URL"))
    with pytest.raises(ValidationError, match="ttl applies only"):
        parse(base(ttl=120, outputType="dataURI"))


def test_responses_ignore_unknown_fields_and_keep_money_exact() -> None:
    """A response item with new fields still parses; cost stays an exact Decimal."""
    body = {
        "data": [
            {
                "taskType": "imageInference",
                "taskUUID": UUID4,
                "imageUUID": UUID4,
                "imageURL": "https://im.runware.ai/image/x.jpg",
                "seed": 1952539914,
                "cost": 0.08,
                "status": "success",
                "someNewField": {"nested": True},
            },
            {"taskType": "imageInference", "taskUUID": UUID4, "status": "pending"},
            {"taskType": "imageUpload", "taskUUID": UUID4, "imageUUID": UUID4},
        ],
        "errors": [
            {"code": "invalidParameter", "parameter": ["width", "height"], "x": 1}
        ],
    }
    envelope = Envelope.model_validate_json(json.dumps(body))
    result, pending, upload = envelope.data
    assert isinstance(result, ImageResult)
    assert result.cost == Decimal("0.08")
    assert isinstance(pending, Processing)
    assert isinstance(upload, UploadResult)
    assert envelope.errors[0].parameters == ["width", "height"]


@given(st.decimals(min_value=0, max_value=100, places=4, allow_nan=False))
def test_cost_round_trips_exactly(cost: Decimal) -> None:
    """Costs survive JSON as numbers without float drift."""
    item = ImageResult(task_uuid=UUID4, image_uuid=UUID4, cost=cost)
    again = ImageResult.model_validate_json(item.model_dump_json())
    assert again.cost == cost


def test_bare_object_data_is_tolerated() -> None:
    """One old docs page shows imageUpload's data as an object, not an array."""
    body = {"data": {"taskType": "imageUpload", "taskUUID": UUID4, "imageUUID": UUID4}}
    envelope = Envelope.model_validate_json(json.dumps(body))
    assert isinstance(envelope.data[0], UploadResult)


def test_authentication_key_is_kept_out_of_repr() -> None:
    """The key in an authentication task never shows in repr or str."""
    task = REQUEST_ADAPTER.validate_python(
        {"taskType": "authentication", "apiKey": "sk-test-SECRET-1"}, by_name=False
    )
    assert "sk-test-SECRET-1" not in repr(task)
    assert "sk-test-SECRET-1" not in str(task)
