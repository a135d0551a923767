"""Pixel data to display-ready 8-bit values: decoding and the LUT pipeline.

The order is PS3.3 C.7.6.3 / C.11 and PS3.4 N.2: decode (pydicom, one frame) ->
Modality LUT (rescale or Modality LUT Sequence) -> VOI (VOI LUT Sequence, the file's
window, an explicit window, or an automatic min..max window) -> 8 bits -> MONOCHROME1
inverted. Colour images are converted to RGB (YBR_*) or through their palette and
scaled to 8 bits; they get no VOI.

Grey images of 8 or 16 bits are not transformed pixel by pixel: pydicom's own
functions (``apply_modality_lut``, ``apply_windowing``, ``apply_voi``) are applied once
to every possible stored value (256 or 65,536 of them), giving an 8-bit lookup table
that the frame is then indexed through. The result is the same as applying them to
the frame, at a fraction of the cost. Wider or floating-point data go through the same
functions directly.

``render.py`` holds the public API; :class:`RenderError` lives there and is imported
lazily to avoid an import cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from pydicom import uid as uids
from pydicom.dataset import Dataset
from pydicom.pixels import (apply_color_lut, apply_modality_lut, apply_voi, apply_windowing,
                            as_pixel_options, convert_color_space, get_decoder)
from pydicom.pixels.decoders.base import JPEGExtended12BitDecoder
from pydicom.pixels.utils import get_nr_frames
from pydicom.valuerep import DSfloat

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

log = logging.getLogger(__name__)

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
GREY = ("MONOCHROME1", "MONOCHROME2")

#: Transfer syntaxes whose pixel data are always lossy.
ALWAYS_LOSSY = frozenset({
    uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, "1.2.840.10008.1.2.4.52",
    "1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.54", "1.2.840.10008.1.2.4.55",
    "1.2.840.10008.1.2.4.56", "1.2.840.10008.1.2.4.59", "1.2.840.10008.1.2.4.60",
    "1.2.840.10008.1.2.4.61", "1.2.840.10008.1.2.4.62", "1.2.840.10008.1.2.4.63",
    "1.2.840.10008.1.2.4.64", *uids.MPEGTransferSyntaxes,
})
#: Transfer syntaxes that may be lossy or lossless; Lossy Image Compression "00" says
#: which (absent: treated as lossy).
MAYBE_LOSSY = frozenset({
    uids.JPEGLSNearLossless, uids.JPEG2000, uids.JPEG2000MC, uids.HTJ2K,
    "1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95",  # JPIP
})


def _error(message: str) -> Exception:
    from .render import RenderError

    return RenderError(message)


def one_line(text: object, limit: int = 300) -> str:
    """A decoder's message on one line, not too long."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


# ---------------------------------------------------------------- 12-bit lossy JPEG
# pydicom 3.0's GDCM plugin refuses JPEG Extended with 12-bit samples, and its other
# decoder for them (pylibjpeg-libjpeg) is GPL. GDCM itself decodes them; this plugin,
# registered with pydicom's JPEG Extended decoder, lets it.

try:
    import gdcm

    _HAVE_GDCM = True
except ImportError:  # pragma: no cover - python-gdcm is a dependency of the plugin
    _HAVE_GDCM = False

DECODER_DEPENDENCIES = {uids.JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}


def is_available(uid: str) -> bool:
    """pydicom's decoder-plugin hook."""
    return _HAVE_GDCM and uid in DECODER_DEPENDENCIES


def decode_jpeg12_gdcm(src: bytes, runner: DecodeRunner) -> bytes:
    """Decode one frame of 12-bit (or 8-bit) JPEG Extended with GDCM."""
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated,
                                          bits, bits - 1, runner.pixel_representation))
    frame = image.GetBuffer().encode("utf-8", "surrogateescape")
    expected = runner.rows * runner.columns * runner.samples_per_pixel * (
        runner.bits_allocated // 8)
    if len(frame) != expected:
        raise ValueError(f"GDCM returned {len(frame)} bytes instead of {expected}")
    return frame


def _register_jpeg12() -> None:
    label = "dicomgate-gdcm-12bit"
    if label not in JPEGExtended12BitDecoder._available and \
            label not in JPEGExtended12BitDecoder._unavailable:
        JPEGExtended12BitDecoder.add_plugin(label, (__name__, "decode_jpeg12_gdcm"))


_register_jpeg12()


# ------------------------------------------------------------------------ decoding

def has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in PIXEL_KEYWORDS)


