"""The caption band: DICOM fields as text under the picture, and the font to draw it.

Text is drawn with Pillow's FreeType binding in a TrueType font that covers Cyrillic
(DejaVu Sans by default), white on black, in a band as wide as the picture; the font
size follows the picture's width, and fields wrap onto further lines when they do not
fit on one.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from pydicom.datadict import dictionary_description, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

#: Where fonts are looked for when none is configured (searched recursively, in order).
FONT_DIRS: tuple[str, ...] = ("/usr/share/fonts", "/usr/local/share/fonts",
                              "~/.local/share/fonts", "~/.fonts")
#: Font files tried in each folder, in order.
FONT_FILES: tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSansCondensed.ttf")
NO_FONT = ('no font with Cyrillic for captions: install fonts-dejavu-core (Debian) or set '
           '[jpeg] font = "/path/to/font.ttf"')

#: Between two fields on a line.
SEPARATOR = "  ·  "
#: Short labels of numeric fields (other numeric fields use their DICOM name).
LABELS = {"SeriesNumber": "Series", "InstanceNumber": "Image",
          "AcquisitionNumber": "Acquisition", "TemporalPositionIdentifier": "Phase"}
_NUMERIC = {"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}


def _error(message: str) -> Exception:
    from .render import RenderError

    return RenderError(message)


def find_font(configured: str = "") -> str:
    """Path of the caption font: ``configured`` when given (RenderError when it does not
    exist), else DejaVu Sans (or DejaVu Sans Condensed) found under :data:`FONT_DIRS`."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise _error(f"caption font {configured!r} does not exist")
        return str(path)
    return _search(FONT_DIRS, FONT_FILES)


@functools.lru_cache(maxsize=8)
def _search(folders: tuple[str, ...], names: tuple[str, ...]) -> str:
    # A failed search raises and so is not cached: a font installed later is found.
    for name in names:
        for folder in folders:
            root = Path(folder).expanduser()
            if not root.is_dir():
                continue
            direct = root / name
            if direct.is_file():
                return str(direct)
            for found in sorted(root.rglob(name)):
                if found.is_file():
                    return str(found)
    raise _error(NO_FONT)


_FONTS = threading.local()


def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """The font at ``size`` pixels, cached per thread (a FreeType face is not meant to
    be used by two threads at once, and the plugin renders in worker threads)."""
    cache = getattr(_FONTS, "cache", None)
    if cache is None:
        cache = _FONTS.cache = {}
    font = cache.get((path, size))
    if font is None:
        try:
            font = ImageFont.truetype(path, size)
        except OSError as exc:
            raise _error(f"caption font {path!r} cannot be loaded: {exc}") from exc
        if len(cache) >= 32:
            cache.clear()
        cache[(path, size)] = font
    return font


# ------------------------------------------------------------------------- fields

def person_name(value: object) -> str:
    """``Иванов^Пётр^Сергеевич`` as ``Иванов Пётр Сергеевич`` (prefix first, suffix
    last; the alphabetic group, else the ideographic or phonetic one)."""
    text = str(value)
    groups = text.split("=")
    group = next((g for g in groups if g.replace("^", "").strip()), "")
    parts = (group.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return " ".join(p for p in (prefix, family, given, middle, suffix) if p)


def _date(text: str) -> str:
    match = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", text.strip())
    return "-".join(match.groups()) if match else text.strip()


def _time(text: str) -> str:
    match = re.fullmatch(r"(\d{2}):?(\d{2})?:?(\d{2})?(?:\.\d*)?", text.strip())
    if not match:
        return text.strip()
    return ":".join(part for part in match.groups() if part)


def _datetime(text: str) -> str:
    text = text.strip()
    match = re.fullmatch(r"(\d{8})(\d{2,6}(?:\.\d*)?)?([+-]\d{4})?", text)
    if not match:
        return text
    date, time, _zone = match.groups()
    return _date(date) + (" " + _time(time) if time else "")


def field_text(ds: Dataset, keyword: str) -> str:
    """One field as shown in the caption ("" when absent or empty, or not a keyword)."""
    if tag_for_keyword(keyword) is None:
        return ""
    element = ds.data_element(keyword) if keyword in ds else None
    if element is None or element.value is None or element.value == "" or \
            element.VR == "SQ" or isinstance(element.value, (bytes, bytearray)):
        return ""
    vr = element.VR
    values = element.value if element.VM > 1 else [element.value]
    shown = []
    for value in values:
        if vr == "PN":
            text = person_name(value)
        elif vr == "DA":
            text = _date(str(value))
        elif vr == "TM":
            text = _time(str(value))
        elif vr == "DT":
            text = _datetime(str(value))
        else:
            text = " ".join(str(value).split())
        if text:
            shown.append(text)
    if not shown:
        return ""
    text = ", ".join(shown)
    if vr in _NUMERIC or (keyword in LABELS and dictionary_VR(keyword) in _NUMERIC):
        label = LABELS.get(keyword) or dictionary_description(keyword)
        text = f"{label} {text}"
    return text


def caption_fields(ds: Dataset, keywords: Sequence[str]) -> list[str]:
    return [text for keyword in keywords if (text := field_text(ds, keyword))]


# ------------------------------------------------------------------------- drawing

def font_size(width: int) -> int:
    """Caption font size in pixels for a picture ``width`` pixels wide."""
    return max(9, round(width / 42))


def _wrap(fields: Sequence[str], font: ImageFont.FreeTypeFont, room: float) -> list[str]:
    lines: list[str] = []
    line = ""
    for field in fields:
        candidate = field if not line else line + SEPARATOR + field
        if font.getlength(candidate) <= room:
            line = candidate
            continue
        if line:
            lines.append(line)
            line = ""
        # The field alone: split at spaces, then anywhere, to fit.
        for word in field.split(" "):
            candidate = word if not line else line + " " + word
            if font.getlength(candidate) <= room:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and font.getlength(line + char) > room:
                    lines.append(line)
                    line = ""
                line += char
    if line:
        lines.append(line)
    return lines


def caption_band(fields: Sequence[str], width: int, mode: str, font_path: str) -> Image.Image:
    """A black band ``width`` pixels wide with ``fields`` in white, in ``mode`` ("L" or
    "RGB")."""
    size = font_size(width)
    font = load_font(font_path, size)
    margin = max(2, size // 2)
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + max(1, size // 6)
    lines = _wrap(fields, font, max(1, width - 2 * margin)) or [""]
    band = Image.new(mode, (width, 2 * margin + line_height * len(lines)), 0)
    draw = ImageDraw.Draw(band)
    white = 255 if mode == "L" else (255, 255, 255)
    for number, line in enumerate(lines):
        draw.text((margin, margin + number * line_height), line, font=font, fill=white)
    return band


def add_caption(image: Image.Image, fields: Sequence[str], font_path: str) -> Image.Image:
    """``image`` with the caption band under it (unchanged when no field has a value)."""
    if not fields:
        return image
    band = caption_band(fields, image.width, image.mode, font_path)
    out = Image.new(image.mode, (image.width, image.height + band.height))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out
