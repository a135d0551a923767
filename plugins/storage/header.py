"""What the index needs from a DICOM Part 10 file, read with pydicom.

Every received file is read once on the C-STORE path. pydicom parses it with the two
steps :func:`pydicom.dcmread` takes (:func:`pydicom.filereader.read_preamble`, then
:func:`pydicom.filereader.read_dataset` for the file meta group and again for the data
set), with ``specific_tags`` and ``defer_size``, so only the few top-level attributes
the index needs are read into memory: every other top-level value, Pixel Data
included, is skipped with a seek. Sequences of undefined length are parsed item by
item, so a broken or unclosed nested item raises.

Why those two functions rather than ``dcmread`` itself: ``read_dataset`` takes the
``stop_when`` callback that the completeness check below hangs on (``dcmread`` only
offers "stop before pixels"); reading the file meta group on its own leaves the file
at the data set's first byte, which is the data set offset this module reports, exact
even when File Meta Information Group Length is wrong (pydicom only logs that, and an
offset computed from it would copy or compare the wrong bytes); and a deflated data
set can be inflated in bounded blocks to a temporary file (``dcmread`` inflates it
whole in memory, without a limit).

pydicom is lenient where a store must not be: it stops quietly at the end of the
file even when the last element is cut short. So this module also checks that the
data set is complete (see :class:`_Complete`): every top-level value fits in the
file, the file ends exactly where the last element ends (zero padding aside), and
an element of undefined length is closed by its delimiter.

Text is decoded with pydicom's converters, in the character set pydicom resolved from
Specific Character Set. A file that fails these checks raises :class:`Malformed`;
nothing else is judged here (a wrong value in an indexed attribute is indexed as
well as it can be).
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tempfile
import zlib
from collections.abc import Mapping
from typing import IO, Any

import attrs
from pydicom.encaps import parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.uid import UID
from pydicom.values import convert_PN, convert_text

#: Length value of an element or item of undefined length.
UNDEFINED = 0xFFFFFFFF
#: Top-level values longer than this are skipped, not read (``defer_size``); none of
#: the indexed attributes is anywhere near it.
DEFER_SIZE = 64 * 1024
#: Inside sequence items pydicom reads every value (``defer_size`` applies to the top
#: level only): a read longer than this is turned into a seek, see :class:`_Skipping`.
NESTED_READ_LIMIT = 1 << 20
#: A deflated data set may not inflate beyond this (bytes).
MAX_INFLATED = 4 << 30
#: Inflated data sets up to this size stay in memory, larger ones go to a file.
INFLATE_IN_MEMORY = 8 << 20
_CHUNK = 256 * 1024


class Malformed(ValueError):
    """The file is not a complete DICOM Part 10 file."""


# The top-level attributes the index keeps, with the VR they are decoded as.
SPECIFIC_CHARACTER_SET = 0x00080005
WANTED: Mapping[int, tuple[str, str]] = {
    SPECIFIC_CHARACTER_SET: ("SpecificCharacterSet", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080020: ("StudyDate", "DA"),
    0x00080030: ("StudyTime", "TM"),
    0x00080050: ("AccessionNumber", "SH"),
    0x00080060: ("Modality", "CS"),
    0x00080090: ("ReferringPhysicianName", "PN"),
    0x00081030: ("StudyDescription", "LO"),
    0x0008103E: ("SeriesDescription", "LO"),
    0x00100010: ("PatientName", "PN"),
    0x00100020: ("PatientID", "LO"),
    0x00100021: ("IssuerOfPatientID", "LO"),
    0x00100030: ("PatientBirthDate", "DA"),
    0x00100040: ("PatientSex", "CS"),
    0x00180015: ("BodyPartExamined", "CS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200010: ("StudyID", "SH"),
    0x00200011: ("SeriesNumber", "IS"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
}
_WANTED_TAGS = sorted(WANTED)
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: encapsulated when of undefined length.
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# File meta elements kept
_TRANSFER_SYNTAX, _META_CLASS, _META_INSTANCE, _SOURCE_AE = (
    0x00020010, 0x00020002, 0x00020003, 0x00020016)


@attrs.frozen
class FileMeta:
    """The file meta information group of a Part 10 file."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    source_ae: str
    #: Offset of the data set's first byte in the file.
    dataset_offset: int


