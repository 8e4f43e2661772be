"""Invalid manifests through the real CLI: exit 2, a precise message, zero requests.

Each case is a valid job with exactly one thing wrong. It goes through
``remix run`` (pointed at a live sandbox with a valid key) and ``remix plan``: the run
must stop with exit code 2 before a single byte reaches the server, and the message
must name the file, the task key (or the reference / variant / table) and the field.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from pipeline.cli import main
from pipeline.sandbox import STATE, SandboxConfig
from tests.conftest import SandboxFactory
from tests.jobkit import make_ref, toml_value

DATA = Path(__file__).parent / "data" / "manifests"
COMMITTED_BAD = sorted(DATA.glob("bad_*.toml"))
EXPECT = {
    p: p.read_text(encoding="utf-8").splitlines()[0].removeprefix("# expect: ")
    for p in COMMITTED_BAD
}
"""Each committed bad manifest's first line: ``# expect: <regex>``."""
KEY = "r0/v0"
"""The task key of the one task of the base job."""
REF = "references[0] (id=r0)"
VAR = "variants[0] (id=v0)"
IDEO = "providerSettings.ideogram"
URL = "https://example.com/photo.jpg"
FAST_CONFIG = """
[poll]
interval_s = 0.05
min_interval_s = 0.005
max_interval_s = 0.2
not_found_grace_s = 0.1

[retry]
wait_initial_s = 0.0
wait_max_s = 0.0
attempts = 2

[limits]
requests_per_s = 10000.0
burst = 1000
"""

Doc = dict[str, Any]
Edit = Callable[[Doc], None]


def base_doc() -> Doc:
    """A valid one-task job: a local PNG reference and one templated variant."""
    return {
        "job": {"name": "bad"},
        "defaults": {"width": 1024, "height": 1024, "outputFormat": "PNG"},
        "references": [
            {"id": "r0", "image": "refs/r0.png", "vars": {"thing": "cat"}},
        ],
        "variants": [{"id": "v0", "positivePrompt": "a {thing} in ink"}],
    }


# ---------------------------------------------------------------------------
# A tiny TOML writer (tomllib only reads): tables, arrays of tables, inline values


def to_toml(doc: Mapping[str, Any]) -> str:
    """Scalars first (TOML needs them before any table), then tables."""
    lines = [
        f"{json.dumps(k)} = {toml_value(v)}"
        for k, v in doc.items()
        if not isinstance(v, dict | list) or (isinstance(v, list) and not v)
    ]
    for name, value in doc.items():
        if isinstance(value, dict):
            lines += ["", f"[{name}]"]
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines += ["", f"[[{name}]]"]
                lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in item.items()]
        elif isinstance(value, list) and value:
            lines.insert(0, f"{json.dumps(name)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Edits


def variant(**params: Any) -> Edit:
    def edit(doc: Doc) -> None:
        doc["variants"][0].update(params)

    return edit


def ideogram(**params: Any) -> Edit:
    return variant(providerSettings={"ideogram": params})


def defaults(**params: Any) -> Edit:
    def edit(doc: Doc) -> None:
        doc["defaults"].update(params)

    return edit


def reference(**values: Any) -> Edit:
    def edit(doc: Doc) -> None:
        doc["references"][0].update(values)

    return edit


def table(name: str, value: Any) -> Edit:
    def edit(doc: Doc) -> None:
        doc[name] = value

    return edit


def drop(*path: str) -> Edit:
    def edit(doc: Doc) -> None:
        node: Any = doc
        for seg in path[:-1]:
            node = node[int(seg)] if isinstance(node, list) else node[seg]
        del node[path[-1]]

    return edit


def both(*edits: Edit) -> Edit:
    def edit(doc: Doc) -> None:
        for e in edits:
            e(doc)

    return edit


def second_reference(**values: Any) -> Edit:
    def edit(doc: Doc) -> None:
        doc["references"].append({"id": "r1", "image": URL, **values})

    return edit


def second_variant(**values: Any) -> Edit:
    def edit(doc: Doc) -> None:
        doc["variants"].append({"positivePrompt": "x", **values})

    return edit


def members(*pairs: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"colorHex": h, "colorWeight": w} for h, w in pairs]


