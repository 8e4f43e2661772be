"""Each mistake is found by one check and reported once, however many tasks share it.

Before the validation package, the shape checks (on the raw TOML) and the per-task
checks (on the built manifest) both saw some mistakes, and a regex over the rendered
lines removed what it recognised as repeats. These manifests are the ones that came
out twice or more (or only by luck once); now no check repeats another's work.
"""

from __future__ import annotations

import builtins
import pathlib
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.errors import ManifestError
from pipeline.expand import expand
from pipeline.manifest import Manifest
from pipeline.validation import files as files_mod
from pipeline.validation.check import check_manifest
from pipeline.validation.tasks import wire_problems
from pipeline.wire import CROSS_FIELD_CHECKS, SIZE_NOT_ALLOWED, ImageInferenceRequest

HEAD = """
[job]
name = "p"
{job}
[defaults]
width = 1024
height = 1024
positivePrompt = "x"
{defaults}
"""
THREE_REFS = "".join(
    f'[[references]]\nid = "r{i}"\nimage = "https://example.com/{i}.jpg"\n'
    for i in range(3)
)
PALETTE = "providerSettings.ideogram.colorPalette"
TWO_VARIANTS = '[[variants]]\nid = "v0"\n[[variants]]\nid = "v1"\n'


def problems(tmp_path: Path, body: str, job: str = "", defaults: str = "") -> list[str]:
    path = tmp_path / "job.toml"
    path.write_text(HEAD.format(job=job, defaults=defaults) + body, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        check_manifest(path)
    return info.value.problems


def naming(lines: list[str], *parts: str) -> list[str]:
    return [line for line in lines if all(p in line for p in parts)]


def test_duplicate_id_in_a_csv_list_is_reported_once(tmp_path: Path) -> None:
    """Both layers used to see it, named a little differently, so it came out twice."""
    (tmp_path / "refs.csv").write_text(
        "id,image\n" + "".join(f"r{i % 4},https://e.com/{i}.jpg\n" for i in range(5)),
        encoding="utf-8",
    )
    lines = problems(tmp_path, '[references_from]\ncsv = "refs.csv"\n' + TWO_VARIANTS)
    assert lines == [
        f"{tmp_path}/refs.csv: line 6 (id=r0): id: duplicate reference id 'r0' "
        f"(also {tmp_path}/refs.csv: line 2 (id=r0))"
    ]


def test_reserved_model_in_defaults_is_one_problem(tmp_path: Path) -> None:
    """A reserved key is the shape check's; the wire check no longer adds 'model'
    problems for each parameter set."""
    lines = problems(tmp_path, THREE_REFS + TWO_VARIANTS, defaults='model = "other"')
    assert len(naming(lines, "model")) == 1, lines
    assert "defaults: model: 'model' is reserved" in lines[0]


def test_bad_job_model_is_one_problem_for_every_task(tmp_path: Path) -> None:
    """The [job] model is one value: one problem, not one per parameter set."""
    lines = problems(
        tmp_path,
        THREE_REFS + TWO_VARIANTS + "[matrix]\noutputQuality = [50, 60]\n",
        job='model = "x:1@1"',
    )
    assert lines == [
        f"{tmp_path}/job.toml: r0/v0/outputQuality=50: model: "
        "Input should be 'ideogram:3@2'"
    ]


def test_unknown_keys_are_named_once_at_their_table(tmp_path: Path) -> None:
    """Unknown keys belong to the shape check; the wire check leaves them alone."""
    lines = problems(
        tmp_path,
        THREE_REFS
        + '[[variants]]\nid = "v0"\nseed = 4\n[matrix]\n'
        + '"providerSettings.ideogram.colorPalette" = [{name = "EMBER", nme = "x"}]\n',
    )
    assert len(lines) == 2, lines
    assert len(naming(lines, "variants[0] (id=v0): seed: unknown parameter")) == 1
    assert len(naming(lines, "colorPalette[0].nme: unknown parameter")) == 1


@pytest.mark.parametrize(
    ("matrix", "key", "field"),
    [
        ("width = [1000]", "r0/v0/width=1000", "width/height"),
        (
            '"providerSettings.ideogram.remixStrength" = [50, 101]',
            "r0/v0/remixStrength=101",
            "providerSettings.ideogram.remixStrength",
        ),
        ('outputType = ["dataURI"]\nttl = [60]', "r0/v0/", "ttl"),
    ],
)
def test_a_bad_matrix_value_shared_by_many_tasks_is_one_problem(
    tmp_path: Path, matrix: str, key: str, field: str
) -> None:
    """Three references share the parameter set: one line, naming key and field."""
    lines = problems(
        tmp_path, THREE_REFS + f'[[variants]]\nid = "v0"\n[matrix]\n{matrix}\n'
    )
    assert len(lines) == 1, lines
    assert len(naming(lines, key, f": {field}: ")) == 1, lines
    assert lines[0].endswith("(same for all 3 references)")


def test_a_missing_file_used_by_many_tasks_is_checked_and_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One reference file and one style file, used by 2 variants x 3 axis values."""
    checked: list[Path] = []
    real = files_mod.image_problem

    def spy(path: Path) -> str | None:
        checked.append(path)
        return real(path)

    monkeypatch.setattr(files_mod, "image_problem", spy)
    lines = problems(
        tmp_path,
        '[[references]]\nid = "r0"\nimage = "gone.png"\n'
        + TWO_VARIANTS
        + "[matrix]\noutputQuality = [50, 60, 70]\n",
        defaults='providerSettings.ideogram.styleReferenceImages = ["nostyle.png"]',
    )
    assert lines == [
        f"{tmp_path}/job.toml: references[0] (id=r0): image: "
        f"file not found: {tmp_path}/gone.png",
        f"{tmp_path}/job.toml: r0/v0/outputQuality=50: "
        "providerSettings.ideogram.styleReferenceImages: "
        f"file not found: {tmp_path}/nostyle.png",
    ]
    assert checked == [tmp_path / "gone.png", tmp_path / "nostyle.png"]


def test_tasks_of_a_repeated_variant_id_are_not_checked_again(tmp_path: Path) -> None:
    """Their keys would name the first variant's tasks: the id is the problem."""
    body = THREE_REFS + '[[variants]]\nid = "v0"\n[[variants]]\nid = "v0"\n'
    path = tmp_path / "job.toml"
    path.write_text(
        HEAD.format(job="", defaults="").replace("width = 1024\n", "") + body,
        encoding="utf-8",
    )
    with pytest.raises(ManifestError) as info:
        check_manifest(path)
    assert [line.removeprefix(f"{path}: ") for line in info.value.problems] == [
        "variants[1] (id=v0): id: duplicate variant id 'v0' (also variants[0] (id=v0))",
        "r0/v0: width: required: set it in [defaults], the variant or the matrix "
        "(same for all 3 references)",
    ]


def request_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskUUID": uuid4(),
        "positivePrompt": "p",
        "width": 1024,
        "height": 1024,
        "inputs": {"referenceImages": ["https://example.com/a.jpg"]},
    }
    return {**body, **changes}


