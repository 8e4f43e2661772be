"""Test helpers: small real jobs (Pillow photos + a manifest) run the way the CLI does.

They run against an in-process sandbox through the same path ``remix run`` takes.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from PIL import Image, ImageDraw

from pipeline import runner
from pipeline.cli.sandboxed import SANDBOX_KEY as SANDBOX_KEY
from pipeline.config import Settings, load_settings
from pipeline.engine import Engine
from pipeline.progress import Progress
from pipeline.records import EngineOptions, RunSummary


def make_ref(path: Path, seed: int = 0, size: tuple[int, int] = (96, 64)) -> Path:
    """A small real photo-like image: a sky, a ground and a few shapes."""
    img = Image.new("RGB", size, (40 + seed * 20 % 200, 90, 160))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle((0, h * 2 // 3, w, h), fill=(60, 120 + seed * 13 % 100, 40))
    draw.ellipse((w // 4, h // 5, w // 2, h // 2), fill=(250, 220, 90))
    draw.line((0, h // 2, w, h // 3 + seed % 7), fill=(20, 20, 20), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def toml_value(value: Any) -> str:
    """One TOML value (tomllib only reads): scalars, arrays, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{ " + inner + " }"
    raise TypeError(value)


def styles(n: int, *, pairs_every: int = 0) -> list[dict[str, Any]]:
    """n variants with distinct prompts; every ``pairs_every``-th asks two images."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        variant: dict[str, Any] = {
            "id": f"v{i}",
            "positivePrompt": f"style {i} {{thing}}",
        }
        if pairs_every and i % pairs_every == 0:
            variant["numberResults"] = 2
        out.append(variant)
    return out


def write_job(
    root: Path,
    *,
    refs: int = 2,
    variants: Sequence[Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    matrix: Mapping[str, list[Any]] | None = None,
    name: str = "job",
    budget_usd: str | None = None,
) -> Path:
    """Write refs/*.png and job.toml under ``root``; returns the manifest path."""
    lines = ["[job]", f'name = "{name}"']
    if budget_usd is not None:
        lines.append(f"budget_usd = {budget_usd}")
    lines += ["", "[defaults]"]
    base = {"width": 1024, "height": 1024, "outputFormat": "PNG"}
    for key, value in {**base, **(defaults or {})}.items():
        lines.append(f"{key} = {toml_value(value)}")
    for i in range(refs):
        make_ref(root / "refs" / f"r{i}.png", seed=i)
        lines += ["", "[[references]]", f'id = "r{i}"', f'image = "refs/r{i}.png"']
        lines.append(f'vars = {{ thing = "thing {i}" }}')
    for variant in variants or [{"id": "v0", "positivePrompt": "a {thing} in ink"}]:
        lines += ["", "[[variants]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in variant.items()]
    if matrix:
        lines += ["", "[matrix]"]
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in matrix.items()]
    path = root / "job.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tomllib.loads(path.read_text())  # a broken helper should fail here, not later
    return path


def fast_settings(
    root: Path, base_url: str, key: str = SANDBOX_KEY, **sections: Mapping[str, Any]
) -> Settings:
    """Settings for tests: quick polls, zero retry waits, no rate limit to speak of."""
    overrides: dict[str, Any] = {
        "poll": {
            "interval_s": 0.05,
            "min_interval_s": 0.005,
            "first_after_s": 0.0,
            "max_interval_s": 0.2,
            "not_found_grace_s": 0.1,
        },
        "retry": {"wait_initial_s": 0.0, "wait_max_s": 0.0, "attempts": 4},
        "limits": {"requests_per_s": 10_000.0, "burst": 1_000},
        "run": {"shutdown_grace_s": 1.0},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    config = root / "test-config.toml"
    config.write_text("", encoding="utf-8")
    return load_settings(
        config,
        env={"RUNWARE_API_KEY": key, "REMIX_BASE_URL": base_url},
        overrides=overrides,
    )


def base_url(server: TestServer) -> str:
    return str(server.make_url("/v1"))


async def run_manifest(
    manifest_path: Path,
    run_dir: Path,
    settings: Settings,
    *,
    concurrency: int = 8,
    budget_usd: Decimal | None = None,
    retry_failed: bool = False,
    on_engine: Callable[[Engine], None] | None = None,
    progress: Progress | None = None,
    outputs: bool = False,
) -> RunSummary:
    """What ``remix run`` does after parsing flags: validate, lock the dir, run
    (and write the ledger and gallery when ``outputs``: most tests need neither)."""
    options = EngineOptions(
        concurrency=concurrency, budget_usd=budget_usd, retry_failed=retry_failed
    )
    return await runner.run_manifest(
        manifest_path,
        run_dir,
        settings,
        options,
        outputs=outputs,
        progress=progress,
        on_engine=on_engine,
    )


class StopAfter:
    """A progress sink that stops the engine once ``n`` images are done."""

    def __init__(self, n: int, *, hard: bool = True) -> None:
        self.n = n
        self.hard = hard
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.engine = engine

    def start(self, total_images: int, done_images: int) -> None:
        return None

    def update(
        self, *, done: int, failed: int, in_flight: int, spent_usd: Decimal
    ) -> None:
        if done >= self.n and self.engine is not None:
            if self.hard:
                self.engine.stop_now()
            else:
                self.engine.request_stop("interrupted")

    def close(self) -> None:
        return None


def image_files(run_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in (run_dir / "images").rglob("*")
        if p.suffix in {".png", ".jpg", ".webp"}
    )