def gif_bytes() -> bytes:
    """A real, readable image in a format the API does not take."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="GIF")
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    """One invalid manifest: how to make it and what the message must name."""

    id: str
    edit: Edit | None
    where: str
    field: str
    raw: str | bytes | None = None
    """The manifest text itself, for cases the TOML writer cannot produce."""
    files: Mapping[str, str | bytes] = dataclasses.field(default_factory=dict)
    shown: str | None = None
    """The file the message names when it is not the manifest (a CSV/JSONL list)."""
    xfail: str | None = None
    """Why this case fails today (a known bug); strict, so a fix is noticed."""
    follow_ons: int = 0
    """Further genuine problems the one mistake causes (reported with it)."""

    def build(self, root: Path) -> Path:
        make_ref(root / "refs" / "r0.png")
        for name, content in self.files.items():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        path = root / "job.toml"
        if self.raw is not None:
            data = self.raw if isinstance(self.raw, bytes) else self.raw.encode()
            path.write_bytes(data)
            return path
        doc = base_doc()
        if self.edit is not None:
            self.edit(doc)
        path.write_text(to_toml(copy.deepcopy(doc)), encoding="utf-8")
        return path


LONG_VAR = "x" * 1995
BASE_TEXT = to_toml(base_doc())


def base_with(old: str, new: str) -> str:
    """The base manifest's text with one exact edit (which must apply)."""
    assert old in BASE_TEXT, old
    return BASE_TEXT.replace(old, new)


def nested(depth: int) -> str:
    return base_with('"width" = 1024', '"width" = ' + "[" * depth + "]" * depth)


