"""Expansion into TaskSpecs: sizes, stable keys, precedence, templates, requests."""

from __future__ import annotations

import inspect
import math
import random
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.expand import expand
from pipeline.manifest import Job, Manifest
from pipeline.plan import (
    Template,
    axes_of,
    count_tasks,
    parse_template,
    render_value,
)
from pipeline.validation.check import validate_manifest

UPLOADED = "11111111-1111-4111-8111-111111111111"

AXES: dict[str, st.SearchStrategy[Any]] = {
    "providerSettings.ideogram.remixStrength": st.integers(1, 100),
    "providerSettings.ideogram.styleType": st.sampled_from(
        ["AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION"]
    ),
    "providerSettings.ideogram.magicPrompt": st.sampled_from(["AUTO", "ON", "OFF"]),
    "outputQuality": st.integers(20, 99),
    "numberResults": st.integers(1, 20),
}
ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,8}\Z")


def build(
    ref_ids: list[str],
    variant_ids: list[str],
    matrix: dict[str, list[Any]],
    defaults: dict[str, Any] | None = None,
) -> Manifest:
    return Manifest.model_validate(
        {
            "job": {"name": "h"},
            "defaults": defaults
            or {
                "width": 1344,
                "height": 768,
                "negativePrompt": "blurry",
                "providerSettings": {"ideogram": {"magicPrompt": "ON"}},
            },
            "references": [
                {"id": r, "image": f"https://example.com/{r}.jpg", "vars": {"place": r}}
                for r in ref_ids
            ],
            "variants": [
                {"id": v, "positivePrompt": "the {place} as {variant}"}
                for v in variant_ids
            ],
            "matrix": matrix,
        }
    )


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    ref_ids = draw(st.lists(ids, min_size=1, max_size=4, unique=True))
    variant_ids = draw(st.lists(ids, min_size=1, max_size=3, unique=True))
    paths = draw(st.lists(st.sampled_from(sorted(AXES)), max_size=3, unique=True))
    matrix = {
        p: draw(st.lists(AXES[p], min_size=1, max_size=3, unique=True)) for p in paths
    }
    return build(ref_ids, variant_ids, matrix)


@given(manifests())
@settings(max_examples=60)
def test_size_is_the_product_and_keys_are_unique(manifest: Manifest) -> None:
    """Tasks = refs x variants x axis sizes; every key is distinct and valid."""
    specs = list(expand(manifest))
    axes = math.prod(len(v) for v in manifest.matrix.values())
    expected = len(manifest.references) * len(manifest.variants) * axes
    assert len(specs) == expected == count_tasks(manifest)
    assert len({s.key for s in specs}) == len(specs)
    report = validate_manifest(manifest, Path("h.toml"))
    assert report.problems == ()
    assert report.tasks == expected
    assert report.images == sum(s.images for s in specs)


@given(manifests(), st.randoms(use_true_random=False))
@settings(max_examples=40)
def test_keys_are_stable_across_runs_and_default_orderings(
    manifest: Manifest, rnd: random.Random
) -> None:
    """Same manifest, same keys and order; reordering defaults changes nothing."""
    first = [(s.key, dict(s.params)) for s in expand(manifest)]
    assert first == [(s.key, dict(s.params)) for s in expand(manifest)]
    items = list(manifest.defaults.items())
    rnd.shuffle(items)
    shuffled = manifest.model_copy(update={"defaults": dict(items)})
    assert [(s.key, dict(s.params)) for s in expand(shuffled)] == first


def test_keys_name_reference_variant_and_axes_in_manifest_order() -> None:
    """Keys read <ref>/<variant>/axis=value,... with axes in manifest order."""
    manifest = build(
        ["atrium"],
        ["art-deco"],
        {
            "providerSettings.ideogram.remixStrength": [30, 60],
            "providerSettings.ideogram.styleType": ["DESIGN"],
        },
    )
    specs = list(expand(manifest))
    assert [s.key for s in specs] == [
        "atrium/art-deco/remixStrength=30,styleType=DESIGN",
        "atrium/art-deco/remixStrength=60,styleType=DESIGN",
    ]
    assert specs[0].axes == (("remixStrength", "30"), ("styleType", "DESIGN"))
    assert (specs[0].reference_id, specs[0].variant_id) == ("atrium", "art-deco")
    assert [s.key for s in expand(build(["a"], ["v"], {}))] == ["a/v"]


def test_axis_names_fall_back_to_the_full_path_when_they_clash() -> None:
    """Two axes ending in the same segment are named by their full dotted paths."""
    manifest = Manifest.model_construct(
        job=Job(name="x"), matrix={"a.mode": [1], "b.mode": [2], "c.speed": [3]}
    )
    assert [a.name for a in axes_of(manifest)] == ["a.mode", "b.mode", "speed"]


def test_expand_is_a_lazy_generator() -> None:
    """A million-task manifest is counted at once and yields its first task at once."""
    manifest = build(
        [f"r{i}" for i in range(100)],
        [f"v{i}" for i in range(100)],
        {"providerSettings.ideogram.remixStrength": list(range(1, 101))},
    )
    assert count_tasks(manifest) == 1_000_000
    assert inspect.isgenerator(expand(manifest))
    assert next(expand(manifest)).key == "r0/v0/remixStrength=1"


