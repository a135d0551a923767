"""The JPEG rendering engine (dicomgate.plugins.jpeg.render).

* pydicom's own test files: every image becomes JPEGs of the right number and size,
  the others are NotAnImage, the deliberately broken ones fail with a clear reason;
* pixel agreement with DCMTK's dcmj2pnm (dcml2pnm for JPEG-LS; for JPEG 2000, which
  DCMTK cannot decode, GDCM's own decompression rendered by dcmj2pnm) with the same
  window, frame by frame, within the tolerance stated in docs/plugins/jpeg-rendering.md;
* synthetic images with known values: rescale, signed pixels, MONOCHROME1, VOI LUT
  Sequence, Modality LUT Sequence, SIGMOID, palettes, RGB/YBR, multi-frame, sizes;
* errors, captions (Cyrillic), lossy marking.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from dicomgate.plugins.jpeg import caption as caption_module
from dicomgate.plugins.jpeg.render import (NotAnImage, RenderError, RenderOptions, find_font,
                                           iter_jpeg, render_jpeg, render_pixels)
from dicomgate.testing import missing

TEST_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
# Only the files shipped in pydicom's wheel: get_testdata_files() may also look for
# the large ones pydicom downloads on demand, and the tests never use the network.
CORPUS = sorted(path.name for path in TEST_FILES.glob("*.dcm"))
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Deliberately broken files of pydicom's set: why, and what our error must say.
BROKEN = {
    "MR_truncated.dcm": ("Pixel Data is 62 bytes shorter than Rows x Columns x 2",
                         "pixel data cannot be decoded (Explicit VR Little Endian): The number "
                         "of bytes of pixel data is less than expected"),
    "badVR.dcm": ("Number of Frames is '1A'", "invalid Number of Frames '1A'"),
    "JPEG2000-embedded-sequence-delimiter.dcm": (
        "4 bytes of the JPEG 2000 codestream replaced by a Sequence Delimiter (pydicom #1140)",
        "pixel data cannot be decoded (JPEG 2000 Image Compression)"),
    "meta_missing_tsyntax.dcm": ("no Transfer Syntax UID, no Image Pixel module",
                                 "the file has no Transfer Syntax UID"),
    "nested_priv_SQ.dcm": ("Pixel Data without an Image Pixel module",
                           "Missing required element: (0028,0100) 'Bits Allocated'"),
    "no_meta.dcm": ("a fragment without DICM header, file meta or any group 0008 element: "
                    "not recognisable as DICOM", "not a DICOM file"),
}

#: Every pixel within MAX_DIFF grey/colour levels of the reference, and the mean
#: absolute difference at most MEAN_DIFF (docs/plugins/jpeg-rendering.md says why).
MAX_DIFF = 1
MEAN_DIFF = 0.5
#: Uncompressed YBR_FULL / YBR_FULL_422: DCMTK converts to RGB with integer arithmetic
#: that is up to 3 levels off the exact result; pydicom's conversion is within 1 of it
#: (test_rgb_planar_and_ybr_full_give_the_rgb_values checks against the truth).
MAX_DIFF_YBR = 3
MEAN_DIFF_YBR = 1.0

J2K = {uids.JPEG2000Lossless, uids.JPEG2000}
JPEG_LS = {uids.JPEGLSLossless, uids.JPEGLSNearLossless}
#: Files DCMTK 3.6.7 cannot render, compared some other way.
VIA_GDCM = {"SC_rgb_jpeg.dcm": "dcmj2pnm stops with 'premature end of stream' on its JPEG"}
TWINS = {  # DCMTK 3.6.7 renders 32-bit big-endian pixel data wrongly
    "rtdose_expb.dcm": "rtdose.dcm", "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm"}


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path, force=True)


def has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in PIXEL_KEYWORDS)


def corpus_kind(name: str) -> str:
    if name in BROKEN:
        return "broken"
    return "image" if has_pixels(read(TEST_FILES / name)) else "not-image"


IMAGES = [name for name in CORPUS if corpus_kind(name) == "image"]
NOT_IMAGES = [name for name in CORPUS if corpus_kind(name) == "not-image"]


# --------------------------------------------------------------------- references

def gdcm_transcode(src: Path, dst: Path, syntax: str = "ExplicitVRLittleEndian") -> Path:
    """``src`` rewritten by GDCM itself (its reader and ImageChangeTransferSyntax, not
    pydicom's plugin) in the transfer syntax GDCM calls ``syntax``: decompressed to
    Explicit VR Little Endian by default, or compressed (pydicom has no encoder for
    JPEG lossless, JPEG-LS or JPEG 2000)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), f"GDCM cannot read {src}"
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM cannot change {src} to {syntax}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def voi_args(ds: Dataset, options: RenderOptions) -> list[str]:
    """dcmj2pnm's VOI options for what the engine is specified to choose."""
    if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return []
    if options.window:
        return ["+Ww", repr(options.window[0]), repr(options.window[1])]
    if ds.get("VOILUTSequence"):
        count = len(ds.VOILUTSequence)
        return ["+Wl", str(options.voi_index + 1 if options.voi_index < count else 1)]
    if "WindowCenter" in ds:
        count = ds["WindowCenter"].VM
        return ["+Wi", str(options.voi_index + 1 if options.voi_index < count else 1)]
    if options.fallback_window:
        return ["+Ww", repr(options.fallback_window[0]), repr(options.fallback_window[1])]
    return ["+Wm"]  # DCMTK's min-max window over the frame loaded