CASES: list[Case] = [
    # -- every range of the seed, at both ends ---------------------------------
    Case("outputQuality-19", variant(outputQuality=19), KEY, "outputQuality"),
    Case("outputQuality-100", variant(outputQuality=100), KEY, "outputQuality"),
    Case("outputQuality-float", variant(outputQuality=50.5), KEY, "outputQuality"),
    Case("numberResults-0", variant(numberResults=0), KEY, "numberResults"),
    Case("numberResults-21", variant(numberResults=21), KEY, "numberResults"),
    Case("numberResults-string", variant(numberResults="2"), KEY, "numberResults"),
    Case(
        "remixStrength-0",
        ideogram(remixStrength=0),
        KEY,
        f"{IDEO}.remixStrength",
    ),
    Case(
        "remixStrength-101",
        ideogram(remixStrength=101),
        KEY,
        f"{IDEO}.remixStrength",
    ),
    Case(
        "remixStrength-bool",
        ideogram(remixStrength=True),
        KEY,
        f"{IDEO}.remixStrength",
    ),
    Case("ttl-59", variant(ttl=59), KEY, "ttl"),
    Case("ttl-without-url", variant(ttl=60, outputType="dataURI"), KEY, "ttl"),
    Case(
        "colorWeight-0.04",
        ideogram(colorPalette={"members": members(("#FF5733", 0.04))}),
        KEY,
        f"{IDEO}.colorPalette.members.0.colorWeight",
    ),
    Case(
        "colorWeight-1.01",
        ideogram(colorPalette={"members": members(("#FF5733", 1.01))}),
        KEY,
        f"{IDEO}.colorPalette.members.0.colorWeight",
    ),
    Case(
        "colorWeight-0.055",
        ideogram(colorPalette={"members": members(("#FF5733", 0.055))}),
        KEY,
        f"{IDEO}.colorPalette.members.0.colorWeight",
    ),
    Case(
        "colorHex-no-hash",
        ideogram(colorPalette={"members": members(("FF5733", 0.5))}),
        KEY,
        f"{IDEO}.colorPalette.members.0.colorHex",
    ),
    Case(
        "colorHex-not-hex",
        ideogram(colorPalette={"members": members(("#GG5733", 0.5))}),
        KEY,
        f"{IDEO}.colorPalette.members.0.colorHex",
    ),
    Case(
        "colorHex-short",
        ideogram(colorPalette={"members": members(("#F57", 0.5))}),
        KEY,
        f"{IDEO}.colorPalette.members.0.colorHex",
    ),
    Case(
        "palette-name-bad",
        ideogram(colorPalette={"name": "NEON"}),
        KEY,
        f"{IDEO}.colorPalette.name",
    ),
    Case(
        "palette-name-and-members",
        ideogram(colorPalette={"name": "EMBER", "members": members(("#FF5733", 0.5))}),
        KEY,
        f"{IDEO}.colorPalette",
    ),
    Case(
        "palette-neither",
        ideogram(colorPalette={}),
        KEY,
        f"{IDEO}.colorPalette",
    ),
    Case(
        "palette-members-empty",
        ideogram(colorPalette={"members": []}),
        KEY,
        f"{IDEO}.colorPalette.members",
    ),
    Case(
        "styleReferenceImages-0",
        ideogram(styleReferenceImages=[]),
        KEY,
        f"{IDEO}.styleReferenceImages",
    ),
    Case(
        "styleReferenceImages-5",
        ideogram(styleReferenceImages=[URL] * 5),
        KEY,
        f"{IDEO}.styleReferenceImages",
    ),
    # -- every enum ------------------------------------------------------------
    Case("styleType-bad", ideogram(styleType="PHOTO"), KEY, f"{IDEO}.styleType"),
    Case(
        "styleType-lowercase",
        ideogram(styleType="design"),
        KEY,
        f"{IDEO}.styleType",
    ),
    Case("magicPrompt-bad", ideogram(magicPrompt="YES"), KEY, f"{IDEO}.magicPrompt"),
    Case(
        "renderingSpeed-bad",
        ideogram(renderingSpeed="FAST"),
        KEY,
        f"{IDEO}.renderingSpeed",
    ),
    Case("outputType-bad", variant(outputType="file"), KEY, "outputType"),
    Case("outputFormat-bad", variant(outputFormat="GIF"), KEY, "outputFormat"),
    Case("safety-mode-bad", variant(safety={"mode": "strict"}), KEY, "safety.mode"),
    Case(
        "safety-checkContent-string",
        variant(safety={"checkContent": "yes"}),
        KEY,
        "safety.checkContent",
    ),
    Case(
        "webhookURL-not-uri", variant(webhookURL="ftp://x.example/h"), KEY, "webhookURL"
    ),
    Case(
        "uploadEndpoint-not-uri",
        variant(uploadEndpoint="not a url at all"),
        KEY,
        "uploadEndpoint",
    ),
    Case(
        "job-model-bad",
        table("job", {"name": "bad", "model": "ideogram:2@1"}),
        KEY,
        "model",
    ),
    # -- reserved parameters ---------------------------------------------------
    Case(
        "deliveryMethod-reserved", variant(deliveryMethod="sync"), VAR, "deliveryMethod"
    ),
    Case(
        "deliveryMethod-reserved-defaults",
        defaults(deliveryMethod="async"),
        "defaults",
        "deliveryMethod",
    ),
    Case("taskType-reserved", variant(taskType="imageInference"), VAR, "taskType"),
    Case("taskUUID-reserved", defaults(taskUUID="x"), "defaults", "taskUUID"),
    Case("includeCost-reserved", variant(includeCost=False), VAR, "includeCost"),
    Case(
        "inputs-reserved",
        variant(inputs={"referenceImages": [URL]}),
        VAR,
        "inputs",
    ),
    Case("model-reserved", defaults(model="ideogram:3@2"), "defaults", "model"),
    # -- sizes and prompts -----------------------------------------------------
    Case("width-not-allowed", variant(width=1000), KEY, "width"),
    Case("height-not-allowed", variant(height=1000), KEY, "height"),
    Case("width-missing", drop("defaults", "width"), KEY, "width"),
    Case("negativePrompt-empty", variant(negativePrompt=""), KEY, "negativePrompt"),
    Case(
        "negativePrompt-2001",
        variant(negativePrompt="n" * 2001),
        KEY,
        "negativePrompt",
    ),
    Case(
        "positivePrompt-missing",
        drop("variants", "0", "positivePrompt"),
        KEY,
        "positivePrompt",
    ),
    Case("positivePrompt-empty", variant(positivePrompt=""), KEY, "positivePrompt"),
    Case(
        "positivePrompt-empty-after-filling",
        both(variant(positivePrompt="{thing}"), reference(vars={"thing": ""})),
        KEY,
        "positivePrompt",
    ),
    Case(
        "positivePrompt-2001",
        variant(positivePrompt="p" * 2001),
        KEY,
        "positivePrompt",
    ),
    Case(
        "positivePrompt-over-2000-after-filling",
        reference(vars={"thing": LONG_VAR}),
        KEY,
        "positivePrompt",
    ),
    Case(
        "positivePrompt-not-string",
        variant(positivePrompt=42),
        KEY,
        "positivePrompt",
    ),
    # -- templates -------------------------------------------------------------
    Case(
        "template-unfilled",
        variant(positivePrompt="a {place} at night"),
        KEY,
        "positivePrompt",
    ),
    Case(
        "template-unfilled-negative",
        variant(negativePrompt="no {thingy}"),
        KEY,
        "negativePrompt",
    ),
    Case(
        "template-stray-brace",
        variant(positivePrompt="a {thing at night"),
        KEY,
        "positivePrompt",
    ),
    Case(
        "template-var-name-bad",
        reference(vars={"bad-name": "x"}),
        REF,
        "vars",
    ),
    Case(
        "template-var-not-string",
        reference(vars={"thing": 3}),
        REF,
        "vars.thing",
    ),
    # -- malformed TOML and files ----------------------------------------------
    Case(
        "toml-unclosed-table",
        None,
        "line 1, column",
        "invalid TOML",
        raw="[job\nname = 'bad'\n",
    ),
    Case(
        "toml-duplicate-key",
        None,
        "line 3, column",
        "invalid TOML",
        raw="[job]\nname = 'a'\nname = 'b'\n",
    ),
    Case(
        "toml-unterminated-string",
        None,
        "line 2, column",
        "invalid TOML",
        raw='[job]\nname = "bad\n',
    ),
    Case(
        "toml-bare-value",
        None,
        "line 2, column",
        "invalid TOML",
        raw="[job]\nname = bad\n",
    ),
    Case(
        "toml-nested-300",
        None,
        "[defaults]",
        "width",
        raw=nested(300),
    ),
    Case(
        "toml-nested-1000",
        None,
        "",
        "nested",
        raw=nested(1000),
    ),
    Case(
        "toml-int-5000-digits",
        None,
        "",
        "width",
        raw=base_with('"width" = 1024', '"width" = ' + "9" * 5000),
    ),
    Case(
        "toml-not-utf8",
        None,
        "",
        "not UTF-8",
        raw=BASE_TEXT.encode() + b"# caf\xe9\n",
    ),
    Case(
        "reference-file-missing",
        reference(image="refs/missing.png"),
        REF,
        "image",
    ),
    Case(
        "reference-text-renamed-png",
        reference(image="refs/notes.png"),
        REF,
        "image",
        files={"refs/notes.png": "these are notes, not pixels\n"},
    ),
    Case(
        "reference-empty-file",
        reference(image="refs/empty.png"),
        REF,
        "image",
        files={"refs/empty.png": b""},
    ),
    Case(
        "reference-gif",
        reference(image="refs/anim.gif"),
        REF,
        "image",
        files={"refs/anim.gif": gif_bytes()},
    ),
    Case(
        "reference-tilde-unknown-user",
        reference(image="~nosuchuser/photo.png"),
        REF,
        "image",
    ),
    Case("reference-directory", reference(image="refs"), REF, "image"),
    Case(
        "reference-bad-scheme", reference(image="ftp://x.example/a.png"), REF, "image"
    ),
    Case("reference-empty-string", reference(image=""), REF, "image"),
    Case(
        "style-reference-missing",
        ideogram(styleReferenceImages=["refs/nostyle.png"]),
        KEY,
        f"{IDEO}.styleReferenceImages",
    ),
    Case(
        "style-reference-not-image",
        ideogram(styleReferenceImages=["refs/style.png"]),
        KEY,
        f"{IDEO}.styleReferenceImages",
        files={"refs/style.png": "text\n"},
    ),
    # -- ids -------------------------------------------------------------------
    Case(
        "duplicate-reference-id",
        second_reference(id="r0"),
        "references[1] (id=r0)",
        "id",
        # The second r0 also lacks vars for the prompt's {thing}, but its tasks have
        # no key of their own (they would be r0/v0 again): only the id is reported.
    ),
    Case(
        "duplicate-variant-id",
        second_variant(id="v0"),
        "variants[1] (id=v0)",
        "id",
    ),
    Case("reference-id-dotdot", reference(id="../x"), "references[0] (id=../x)", "id"),
    Case("reference-id-slash", reference(id="a/b"), "references[0] (id=a/b)", "id"),
    Case(
        "reference-id-dot", reference(id=".hidden"), "references[0] (id=.hidden)", "id"
    ),
    Case("reference-id-empty", reference(id=""), "references[0] (id=)", "id"),
    Case("reference-id-missing", drop("references", "0", "id"), "references[0]", "id"),
    Case("variant-id-dotdot", variant(id="../x"), "variants[0] (id=../x)", "id"),
    Case("variant-id-slash", variant(id="a/b"), "variants[0] (id=a/b)", "id"),
    Case("variant-id-backslash", variant(id="a\\b"), "variants[0] (id=a\\b)", "id"),
    Case("job-name-traversal", table("job", {"name": "../up"}), "job", "name"),
    Case(
        "variant-only-unknown",
        variant(only=["nobody"]),
        VAR,
        "only",
    ),
    # -- unknown keys ----------------------------------------------------------
    Case("unknown-top-level-key", table("colour", "red"), "colour", ""),
    Case("unknown-table", table("extras", {"a": 1}), "extras", ""),
    Case(
        "unknown-key-in-job",
        table("job", {"name": "bad", "budget": 1}),
        "job",
        "budget",
    ),
    Case("unknown-key-in-defaults", defaults(strength=5), "defaults", "strength"),
    Case(
        "snake-case-key-in-defaults",
        defaults(output_format="PNG"),
        "defaults",
        "output_format",
    ),
    Case(
        "unknown-key-in-defaults-ideogram",
        defaults(providerSettings={"ideogram": {"remixStrenght": 40}}),
        "defaults",
        f"{IDEO}.remixStrenght",
    ),
    Case(
        "unknown-provider-in-defaults",
        defaults(providerSettings={"openai": {"quality": "hd"}}),
        "defaults",
        "providerSettings.openai",
        follow_ons=1,  # and then providerSettings lacks its required ideogram
    ),
    Case(
        "unknown-key-in-variant-ideogram",
        ideogram(magic_prompt="ON"),
        VAR,
        f"{IDEO}.magic_prompt",
    ),
    Case("unknown-key-in-variant", variant(seed=42), VAR, "seed"),
    Case(
        "unknown-key-in-palette-member",
        ideogram(colorPalette={"members": [{"colorHex": "#FF5733", "weight": 0.5}]}),
        VAR,
        f"{IDEO}.colorPalette.members.0.weight",
    ),
    Case("unknown-key-in-reference", reference(caption="hi"), REF, "caption"),
    # -- matrix ----------------------------------------------------------------
    Case(
        "matrix-empty-axis",
        table("matrix", {f"{IDEO}.remixStrength": []}),
        "matrix",
        f"{IDEO}.remixStrength",
    ),
    Case(
        "matrix-unknown-axis",
        table("matrix", {f"{IDEO}.strength": [1, 2]}),
        "matrix",
        f"{IDEO}.strength",
    ),
    Case(
        "matrix-axis-not-list",
        table("matrix", {f"{IDEO}.remixStrength": 50}),
        "matrix",
        f"{IDEO}.remixStrength",
    ),
    Case(
        "matrix-value-out-of-range",
        table("matrix", {f"{IDEO}.remixStrength": [50, 101]}),
        "r0/v0/remixStrength=101",
        f"{IDEO}.remixStrength",
    ),
    Case(
        "matrix-reserved-axis",
        table("matrix", {"deliveryMethod": ["sync", "async"]}),
        "matrix",
        "deliveryMethod",
    ),
    # -- CSV / JSONL reference lists -------------------------------------------
    Case(
        "csv-file-missing",
        table("references_from", {"csv": "nope.csv"}),
        "references_from",
        "csv",
    ),
    Case(
        "csv-missing-image-column",
        table("references_from", {"csv": "refs.csv"}),
        "line 1",
        "missing column 'image'",
        files={"refs.csv": f"id,url\nr1,{URL}\n"},
        shown="refs.csv",
    ),
    Case(
        "csv-wrong-field-count",
        table("references_from", {"csv": "refs.csv"}),
        "line 3",
        "fields",
        files={"refs.csv": f"id,image,thing\nr1,{URL},dog\nr2,{URL},dog,extra\n"},
        shown="refs.csv",
    ),
    Case(
        "csv-traversal-id",
        table("references_from", {"csv": "refs.csv"}),
        "line 2 (id=../r1)",
        "id",
        files={"refs.csv": f"id,image,thing\n../r1,{URL},dog\n"},
        shown="refs.csv",
    ),
    Case(
        "csv-duplicate-of-inline-id",
        table("references_from", {"csv": "refs.csv"}),
        "line 2 (id=r0)",
        "id",
        files={"refs.csv": f"id,image,thing\nr0,{URL},dog\n"},
        shown="refs.csv",
    ),
    Case(
        "csv-image-missing-file",
        table("references_from", {"csv": "refs.csv"}),
        "line 2 (id=r1)",
        "image",
        files={"refs.csv": "id,image,thing\nr1,refs/gone.png,dog\n"},
        shown="refs.csv",
    ),
    Case(
        "csv-empty-file",
        table("references_from", {"csv": "refs.csv"}),
        "line 1",
        "empty file",
        files={"refs.csv": ""},
        shown="refs.csv",
    ),
    Case(
        "csv-bad-var-column",
        table("references_from", {"csv": "refs.csv"}),
        "line 1",
        "not a valid variable name",
        files={"refs.csv": f"id,image,my place\nr1,{URL},x\n"},
        shown="refs.csv",
    ),
    Case(
        "jsonl-invalid-json",
        table("references_from", {"jsonl": "refs.jsonl"}),
        "line 2",
        "invalid JSON",
        files={
            "refs.jsonl": json.dumps(
                {"id": "r1", "image": URL, "vars": {"thing": "dog"}}
            )
            + "\n{id: r2\n"
        },
        shown="refs.jsonl",
    ),
    Case(
        "jsonl-not-object",
        table("references_from", {"jsonl": "refs.jsonl"}),
        "line 1",
        "expected an object",
        files={"refs.jsonl": json.dumps(["r1", URL]) + "\n"},
        shown="refs.jsonl",
    ),
    Case(
        "jsonl-missing-image",
        table("references_from", {"jsonl": "refs.jsonl"}),
        "line 1 (id=r1)",
        "image",
        files={"refs.jsonl": json.dumps({"id": "r1"}) + "\n"},
        shown="refs.jsonl",
    ),
    Case(
        "jsonl-var-not-string",
        table("references_from", {"jsonl": "refs.jsonl"}),
        "line 1 (id=r1)",
        "vars.n",
        files={"refs.jsonl": json.dumps({"id": "r1", "image": URL, "vars": {"n": 1}})},
        shown="refs.jsonl",
    ),
    Case(
        "references-from-both",
        table("references_from", {"csv": "a.csv", "jsonl": "b.jsonl"}),
        "references_from",
        "",
    ),
    # -- empty or missing tables -----------------------------------------------
    Case("no-variants", table("variants", []), "variants", ""),
    Case("no-references", table("references", []), "references", ""),
    Case("job-missing", drop("job"), "job", ""),
    Case(
        "budget-negative",
        table("job", {"name": "bad", "budget_usd": -1}),
        "job",
        "budget_usd",
    ),
]

