"""Pillow rendering: restyle a reference image the way a remix would, deterministically.

The output keeps the reference's layout (it is the reference, fitted to the requested
size) and restyles it by ``styleType``, ``colorPalette`` and style reference images;
``remixStrength`` blends between the two and ``seed`` adds a small hue shift and a soft
noise pattern. Same inputs and seed give the same bytes. Work happens at a reduced
internal resolution and is upscaled, which keeps a 1344x768 image well under 50 ms.
Everything here is synchronous and CPU-bound: callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, cast

from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter, ImageOps

RGB = tuple[int, int, int]

WORK_MAX_SIDE: Final = 384
"""Longest side of the internal working image; the result is upscaled from it."""

FORMATS: Final[dict[str, tuple[str, str, str]]] = {
    "JPG": ("JPEG", "jpg", "image/jpeg"),
    "PNG": ("PNG", "png", "image/png"),
    "WEBP": ("WEBP", "webp", "image/webp"),
}
"""outputFormat -> (Pillow format, file extension, MIME type)."""

PALETTES: Final[dict[str, tuple[str, ...]]] = {
    "EMBER": ("#2B0A05", "#7A1E0B", "#D9480F", "#F59F00", "#FFE8A3"),
    "FRESH": ("#0B3D2E", "#2F9E44", "#94D82D", "#D3F9D8", "#FFFFFF"),
    "JUNGLE": ("#191A19", "#0B2E13", "#1E5128", "#4E9F3D", "#D8E9A8"),
    "MAGIC": ("#1A0B3D", "#5F3DC4", "#B197FC", "#F783AC", "#FFF0F6"),
    "MELON": ("#3B0A0A", "#2B8A3E", "#E03131", "#FF8787", "#FFE3E3"),
    "MOSAIC": ("#29335C", "#1C3D5A", "#E4572E", "#A8C686", "#F3A712"),
    "PASTEL": ("#C9D7F8", "#E8D5FF", "#FFD6E0", "#D7F9F1", "#FFEFCF"),
    "ULTRAMARINE": ("#04052E", "#140152", "#22007C", "#0D00A4", "#4361EE"),
}
"""Preset colorPalette names -> their colours (the sandbox's own choice)."""

_EDGE_THRESHOLD: Final = 48


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where a reference image comes from: encoded bytes, or a placeholder key.

    ``key`` identifies the source for the decode cache (an image UUID, a URL or a
    content hash). With ``data`` None the sandbox could not fetch the image (a foreign
    URL), so a deterministic scene derived from ``key`` stands in for it.
    """

    key: str
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class RenderSpec:
    """Everything that determines the output bytes."""

    width: int
    height: int
    seed: int
    style_type: str = "AUTO"
    palette: tuple[tuple[RGB, float], ...] = ()
    """colorPalette colours with their weights (empty: no palette)."""
    remix_strength: int = 50
    output_format: str = "JPG"
    quality: int = 95
    scale: float = 1.0
    """Render smaller than requested (benchmarks); the reported size is unchanged."""

    @property
    def output_size(self) -> tuple[int, int]:
        return (
            max(1, round(self.width * self.scale)),
            max(1, round(self.height * self.scale)),
        )

    @property
    def work_size(self) -> tuple[int, int]:
        out_w, out_h = self.output_size
        factor = min(1.0, WORK_MAX_SIDE / max(out_w, out_h))
        return max(1, round(out_w * factor)), max(1, round(out_h * factor))


def hex_to_rgb(value: str) -> RGB:
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


def preset_palette(name: str) -> tuple[tuple[RGB, float], ...]:
    return tuple((hex_to_rgb(c), 1.0) for c in PALETTES[name])


def sniff(data: bytes) -> tuple[str, str]:
    """The extension and MIME type of an encoded image.

    Raises:
        ValueError: the bytes are not an image Pillow can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc
    for ext, mime in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
        if fmt == mime:
            return ext, f"image/{'jpeg' if ext == 'jpg' else ext}"
    raise ValueError(f"unsupported image format {fmt}; use PNG, JPG or WEBP")


# ---------------------------------------------------------------------------
# Sources


class _SourceCache:
    """A small LRU of decoded, fitted working images, shared by the render threads."""

    def __init__(self, capacity: int = 64) -> None:
        self._items: OrderedDict[tuple[str, tuple[int, int]], Image.Image] = (
            OrderedDict()
        )
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, source: Source, size: tuple[int, int]) -> Image.Image:
        key = (source.key, size)
        with self._lock:
            img = self._items.get(key)
            if img is not None:
                self._items.move_to_end(key)
                return img
        img = _load(source, size)
        with self._lock:
            self._items[key] = img
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return img