class Reference:
    """An independent rendering of one file: DCMTK, by way of GDCM for JPEG 2000."""

    def __init__(self, dcmtk: Callable[[str], str], workdir: Path):
        self.dcmtk = dcmtk
        self.workdir = workdir

    def source(self, path: Path) -> tuple[str, Path]:
        tsyntax = read(path).file_meta.TransferSyntaxUID
        if path.name in TWINS:
            return "dcmj2pnm", TEST_FILES / TWINS[path.name]
        if tsyntax in J2K or path.name in VIA_GDCM:
            return "dcmj2pnm", gdcm_transcode(path, self.workdir / f"gdcm-{path.name}")
        if tsyntax in JPEG_LS:
            return "dcml2pnm", path
        return "dcmj2pnm", path

    def frame(self, path: Path, frame: int, options: RenderOptions) -> np.ndarray:
        tool, source = self.source(path)
        out = self.workdir / f"{path.stem}-{frame}.png"
        # -O: DCMTK burns overlays in by default; the engine does not draw them.
        cmd = [self.dcmtk(tool), "+on", "-O", "+F", str(frame),
               *voi_args(read(path), options), str(source), str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"
        with Image.open(out) as image:
            return np.asarray(image)


@pytest.fixture
def reference(dcmtk, tmp_path: Path) -> Reference:
    return Reference(dcmtk, tmp_path)


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str,
                 max_diff: int = MAX_DIFF, mean_diff: float = MEAN_DIFF) -> None:
    assert ours.dtype == np.uint8
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    assert diff.max() <= max_diff, (
        f"{what}: max |diff| {diff.max()} at {worst} (ours {ours[worst]}, "
        f"reference {theirs[worst]}); {(diff > max_diff).sum()} pixels over {max_diff}")
    assert diff.mean() <= mean_diff, f"{what}: mean |diff| {diff.mean():.3f}"


def tolerance(ds: Dataset) -> dict[str, float]:
    """The tolerance for comparing ``ds`` with DCMTK."""
    native = not ds.file_meta.TransferSyntaxUID.is_compressed
    if native and str(ds.PhotometricInterpretation).startswith("YBR_FULL"):
        return {"max_diff": MAX_DIFF_YBR, "mean_diff": MEAN_DIFF_YBR}
    return {}


def jpeg_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return np.asarray(image)


# ----------------------------------------------------------------- pydicom's files

@pytest.mark.parametrize("name", IMAGES)
def test_every_image_of_pydicoms_set_becomes_jpegs(name: str):
    ds = read(TEST_FILES / name)
    frames = int(ds.get("NumberOfFrames") or 1)
    grey = ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
    images = render_jpeg(TEST_FILES / name)
    assert [image.frame for image in images] == list(range(1, frames + 1))
    for image in images:
        assert image.frames == frames
        assert (image.width, image.height) == (ds.Columns, ds.Rows)
        assert image.media_type == "image/jpeg" and image.extension == ".jpg"
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.format == "JPEG"
            assert decoded.size == (ds.Columns, ds.Rows)
            assert decoded.mode == ("L" if grey else "RGB")
        assert (image.window is None) == (not grey or bool(ds.get("VOILUTSequence")))


@pytest.mark.parametrize("name", NOT_IMAGES)
def test_files_without_pixel_data_are_not_images(name: str):
    with pytest.raises(NotAnImage, match="no pixel data"):
        render_jpeg(TEST_FILES / name)


@pytest.mark.parametrize("name", sorted(BROKEN), ids=[f"{n}: {BROKEN[n][0]}" for n in
                                                      sorted(BROKEN)])
def test_broken_files_of_pydicoms_set_fail_with_a_clear_reason(name: str):
    assert name in CORPUS, f"{name} is no longer in pydicom's test files: update BROKEN"
    with pytest.raises(RenderError) as caught:
        render_jpeg(TEST_FILES / name)
    assert not isinstance(caught.value, NotAnImage)
    message = str(caught.value)
    assert BROKEN[name][1] in message
    assert "\n" not in message


def test_every_transfer_syntax_of_pydicoms_images_decodes():
    by_syntax: dict[str, list[str]] = {}
    for name in IMAGES + [n for n in BROKEN if n in CORPUS]:
        ds = read(TEST_FILES / name)
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if tsyntax and has_pixels(ds):
            by_syntax.setdefault(tsyntax, []).append(name)
    assert len(by_syntax) >= 12, sorted(by_syntax)
    undecoded = {}
    for tsyntax, names in by_syntax.items():
        rendered = 0
        for name in names:
            try:
                render_jpeg(TEST_FILES / name, RenderOptions(frames="first"))
                rendered += 1
            except RenderError:
                pass
        if not rendered:
            undecoded[f"{tsyntax} {uids.UID(tsyntax).name}"] = names
    assert not undecoded


@pytest.mark.parametrize("name", IMAGES)
def test_pixels_agree_with_dcmtk(name: str, reference: Reference):
    path = TEST_FILES / name
    ds = read(path)
    options = RenderOptions()
    for frame in range(1, int(ds.get("NumberOfFrames") or 1) + 1):
        ours, _window = render_pixels(ds, frame, options)
        assert_close(ours, reference.frame(path, frame, options), f"{name} frame {frame}",
                     **tolerance(ds))