def test_precedence_defaults_then_variant_then_matrix() -> None:
    """Nested tables merge key by key; the matrix beats the variant beats defaults."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "p"},
            "defaults": {
                "width": 1344,
                "height": 768,
                "outputQuality": 80,
                "numberResults": 2,
                "providerSettings": {
                    "ideogram": {
                        "magicPrompt": "ON",
                        "styleType": "AUTO",
                        "remixStrength": 5,
                    }
                },
            },
            "references": [{"id": "a", "image": "https://example.com/a.jpg"}],
            "variants": [
                {
                    "id": "v",
                    "positivePrompt": "p",
                    "outputQuality": 90,
                    "providerSettings": {"ideogram": {"styleType": "DESIGN"}},
                }
            ],
            "matrix": {"providerSettings.ideogram.styleType": ["ANIME"]},
        }
    )
    (spec,) = expand(manifest)
    assert spec.params["outputQuality"] == 90
    assert spec.params["numberResults"] == 2
    assert spec.images == 2
    assert spec.params["providerSettings"] == {
        "ideogram": {"magicPrompt": "ON", "styleType": "ANIME", "remixStrength": 5}
    }
    assert spec.params["model"] == "ideogram:3@2"
    assert spec.params["inputs"] == {"referenceImages": ["https://example.com/a.jpg"]}
    for reserved in ("taskType", "taskUUID", "deliveryMethod", "includeCost"):
        assert reserved not in spec.params
    # the manifest's own tables are untouched by merging
    assert manifest.defaults["providerSettings"]["ideogram"]["styleType"] == "AUTO"


def test_color_palette_is_replaced_whole() -> None:
    """A variant's palette replaces the default one (preset or members, never both)."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "p"},
            "defaults": {
                "width": 1344,
                "height": 768,
                "providerSettings": {"ideogram": {"colorPalette": {"name": "EMBER"}}},
            },
            "references": [{"id": "a", "image": "https://example.com/a.jpg"}],
            "variants": [
                {
                    "id": "v",
                    "positivePrompt": "p",
                    "providerSettings": {
                        "ideogram": {
                            "colorPalette": {"members": [{"colorHex": "#112233"}]}
                        }
                    },
                }
            ],
        }
    )
    (spec,) = expand(manifest)
    palette = spec.params["providerSettings"]["ideogram"]["colorPalette"]
    assert palette == {"members": [{"colorHex": "#112233"}]}
    assert validate_manifest(manifest, Path("p.toml")).ok


def test_template_fill_order_vars_then_reference_variant_axes() -> None:
    """{name} comes from vars first, then reference, variant and axis names."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "t"},
            "defaults": {"width": 1344, "height": 768},
            "references": [
                {
                    "id": "a",
                    "image": "https://example.com/a.jpg",
                    "vars": {"variant": "V!"},
                },
                {"id": "b", "image": "https://example.com/b.jpg"},
            ],
            "variants": [
                {
                    "id": "deco",
                    "positivePrompt": "{reference}/{variant}/{remixStrength} {{x}}",
                    "negativePrompt": "no {styleType}",
                }
            ],
            "matrix": {
                "providerSettings.ideogram.remixStrength": [7],
                "providerSettings.ideogram.styleType": ["ANIME"],
            },
        }
    )
    specs = list(expand(manifest))
    assert [s.params["positivePrompt"] for s in specs] == ["a/V!/7 {x}", "b/deco/7 {x}"]
    assert specs[0].params["negativePrompt"] == "no ANIME"


@given(st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=50))
def test_text_without_braces_is_its_own_template(text: str) -> None:
    """A prompt with no braces is a template with no names that fills to itself."""
    template = parse_template(text)
    assert isinstance(template, Template)
    assert template.names == ()
    assert template.fill({}) == text


@given(
    st.lists(
        st.one_of(
            st.text(alphabet="abc ", max_size=5).map(lambda s: ("lit", s)),
            st.sampled_from(["place", "x_1", "Y"]).map(lambda s: ("name", s)),
            st.sampled_from(["{{", "}}"]).map(lambda s: ("esc", s)),
        ),
        max_size=10,
    )
)
def test_templates_fill_like_str_format(parts: list[tuple[str, str]]) -> None:
    """Filling agrees with str.format_map on {identifier}, {{ and }}."""
    text = "".join(f"{{{v}}}" if kind == "name" else v for kind, v in parts)
    values = {"place": "P", "x_1": "X", "Y": "{Y}"}
    template = parse_template(text)
    assert isinstance(template, Template)
    assert template.fill(values) == text.format_map(values)


@pytest.mark.parametrize("text", ["a {b", "a } b", "{0}", "{a.b}", "{ a }", "{}"])
def test_other_braces_are_errors(text: str) -> None:
    """Anything but {identifier}, {{ or }} is reported rather than sent."""
    assert isinstance(parse_template(text), str)


def test_request_substitutes_uploads_and_adds_remix_fields(tmp_path: Path) -> None:
    """Local paths become uploaded UUIDs; async delivery and cost are always asked."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "r"},
            "defaults": {"width": 1024, "height": 1024},
            "references": [{"id": "a", "image": "a.png"}],
            "variants": [
                {
                    "id": "v",
                    "positivePrompt": "p",
                    "providerSettings": {
                        "ideogram": {
                            "styleReferenceImages": [
                                "s.png",
                                "https://example.com/s.jpg",
                            ]
                        }
                    },
                }
            ],
        },
        context={"base_dir": tmp_path},
    )
    (spec,) = expand(manifest)
    ref, style = tmp_path / "a.png", tmp_path / "s.png"
    assert spec.local_files == (ref, style)
    assert spec.params["inputs"] == {"referenceImages": [str(ref)]}
    task_uuid = uuid4()
    style_uuid = "22222222-2222-4222-8222-222222222222"
    request = spec.request(task_uuid, {ref: UPLOADED, style: style_uuid})
    wire = request.to_wire()
    assert wire["taskUUID"] == str(task_uuid)
    assert wire["taskType"] == "imageInference"
    assert wire["deliveryMethod"] == "async"
    assert wire["includeCost"] is True
    assert wire["inputs"] == {"referenceImages": [UPLOADED]}
    assert wire["providerSettings"]["ideogram"]["styleReferenceImages"] == [
        style_uuid,
        "https://example.com/s.jpg",
    ]
    assert spec.params["inputs"] == {"referenceImages": [str(ref)]}  # spec unchanged
    with pytest.raises(KeyError, match="has not been uploaded"):
        spec.request(uuid4(), {ref: UPLOADED})


