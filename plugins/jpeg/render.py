"""Rendering DICOM images to JPEG: the engine the JPEG export plugin calls.

``render_jpeg(path, options)`` reads a DICOM file with pydicom and returns one JPEG
per selected frame; ``render_pixels(dataset, frame, options)`` is the display-ready
8-bit array before caption, resize and JPEG encoding. What the pipeline does, step
by step, is in docs/plugins/jpeg-rendering.md; the LUT pipeline itself is in
``pixels.py``, the caption in ``caption.py``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import pydicom
from PIL import ExifTags, Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from . import caption as _caption
from . import pixels as _pixels

__all__ = ["NotAnImage", "RenderError", "RenderOptions", "RenderedImage", "find_font",
           "iter_jpeg", "render_jpeg", "render_pixels"]

_FRAMES = re.compile(r"all|first|middle|[1-9][0-9]*")


class RenderError(Exception):
    """Clear, one-line, user-facing reason an instance could not be rendered (corrupt
    pixel data, no decoder for the transfer syntax, unsupported photometric
    interpretation ...)."""


class NotAnImage(RenderError):
    """The instance has no pixel data (SR, encapsulated PDF, presentation state ...):
    documents skip it quietly."""


def _window(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    center, width = (float(v) for v in value)
    if not width >= 1:
        raise ValueError(f"window width must be at least 1, not {width}")
    return center, width


def _keywords(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def check_frames(value: str) -> None:
    """ValueError unless ``value`` names frames: all, first, middle or a frame number."""
    if not isinstance(value, str) or not _FRAMES.fullmatch(value):
        raise ValueError(f"frames must be all, first, middle or a frame number, not {value!r}")


def _frames(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    check_frames(value)


@attrs.frozen
class RenderOptions:
    #: JPEG quality 1..95.
    quality: int = attrs.field(default=90, validator=[attrs.validators.ge(1),
                                                      attrs.validators.le(95)])
    #: Longest side in pixels after rendering; 0 = native size; never upscaled.
    max_size: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: "all", "first", "middle" (frame n // 2 + 1 of n) or a 1-based frame number ("3").
    frames: str = attrs.field(default="all", validator=_frames)
    #: Which of the file's VOI LUTs / windows (0 = first); out of range: the first.
    voi_index: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: (center, width) where the file has no window or VOI LUT; None = automatic.
    fallback_window: tuple[float, float] | None = attrs.field(default=None, converter=_window)
    #: (center, width) overriding the file's.
    window: tuple[float, float] | None = attrs.field(default=None, converter=_window)
    #: DICOM keywords printed in a caption band under the image; () = no caption.
    caption: tuple[str, ...] = attrs.field(default=(), converter=_keywords)
    #: TrueType font of the caption; "" = DejaVu Sans found at run time.
    font: str = ""


@attrs.frozen
class RenderedImage:
    #: 1-based frame number in the source.
    frame: int
    #: Number of frames in the source.
    frames: int
    #: The encoded image.
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    width: int
    height: int
    #: (center, width) applied; None for colour images or a VOI LUT Sequence.
    window: tuple[float, float] | None
    #: The source pixel data were lossy compressed.
    lossy_source: bool
    media_type: str = "image/jpeg"
    extension: str = ".jpg"


# --------------------------------------------------------------------------- reading

def read_dataset(path: str | os.PathLike) -> Dataset:
    """The whole file (pixel data included) as a pydicom Dataset."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError as exc:
        raise RenderError(f"file not found: {os.fspath(path)}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise RenderError(f"not a readable DICOM file: {_pixels.one_line(exc)}") from exc
    # force=True reads data sets without the DICM preamble, and also any other file as
    # a few nonsense elements: without a preamble, group 0008 must be there.
    if ds.preamble is None and not getattr(ds, "file_meta", None) and \
            not any(tag.group == 0x0008 for tag in ds.keys()):
        raise RenderError("not a DICOM file (no DICM header and no identifying attributes)")
    return ds


def _check_image(ds: Dataset) -> int:
    """The number of frames; NotAnImage without pixel data."""
    if not _pixels.has_pixels(ds):
        sop = ds.get("SOPClassUID")
        kind = f" ({pydicom.uid.UID(sop).name})" if sop else ""
        raise NotAnImage(f"no pixel data{kind}")
    return _pixels.frame_count(ds)


def frame_numbers(selection: str, frames: int) -> list[int]:
    """1-based frame numbers that ``selection`` ("all", "first", "middle", "3") picks
    from ``frames`` frames."""
    if selection == "all":
        return list(range(1, frames + 1))
    if selection == "first":
        return [1]
    if selection == "middle":
        return [frames // 2 + 1]
    number = int(selection)
    if not 1 <= number <= frames:
        raise RenderError(f"frame {number} requested, the instance has {frames} "
                          f"frame{'s' if frames != 1 else ''}")
    return [number]


# ------------------------------------------------------------------------ pixels

def _display(arr: np.ndarray, photometric: str, ds: Dataset, frame: int,
             options: RenderOptions) -> tuple[np.ndarray, tuple[float, float] | None]:
    photometric = str(photometric).strip().upper()
    if photometric in _pixels.GREY:
        if arr.ndim != 2:
            raise RenderError(f"{photometric} image with {ds.get('SamplesPerPixel')} samples "
                              "per pixel is not supported")
        view = _pixels.frame_view(ds, frame - 1)
        return _pixels.grey_8bit(arr, view, photometric, voi_index=options.voi_index,
                                 window=options.window,
                                 fallback_window=options.fallback_window)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        return _pixels.colour_8bit(arr, ds, photometric), None
    raise RenderError(f"unsupported photometric interpretation {photometric or '(none)'}")


def render_pixels(dataset: Dataset, frame: int, options: RenderOptions = RenderOptions()
                  ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The display-ready uint8 array, (H, W) for grey or (H, W, 3) RGB, of one 1-based
    frame, before caption, resize and JPEG, and the window applied."""
    frames = _check_image(dataset)
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} requested, the instance has {frames} "
                          f"frame{'s' if frames != 1 else ''}")
    arr, photometric = next(_pixels.decode_frames(dataset, [frame - 1]))
    return _display(arr, photometric, dataset, frame, options)


# --------------------------------------------------------------------------- JPEG

def _description(ds: Dataset, lossy: bool, frame: int, frames: int) -> str:
    """What the picture's JPEG comment and EXIF ImageDescription say (ASCII)."""
    parts = []
    if lossy:
        details = []
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if tsyntax in _pixels.ALWAYS_LOSSY or tsyntax in _pixels.MAYBE_LOSSY:
            details.append(f"transfer syntax {tsyntax.name}")
        for keyword, label in (("LossyImageCompressionRatio", "ratio"),
                               ("LossyImageCompressionMethod", "method")):
            value = ds.get(keyword)
            if value not in (None, ""):
                values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
                details.append(f"{label} {'/'.join(str(v) for v in values)}")
        parts.append("lossy-source" + (f" ({'; '.join(details)})" if details else ""))
    else:
        parts.append("lossless-source")
    uid = str(ds.get("SOPInstanceUID") or "")
    if uid:
        parts.append(f"SOP Instance UID {uid}")
    parts.append(f"frame {frame} of {frames}")
    text = "; ".join(parts)
    return text.encode("ascii", "replace").decode("ascii")


def _resize(image: Image.Image, max_size: int) -> Image.Image:
    longest = max(image.size)
    if not max_size or longest <= max_size:
        return image
    scale = max_size / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: first a box reduce() by the integer factor that leaves at least 2x
    # for Lanczos (Pillow: 3.0 is indistinguishable from Lanczos alone; 2.0 differs by
    # about a quarter of a grey level on average and is up to 3x faster).
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def encode_jpeg(pixels: np.ndarray, options: RenderOptions, description: str,
                fields: list[str] | None = None) -> tuple[bytes, int, int]:
    """Resize, add the caption, encode; returns the JPEG and its width and height."""
    image = _resize(Image.fromarray(pixels), options.max_size)
    if fields:
        image = _caption.add_caption(image, fields, find_font(options.font))
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = description
    exif[ExifTags.Base.Software] = "dicomgate"
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=options.quality, comment=description,
               exif=exif.tobytes(), subsampling="4:4:4" if options.quality >= 90 else "4:2:0")
    return out.getvalue(), image.width, image.height


def iter_jpeg(path: str | os.PathLike, options: RenderOptions = RenderOptions()
              ) -> Iterator[RenderedImage]:
    """:func:`render_jpeg` one frame at a time (for instances with many frames)."""
    ds = read_dataset(path)
    yield from _iter_dataset(ds, options)


def _iter_dataset(ds: Dataset, options: RenderOptions) -> Iterator[RenderedImage]:
    frames = _check_image(ds)
    numbers = frame_numbers(options.frames, frames)
    lossy = _pixels.is_lossy(ds)
    fields = _caption.caption_fields(ds, options.caption) if options.caption else []
    if fields:
        find_font(options.font)  # fail before decoding anything
    decoded = _pixels.decode_frames(ds, [number - 1 for number in numbers])
    for number, (arr, photometric) in zip(numbers, decoded):
        pixels, window = _display(arr, photometric, ds, number, options)
        data, width, height = encode_jpeg(pixels, options,
                                          _description(ds, lossy, number, frames), fields)
        yield RenderedImage(frame=number, frames=frames, data=data, width=width,
                            height=height, window=window, lossy_source=lossy)


def render_jpeg(path: str | os.PathLike, options: RenderOptions = RenderOptions()
                ) -> list[RenderedImage]:
    """Render the DICOM file at ``path`` to one JPEG per selected frame."""
    return list(iter_jpeg(path, options))


def find_font(configured: str = "") -> str:
    """Path of the caption font: ``configured`` if given (RenderError if it does not
    exist), else DejaVuSans.ttf (or DejaVuSansCondensed.ttf) found under /usr/share/fonts,
    /usr/local/share/fonts, ~/.local/share/fonts, ~/.fonts; RenderError with an install
    hint when none."""
    return _caption.find_font(configured)