#: Lossless encodings of the same pixels in pydicom's set.
SAME_PIXELS = [
    ("MR_small.dcm", twin) for twin in (
        "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
        "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_padded.dcm")] + [
    ("rtdose.dcm", "rtdose_expb.dcm"), ("rtdose.dcm", "rtdose_rle.dcm"),
    ("rtdose_1frame.dcm", "rtdose_expb_1frame.dcm"), ("rtdose_1frame.dcm", "rtdose_rle_1frame.dcm"),
    ("liver_1frame.dcm", "liver_expb_1frame.dcm"), ("SC_rgb_small_odd.dcm",
                                                    "SC_rgb_small_odd_big_endian.dcm"),
]


@pytest.mark.parametrize("first, second", SAME_PIXELS)
def test_lossless_twins_render_identically(first: str, second: str):
    a, b = read(TEST_FILES / first), read(TEST_FILES / second)
    frames = int(a.get("NumberOfFrames") or 1)
    assert frames == int(b.get("NumberOfFrames") or 1)
    for frame in range(1, frames + 1):
        ours, window = render_pixels(a, frame)
        theirs, their_window = render_pixels(b, frame)
        assert window == their_window
        assert np.array_equal(ours, theirs), f"frame {frame}"


# ------------------------------------------------------------- synthetic datasets

def make(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
         tsyntax: str = uids.ExplicitVRLittleEndian, **attributes) -> Dataset:
    """A Secondary Capture dataset around ``pixels`` (frames, rows, columns[, 3])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uids.generate_uid()
    ds.PatientName = "TEST^RENDER"
    ds.PatientID = "R1"
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if tsyntax != uids.ExplicitVRLittleEndian:
        ds.compress(tsyntax)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int, columns: int, low: int, high: int, dtype) -> np.ndarray:
    """A horizontal ramp from ``low`` to ``high`` (inclusive) with a vertical ripple."""
    x = np.linspace(low, high, columns)
    y = np.linspace(0, 1, rows)[:, None]
    values = x[None, :] + (high - low) * 0.05 * np.sin(6 * y)
    return np.clip(np.rint(values), low, high).astype(dtype)


def linear_levels(x, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 to 0..255 (independent of the engine)."""
    x = np.asarray(x, dtype=np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, y)
    return np.where(x > center - 0.5 + (width - 1) / 2, 255, y)


def linear_window(x, center: float, width: float) -> np.ndarray:
    """The same truncated to 8 bits, as DCMTK does."""
    return np.floor(linear_levels(x, center, width) + 1e-6).astype(np.uint8)


def lut_item(entries: int, first: int, bits: int, data: np.ndarray, vr: str = "US") -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits]
    item.add_new(0x00283006, vr, data.astype(np.uint16).tobytes() if vr == "OW"
                 else [int(v) for v in data])
    return item


def signed_ct() -> Dataset:
    """Signed 12-bit stored values, HU = 2 * stored - 100, two windows."""
    pixels = ramp(64, 96, -2048, 2047, np.int16)
    pixels[0, :6] = [-30, 20, 70, 170, -2048, 2047]  # HU -160, -60, 40, 240, min, max
    return make(pixels[None], "MONOCHROME2", 12, RescaleSlope=2, RescaleIntercept=-100,
                WindowCenter=[40, -600], WindowWidth=[400, 1500], Modality="CT",
                SOPClassUID="1.2.840.10008.5.1.4.1.1.2")


def mono1() -> Dataset:
    return make(ramp(40, 128, 0, 1023, np.uint16)[None], "MONOCHROME1", 10)


def sigmoid() -> Dataset:
    return make(ramp(40, 128, 0, 4095, np.uint16)[None], "MONOCHROME2", 12,
                WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID")


def voi_lut() -> Dataset:
    """A gamma curve VOI LUT (12-bit output) over 4096 entries, and a window too."""
    curve = np.rint(4095 * (np.arange(4096) / 4095) ** 0.5)
    ds = make(ramp(40, 128, 0, 4095, np.uint16)[None], "MONOCHROME2", 12,
              WindowCenter=1000, WindowWidth=500)
    ds.VOILUTSequence = [lut_item(4096, 0, 12, curve)]
    return ds


def modality_lut() -> Dataset:
    """8-bit stored values through a non-linear Modality LUT to 12 bits, windowed."""
    table = np.rint(4095 * (np.arange(256) / 255) ** 2)
    ds = make(ramp(40, 128, 0, 255, np.uint8)[None], "MONOCHROME2", 8,
              WindowCenter=1500, WindowWidth=2000)
    ds.ModalityLUTSequence = [lut_item(256, 0, 12, table)]
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    return ds


def palette(bits: int) -> Dataset:
    """Index i -> (i, 255 - i, 128) in 8 bits, stored as 8- or 16-bit entries."""
    index = ramp(30, 256, 0, 255, np.uint8)
    ds = make(index[None], "PALETTE COLOR", 8)
    scale = 257 if bits == 16 else 1
    i = np.arange(256)
    for colour, values in (("Red", i * scale), ("Green", (255 - i) * scale),
                           ("Blue", np.full(256, 0x8000 if bits == 16 else 128))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, bits])
        data = values.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", data)
    return ds