def test_request_reports_wire_problems_by_task_key() -> None:
    """An invalid task (never validated) raises ManifestError naming key and field."""
    manifest = build(["a"], ["v"], {"providerSettings.ideogram.remixStrength": [0]})
    (spec,) = expand(manifest)
    with pytest.raises(
        Exception,
        match=r"a/v/remixStrength=0: providerSettings\.ideogram\.remixStrength",
    ):
        spec.request(uuid4(), {})


def test_rendering_speed_and_images_per_task() -> None:
    """TaskSpec carries numberResults and renderingSpeed for cost estimates."""
    manifest = build(
        ["a"],
        ["v"],
        {
            "providerSettings.ideogram.renderingSpeed": ["TURBO", "QUALITY"],
            "numberResults": [3],
        },
    )
    specs = list(expand(manifest))
    assert [(s.rendering_speed, s.images) for s in specs] == [
        ("TURBO", 3),
        ("QUALITY", 3),
    ]
    assert next(expand(build(["a"], ["v"], {}))).rendering_speed is None
    report = validate_manifest(manifest, Path("m.toml"))
    assert report.images_by_speed == {"TURBO": 3, "QUALITY": 3}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (30, "30"),
        (0.5, "0.5"),
        ("DESIGN", "DESIGN"),
        ({"name": "EMBER"}, '{"name":"EMBER"}'),
        (["a", "b"], '["a","b"]'),
    ],
)
def test_axis_values_render_as_text(value: Any, text: str) -> None:
    """Axis values appear in keys with TOML booleans and compact JSON for tables."""
    assert render_value(value) == text


def test_axis_values_that_render_alike_are_a_problem() -> None:
    """Two values with the same text would give two tasks one key."""
    manifest = build(["a"], ["v"], {"outputQuality": [50, "50"]})
    report = validate_manifest(manifest, Path("m.toml"))
    assert (
        "m.toml: matrix: two value combinations give the same task key part "
        in (report.problems[0])
    )


def test_dummy_uuid_is_version_4() -> None:
    """The stand-in taskUUID passes the wire model's UUID4 check."""
    from pipeline.validation.tasks import PLACEHOLDER_TASK_UUID

    assert UUID(str(PLACEHOLDER_TASK_UUID)).version == 4


def test_requests_leave_the_shared_tables_of_other_tasks_alone(tmp_path: Path) -> None:
    """Tasks of one variant share nested tables; building one's request (uploads
    swapped in, the wire model filled) changes no other task's parameters."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "r"},
            "defaults": {"width": 1024, "height": 1024},
            "references": [
                {"id": "a", "image": "a.png"},
                {"id": "b", "image": "b.png"},
            ],
            "variants": [
                {
                    "id": "v",
                    "positivePrompt": "p",
                    "providerSettings": {
                        "ideogram": {"styleReferenceImages": ["s.png"]}
                    },
                }
            ],
        },
        context={"base_dir": tmp_path},
    )
    first, second = expand(manifest)
    before = repr(second.params)
    uploads = {p: str(uuid4()) for p in (*first.local_files, *second.local_files)}
    wire = first.request(uuid4(), uploads).to_wire()
    wire["providerSettings"]["ideogram"]["styleReferenceImages"].append("x")
    assert repr(second.params) == before
    assert second.params["providerSettings"]["ideogram"]["styleReferenceImages"] == [
        str(tmp_path / "s.png")
    ]