@pytest.mark.parametrize(
    ("changes", "field", "start"),
    [
        ({"width": 1000}, "width/height", "width x height 1000x1024 is not a size"),
        ({"ttl": 60, "outputType": "dataURI"}, "ttl", "ttl applies only"),
    ],
)
def test_cross_field_wire_checks_carry_their_fields_in_the_error(
    changes: dict[str, Any], field: str, start: str
) -> None:
    """The path comes from the error's type or location, never from its text."""
    with pytest.raises(ValidationError) as info:
        ImageInferenceRequest.model_validate(request_body(**changes))
    [(kind, path, message)] = wire_problems(info.value)
    assert (path, message[: len(start)]) == (field, start)
    if field == "width/height":
        assert kind == SIZE_NOT_ALLOWED
        assert CROSS_FIELD_CHECKS[kind] == ("width", "height")
    else:
        assert info.value.errors()[0]["loc"] == ("ttl",)


def test_expansion_and_requests_touch_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """expand() and TaskSpec.request() only move strings: local images are checked by
    validation and read when uploaded, never while expanding."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "pure"},
            "defaults": {"width": 1024, "height": 1024, "positivePrompt": "p"},
            "references": [{"id": "a", "image": "/nowhere/a.png"}],
            "variants": [
                {
                    "id": "v",
                    "providerSettings": {
                        "ideogram": {"styleReferenceImages": ["/nowhere/s.png"]}
                    },
                }
            ],
        }
    )

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"file access during expansion: {args}")

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(Image, "open", forbidden)
    for name in ("is_file", "exists", "stat", "open", "read_bytes"):
        monkeypatch.setattr(pathlib.Path, name, forbidden)
    [spec] = list(expand(manifest))
    uploaded = {path: str(uuid4()) for path in spec.local_files}
    wire = spec.request(uuid4(), uploaded).wire
    monkeypatch.undo()
    assert wire["inputs"]["referenceImages"] == [uploaded[Path("/nowhere/a.png")]]


@pytest.mark.parametrize(
    ("text", "only"),
    [
        (
            'references = 3\n[job]\nname = "p"\n[[variants]]\nid = "v0"\n',
            "references: must be a list",
        ),
        (
            'variants = "v"\n' + HEAD.format(job="", defaults="") + THREE_REFS,
            "variants: must be a list",
        ),
        (
            HEAD.format(job="", defaults="")
            + THREE_REFS
            + '[[variants]]\nid = "v0"\n[matrix]\n'
            + f'"{PALETTE}.members.colorHex" = ["#FFFFFF"]\n',
            "matrix: providerSettings.ideogram.colorPalette.members.colorHex: "
            "cannot point inside the list",
        ),
        (
            HEAD.format(job="", defaults="")
            + THREE_REFS
            + '[[variants]]\nid = "v0"\n[matrix]\n"deliveryMethod" = ["sync"]\n',
            "matrix: deliveryMethod: 'deliveryMethod' is reserved",
        ),
    ],
    ids=["references-not-a-list", "variants-not-a-list", "axis-in-a-list", "reserved"],
)
def test_a_mistake_has_no_follow_on_problems(
    tmp_path: Path, text: str, only: str
) -> None:
    """A table of the wrong type is not also 'empty'; a rejected axis's values are
    not applied to the tasks, so the wire check adds nothing about them."""
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        check_manifest(path)
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(f"{path}: {only}")


def test_axis_values_that_render_alike_make_one_problem_per_key_part(
    tmp_path: Path,
) -> None:
    """Four combinations render to one key part: that part is named once, and only
    the first combination (all valid integers) is checked as a task."""
    lines = problems(
        tmp_path,
        THREE_REFS
        + '[[variants]]\nid = "v0"\n[matrix]\n'
        + 'outputQuality = [50, "50"]\nnumberResults = [1, "1"]\n',
    )
    assert [line.removeprefix(f"{tmp_path}/job.toml: ") for line in lines] == [
        "matrix: two value combinations give the same task key part "
        "'outputQuality=50,numberResults=1': make the axis values distinct"
    ]


def test_a_size_mistake_in_defaults_is_one_problem_for_all_tasks(
    tmp_path: Path,
) -> None:
    """width = 1000 in [defaults] was one line per parameter set (6 here); it is
    one line naming [defaults] and how many tasks it reaches."""
    path = tmp_path / "job.toml"
    path.write_text(
        HEAD.format(job="", defaults="").replace("width = 1024", "width = 1000")
        + THREE_REFS
        + TWO_VARIANTS
        + "[matrix]\noutputQuality = [50, 60, 70]\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestError) as info:
        check_manifest(path)
    assert info.value.problems == [
        f"{path}: [defaults]: width/height: width x height 1000x1024 "
        "is not a size Ideogram Remix supports (e.g. 1024x1024, 1344x768, "
        "768x1344) (so for all 18 tasks)"
    ]


def test_a_defaults_mistake_a_variant_overrides_counts_only_the_others(
    tmp_path: Path,
) -> None:
    """A variant that sets the field itself does not inherit the mistake; its own
    value is checked as before."""
    body = (
        THREE_REFS
        + '[[variants]]\nid = "v0"\n'
        + '[[variants]]\nid = "v1"\nproviderSettings = { ideogram = '
        + "{ remixStrength = 50 } }\n"
        + '[[variants]]\nid = "v2"\nproviderSettings = { ideogram = '
        + "{ remixStrength = 500 } }\n"
    )
    lines = problems(
        tmp_path,
        body,
        defaults="providerSettings = { ideogram = { remixStrength = 101 } }",
    )
    assert len(lines) == 2, lines
    assert naming(lines, "[defaults]: providerSettings.ideogram.remixStrength: ")
    assert lines[0].endswith("(so for 3 of 9 tasks)"), lines
    assert naming(lines, "r0/v2: providerSettings.ideogram.remixStrength: ")


def test_a_constant_prompt_mistake_in_defaults_is_one_problem(tmp_path: Path) -> None:
    """An empty negativePrompt in [defaults] came out once per variant (and
    matrix value); it is one line at [defaults]."""
    lines = problems(
        tmp_path,
        THREE_REFS + TWO_VARIANTS + "[matrix]\noutputQuality = [50, 60]\n",
        defaults='negativePrompt = ""',
    )
    assert lines == [
        f"{tmp_path}/job.toml: [defaults]: negativePrompt: must not be empty "
        "(so for all 12 tasks)"
    ]