@attrs.frozen
class Header:
    """The indexed attributes of one instance, decoded. Absent text is ``""``."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    study_id: str
    accession: str
    study_description: str
    referring_physician: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    instance_number: int | None
    #: Number of Frames; 1 for an image without it, 0 for an instance without pixels.
    frames: int


Source = bytes | bytearray | memoryview | IO[bytes]


def read_meta(source: Source) -> FileMeta:
    """The file meta group at the start of ``source`` (preamble, ``DICM``, group 0002):
    a binary file (read from its start) or the file's first bytes."""
    fp = _as_file(source)
    return _read_meta(fp, _size(fp))


def read_header(source: Source, meta: FileMeta, scratch_dir: str | None = None) -> Header:
    """Check the data set after ``meta`` in ``source`` (a binary file or the whole
    file's bytes) and decode its indexed attributes."""
    fp = _as_file(source)
    return _read_header(fp, _size(fp), meta, scratch_dir)


def read_file(fp: IO[bytes], size: int | None = None,
              scratch_dir: str | None = None) -> tuple[FileMeta, Header]:
    """File meta and checked, decoded header of the Part 10 file ``fp``.

    ``fp`` is read from its start and may be an open file (large values are skipped
    with seeks, never read) or an in-memory buffer. ``scratch_dir`` is where a
    large deflated data set is inflated to.
    """
    if size is None:
        size = _size(fp)
    if size > NESTED_READ_LIMIT:
        fp = _Skipping(fp)
    meta = _read_meta(fp, size)
    return meta, _read_header(fp, size, meta, scratch_dir)


# Reading ---------------------------------------------------------------------------


def _as_file(source: Source) -> IO[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    return source


def _size(fp: IO[bytes]) -> int:
    return fp.seek(0, os.SEEK_END)


def _read_meta(fp: IO[bytes], size: int) -> FileMeta:
    fp.seek(0)
    try:
        read_preamble(fp, False)
    except InvalidDicomError:
        raise Malformed("not a DICOM Part 10 file (no DICM prefix)") from None
    check = _Complete(fp, size, "file meta information", stop_group=0x0002)
    try:
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=check)
    except Malformed:
        raise
    except Exception as exc:  # pydicom on bytes it cannot parse
        raise Malformed(f"file meta information cannot be read: {_describe(exc)}") from None
    # The data set starts where the group ends. File Meta Information Group Length
    # would say the same for a well-formed file; read this way a wrong one (pydicom
    # only logs it) cannot make the data set start anywhere else.
    offset = fp.tell()
    check.finish(offset)
    values = {tag: _raw_value(meta, tag) for tag in
              (_TRANSFER_SYNTAX, _META_CLASS, _META_INSTANCE, _SOURCE_AE)}
    if not values[_TRANSFER_SYNTAX]:
        raise Malformed("file meta information has no Transfer Syntax UID")
    return FileMeta(
        transfer_syntax=_uid(values[_TRANSFER_SYNTAX]),
        sop_class_uid=_uid(values[_META_CLASS]), sop_instance_uid=_uid(values[_META_INSTANCE]),
        source_ae=_uid(values[_SOURCE_AE]), dataset_offset=offset)


