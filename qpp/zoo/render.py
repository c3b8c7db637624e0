"""Deterministic synthetic text: random text lines, rendered line crops and pages.

Everything is drawn with Pillow in the DejaVu fonts that ship inside matplotlib (a qpp
dependency), so a fresh machine renders the same images without system fonts. A sample is a
pure function of its ``numpy.random.Generator``: same seed, same pixels (on the same Pillow /
FreeType build). Images are RGB ``uint8`` arrays, H x W x 3.

The augmentation is light on purpose (paper-like gray backgrounds, dark ink, a little blur and
sensor noise), so PP-OCR in FP32 reads almost all of it and quantization errors show.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from qpp.errors import DataError

FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
)

_WORD_TEXT = (
    "account address after again amount annual april area august balance bank before best "
    "bill black blue book box building business call card care cash center change check city "
    "class clear client close code coffee color company contact cost country credit customer "
    "daily data date day delivery department design dinner direct doctor door down east "
    "email energy entry exit express family fast fee file final floor food free fresh friday "
    "front fuel full garden gate general gift global gold good green group guest hall health "
    "help high home hotel hour house income invoice item january july june kitchen label "
    "lane large last level light limited line local lunch main manager march market may "
    "medical meeting member menu metro middle milk monday month morning music name network "
    "new news next night north notice number office online open order page paid park parking "
    "party pass payment phone plan plaza please point police post power press price print "
    "private product public quality quick receipt red report reserved road room route sale "
    "saturday school screen sea season service shop short sign size small south special "
    "sport square staff station stop store street student sunday supply table tax team "
    "terminal thank ticket time today total tour tower town track trade train travel tuesday "
    "union unit university valid value view visit wait water way welcome west window winter "
    "world year yellow zone"
)
_NAME_TEXT = (
    "London Paris Berlin Tokyo Madrid Boston Denver Oslo Vienna Dublin Lisbon Prague Austin "
    "Anna Peter Maria James Laura David Sofia Lucas Emma Oliver Acme Nordic Zenith Apex Orion"
)
_MONTH_TEXT = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec"
WORDS, NAMES, MONTHS = (tuple(text.split()) for text in (_WORD_TEXT, _NAME_TEXT, _MONTH_TEXT))


@cache
def font_paths() -> tuple[Path, ...]:
    """The bundled DejaVu TrueType files, from matplotlib's data folder."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = tuple(folder / name for name in FONT_FILES)
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DataError(
            f"fonts {', '.join(missing)} are missing from {folder}; reinstall matplotlib "
            "(pip install --force-reinstall matplotlib), which ships them"
        )
    return paths


@cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def _word(rng: np.random.Generator) -> str:
    word = str(rng.choice(WORDS)) if rng.random() < 0.85 else str(rng.choice(NAMES))
    case = rng.random()
    if case < 0.2:
        return word.upper()
    if case < 0.6:
        return word.capitalize()
    return word


def _number_phrase(rng: np.random.Generator) -> str:
    kind = int(rng.integers(9))
    n = int(rng.integers(1, 10_000))
    if kind == 0:
        return f"${n / 100 * int(rng.integers(1, 40)):,.2f}"
    if kind == 1:
        return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == 2:
        return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    if kind == 3:
        return f"{rng.integers(0, 1000) / 10:.1f}%"
    if kind == 4:
        return f"({rng.integers(200, 999)}) {rng.integers(100, 999)}-{rng.integers(0, 9999):04d}"
    if kind == 5:
        letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), size=2))
        return f"{letters}-{n:04d}"
    if kind == 6:
        return f"No. {n % 500}"
    if kind == 7:
        return f"{rng.integers(1, 29)} {rng.choice(MONTHS)} {rng.integers(1990, 2031)}"
    return f"{n}"


def random_text(rng: np.random.Generator, max_chars: int = 18) -> str:
    """A short, realistic text line: words, numbers, dates, prices, codes, punctuation."""
    while True:
        kind = rng.random()
        if kind < 0.45:
            text = " ".join(_word(rng) for _ in range(int(rng.integers(1, 4))))
            if rng.random() < 0.3:
                text += str(rng.choice(list(".,:!?")))
        elif kind < 0.8:
            text = f"{_word(rng)} {_number_phrase(rng)}"
            if rng.random() < 0.3:
                text = f"{_word(rng)}: {_number_phrase(rng)}"
        elif kind < 0.9:
            text = _number_phrase(rng)
        else:
            text = f"{_word(rng).lower()}@{rng.choice(WORDS)}.{rng.choice(['com', 'org', 'net'])}"
        if 2 <= len(text) <= max_chars:
            return text


@dataclass(frozen=True)
class Style:
    """How one sample is drawn: font, size, ink and paper gray levels, blur, noise."""

    font: Path
    size: int
    ink: int
    paper: int
    blur: float
    noise: float


def random_style(rng: np.random.Generator, size_range: tuple[int, int]) -> Style:
    """A light, deterministic augmentation drawn from ``rng``."""
    return Style(
        font=font_paths()[int(rng.integers(len(font_paths())))],
        size=int(rng.integers(*size_range)),
        ink=int(rng.integers(0, 90)),
        paper=int(rng.integers(175, 256)),
        blur=float(rng.uniform(0.0, 1.4)),
        noise=float(rng.uniform(0.0, 8.0)),
    )


def _finish(image: Image.Image, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Blur, tint slightly, add Gaussian noise; an RGB uint8 array."""
    if style.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    gray = np.asarray(image, dtype=np.float32)
    tint = rng.uniform(-8.0, 8.0, size=3).astype(np.float32)
    noisy = gray[..., None] + tint + rng.normal(0.0, style.noise, size=(*gray.shape, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_line(text: str, style: Style, rng: np.random.Generator) -> np.ndarray:
    """``text`` as a detector-style crop: the line with a small random margin around it."""
    font = _font(style.font, style.size)
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    margin_x = int(rng.integers(2, max(3, style.size // 3)))
    margin_top = int(rng.integers(1, max(2, style.size // 5)))
    margin_bottom = int(rng.integers(1, max(2, style.size // 5)))
    width = right - left + 2 * margin_x
    height = ascent + descent + margin_top + margin_bottom
    image = Image.new("L", (width, height), style.paper)
    ImageDraw.Draw(image).text((margin_x - left, margin_top), text, font=font, fill=style.ink)
    return _finish(image, style, rng)


def render_page(
    texts: list[str], style: Style, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` laid out top to bottom on a ``size`` x ``size`` page.

    Returns the RGB page and the box of every line that fits, K x 4 (x0, y0, x1, y1) in pixels,
    float32: the line's ink horizontally, the font's ascender-to-descender span vertically.
    Lines are placed at random left offsets with random vertical gaps.
    """
    font = _font(style.font, style.size)
    image = Image.new("L", (size, size), style.paper)
    draw = ImageDraw.Draw(image)
    boxes = []
    _, line_top, _, line_bottom = font.getbbox("Hg")
    y = int(rng.integers(4, 3 * style.size))
    for text in texts:
        left, top, right, bottom = font.getbbox(text)
        # A labeller's box spans ascenders to descenders even where this line has none.
        top, bottom = min(top, line_top), max(bottom, line_bottom)
        if right - left > size - 8 or y + bottom > size - 4:
            break
        x = int(rng.integers(4, size - 4 - (right - left) + 1))
        draw.text((x - left, y), text, font=font, fill=style.ink)
        boxes.append((x, y + top, x + right - left, y + bottom))
        y += bottom + int(rng.integers(style.size // 2, 2 * style.size))
    return _finish(image, style, rng), np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