def frame_count(ds: Dataset) -> int:
    try:
        frames = int(get_nr_frames(ds, warn=False))
        if frames < 1:
            raise ValueError("less than 1")
        return frames
    except (ValueError, TypeError) as exc:
        raise _error(f"invalid Number of Frames {ds.get('NumberOfFrames')!r}: "
                     f"{one_line(exc)}") from exc


def transfer_syntax(ds: Dataset) -> uids.UID:
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if not tsyntax:
        raise _error("the file has no Transfer Syntax UID (0002,0010): pixel data cannot be "
                     "decoded")
    return uids.UID(tsyntax)


def _decoder(ds: Dataset):
    tsyntax = transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise _error(f"no decoder for the transfer syntax {tsyntax.name} ({tsyntax})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise _error(f"no decoder installed for the transfer syntax {tsyntax.name} "
                     f"({tsyntax}){': ' + missing if missing else ''}")
    return decoder, tsyntax


def _decode_failure(tsyntax: uids.UID, exc: BaseException) -> Exception:
    message = str(exc)
    prefix = "Unable to decode as exceptions were raised by all available plugins:"
    if message.startswith(prefix):
        message = message[len(prefix):]
    # pydicom's GDCM plugin fails this way when GDCM returned nothing.
    message = message.replace("'NoneType' object has no attribute 'encode'",
                              "GDCM could not decode it")
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return _error(f"pixel data cannot be decoded ({tsyntax.name}): {one_line(message)}")


def decode_frames(ds: Dataset, indices: list[int]) -> Iterator[tuple[np.ndarray, str]]:
    """Decoded frames (0-based ``indices``, ascending) with the photometric
    interpretation of the array (pydicom converts YBR to RGB)."""
    decoder, tsyntax = _decoder(ds)
    try:
        options = as_pixel_options(ds)
        if len(indices) == 1:
            frames = iter([decoder.as_array(ds, index=indices[0], validate=True, raw=False,
                                            **options)])
        else:
            # All frames: None lets pydicom walk encapsulated fragments once instead of
            # locating each frame from the start.
            every = indices == list(range(frame_count(ds)))
            frames = decoder.iter_array(ds, indices=None if every else indices,
                                        validate=True, raw=False, **options)
        for arr, meta in frames:
            yield arr, str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError, IndexError,
            NotImplementedError, OSError, EOFError) as exc:
        raise _decode_failure(tsyntax, exc) from exc


# ------------------------------------------------------------- enhanced multi-frame

#: Functional groups (PS3.3 C.7.6.16) whose attributes the grey pipeline reads.
FUNCTIONAL_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction",
                            "WindowCenterWidthExplanation", "VOILUTSequence"),
}
#: Top-level attributes the grey pipeline reads.
_GREY_KEYWORDS = ("PhotometricInterpretation", "BitsAllocated", "BitsStored",
                  "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
                  "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
                  "WindowCenterWidthExplanation", "VOILUTSequence")


def frame_view(ds: Dataset, index: int) -> Dataset:
    """``ds``, or for an enhanced multi-frame image (functional groups) a small dataset
    of the attributes the grey pipeline reads, with the Shared and then the frame's
    Per-Frame Functional Groups' rescale and window put at the top level, where
    pydicom's functions look for them."""
    shared = ds.get("SharedFunctionalGroupsSequence") or [None]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [shared[0], per_frame[index] if index < len(per_frame) else None]
    found = {}
    for group in groups:
        if group is None:
            continue
        for sequence, keywords in FUNCTIONAL_GROUPS.items():
            items = group.get(sequence)
            if items:
                found.update({k: items[0][k] for k in keywords if k in items[0]})
    if not found:
        return ds
    view = Dataset()
    for keyword in _GREY_KEYWORDS:
        if keyword in ds:
            view.add(ds[keyword])
    for element in found.values():
        view.add(element)
    if getattr(ds, "file_meta", None) is not None:
        view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    return view