@functools.lru_cache(maxsize=64)
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a transfer syntax."""
    syntax = UID(transfer_syntax)
    if syntax.is_transfer_syntax:
        return syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
    return False, True, False  # as pydicom reads an unknown syntax: explicit VR LE


def _read_header(fp: IO[bytes], size: int, meta: FileMeta, scratch_dir: str | None) -> Header:
    # (no UID is longer than 64 characters: a longer value is an unknown syntax)
    implicit, little, deflated = (_encoding(meta.transfer_syntax)
                                  if len(meta.transfer_syntax) <= 64 else (False, True, False))
    if deflated:
        with _inflate(fp, meta.dataset_offset, scratch_dir) as inflated:
            inflated_size = inflated.tell()
            found = _read_data_set(_Skipping(inflated) if inflated_size > NESTED_READ_LIMIT
                                   else inflated, 0, inflated_size, implicit, little)
    else:
        found = _read_data_set(fp, meta.dataset_offset, size, implicit, little)
    try:
        return _decode(found)
    except Exception as exc:  # pydicom's converters on values it cannot make sense of
        raise Malformed(f"cannot decode the indexed attributes: {exc}") from exc


def _read_data_set(fp: IO[bytes], offset: int, size: int, implicit: bool, little: bool
                   ) -> tuple[dict[int, bytes], Any]:
    """Parse the data set from ``offset`` to ``size``; the raw values of the wanted
    top-level elements, and the character set pydicom resolved."""
    fp.seek(offset)
    check = _Complete(fp, size, "data set", little_endian=little)
    try:
        ds = read_dataset(fp, implicit, little, stop_when=check, defer_size=DEFER_SIZE,
                          specific_tags=_WANTED_TAGS)
    except Malformed:
        raise
    except RecursionError:
        raise Malformed("sequences nested too deep") from None
    except Exception as exc:  # pydicom on bytes it cannot parse
        raise Malformed(f"data set cannot be read: {_describe(exc)}") from None
    check.finish(fp.tell())
    found: dict[int, bytes] = {}
    for tag in ds.keys():  # only wanted tags were kept (specific_tags)
        elem = ds.get_item(tag, keep_deferred=True)
        value = elem.value
        if value is None and elem.length == 0:
            continue
        if value is None or (elem.length != UNDEFINED and len(value) != elem.length):
            name = WANTED.get(tag, ("an element",))[0]
            raise Malformed(f"{name} is {elem.length} bytes long, too long to index")
        if isinstance(value, bytes):  # not, for instance, a sequence under that tag
            found[tag] = value
    return found, ds.original_character_set


class _Complete:
    """Checks that pydicom read a whole data set (or file meta group), not just the
    part of it before the end of the file.

    pydicom calls it (as ``stop_when``) before each top-level element's value, with
    the file positioned at that value: it refuses a value that runs past the end and
    a delimiter where an element must be, and remembers where the last element ends.
    :meth:`finish` then checks where the reading stopped.
    """

    def __init__(self, fp: IO[bytes], size: int, what: str, stop_group: int | None = None,
                 little_endian: bool = True):
        self.fp = fp
        self.size = size
        self.what = what
        self.stop_group = stop_group
        self.delimiter = (b"\xfe\xff\xdd\xe0" if little_endian else b"\xff\xfe\xe0\xdd")
        #: Where the last element read ends; None after one of undefined length.
        self.end: int | None = None
        self.started = fp.tell()
        self.next_group = False
        self.little_endian = little_endian
        #: (tag, value offset) of encapsulated pixel data
        self.encapsulated: list[tuple[int, int]] = []

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        group = tag >> 16
        if self.stop_group is not None and group != self.stop_group:
            self.next_group = True
            return True
        if group == 0xFFFE:
            raise Malformed(f"{self.what}: unexpected delimiter ({group:04X},{tag & 0xFFFF:04X})")
        start = self.fp.tell()
        if length == UNDEFINED:
            self.end = None
            if tag in _PIXEL_DATA_TAGS:
                self.encapsulated.append((tag, start))
            return False
        if start + length > self.size:
            raise Malformed(
                f"{self.what}: element ({group:04X},{tag & 0xFFFF:04X}) at offset {start} is "
                f"{length} bytes long, only {max(self.size - start, 0)} are left")
        self.end = start + length
        return False

    def finish(self, stopped: int) -> None:
        """Raise :class:`Malformed` unless reading that stopped at ``stopped`` read
        every element up to the end of the file (or of the group)."""
        if self.stop_group is not None:
            # The group ends where the next group starts (pydicom stopped there), or
            # exactly at the end of the file
            if not self.next_group and (self.started if self.end is None else self.end) \
                    != self.size:
                raise Malformed(f"{self.what} is truncated")
            return
        if stopped > self.size:
            raise Malformed(f"{self.what}: a value runs past the end of the file")
        for tag, start in self.encapsulated:
            self._check_fragments(tag, start)
        if self.end is not None:
            # The last element had a length: after it, at most padding with zeros
            # (longer padding reads as elements of tag (0000,0000), so at most 7 bytes
            # are left); anything else is an element cut inside its header, or data
            # after a stray item delimiter, where pydicom stopped.
            left = self.size - self.end
            if left and (left >= 8 or any(self._tail(left))):
                raise Malformed(f"{self.what} ends inside an element header, or has data "
                                f"after its last element ({left} bytes)")
            return
        if self.started == self.size:  # no element at all
            return
        # The last element had an undefined length and pydicom found its end: the file
        # must end with its Sequence Delimitation Item (then at most zero padding).
        # pydicom stops quietly when the delimiter is missing, before the element.
        tail = self._tail(min(self.size - self.started, 16))
        stripped = tail.rstrip(b"\0")
        padding = len(tail) - len(stripped)
        closed = tail[-8:-4] == self.delimiter or (
            stripped.endswith(self.delimiter) and 4 <= padding < 12)
        if stopped != self.size or not closed:
            raise Malformed(f"{self.what} ends inside an element of undefined length")

    def _check_fragments(self, tag: int, start: int) -> None:
        """Encapsulated pixel data must be items of defined length closed by a
        Sequence Delimitation Item. (When that fails pydicom falls back to searching
        for the delimiter's bytes, which can be found inside a compressed fragment of
        a truncated file.)"""
        endianness = "<" if self.little_endian else ">"
        name = f"{self.what}: encapsulated ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        self.fp.seek(start)
        try:
            _, offsets = parse_fragments(self.fp, endianness=endianness)
        except ValueError as exc:
            raise Malformed(f"{name}: {exc}") from None
        end = start
        if offsets:
            self.fp.seek(offsets[-1] + 4)
            raw = self.fp.read(4)
            if len(raw) < 4:
                raise Malformed(f"{name} is truncated")
            end = offsets[-1] + 8 + struct.unpack(f"{endianness}L", raw)[0]
        if end + 8 > self.size:
            raise Malformed(f"{name} is truncated")
        self.fp.seek(end)
        if self.fp.read(4) != self.delimiter:
            raise Malformed(f"{name} is not closed by a Sequence Delimitation Item")

    def _tail(self, count: int) -> bytes:
        self.fp.seek(self.size - count)
        return self.fp.read(count)


class _Skipping:
    """A file for pydicom in which a read longer than :data:`NESTED_READ_LIMIT`
    skips the bytes (a seek) and returns nothing.

    pydicom's ``defer_size`` keeps large top-level values out of memory, but values
    inside sequence items are always read; a long one (a waveform in a sequence, or
    a hostile length) would otherwise be read whole. The index never looks at those
    values, and a skip past the end of the file is caught like any other truncation.
    """

    def __init__(self, fp: IO[bytes]):
        self._fp = fp
        self.seek = fp.seek
        self.tell = fp.tell
        self.name = getattr(fp, "name", "<buffer>")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > NESTED_READ_LIMIT:
            if size is None or size < 0:
                raise Malformed("refusing to read the rest of the file at once")
            self._fp.seek(size, os.SEEK_CUR)
            return b""
        return self._fp.read(size)


def _inflate(fp: IO[bytes], offset: int, scratch_dir: str | None) -> IO[bytes]:
    """The inflated data set of a deflated file, in blocks, as a temporary file (in
    memory while small) that the caller closes; never larger than MAX_INFLATED."""
    out: Any = tempfile.SpooledTemporaryFile(max_size=INFLATE_IN_MEMORY, dir=scratch_dir)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    fp.seek(offset)
    pending = b""
    try:
        while not inflater.eof:
            if not pending:
                pending = fp.read(_CHUNK)
                if not pending:
                    raise Malformed("deflated data set is truncated")
            out.write(inflater.decompress(pending, _CHUNK))
            pending = inflater.unconsumed_tail
            if out.tell() > MAX_INFLATED:
                raise Malformed(f"deflated data set inflates beyond {MAX_INFLATED >> 30} GiB")
    except zlib.error as exc:
        out.close()
        raise Malformed(f"deflated data set does not inflate: {exc}") from None
    except BaseException:
        out.close()
        raise
    return out


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _raw_value(ds: Any, tag: int) -> bytes:
    elem = ds.get_item(tag, keep_deferred=True)
    value = None if elem is None else elem.value
    return value if isinstance(value, bytes) else b""


# Decoding --------------------------------------------------------------------------


def _uid(raw: bytes) -> str:
    return raw.decode("latin-1").strip("\0 ")


def _multi(raw: bytes) -> str:
    """A CS/DA/TM value; several values stay joined by backslashes."""
    return "\\".join(part.strip("\0 ") for part in raw.decode("latin-1").split("\\"))


def _integer(raw: bytes | None) -> int | None:
    if not raw:
        return None
    text = raw.decode("latin-1").split("\\")[0].strip("\0 ")
    try:
        value = int(text)
    except ValueError:
        try:
            value = int(float(text))
        except (ValueError, OverflowError):
            return None
    return value if -(1 << 31) <= value < (1 << 31) else None


#: Decoded values of at most this many bytes are remembered (see :func:`_text`).
_CACHED_UP_TO = 256


@functools.lru_cache(maxsize=2048)
def _cached_text(raw: bytes, encodings: tuple[str, ...], person: bool) -> str:
    return _decode_text(raw, encodings, person)


def _decode_text(raw: bytes, encodings: tuple[str, ...], person: bool) -> str:
    if person:
        value: Any = convert_PN(raw, list(encodings))
        if not isinstance(value, str) and not hasattr(value, "components"):
            value = value[0] if len(value) else ""
        return str(value).strip("\0 ")
    value = convert_text(raw, list(encodings))
    if not isinstance(value, str):
        value = "\\".join(str(part) for part in value)
    return value.strip("\0 ")


def _text(raw: bytes | None, encodings: tuple[str, ...], person: bool = False) -> str:
    """A text or person name value decoded in ``encodings``.

    The images of one series repeat the same names and descriptions, so short values
    are decoded once (pydicom's person name decoding costs as much as reading the
    rest of the header)."""
    if not raw:
        return ""
    if len(raw) <= _CACHED_UP_TO:
        return _cached_text(raw, encodings, person)
    return _decode_text(raw, encodings, person)


def _decode(read: tuple[dict[int, bytes], Any]) -> Header:
    found, charset = read
    # pydicom resolved Specific Character Set into Python codecs while it read
    encodings = (charset,) if isinstance(charset, str) else tuple(charset)

    def text(tag: int) -> str:
        return _text(found.get(tag), encodings)

    def person(tag: int) -> str:
        return _text(found.get(tag), encodings, person=True)

    def plain(tag: int) -> str:
        raw = found.get(tag)
        return _multi(raw) if raw else ""

    frames = _integer(found.get(0x00280008))
    if frames is None:
        frames = 1 if 0x00280010 in found else 0
    return Header(
        sop_class_uid=_uid(found.get(0x00080016, b"")),
        sop_instance_uid=_uid(found.get(0x00080018, b"")),
        study_uid=_uid(found.get(0x0020000D, b"")),
        series_uid=_uid(found.get(0x0020000E, b"")),
        patient_id=text(0x00100020),
        issuer=text(0x00100021),
        patient_name=person(0x00100010),
        birth_date=plain(0x00100030),
        sex=plain(0x00100040),
        study_date=plain(0x00080020),
        study_time=plain(0x00080030),
        study_id=text(0x00200010),
        accession=text(0x00080050),
        study_description=text(0x00081030),
        referring_physician=person(0x00080090),
        modality=plain(0x00080060),
        series_number=_integer(found.get(0x00200011)),
        series_description=text(0x0008103E),
        body_part=plain(0x00180015),
        instance_number=_integer(found.get(0x00200013)),
        frames=max(frames, 0),
    )
