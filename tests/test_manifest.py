"""Manifest loading and whole-job validation: every problem, named by file and field."""

from __future__ import annotations

import re
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import ManifestError
from pipeline.expand import expand
from pipeline.manifest import Manifest, load_manifest
from pipeline.plan import count_tasks
from pipeline.validation import files as files_mod
from pipeline.validation.check import validate_manifest
from pipeline.validation.problems import ValidationReport

DATA = Path(__file__).parent / "data" / "manifests"
BAD = sorted(DATA.glob("bad_*.toml"))

HEAD = """
[job]
name = "t"

[defaults]
width = 1344
height = 768
"""
URL = "https://example.com/{}.jpg"


def png(path: Path, size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> Path:
    """Write a tiny real image (never a committed binary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 40)).save(path, format=fmt)
    return path


def ref_table(ref_id: str, place: str = "x") -> str:
    """A [[references]] table with a URL image and a place var."""
    image = URL.format(ref_id)
    head = f'[[references]]\nid = "{ref_id}"\nimage = "{image}"\n'
    return head + f'vars = {{ place = "{place}" }}\n'


def problems_of(path: Path) -> list[str]:
    """Load, then validate: the problems `remix plan` would print."""
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        return exc.problems
    return list(validate_manifest(manifest, path).problems)


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """The committed good manifest, copied next to freshly made reference images."""
    for name in ("good.toml", "good-refs.csv"):
        shutil.copy(DATA / name, tmp_path / name)
    for name in ("atrium", "lobby", "style"):
        png(tmp_path / "refs" / f"{name}.png")
    return tmp_path / "good.toml"


def expectation(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_each_bad_manifest_has_exactly_its_one_problem(path: Path) -> None:
    """Every bad_*.toml yields one problem line, naming the file, place and field."""
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(str(path) + ": ")
    assert re.search(expectation(path), problems[0]), problems[0]


def test_good_manifest_loads_and_validates(good: Path) -> None:
    """The good manifest has no problem and the expected totals."""
    manifest = load_manifest(good)
    report = validate_manifest(manifest, good)
    assert report.problems == ()
    assert report.ok
    assert (report.tasks, report.images) == (48, 72)
    assert report.images_by_speed == {"DEFAULT": 24, "TURBO": 48}
    assert report.local_files == 3
    assert report.estimated_cost_usd() == Decimal("5.76")
    assert report.estimated_cost_usd({"TURBO": Decimal("0.05")}) == Decimal("4.32")
    assert manifest.job.budget_usd == Decimal("5.0")
    assert manifest.job.model == "ideogram:3@2"
    assert [r.id for r in manifest.references] == [
        "atrium",
        "harbor",
        "lobby",
        "station",
    ]
    assert count_tasks(manifest) == 48


def test_every_expanded_task_passes_the_wire_model(good: Path) -> None:
    """A clean report means every task's request validates (shortcut is exact)."""
    from uuid import uuid4

    manifest = load_manifest(good)
    upload = "11111111-1111-4111-8111-111111111111"
    for spec in expand(manifest):
        request = spec.request(uuid4(), dict.fromkeys(spec.local_files, upload))
        assert request.delivery_method == "async"


def test_local_paths_are_resolved_relative_to_the_manifest(good: Path) -> None:
    """Local references and style images become absolute paths next to the manifest."""
    manifest = load_manifest(good)
    refs = {r.id: r for r in manifest.references}
    assert refs["atrium"].local_path == good.parent / "refs" / "atrium.png"
    assert refs["lobby"].local_path == good.parent / "refs" / "lobby.png"
    assert refs["harbor"].local_path is None
    assert refs["station"].local_path is None
    style = manifest.variants[1].params["providerSettings"]["ideogram"]
    assert style["styleReferenceImages"] == [str(good.parent / "refs" / "style.png")]


def test_all_load_problems_are_reported_together(tmp_path: Path) -> None:
    """Shape problems in different tables come back in one ManifestError."""
    path = write(
        tmp_path,
        """
[job]
name = "a b"
[defaults]
widht = 1024
[[references]]
id = "../up"
image = "https://example.com/a.jpg"
[[variants]]
id = "v"
positivePrompt = "x"
[[variants]]
id = "v"
positivePrompt = "y"
taskType = "imageInference"
[matrix]
"providerSettings.ideogram.styleType" = []
""",
    )
    with pytest.raises(ManifestError, match="not a valid id") as info:
        load_manifest(path)
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6, text
    for part in (
        "job: name: 'a b' is not a valid id",
        "defaults: widht: unknown parameter 'widht' (did you mean width?)",
        "references[0] (id=../up): id: '../up' is not a valid id",
        "variants[1] (id=v): id: duplicate variant id 'v'",
        "variants[1] (id=v): taskType: 'taskType' is reserved",
        "matrix: providerSettings.ideogram.styleType: axis has no values",
    ):
        assert part in text
    assert all(p.startswith(f"{path}: ") for p in info.value.problems)


def test_all_task_problems_are_reported_together(tmp_path: Path) -> None:
    """Value, template and size problems of different tasks come back in one report."""
    path = write(
        tmp_path,
        HEAD
        + f"""
[[references]]
id = "atrium"
image = "{URL.format("atrium")}"
vars = {{ place = "atrium" }}
[[references]]
id = "lobby"
image = "{URL.format("lobby")}"
[[variants]]
id = "deco"
positivePrompt = "The {{place}} in Art Deco"
[[variants]]
id = "square"
positivePrompt = "x"
width = 1000
outputQuality = 5
[matrix]
"providerSettings.ideogram.remixStrength" = [30, 300]
""",
    )
    report = validate_manifest(load_manifest(path), path)
    text = "\n".join(report.problems)
    assert report.problem_count == len(report.problems) == 5, text
    same = "(same for all 2 references)"
    for line in (
        "atrium/deco/remixStrength=300: providerSettings.ideogram.remixStrength: "
        f"Input should be less than or equal to 100 {same}",
        "lobby/deco/remixStrength=30: positivePrompt: unknown template variable "
        "{place}",
        "atrium/square/remixStrength=30: outputQuality: Input should be greater than "
        f"or equal to 20 {same}",
        "atrium/square/remixStrength=300: outputQuality: Input should be greater",
        "atrium/square/remixStrength=300: providerSettings.ideogram.remixStrength",
    ):
        assert f"{path}: {line}" in text
    with pytest.raises(ManifestError, match="remixStrength=300"):
        report.raise_for_problems()


def test_malformed_toml_names_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error is one problem with its line and column."""
    path = write(tmp_path, '[job]\nname = "x"\n\n[defaults\nwidth = 1\n')
    with pytest.raises(
        ManifestError, match=r"job\.toml: line 4, column 10: invalid TOML"
    ):
        load_manifest(path)


def test_missing_manifest_is_one_problem(tmp_path: Path) -> None:
    """A manifest that cannot be read is reported, not a traceback."""
    with pytest.raises(ManifestError, match=r"nope\.toml: cannot read: No such file"):
        load_manifest(tmp_path / "nope.toml")


def refs_manifest(tmp_path: Path, table: str) -> Path:
    return write(
        tmp_path,
        HEAD + table + '\n[[variants]]\nid = "v"\npositivePrompt = "the {place}"\n',
    )


def test_csv_references_with_vars_and_paths_relative_to_the_csv(tmp_path: Path) -> None:
    """CSV rows become references, extra columns vars; paths resolve from the CSV."""
    png(tmp_path / "lists" / "img" / "a.png")
    (tmp_path / "lists").mkdir(exist_ok=True)
    (tmp_path / "lists" / "refs.csv").write_text(
        "id,image,place\r\na,img/a.png,hall\r\n\r\nb,https://example.com/b.jpg,yard\r\n",
        encoding="utf-8",
    )
    path = refs_manifest(tmp_path, '[references_from]\ncsv = "lists/refs.csv"\n')
    manifest = load_manifest(path)
    assert [(r.id, r.vars) for r in manifest.references] == [
        ("a", {"place": "hall"}),
        ("b", {"place": "yard"}),
    ]
    assert manifest.references[0].local_path == tmp_path / "lists" / "img" / "a.png"
    assert validate_manifest(manifest, path).ok
    prompts = [s.params["positivePrompt"] for s in expand(manifest)]
    assert prompts == ["the hall", "the yard"]


def test_csv_row_problems_name_the_csv_file_and_line(tmp_path: Path) -> None:
    """Bad CSV rows are reported as csv-file: line N (id=...): field: message."""
    (tmp_path / "refs.csv").write_text(
        "id,image,place\n"
        "ok,https://example.com/a.jpg,hall\n"
        "../x,https://example.com/b.jpg,yard\n"
        "short,https://example.com/c.jpg\n"
        "ok,https://example.com/d.jpg,again\n",
        encoding="utf-8",
    )
    path = refs_manifest(tmp_path, '[references_from]\ncsv = "refs.csv"\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    csv_file = str(tmp_path / "refs.csv")
    assert info.value.problems == [
        f"{csv_file}: line 4: 2 fields, but the header has 3",
        f"{csv_file}: line 3 (id=../x): id: '../x' is not a valid id: use 1-64 "
        "letters, digits, '.', '_' or '-', starting with a letter or digit, "
        "without '..' (ids become file names)",
        f"{csv_file}: line 5 (id=ok): id: duplicate reference id 'ok' "
        f"(also {csv_file}: line 2 (id=ok))",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "line 1: empty file"),
        ("id,picture\n", "line 1: missing column 'image'"),
        (
            "id,image,my place\n",
            "line 1: column 'my place' is not a valid variable name",
        ),
        ("id,image,id\n", "line 1: duplicate column 'id'"),
    ],
)
def test_csv_header_problems(tmp_path: Path, content: str, message: str) -> None:
    """A CSV header must have id and image and usable variable names."""
    (tmp_path / "refs.csv").write_text(content, encoding="utf-8")
    path = refs_manifest(tmp_path, '[references_from]\ncsv = "refs.csv"\n')
    with pytest.raises(ManifestError, match=re.escape(f"refs.csv: {message}")):
        load_manifest(path)


def test_missing_csv_names_the_file(tmp_path: Path) -> None:
    """A references_from file that is missing is one problem naming it."""
    path = refs_manifest(tmp_path, '[references_from]\ncsv = "gone.csv"\n')
    with pytest.raises(
        ManifestError, match=r"references_from: csv: cannot read .*gone\.csv"
    ):
        load_manifest(path)


def test_jsonl_references(tmp_path: Path) -> None:
    """JSONL lines {id, image, vars?} become references; blank lines are skipped."""
    (tmp_path / "refs.jsonl").write_text(
        '{"id": "a", "image": "https://example.com/a.jpg", "vars": {"place": "hall"}}\n'
        "\n"
        '{"id": "b", "image": "data:image/png;base64,iVBORw0KGgo=", '
        '"vars": {"place": "yard"}}\n',
        encoding="utf-8",
    )
    path = refs_manifest(tmp_path, '[references_from]\njsonl = "refs.jsonl"\n')
    manifest = load_manifest(path)
    assert [r.id for r in manifest.references] == ["a", "b"]
    assert validate_manifest(manifest, path).ok


def test_jsonl_problems_name_file_and_line(tmp_path: Path) -> None:
    """Bad JSON, a non-object and an unknown key are each reported with their line."""
    (tmp_path / "refs.jsonl").write_text(
        '{"id": "a", "image": "https://example.com/a.jpg"}\n'
        '{"id": "b", "image": \n'
        "[1, 2]\n"
        '{"id": "c", "image": "https://example.com/c.jpg", "tags": []}\n',
        encoding="utf-8",
    )
    path = refs_manifest(tmp_path, '[references_from]\njsonl = "refs.jsonl"\n')
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    jsonl = str(tmp_path / "refs.jsonl")
    assert info.value.problems == [
        f"{jsonl}: line 2: invalid JSON: Expecting value (column 22)",
        f"{jsonl}: line 3: expected an object "
        '{"id": ..., "image": ..., "vars": {...}}',
        f"{jsonl}: line 4 (id=c): tags: unknown key 'tags'",
    ]


def test_inline_and_listed_references_combine(tmp_path: Path) -> None:
    """[[references]] come first, then the list file's rows."""
    (tmp_path / "refs.jsonl").write_text(
        '{"id": "b", "image": "https://example.com/b.jpg", "vars": {"place": "b"}}\n',
        encoding="utf-8",
    )
    table = (
        f'[[references]]\nid = "a"\nimage = "{URL.format("a")}"\n'
        'vars = { place = "a" }\n[references_from]\njsonl = "refs.jsonl"\n'
    )
    manifest = load_manifest(refs_manifest(tmp_path, table))
    assert [r.id for r in manifest.references] == ["a", "b"]


def test_non_image_reference_file(tmp_path: Path) -> None:
    """A local reference that is not an image is named with its path."""
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_text("not a picture", encoding="utf-8")
    path = refs_manifest(
        tmp_path,
        '[[references]]\nid = "a"\nimage = "refs/a.png"\nvars = { place = "x" }\n',
    )
    problems = problems_of(path)
    assert len(problems) == 1
    assert re.search(
        r"references\[0\] \(id=a\): image: not a readable image: /.*a\.png", problems[0]
    )


def test_missing_reference_file(tmp_path: Path) -> None:
    """A local reference that does not exist is named with its absolute path."""
    path = refs_manifest(
        tmp_path,
        '[[references]]\nid = "a"\nimage = "refs/gone.jpg"\nvars = { place = "x" }\n',
    )
    assert problems_of(path) == [
        f"{path}: references[0] (id=a): image: file not found: {tmp_path}/refs/gone.jpg"
    ]


def test_unsupported_image_format(tmp_path: Path) -> None:
    """A real image in a format the API does not take (GIF) is a problem."""
    png(tmp_path / "a.gif", fmt="GIF")
    path = refs_manifest(
        tmp_path, '[[references]]\nid = "a"\nimage = "a.gif"\nvars = { place = "x" }\n'
    )
    assert problems_of(path) == [
        f"{path}: references[0] (id=a): image: {tmp_path}/a.gif is GIF; the API takes "
        "PNG, JPG or WEBP"
    ]


def test_each_local_file_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images shared by many references and tasks are opened once per path."""
    png(tmp_path / "a.png")
    opened: list[Path] = []
    real = files_mod.image_problem

    def spy(path: Path) -> str | None:
        opened.append(path)
        return real(path)

    monkeypatch.setattr(files_mod, "image_problem", spy)
    refs = "".join(
        f'[[references]]\nid = "r{i}"\nimage = "a.png"\nvars = {{ place = "x" }}\n'
        for i in range(5)
    )
    path = refs_manifest(
        tmp_path,
        refs + '[matrix]\n"providerSettings.ideogram.'
        'styleReferenceImages" = [["a.png"], ["a.png", "a.png"]]\n',
    )
    report = validate_manifest(load_manifest(path), path)
    assert report.ok, report.problems
    assert opened == [tmp_path / "a.png"]
    assert report.local_files == 1


def test_missing_style_image_reported_once(tmp_path: Path) -> None:
    """A missing local style image is one problem, however many tasks use it."""
    refs = "".join(ref_table(f"r{i}") for i in range(3))
    path = refs_manifest(
        tmp_path,
        refs + "[defaults.providerSettings.ideogram]\n"
        'styleReferenceImages = ["style/gone.png"]\n',
    )
    assert problems_of(path) == [
        f"{path}: r0/v: providerSettings.ideogram.styleReferenceImages: "
        f"file not found: {tmp_path}/style/gone.png"
    ]


def test_prompt_longer_than_2000_after_filling(tmp_path: Path) -> None:
    """Filling can push a short template past the limit; that task is named."""
    long = "x" * 1997
    table = ref_table("short", "y") + ref_table("long", long)
    path = refs_manifest(tmp_path, table)
    assert problems_of(path) == [
        f"{path}: long/v: positivePrompt: 2001 characters after filling the template; "
        "the limit is 2000"
    ]


def test_template_at_the_2000_limit_is_fine(tmp_path: Path) -> None:
    """Exactly 2000 characters after filling is allowed."""
    table = (
        f'[[references]]\nid = "a"\nimage = "{URL.format(1)}"\n'
        f'vars = {{ place = "{"x" * 1996}" }}\n'
    )
    assert problems_of(refs_manifest(tmp_path, table)) == []


def test_problem_listing_is_capped(tmp_path: Path) -> None:
    """Past the limit, problems are counted and summarised in one last line."""
    refs = "".join(
        f'[[references]]\nid = "r{i}"\nimage = "{URL.format(i)}"\n' for i in range(12)
    )
    path = refs_manifest(tmp_path, refs)
    report = validate_manifest(load_manifest(path), path, limit=5)
    assert report.problem_count == 12
    assert len(report.problems) == 6
    assert report.problems[-1] == "... and 7 more"
    assert not report.ok


def test_only_restricts_a_variant_to_some_references(tmp_path: Path) -> None:
    """A variant's `only` list limits it to those references, in reference order."""
    refs = "".join(ref_table(f"r{i}") for i in range(3))
    path = write(
        tmp_path,
        HEAD
        + refs
        + '[[variants]]\nid = "all"\npositivePrompt = "{place}"\n'
        + '[[variants]]\nid = "some"\npositivePrompt = "{place}"\n'
        + 'only = ["r2", "r0"]\n',
    )
    manifest = load_manifest(path)
    keys = [s.key for s in expand(manifest)]
    assert keys == ["r0/all", "r0/some", "r1/all", "r2/all", "r2/some"]
    assert count_tasks(manifest) == 5
    assert validate_manifest(manifest, path).tasks == 5
    assert "only" not in manifest.variants[1].params


def test_report_without_problems_does_not_raise() -> None:
    """raise_for_problems is a no-op on a clean report."""
    report = ValidationReport(
        tasks=1,
        images=1,
        images_by_speed={},
        local_files=0,
        problems=(),
        problem_count=0,
    )
    report.raise_for_problems()


def test_manifest_built_in_python_is_checked_too(tmp_path: Path) -> None:
    """validate_manifest repeats the shape checks for manifests not made by load."""
    manifest = Manifest.model_validate(
        {
            "job": {"name": "py"},
            "defaults": {"width": 1344, "height": 768, "remix": 1},
            "references": [{"id": "a", "image": URL.format("a")}],
            "variants": [{"id": "v", "positivePrompt": "p"}],
            "matrix": {"numberResults": []},
        }
    )
    report = validate_manifest(manifest, Path("py.toml"))
    assert report.problems == (
        "py.toml: defaults: remix: unknown parameter 'remix'",
        "py.toml: matrix: numberResults: axis has no values: give at least one",
    )


def test_task_problems_of_listed_references_name_the_list_line(tmp_path: Path) -> None:
    """A missing image of a CSV reference is placed at its CSV line."""
    (tmp_path / "refs.csv").write_text(
        "id,image,place\na,gone.png,x\n", encoding="utf-8"
    )
    path = refs_manifest(tmp_path, '[references_from]\ncsv = "refs.csv"\n')
    assert problems_of(path) == [
        f"{path}: {tmp_path}/refs.csv line 2 (id=a): image: file not found: "
        f"{tmp_path}/gone.png"
    ]