PROBLEMS_PER_CASE = 1
"""Problems each corpus case must produce: one problem each, by construction."""


def problem_lines(stderr: str) -> list[str]:
    """stderr minus the closing count line."""
    return [
        line
        for line in stderr.splitlines()
        if line and not re.match(r"remix: \d+ problem\(s\) found", line)
    ]


def assert_names(lines: list[str], case: Case, path: Path) -> None:
    shown = str(path.parent / case.shown) if case.shown else str(path)
    matching = [
        line
        for line in lines
        if line.startswith((f"{path}: ", f"{shown}: "))
        and shown in line
        and case.where in line
        and case.field in line
    ]
    assert matching, f"no line names {shown!r}, {case.where!r}, {case.field!r}: {lines}"


async def cli(argv: list[str]) -> int:
    """`remix ...` in a worker thread: a wrongly accepted run gets its own loop."""
    return await anyio.to_thread.run_sync(main, argv)


def assert_untouched(server: TestServer) -> None:
    state = server.app[STATE]
    assert state.http_requests == 0
    assert state.uploads == 0
    assert sum(state.requests.values()) == 0


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean working directory with a fast config file; returns the config path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNWARE_API_KEY", "sandbox")
    config = tmp_path / "fast.toml"
    config.write_text(FAST_CONFIG, encoding="utf-8")
    return config