def rgb_planar() -> Dataset:
    rgb = np.stack([ramp(30, 60, 0, 255, np.uint8), 255 - ramp(30, 60, 0, 255, np.uint8),
                    np.full((30, 60), 77, np.uint8)], axis=-1)
    ds = make(rgb[None], "RGB", 8)
    planes = np.moveaxis(rgb, -1, 0)
    ds.PlanarConfiguration = 1
    ds.PixelData = planes.tobytes()
    return ds


def rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    """PS3.3 C.7.6.3.1.2 YBR_FULL from RGB, written out here to be independent."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


RGB_PATCHES = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
                        [[0, 0, 0], [128, 128, 128], [200, 120, 40], [30, 200, 210]]],
                       np.uint8).repeat(8, axis=0).repeat(8, axis=1)


def ybr_full() -> Dataset:
    return make(rgb_to_ybr_full(RGB_PATCHES)[None], "YBR_FULL", 8)


def high_bits_garbage() -> Dataset:
    """8 bits allocated, 6 stored: the unused high bits hold noise to be ignored."""
    stored = ramp(20, 64, 0, 63, np.uint8)
    ds = make(stored[None], "MONOCHROME2", 6)
    ds.PixelData = (stored | np.uint8(0b1100_0000)).tobytes()
    return ds


def signed_8bit() -> Dataset:
    return make(ramp(20, 64, -128, 127, np.int8)[None], "MONOCHROME2", 8)


def multiframe(tsyntax: str = uids.ExplicitVRLittleEndian) -> Dataset:
    """Five 12-bit frames; frame k (1-based) is a ramp offset by 500 * k."""
    frames = np.stack([ramp(32, 48, 0, 1000, np.uint16) + 500 * k for k in range(1, 6)])
    return make(frames, "MONOCHROME2", 12, tsyntax=tsyntax)


SYNTHETIC = {"signed-ct": signed_ct, "monochrome1": mono1, "sigmoid": sigmoid,
             "voi-lut-sequence": voi_lut, "modality-lut-sequence": modality_lut,
             "palette-8": lambda: palette(8), "palette-16": lambda: palette(16),
             "rgb-planar": rgb_planar, "ybr-full": ybr_full,
             "high-bits-garbage": high_bits_garbage, "signed-8bit": signed_8bit,
             "multiframe": multiframe,
             "multiframe-rle": lambda: multiframe(uids.RLELossless),
             "multiframe-jpeg-ls": lambda: multiframe(uids.JPEGLSLossless),
             "multiframe-j2k": lambda: multiframe(uids.JPEG2000Lossless)}


# (GDCM's 12-bit lossy JPEG of 16-bit allocated data is written with a precision of
# 16, which the standard does not allow: the 12-bit JPEG Extended files of pydicom's
# set are used instead.)
GDCM_SYNTAXES = {"JPEGLosslessProcess14": uids.JPEGLossless,
                 "JPEGLosslessProcess14_1": uids.JPEGLosslessSV1}


@pytest.mark.parametrize("case", sorted(SYNTHETIC) + sorted(GDCM_SYNTAXES))
def test_synthetic_images_agree_with_dcmtk(case: str, tmp_path: Path, reference: Reference):
    if case in GDCM_SYNTAXES:  # JPEG lossless process 14 / SV1, 5 frames
        path = gdcm_transcode(save(multiframe(), tmp_path / "src.dcm"),
                              tmp_path / f"{case}.dcm", case)
        assert read(path).file_meta.TransferSyntaxUID == GDCM_SYNTAXES[case]
    else:
        path = save(SYNTHETIC[case](), tmp_path / f"{case}.dcm")
    ds = read(path)
    for frame in range(1, int(ds.get("NumberOfFrames") or 1) + 1):
        for options in (RenderOptions(), RenderOptions(window=(700.5, 900.0)),
                        RenderOptions(voi_index=1)):
            ours, _ = render_pixels(ds, frame, options)
            assert_close(ours, reference.frame(path, frame, options),
                         f"{case} frame {frame} {options}", **tolerance(ds))


# ------------------------------------------------------------ known values

def test_signed_ct_with_rescale_and_window_gives_the_expected_values():
    ds = signed_ct()
    pixels, window = render_pixels(ds, 1)
    assert window == (40.0, 400.0)
    # HU -160 is the window's bottom, -60 a quarter up, 40 the center, 240 above
    assert list(pixels[0, :6]) == [0, 63, 127, 255, 0, 255]
    stored = ds.pixel_array.astype(np.float64)
    assert np.array_equal(pixels, linear_window(stored * 2 - 100, 40, 400))
    lung, window = render_pixels(ds, 1, RenderOptions(voi_index=1))
    assert window == (-600.0, 1500.0)
    assert np.array_equal(lung, linear_window(stored * 2 - 100, -600, 1500))


def test_automatic_window_is_the_modality_output_min_max():
    stored = ramp(16, 4096, 0, 4095, np.uint16)
    stored[0, :3] = [0, 2048, 4095]
    pixels, window = render_pixels(make(stored[None], "MONOCHROME2", 12), 1)
    assert window == (2048.0, 4096.0)  # (min + max + 1) / 2, max - min + 1
    assert list(pixels[0, :3]) == [0, 127, 255]
    # with a rescale, the range is that of the rescaled values
    rescaled, window = render_pixels(make(stored[None], "MONOCHROME2", 12, RescaleSlope=0.5,
                                          RescaleIntercept=-1000), 1)
    assert window == (24.25, 2048.5)  # -1000 .. 1047.5
    assert list(rescaled[0, :3]) == [0, 127, 255]


def test_monochrome1_is_inverted_after_the_window():
    ds = mono1()
    pixels, window = render_pixels(ds, 1)
    assert window == (512.0, 1024.0)
    # inverted before the truncation to 8 bits, as DCMTK does
    expected = np.floor(255 - linear_levels(ds.pixel_array, *window) + 1e-6)
    assert np.array_equal(pixels, expected)
    assert pixels[0, 0] == 255 and pixels[0, -1] == 0  # row 0 has no ripple


def test_window_choice_override_file_fallback_and_voi_index():
    stored = ramp(8, 64, 0, 4095, np.uint16)[None]
    with_windows = make(stored, "MONOCHROME2", 12, WindowCenter=[1000, 3000],
                        WindowWidth=[500, 200])
    without = make(stored, "MONOCHROME2", 12)
    assert render_pixels(with_windows, 1)[1] == (1000.0, 500.0)
    assert render_pixels(with_windows, 1, RenderOptions(voi_index=1))[1] == (3000.0, 200.0)
    # out of range: the first, not an error
    assert render_pixels(with_windows, 1, RenderOptions(voi_index=5))[1] == (1000.0, 500.0)
    # the file's window wins over the fallback; the override over everything
    assert render_pixels(with_windows, 1, RenderOptions(fallback_window=(10, 20)))[1] == \
        (1000.0, 500.0)
    assert render_pixels(with_windows, 1, RenderOptions(window=(10, 20)))[1] == (10.0, 20.0)
    assert render_pixels(without, 1, RenderOptions(fallback_window=(10, 20)))[1] == (10.0, 20.0)
    assert render_pixels(without, 1)[1] == (2048.0, 4096.0)
    pixels, _ = render_pixels(without, 1, RenderOptions(window=(2000, 1001)))
    assert np.array_equal(pixels, linear_window(stored[0], 2000, 1001))


def test_unusable_file_window_falls_back_to_automatic():
    ds = make(ramp(8, 64, 0, 255, np.uint8)[None], "MONOCHROME2", 8, WindowCenter=100,
              WindowWidth=0)
    assert render_pixels(ds, 1)[1] == (128.0, 256.0)


def test_voi_lut_sequence_is_applied_and_scaled_from_its_bits():
    ds = voi_lut()
    pixels, window = render_pixels(ds, 1)
    assert window is None
    stored = ds.pixel_array
    expected = np.rint(np.rint(4095 * (stored / 4095) ** 0.5) * 255 / 4095).astype(np.uint8)
    assert np.array_equal(pixels, expected)


def test_modality_lut_sequence_then_window():
    ds = modality_lut()
    pixels, window = render_pixels(ds, 1)
    assert window == (1500.0, 2000.0)
    values = np.rint(4095 * (ds.pixel_array / 255) ** 2)
    assert np.array_equal(pixels, linear_window(values, 1500, 2000))


def test_sigmoid_function():
    ds = sigmoid()
    pixels, _ = render_pixels(ds, 1)
    x = ds.pixel_array.astype(np.float64)
    expected = 255 / (1 + np.exp(-4 * (x - 2000) / 1000))
    assert np.abs(pixels - expected).max() <= 1


@pytest.mark.parametrize("bits", [8, 16])
def test_palette_colour_known_entries(bits: int):
    ds = palette(bits)
    pixels, window = render_pixels(ds, 1)
    assert window is None and pixels.shape == (30, 256, 3)
    index = ds.pixel_array.astype(np.int16)
    assert np.array_equal(pixels[..., 0], index)
    assert np.array_equal(pixels[..., 1], 255 - index)
    assert (pixels[..., 2] == 128).all()


def test_rgb_planar_and_ybr_full_give_the_rgb_values():
    rgb, window = render_pixels(rgb_planar(), 1)
    assert window is None
    assert list(rgb[0, 0]) == [0, 255, 77] and list(rgb[0, -1]) == [255, 0, 77]
    ybr, _ = render_pixels(ybr_full(), 1)
    assert np.abs(ybr.astype(int) - RGB_PATCHES).max() <= 2


def test_ybr_left_by_a_decoder_is_converted():
    # pydicom's decoders hand YBR_FULL(_422) over as RGB already; should one not, the
    # engine converts it itself.
    from dicomgate.plugins.jpeg import pixels

    ds = ybr_full()
    raw = np.frombuffer(ds.PixelData, np.uint8).reshape(16, 32, 3)
    rgb = pixels.colour_8bit(raw, ds, "YBR_FULL")
    assert np.abs(rgb.astype(int) - RGB_PATCHES).max() <= 1


def test_bits_stored_below_bits_allocated_ignores_the_high_bits():
    pixels, window = render_pixels(high_bits_garbage(), 1)
    assert window == (32.0, 64.0)
    assert pixels[0, 0] == 0 and pixels[0, -1] == 255  # row 0 has no ripple


def test_enhanced_multiframe_rescale_and_windows_from_functional_groups(tmp_path: Path):
    stored = ramp(16, 64, 0, 4095, np.uint16)
    ds = make(np.stack([stored] * 3), "MONOCHROME2", 12,
              SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT
    transform, voi, lung = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    voi.WindowCenter, voi.WindowWidth = 40, 400
    lung.WindowCenter, lung.WindowWidth = -600, 1500
    shared = Dataset()
    shared.PixelValueTransformationSequence = [transform]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = [Dataset(), Dataset(), Dataset()]
    per_frame[1].FrameVOILUTSequence = [lung]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds = read(save(ds, tmp_path / "enhanced.dcm"))
    for frame, window in ((1, (40.0, 400.0)), (2, (-600.0, 1500.0)), (3, (40.0, 400.0))):
        pixels, applied = render_pixels(ds, frame)
        assert applied == window
        assert np.array_equal(pixels, linear_window(stored.astype(float) - 1024, *window))


# ------------------------------------------------------------ frames and sizes

@pytest.mark.parametrize("tsyntax", [uids.ExplicitVRLittleEndian, uids.RLELossless,
                                     uids.JPEGLSLossless, uids.JPEG2000Lossless])
@pytest.mark.parametrize("frames, expected", [("all", [1, 2, 3, 4, 5]), ("first", [1]),
                                              ("middle", [3]), ("2", [2]), ("5", [5])])
def test_frame_selection(tmp_path: Path, tsyntax: str, frames: str, expected: list[int]):
    path = save(multiframe(tsyntax), tmp_path / "mf.dcm")
    window = (1500.0, 3001.0)
    images = render_jpeg(path, RenderOptions(frames=frames, window=window))
    assert [image.frame for image in images] == expected
    for image in images:
        assert image.frames == 5
        # each frame is its own: the ramp's mean rises with the frame number
        mean = float(jpeg_array(image.data).mean())
        expected_mean = float(linear_window(ramp(32, 48, 0, 1000, np.uint16) + 500 * image.frame,
                                            *window).mean())
        assert abs(mean - expected_mean) < 2, (image.frame, mean, expected_mean)


def test_a_frame_past_the_end_is_an_error(tmp_path: Path):
    path = save(multiframe(), tmp_path / "mf.dcm")
    with pytest.raises(RenderError, match="frame 6 requested, the instance has 5 frames"):
        render_jpeg(path, RenderOptions(frames="6"))
    with pytest.raises(RenderError, match="frame 0 requested"):
        render_pixels(read(path), 0)


def test_iter_jpeg_yields_what_render_jpeg_returns(tmp_path: Path):
    path = save(multiframe(), tmp_path / "mf.dcm")
    assert [i.data for i in iter_jpeg(path)] == [i.data for i in render_jpeg(path)]


@pytest.mark.parametrize("max_size, size", [(0, (300, 200)), (150, (150, 100)),
                                            (1000, (300, 200)), (300, (300, 200)),
                                            (59, (59, 39)), (1, (1, 1))])
def test_max_size_shrinks_the_longest_side_and_never_enlarges(tmp_path: Path, max_size: int,
                                                              size: tuple[int, int]):
    path = save(make(ramp(200, 300, 0, 4095, np.uint16)[None], "MONOCHROME2", 12),
                tmp_path / "big.dcm")
    [image] = render_jpeg(path, RenderOptions(max_size=max_size))
    assert (image.width, image.height) == size
    assert jpeg_array(image.data).shape == (size[1], size[0])


def test_jpeg_matches_the_pixels_within_jpeg_tolerance(tmp_path: Path):
    path = TEST_FILES / "CT_small.dcm"
    pixels, _ = render_pixels(read(path), 1)
    [image] = render_jpeg(path)
    decoded = jpeg_array(image.data)
    diff = np.abs(decoded.astype(int) - pixels)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8
    # colour, and after a resize (compared with the same resize of the pixels)
    path = TEST_FILES / "examples_rgb_color.dcm"
    pixels, _ = render_pixels(read(path), 1)
    [image] = render_jpeg(path, RenderOptions(max_size=160, quality=95))
    small = np.asarray(Image.fromarray(pixels).resize((160, 120), Image.Resampling.LANCZOS))
    diff = np.abs(jpeg_array(image.data).astype(int) - small)
    assert image.width == 160 and diff.mean() < 2.5 and np.percentile(diff, 99) <= 20


def test_quality_changes_the_size():
    path = TEST_FILES / "CT_small.dcm"
    low = render_jpeg(path, RenderOptions(quality=20))[0].data
    high = render_jpeg(path, RenderOptions(quality=95))[0].data
    assert len(low) < len(high)


@pytest.mark.parametrize("field, value", [("quality", 0), ("quality", 96), ("max_size", -1),
                                          ("frames", "last"), ("frames", "0"),
                                          ("voi_index", -1), ("window", (40, 0)),
                                          ("fallback_window", (40, 0.5))])
def test_options_are_validated(field: str, value):
    with pytest.raises(ValueError):
        RenderOptions(**{field: value})


# ------------------------------------------------------------------- errors

def test_truncated_pixel_data(tmp_path: Path):
    ds = make(ramp(32, 32, 0, 4095, np.uint16)[None], "MONOCHROME2", 12)
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(RenderError, match=r"^pixel data cannot be decoded \(Explicit VR Little "
                                          r"Endian\): The number of bytes of pixel data is less"):
        render_jpeg(save(ds, tmp_path / "short.dcm"))


def _jpeg_dataset(fragment: bytes) -> Dataset:
    ds = make(np.zeros((1, 64, 64), np.uint8), "MONOCHROME2", 8)
    ds.file_meta.TransferSyntaxUID = uids.JPEGBaseline8Bit
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.parametrize("damage", ["truncated", "headers-only", "not-a-jpeg"])
def test_broken_jpeg_fragment(tmp_path: Path, damage: str):
    y, x = np.mgrid[0:64, 0:64]
    out = io.BytesIO()
    Image.fromarray(((x + y) * 2).astype(np.uint8)).save(out, "JPEG", quality=90)
    good = out.getvalue()
    assert render_jpeg(save(_jpeg_dataset(good), tmp_path / "good.dcm"))
    fragment = {"truncated": good[:len(good) // 2], "headers-only": good[:200],
                "not-a-jpeg": bytes(range(256)) * 3}[damage]
    with pytest.raises(RenderError, match=r"^pixel data cannot be decoded \(JPEG Baseline "
                                          r"\(Process 1\)\): .+") as caught:
        render_jpeg(save(_jpeg_dataset(fragment), tmp_path / "bad.dcm"))
    assert "\n" not in str(caught.value)


def test_transfer_syntax_without_a_decoder(tmp_path: Path):
    ds = _jpeg_dataset(b"\x00\x00\x01\xb3" + bytes(100))
    ds.file_meta.TransferSyntaxUID = uids.MPEG2MPML
    with pytest.raises(RenderError, match=r"^no decoder for the transfer syntax MPEG2 Main "
                                          r"Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)"):
        render_jpeg(save(ds, tmp_path / "mpeg.dcm"))


def test_unsupported_photometric_interpretation(tmp_path: Path):
    ds = rgb_planar()
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(RenderError, match="^unsupported photometric interpretation HSV$"):
        render_jpeg(save(ds, tmp_path / "hsv.dcm"))


def test_not_dicom_and_missing_file(tmp_path: Path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello world\n" * 100)
    with pytest.raises(RenderError, match="^not a DICOM file"):
        render_jpeg(junk)
    with pytest.raises(RenderError, match="^file not found"):
        render_jpeg(tmp_path / "absent.dcm")


def test_encapsulated_pdf_is_not_an_image(tmp_path: Path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = uids.generate_uid()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    with pytest.raises(NotAnImage, match=r"^no pixel data \(Encapsulated PDF Storage\)$"):
        render_jpeg(save(ds, tmp_path / "doc.dcm"))


# ------------------------------------------------------------------ captions

@pytest.fixture
def font() -> str:
    try:
        return find_font()
    except RenderError as exc:
        missing(str(exc))


def test_caption_fields_are_formatted():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Иванов^Пётр^Сергеевич"
    ds.PatientID = "12345"
    ds.StudyDate = "20250314"
    ds.StudyTime = "101530.25"
    ds.StudyDescription = "КТ  грудной клетки"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 15
    ds.ReferringPhysicianName = "Dr^Smith^^Prof.^Jr"
    keywords = ("PatientName", "PatientID", "StudyDate", "StudyTime", "StudyDescription",
                "SeriesNumber", "InstanceNumber", "AccessionNumber", "ReferringPhysicianName")
    assert caption_module.caption_fields(ds, keywords) == [
        "Иванов Пётр Сергеевич", "12345", "2025-03-14", "10:15:30", "КТ грудной клетки",
        "Series 2", "Image 15", "Prof. Dr Smith Jr"]


def test_caption_with_a_cyrillic_name(tmp_path: Path, font: str):
    ds = make(np.full((1, 120, 420), 128, np.uint8), "MONOCHROME2", 8, WindowCenter=128,
              WindowWidth=256, SpecificCharacterSet="ISO_IR 144",
              PatientName="Иванов^Пётр", PatientID="12345", StudyDate="20250314")
    path = save(ds, tmp_path / "cyrillic.dcm")
    assert read(path).PatientName.family_name == "Иванов"
    options = RenderOptions(caption=("PatientName", "PatientID", "StudyDate"), quality=95)
    [image] = render_jpeg(path, options)
    assert image.width == 420 and image.height > 120
    band = jpeg_array(image.data)[120:].astype(int)
    assert band.max() > 200 and band.std() > 20, "the caption band is blank"
    # The same line drawn straight with Pillow and the font, where the docs say it goes.
    size = caption_module.font_size(420)
    assert size == 10
    margin = max(2, size // 2)
    expected = Image.new("L", (420, band.shape[0]), 0)
    ImageDraw.Draw(expected).text((margin, margin), "Иванов Пётр  ·  12345  ·  2025-03-14",
                                  font=ImageFont.truetype(font, size), fill=255)
    expected = np.asarray(expected).astype(int)
    assert np.abs(band - expected).mean() < 4
    # Cyrillic letters are glyphs of their own, not the font's missing-glyph box
    drawn = ImageFont.truetype(font, 40)
    masks = {ch: bytes(drawn.getmask(ch)) for ch in "ИвнПёЖ"}
    assert len(set(masks.values())) == len(masks)
    assert bytes(drawn.getmask("И")) != bytes(drawn.getmask("\uffff"))


def test_caption_wraps_to_the_width_and_skips_empty_fields(tmp_path: Path, font: str):
    ds = make(np.zeros((1, 60, 100), np.uint8), "MONOCHROME2", 8,
              SpecificCharacterSet="ISO_IR 192",
              PatientName="Константинопольский^Александр", StudyDescription="",
              SeriesNumber=3)
    path = save(ds, tmp_path / "narrow.dcm")
    one_field = render_jpeg(path, RenderOptions(caption=("SeriesNumber", "StudyDescription")))
    two_lines = render_jpeg(path, RenderOptions(caption=("PatientName", "SeriesNumber")))
    assert two_lines[0].height > one_field[0].height > 60
    none = render_jpeg(path, RenderOptions(caption=("StudyDescription", "AccessionNumber")))
    assert none[0].height == 60


def test_caption_is_added_after_the_resize(tmp_path: Path, font: str):
    path = save(make(np.zeros((1, 400, 800), np.uint8), "MONOCHROME2", 8, PatientID="X"),
                tmp_path / "wide.dcm")
    [image] = render_jpeg(path, RenderOptions(max_size=200, caption=("PatientID",)))
    assert image.width == 200 and image.height > 100


def test_missing_font_has_an_install_hint(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(caption_module, "FONT_DIRS", (str(tmp_path / "no-fonts"),))
    hint = ('no font with Cyrillic for captions: install fonts-dejavu-core (Debian) or set '
            '[jpeg] font = "/path/to/font.ttf"')
    with pytest.raises(RenderError) as caught:
        find_font()
    assert str(caught.value) == hint
    path = save(make(np.zeros((1, 8, 8), np.uint8), "MONOCHROME2", 8), tmp_path / "a.dcm")
    with pytest.raises(RenderError, match="install fonts-dejavu-core"):
        render_jpeg(path, RenderOptions(caption=("PatientName",)))
    assert render_jpeg(path)  # no caption: no font needed
    with pytest.raises(RenderError, match="caption font '/nowhere/font.ttf' does not exist"):
        find_font("/nowhere/font.ttf")


def test_font_is_found_under_the_font_folders(tmp_path: Path, monkeypatch, font: str):
    folder = tmp_path / "fonts" / "truetype" / "dejavu"
    folder.mkdir(parents=True)
    (folder / "DejaVuSansCondensed.ttf").write_bytes(Path(font).read_bytes())
    monkeypatch.setattr(caption_module, "FONT_DIRS", (str(tmp_path / "fonts"),))
    assert find_font() == str(folder / "DejaVuSansCondensed.ttf")
    assert find_font(font) == font


# ------------------------------------------------------------------ lossy marking

def marking(data: bytes) -> tuple[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        comment = image.info.get("comment", b"")
        return (comment.decode() if isinstance(comment, bytes) else comment,
                str(image.getexif().get(0x010E, "")))


@pytest.mark.parametrize("name, lossy, mentions", [
    ("JPGExtended.dcm", True, ["transfer syntax JPEG Extended"]),
    ("SC_rgb_jpeg_dcmtk.dcm", True, ["JPEG Baseline"]),
    ("JPEGLSNearLossless_08.dcm", True, ["JPEG-LS Lossy"]),
    ("SC_ybr_full_422_uncompressed.dcm", True, []),  # Lossy Image Compression "01"
    ("examples_jpeg2k.dcm", False, []),  # JPEG 2000 (lossy or not) with "00"
    ("MR_small.dcm", False, []), ("MR_small_jp2klossless.dcm", False, []),
])
def test_lossy_sources_are_marked_in_the_jpeg(name: str, lossy: bool, mentions: list[str]):
    ds = read(TEST_FILES / name)
    [image] = render_jpeg(TEST_FILES / name, RenderOptions(frames="first"))
    assert image.lossy_source is lossy
    comment, description = marking(image.data)
    assert comment == description
    assert comment.startswith("lossy-source" if lossy else "lossless-source")
    assert f"SOP Instance UID {ds.SOPInstanceUID}" in comment
    frames = int(ds.get("NumberOfFrames") or 1)
    assert comment.endswith(f"frame 1 of {frames}")
    for text in mentions:
        assert text in comment


def test_a_lossy_transfer_syntax_is_marked_without_the_attribute(tmp_path: Path):
    out = io.BytesIO()
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(out, "JPEG")
    ds = _jpeg_dataset(out.getvalue())
    assert "LossyImageCompression" not in ds
    [image] = render_jpeg(save(ds, tmp_path / "baseline.dcm"))
    assert image.lossy_source
    assert marking(image.data)[0].startswith(
        "lossy-source (transfer syntax JPEG Baseline (Process 1)); SOP Instance UID")


def test_lossy_ratio_and_method_are_copied(tmp_path: Path):
    ds = multiframe()
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = ["10.5", "2"]
    ds.LossyImageCompressionMethod = ["ISO_10918_1", "ISO_15444_1"]
    images = render_jpeg(save(ds, tmp_path / "was-lossy.dcm"), RenderOptions(frames="middle"))
    comment, description = marking(images[0].data)
    assert comment == ("lossy-source (ratio 10.5/2; method ISO_10918_1/ISO_15444_1); "
                       f"SOP Instance UID {ds.SOPInstanceUID}; frame 3 of 5")
    assert description == comment