# ------------------------------------------------------------------------ grey LUTs

def _spec(center: float, width: float, function: str = "LINEAR") -> Dataset:
    """A VOI module whose output range pydicom computes as 0..255 (8 bits stored,
    unsigned, no rescale): ``apply_windowing`` then yields display values directly."""
    spec = Dataset()
    spec.PhotometricInterpretation = "MONOCHROME2"
    spec.BitsStored = 8
    spec.PixelRepresentation = 0
    spec.WindowCenter = DSfloat(center, auto_format=True)
    spec.WindowWidth = DSfloat(width, auto_format=True)
    spec.VOILUTFunction = function
    return spec


def _windowed(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """pydicom's windowing of ``values`` to 0..255 (float)."""
    return apply_windowing(np.asarray(values, dtype=np.float64), _spec(center, width, function))


def _as_float_list(value: object) -> list[float]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    return [float(item) for item in value]


def file_windows(ds: Dataset) -> list[tuple[float, float]]:
    """The file's (center, width) pairs; empty when missing or unreadable."""
    try:
        centers = _as_float_list(ds.get("WindowCenter"))
        widths = _as_float_list(ds.get("WindowWidth"))
    except (TypeError, ValueError):
        log.debug("unreadable Window Center/Width %r/%r", ds.get("WindowCenter"),
                  ds.get("WindowWidth"))
        return []
    return list(zip(centers, widths))


def _voi_luts(ds: Dataset) -> list[Dataset]:
    return [item for item in ds.get("VOILUTSequence") or ()
            if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None]


def _pick(items: list, index: int, what: str) -> int:
    if index < len(items):
        return index
    log.debug("the file has %d %s; voi_index %d falls back to the first", len(items), what,
              index)
    return 0


def _modality_lut_16(ds: Dataset) -> Dataset:
    """The Modality LUT Sequence alone with 16 as bits per entry: pydicom 3.0 makes a
    ``uint<bits>`` array of the table, which fails for the valid 9 to 15 (the entries
    themselves are read the same way)."""
    item = ds.ModalityLUTSequence[0]
    entries, first, _bits = item.LUTDescriptor
    patched = Dataset()
    patched.LUTDescriptor = [entries, first, 16]
    patched.add(item["LUTData"])
    spec = Dataset()
    spec.ModalityLUTSequence = [patched]
    if getattr(ds, "file_meta", None) is not None:
        spec.file_meta = ds.file_meta
    else:
        spec.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    return spec


def _modality(domain: np.ndarray, ds: Dataset) -> np.ndarray:
    try:
        lut = ds.get("ModalityLUTSequence")
        if lut and int(lut[0].LUTDescriptor[2]) not in (8, 16):
            return apply_modality_lut(domain, _modality_lut_16(ds))
        return apply_modality_lut(domain, ds)
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        log.warning("Modality LUT / rescale not applied (%s)", one_line(exc))
        return domain


def _voi_lut_scaled(values: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """The VOI LUT Sequence item ``index`` applied to modality values, scaled to 0..255
    (float) from its declared bits per entry."""
    item = ds.VOILUTSequence[index]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    lut_input = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
    return apply_voi(lut_input, ds, index).astype(np.float64) * (255.0 / (2 ** bits - 1))


def _to_uint8(levels: np.ndarray, truncate: bool) -> np.ndarray:
    """0..255 floats to 8 bits: windows are truncated as DCMTK does (the epsilon keeps
    exact boundaries from falling a level short), VOI LUTs rounded."""
    out = np.floor(levels + 1e-6) if truncate else np.rint(levels)
    return np.clip(out, 0, 255).astype(np.uint8)


def grey_8bit(arr: np.ndarray, ds: Dataset, photometric: str, *, voi_index: int = 0,
              window: tuple[float, float] | None = None,
              fallback_window: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One grey frame to 8 bits; returns the array and the window applied (None for a
    VOI LUT Sequence)."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "b":
        arr = arr.view(np.uint8)
    table = arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2
    if table:
        # Every possible stored value, ordered by its bit pattern, so that the frame
        # viewed as unsigned integers indexes the table directly (signed ones too).
        index_type = np.uint8 if arr.dtype.itemsize == 1 else np.uint16
        index = arr.view(index_type)
        domain = np.arange(np.iinfo(index_type).max + 1, dtype=index_type).view(arr.dtype)
        values = _modality(domain, ds)
    else:
        values = _modality(arr, ds)
        index = None

    def finish(levels: np.ndarray, applied: tuple[float, float] | None):
        if photometric == "MONOCHROME1":  # inverted before the 8-bit rounding
            levels = 255.0 - levels
        lut = _to_uint8(levels, truncate=applied is not None)
        return (lut[index] if table else lut), applied

    # The file's VOI LUT Function applies to any window used on it (as in DCMTK).
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        log.debug("unknown VOI LUT Function %r: LINEAR instead", function)
        function = "LINEAR"
    # 1. an explicit window; 2. the file's VOI LUT or window; 3. the fallback; 4. auto
    choices: list[tuple[str, object]] = []
    if window is not None:
        choices.append(("window", window))
    luts = _voi_luts(ds)
    if luts:
        choices.append(("lut", _pick(luts, voi_index, "VOI LUTs")))
    windows = file_windows(ds)
    if windows:
        choices.append(("window", windows[_pick(windows, voi_index, "windows")]))
    if fallback_window is not None:
        choices.append(("window", fallback_window))
    for kind, choice in choices:
        try:
            if kind == "lut":
                return finish(_voi_lut_scaled(values, ds, choice), None)
            center, width = choice
            return finish(_windowed(values, center, width, function), (center, width))
        except (ValueError, TypeError, NotImplementedError, IndexError, AttributeError) as exc:
            log.debug("VOI %s %r not applicable (%s); trying the next", kind, choice,
                      one_line(exc))
    # Automatic: the modality output's min..max over the frame, as DCMTK's min-max
    # window: center (min + max + 1) / 2, width max - min + 1 (LINEAR maps min to 0 and
    # max to 255).
    if not table:
        present = values
    elif ds.get("ModalityLUTSequence"):  # may not be monotonic: every value present
        present = values[np.bincount(index.ravel(), minlength=len(domain)) > 0]
    else:  # rescale is monotonic: the extremes come from the stored extremes
        present = values[np.array([arr.min(), arr.max()], dtype=arr.dtype).view(index_type)]
    low, high = float(np.nanmin(present)), float(np.nanmax(present))
    auto = ((low + high + 1) / 2, high - low + 1)
    return finish(_windowed(values, auto[0], auto[1], function), auto)


# ------------------------------------------------------------------------- colour

def to_8bit(arr: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned samples of ``bits`` significant bits scaled to 0..255."""
    if arr.dtype == np.uint8 and bits <= 8:
        return arr if bits == 8 else np.clip(
            np.rint(arr * (255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)
    scale = np.float32(255.0 / (2.0 ** bits - 1))
    out = arr.astype(np.float32)
    out *= scale
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def colour_8bit(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """One colour frame as (rows, columns, 3) uint8 RGB."""
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
            raise _error(f"palette cannot be applied: {one_line(exc)}") from exc
        bits = 8 if rgb.dtype == np.uint8 else _palette_bits(ds)
        return to_8bit(rgb, bits)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise _error(f"unsupported image: {photometric} with {ds.get('SamplesPerPixel')} "
                     "samples per pixel")
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        raise _error(f"unsupported photometric interpretation {photometric}")
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if arr.dtype.kind == "i":  # signed colour samples: not in the standard; shift
        arr = (arr.astype(np.int64) + 2 ** (bits - 1)).clip(0, None).astype(np.uint32)
    return to_8bit(arr, min(bits, arr.dtype.itemsize * 8))


def _palette_bits(ds: Dataset) -> int:
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or (0, 0, 16)
    bits = int(descriptor[2])
    return bits if bits in (8, 16) else 16


def is_lossy(ds: Dataset) -> bool:
    """The pixel data were lossy compressed at some point."""
    flag = str(ds.get("LossyImageCompression") or "").strip()
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")
    if flag == "01" or tsyntax in ALWAYS_LOSSY:
        return True
    return tsyntax in MAYBE_LOSSY and flag != "00"
