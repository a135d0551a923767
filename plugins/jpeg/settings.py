"""The ``[jpeg]`` config section: how pictures are made and when documents are attached."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from dicomgate.plugins.jpeg.render import check_frames

LINKS = "links"
FILES = "files"
DELIVERIES = (LINKS, FILES)

_WINDOW = re.compile(r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*")


def parse_window(text: str) -> tuple[float, float] | None:
    """``"40/400"`` as (center, width); ``""`` or ``"auto"`` as None (automatic)."""
    if text.strip().lower() in ("", "auto"):
        return None
    match = _WINDOW.fullmatch(text)
    if match is None or float(match.group(2)) < 1:
        raise ValueError(f"window {text!r} is not CENTER/WIDTH (e.g. 40/400) with width >= 1, "
                         "nor auto")
    return float(match.group(1)), float(match.group(2))


def _window(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    parse_window(value)


def _frames(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    check_frames(value)


def _keywords(value: Any) -> tuple[str, ...]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    if not isinstance(value, (list, tuple)) or not all(isinstance(k, str) for k in value):
        raise TypeError("expected a list of DICOM keywords")
    for keyword in value:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. PatientName)")
        if dictionary_VR(keyword) == "SQ":
            raise ValueError(f"{keyword!r} is a sequence and cannot be printed")
    return tuple(value)


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(n, str) and n for n in value):
        raise TypeError("expected a non-empty list of renderer names")
    return tuple(value)


def _url(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
        raise ValueError(f"{attribute.name} {value!r} is not an http:// or https:// URL")


@attrs.frozen
class JpegSettings:
    """``[jpeg]``: rendering, automatic attachment and what the HIS is told."""

    #: Folder of the pictures; a relative path is inside ``gateway.data_dir``.
    root: Path = Path("jpeg")
    #: JPEG quality, 1 to 95.
    quality: int = attrs.field(default=90, validator=[attrs.validators.ge(1),
                                                      attrs.validators.le(95)])
    #: Longest side of a picture in pixels (never enlarged); 0 keeps the image's size.
    max_size: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: Frames of a multi-frame image: "all", "first", "middle" or a frame number.
    frames: str = attrs.field(default="all", validator=_frames)
    #: Which of the file's windows (or VOI LUTs) to apply, 0 for the first.
    voi_index: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: Window for images that carry none: "auto" (their value range) or "CENTER/WIDTH".
    fallback_window: str = attrs.field(default="auto", validator=_window)
    #: DICOM keywords printed under each picture; empty: no caption.
    caption: tuple[str, ...] = attrs.field(default=(), converter=_keywords)
    #: TrueType font of the caption; empty: DejaVu Sans, found at run time.
    font: str = ""
    #: Renderers that make a document's pictures (``register_renderers``).
    renderers: tuple[str, ...] = attrs.field(default=("jpeg",), converter=_names)
    #: Seconds after a procedure is reported COMPLETED (MPPS) before its document is
    #: made, for images the device sends after the report.
    settle_seconds: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    #: Seconds without a new image after which a study's document is made without an
    #: MPPS; 0: only on MPPS or on request.
    quiet_seconds: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))
    #: What the "document.ready" event carries: "links" to the pictures, or the "files".
    deliver: str = attrs.field(default=LINKS, validator=attrs.validators.in_(DELIVERIES))
    #: Base of the links (the HIS reaches the pictures there); empty: file:// paths.
    link_base_url: str = attrs.field(default="", validator=_url)
    #: Threads making documents' pictures.
    workers: int = attrs.field(default=1, validator=[attrs.validators.ge(1),
                                                     attrs.validators.le(16)])
    #: Seconds between looks for documents requested by other processes (the CLI).
    poll_interval: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))


EXAMPLE = """\
[jpeg]
# JPEG export: pictures of received images, attached to the examination's medical
# document, and a "document.ready" event for the HIS (through the MPPS plugin's outbox).
# Folder of the pictures; a relative path is inside gateway.data_dir.
root = "jpeg"
# JPEG quality (1-95) and the longest side in pixels (0: the image's own size).
quality = 90
max_size = 0
# Frames of a multi-frame image: "all", "first", "middle" or a number ("3").
frames = "all"
# Which of the file's windows to apply (0: the first); for images without one,
# "auto" (their value range) or "CENTER/WIDTH" such as "40/400".
voi_index = 0
fallback_window = "auto"
# Fields printed under each picture (DICOM keywords); empty: no caption. Needs a font
# with Cyrillic: DejaVu Sans (Debian: fonts-dejavu-core) is found, or set font.
caption = []
# caption = ["PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyDescription", "SeriesNumber", "InstanceNumber"]
font = ""
# Renderers making each document's pictures; plugins add others (png, thumbnails).
renderers = ["jpeg"]
# A study's document is made settle_seconds after its procedure is reported
# COMPLETED (MPPS), or once it received no image for quiet_seconds (0: never), or on
# request (dicomgate documents attach). Images arriving later update the document.
settle_seconds = 10.0
quiet_seconds = 300.0
# The event carries "links" to the pictures (link_base_url + path; file:// paths
# when empty) or the "files" themselves (base64).
deliver = "links"
link_base_url = ""
# Threads making pictures, and seconds between looks for documents that the
# command line asked for.
workers = 1
poll_interval = 5.0
"""