_CACHE = _SourceCache()


def _load(source: Source, size: tuple[int, int]) -> Image.Image:
    if source.data is None:
        return placeholder(source.key, size)
    with Image.open(io.BytesIO(source.data)) as raw:
        # A JPEG can decode straight at a fraction of its size: much faster.
        raw.draft("RGB", (size[0] * 2, size[1] * 2))
        img = ImageOps.exif_transpose(raw).convert("RGB")
    return ImageOps.fit(img, size, Image.Resampling.BILINEAR)


def placeholder(key: str, size: tuple[int, int]) -> Image.Image:
    """A deterministic street scene derived from ``key`` (used for foreign URLs)."""
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    w, h = size
    horizon = int(h * rng.uniform(0.55, 0.7))
    top = tuple(rng.randrange(40, 140) for _ in range(3))
    low = tuple(min(255, c + rng.randrange(60, 120)) for c in top)
    sky = Image.linear_gradient("L").resize((w, horizon))
    img = Image.new("RGB", (w, h))
    img.paste(
        ImageOps.colorize(sky, black=top, white=low),
        (0, 0),
    )
    draw = ImageDraw.Draw(img)
    ground = tuple(rng.randrange(30, 110) for _ in range(3))
    draw.rectangle((0, horizon, w, h), fill=ground)
    sun_r = rng.randrange(max(2, h // 16), max(3, h // 7))
    sun_x, sun_y = rng.randrange(w), rng.randrange(max(1, horizon // 2))
    draw.ellipse(
        (sun_x - sun_r, sun_y - sun_r, sun_x + sun_r, sun_y + sun_r),
        fill=(250, 230, 170),
    )
    x = 0
    while x < w:
        bw = rng.randrange(max(2, w // 14), max(3, w // 5))
        bh = rng.randrange(max(2, h // 6), max(3, horizon - 2))
        shade = tuple(rng.randrange(50, 200) for _ in range(3))
        draw.rectangle((x, horizon - bh, x + bw - 2, horizon), fill=shade)
        step = max(3, bw // 4)
        for wx in range(x + 2, x + bw - 4, step):
            for wy in range(horizon - bh + 3, horizon - 4, step):
                if rng.random() < 0.6:
                    draw.rectangle(
                        (wx, wy, wx + step // 2, wy + step // 2), fill=(240, 220, 120)
                    )
        x += bw
    for i in range(1, 6):  # converging lines on the ground: perspective cues
        gx = w * i // 6
        draw.line(
            (w // 2, horizon, gx * 2 - w // 2, h),
            fill=(200, 200, 200),
            width=max(1, w // 200),
        )
    return img


def style_colors(
    sources: Sequence[Source], size: tuple[int, int]
) -> tuple[tuple[RGB, float], ...]:
    """The dominant colours of style reference images, weighted by their share."""
    counts: dict[RGB, int] = {}
    for source in sources:
        img = _CACHE.get(source, size).resize((48, 48))
        quant = img.quantize(colors=4, method=Image.Quantize.MEDIANCUT)
        pal = quant.getpalette() or []
        colours = cast("list[tuple[int, int]]", quant.getcolors() or [])
        for count, index in colours:
            rgb = (pal[index * 3], pal[index * 3 + 1], pal[index * 3 + 2])
            counts[rgb] = counts.get(rgb, 0) + count
    total = sum(counts.values()) or 1
    return tuple((rgb, max(0.05, n / total)) for rgb, n in sorted(counts.items()))


# ---------------------------------------------------------------------------
# Styles


def _edges(gray: Image.Image, *, bold: bool) -> Image.Image:
    """A mask of the reference's strong edges: the structure every style keeps."""
    edges = gray.filter(ImageFilter.FIND_EDGES).point(
        lambda v: 255 if v > _EDGE_THRESHOLD else 0
    )
    # FIND_EDGES marks the image border itself; that is not structure, so clear it.
    edges = ImageOps.expand(ImageOps.crop(edges, 1), 1, fill=0)
    return edges.filter(ImageFilter.MaxFilter(3)) if bold else edges


def _ink(
    img: Image.Image, mask: Image.Image, colour: RGB = (20, 16, 24)
) -> Image.Image:
    out = img.copy()
    out.paste(colour, (0, 0), mask)
    return out


def _hue_shift(img: Image.Image, degrees: float) -> Image.Image:
    shift = round(degrees / 360 * 256) % 256
    if shift == 0:
        return img
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _stylise(base: Image.Image, style: str) -> Image.Image:
    gray = base.convert("L")
    match style:
        case "REALISTIC":
            img = ImageEnhance.Contrast(ImageEnhance.Color(base).enhance(1.15)).enhance(
                1.08
            )
            r, g, b = img.split()  # warm cinematic grade
            return Image.merge(
                "RGB",
                (
                    r.point(lambda v: min(255, v + 10)),
                    g,
                    b.point(lambda v: v * 92 // 100),
                ),
            )
        case "DESIGN":
            flat = ImageOps.posterize(ImageEnhance.Color(base).enhance(1.4), 2)
            return _ink(flat, _edges(gray, bold=True))
        case "ANIME":
            smooth = base.filter(ImageFilter.SMOOTH_MORE).filter(
                ImageFilter.SMOOTH_MORE
            )
            cel = ImageOps.posterize(ImageEnhance.Color(smooth).enhance(1.5), 3)
            return _ink(
                ImageEnhance.Brightness(cel).enhance(1.08), _edges(gray, bold=False)
            )
        case "RENDER_3D":
            relief = gray.filter(ImageFilter.EMBOSS).convert("RGB")
            shaded = ImageChops.overlay(ImageEnhance.Color(base).enhance(1.2), relief)
            return ImageEnhance.Contrast(shaded).enhance(1.25)
        case "FICTION":
            dreamy = _hue_shift(ImageEnhance.Color(base).enhance(1.5), 40)
            glow = dreamy.filter(ImageFilter.GaussianBlur(4))
            return Image.blend(dreamy, ImageChops.screen(dreamy, glow), 0.6)
        case _:  # GENERAL (AUTO is resolved from the prompt first): painterly
            painted = base.filter(ImageFilter.MedianFilter(5))
            vivid = ImageEnhance.Contrast(ImageEnhance.Color(painted).enhance(1.35))
            flat = ImageOps.posterize(vivid.enhance(1.1), 4)
            return Image.blend(flat, _ink(flat, _edges(gray, bold=False)), 0.5)


_AUTO_STYLES: Final = (
    ("ANIME", ("anime", "manga", "cel-shaded", "cartoon")),
    ("RENDER_3D", ("3d", "render", "clay", "isometric", "octane")),
    ("DESIGN", ("poster", "logo", "typography", "flat", "graphic", "illustration")),
    ("FICTION", ("fantasy", "dream", "storybook", "fairy", "magical", "myth")),
    ("REALISTIC", ("photo", "realistic", "cinematic", "photograph", "editorial")),
)


def auto_style(prompt: str) -> str:
    """What AUTO picks: the style the prompt's words suggest, else GENERAL."""
    words = prompt.lower()
    for style, hints in _AUTO_STYLES:
        if any(hint in words for hint in hints):
            return style
    return "GENERAL"


def _palette_lut(palette: Sequence[tuple[RGB, float]]) -> list[int]:
    """A luminance -> colour lookup table through the palette's weighted stops."""
    stops = sorted(
        palette, key=lambda cw: 299 * cw[0][0] + 587 * cw[0][1] + 114 * cw[0][2]
    )
    total = sum(w for _, w in stops)
    positions: list[float] = []
    acc = 0.0
    for _, weight in stops:
        positions.append((acc + weight / 2) / total)
        acc += weight
    lut: list[int] = [0] * 768
    for v in range(256):
        p = v / 255
        j = 0
        while j < len(stops) - 1 and positions[j + 1] < p:
            j += 1
        if p <= positions[0] or j == len(stops) - 1:
            colour = stops[0][0] if p <= positions[0] else stops[-1][0]
        else:
            span = positions[j + 1] - positions[j]
            t = (p - positions[j]) / span if span else 0.0
            a, b = stops[j][0], stops[j + 1][0]
            colour = (
                round(a[0] + (b[0] - a[0]) * t),
                round(a[1] + (b[1] - a[1]) * t),
                round(a[2] + (b[2] - a[2]) * t),
            )
        lut[v], lut[256 + v], lut[512 + v] = colour
    return lut


def _apply_palette(
    img: Image.Image, palette: Sequence[tuple[RGB, float]], amount: float
) -> Image.Image:
    gray = ImageOps.autocontrast(img.convert("L"))
    lut = _palette_lut(palette)
    mapped = Image.merge(
        "RGB", (gray.point(lut[:256]), gray.point(lut[256:512]), gray.point(lut[512:]))
    )
    return Image.blend(img, mapped, amount)


def _seed_variation(img: Image.Image, seed: int) -> Image.Image:
    """Small per-seed differences: a hue shift and a soft noise pattern."""
    rng = random.Random(seed)
    img = _hue_shift(img, rng.uniform(-14, 14))
    w, h = img.size
    grid = (max(2, w // 24), max(2, h // 24))
    noise = Image.frombytes("L", grid, rng.randbytes(grid[0] * grid[1]))
    noise = noise.resize((w, h), Image.Resampling.BICUBIC).convert("RGB")
    return Image.blend(img, ImageChops.soft_light(img, noise), 0.35)


def render(
    reference: Source, spec: RenderSpec, style_refs: Sequence[Source] = ()
) -> bytes:
    """Encode the remix of ``reference`` described by ``spec``.

    Raises:
        ValueError: the reference bytes are not an image.
    """
    work = spec.work_size
    try:
        base = _CACHE.get(reference, work)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"reference image could not be decoded: {exc}") from exc
    styled = _stylise(base, spec.style_type)
    if spec.palette:
        styled = _apply_palette(styled, spec.palette, 0.6)
    elif style_refs:
        styled = _apply_palette(styled, style_colors(style_refs, work), 0.4)
    styled = _seed_variation(styled, spec.seed)
    alpha = (spec.remix_strength - 1) / 99
    out = Image.blend(base, styled, alpha)
    if out.size != spec.output_size:
        out = out.resize(spec.output_size, Image.Resampling.BILINEAR)
    pil_format = FORMATS[spec.output_format][0]
    buf = io.BytesIO()
    match pil_format:
        case "JPEG":
            out.save(buf, format="JPEG", quality=spec.quality)
        case "PNG":
            out.save(buf, format="PNG", compress_level=1)
        case _:
            out.save(buf, format="WEBP", quality=spec.quality, method=0)
    return buf.getvalue()