def test_corpus_is_large_and_ids_unique() -> None:
    """The corpus holds at least 60 distinct one-problem manifests."""
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


def case_param(case: Case) -> Any:
    marks = (
        []
        if case.xfail is None
        else [pytest.mark.xfail(strict=True, reason=case.xfail)]
    )
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [case_param(c) for c in CASES])
async def test_bad_manifest_is_refused_before_any_request(
    case: Case,
    tmp_path: Path,
    env: Path,
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """run and plan exit 2 naming file, place and field; the server sees nothing."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    path = case.build(tmp_path)
    run_dir = tmp_path / "run"

    code = await cli(
        ["run", str(path), "--run-dir", str(run_dir), "--config", str(env), "-q"]
    )
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = problem_lines(err)
    assert len(lines) == PROBLEMS_PER_CASE + case.follow_ons, lines
    assert_names(lines, case, path)
    assert "nothing was submitted" in err
    for text in (out, err, caplog.text):
        assert "Traceback" not in text
    assert_untouched(server)
    assert not (run_dir / "journal.jsonl").exists()

    code = await cli(["plan", str(path)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert problem_lines(err) == lines
    assert "Traceback" not in out + err + caplog.text
    assert_untouched(server)


@pytest.mark.parametrize("name", ["missing.toml", "refs"])
async def test_unreadable_manifest_path_is_refused(
    name: str,
    tmp_path: Path,
    env: Path,
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A manifest path that is missing or a directory: exit 2, the path named."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    make_ref(tmp_path / "refs" / "r0.png")
    path = tmp_path / name
    for argv in (
        ["run", str(path), "--run-dir", str(tmp_path / "run"), "--config", str(env)],
        ["plan", str(path)],
    ):
        code = await cli(argv)
        out, err = capsys.readouterr()
        assert code == 2, (out, err)
        assert problem_lines(err)[0].startswith(f"{path}: cannot read")
        assert "Traceback" not in out + err + caplog.text
    assert_untouched(server)


@pytest.mark.parametrize("path", COMMITTED_BAD, ids=[p.stem for p in COMMITTED_BAD])
async def test_committed_bad_manifest_is_refused_by_run(
    path: Path,
    tmp_path: Path,
    env: Path,
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The manifest tests' bad_*.toml files also stop `remix run`: exit 2, unsent."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    expect = EXPECT[path]
    run_dir = tmp_path / "run"
    code = await cli(
        ["run", str(path), "--run-dir", str(run_dir), "--config", str(env), "-q"]
    )
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = problem_lines(err)
    assert any(
        line.startswith(f"{path}: ") and re.search(expect, line) for line in lines
    ), lines
    assert "Traceback" not in out + err + caplog.text
    assert_untouched(server)


# ---------------------------------------------------------------------------
# Several problems at once


PER_TASK_PROBLEMS: list[tuple[Edit, str]] = [
    (variant(outputQuality=19), "outputQuality"),
    (ideogram(remixStrength=101), f"{IDEO}.remixStrength"),
    (variant(negativePrompt="no {thingy}"), "negativePrompt"),
    (reference(image="refs/missing.png"), f"{REF}: image"),
    (second_variant(id="v1", positivePrompt="q" * 2001), "r0/v1: positivePrompt"),
]
SHAPE_PROBLEMS: list[tuple[Edit, str]] = [
    (defaults(strength=5), "defaults: strength"),
    (second_reference(id="r0"), "references[1] (id=r0): id"),
]


async def run_and_collect(
    doc_edit: Edit,
    root: Path,
    config: Path,
    server: TestServer,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str]:
    path = Case("multi", doc_edit, "", "").build(root)
    code = await cli(
        ["run", str(path), "--run-dir", str(root / "run"), "--config", str(config)]
    )
    _, err = capsys.readouterr()
    assert_untouched(server)
    return code, err


async def test_every_per_task_problem_is_reported_together(
    tmp_path: Path,
    env: Path,
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ranges, prompts, templates and files: one run lists all of them, then stops."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    code, err = await run_and_collect(
        both(*(e for e, _ in PER_TASK_PROBLEMS)), tmp_path, env, server, capsys
    )
    assert code == 2
    lines = problem_lines(err)
    for _, needle in PER_TASK_PROBLEMS:
        assert any(needle in line for line in lines), (needle, lines)
    assert f"remix: {len(lines)} problem(s) found" in err


async def test_shape_problems_are_reported_together(
    tmp_path: Path,
    env: Path,
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unknown keys, bad ids, unknown tables and bad types are listed in one go."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    problems: list[tuple[Edit, str]] = [
        *SHAPE_PROBLEMS,
        (variant(id="../x"), "variants[0] (id=../x): id"),
        (table("extras", {}), "extras"),
        (ideogram(magic_prompt="ON"), f"{IDEO}.magic_prompt"),
    ]
    code, err = await run_and_collect(
        both(*(e for e, _ in problems)), tmp_path, env, server, capsys
    )
    assert code == 2
    lines = problem_lines(err)
    for _, needle in problems:
        assert any(needle in line for line in lines), (needle, lines)


async def test_shape_and_per_task_problems_are_reported_together(
    tmp_path: Path,
    env: Path,
    make_sandbox: SandboxFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown key does not hide an out-of-range value elsewhere in the job."""
    server = await make_sandbox(SandboxConfig(seed=0, latency_s=0))
    monkeypatch.setenv("REMIX_BASE_URL", str(server.make_url("/v1")))
    problems = [*SHAPE_PROBLEMS, *PER_TASK_PROBLEMS]
    code, err = await run_and_collect(
        both(*(e for e, _ in problems)), tmp_path, env, server, capsys
    )
    assert code == 2
    lines = problem_lines(err)
    missing = [n for _, n in problems if not any(n in line for line in lines)]
    assert not missing, (missing, lines)
