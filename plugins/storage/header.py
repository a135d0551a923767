"""What the index needs from a DICOM Part 10 file, read without decoding the data set.

Every received file is read once on the C-STORE path, so this module does the least
that is safe: it walks the data set's elements by their declared lengths (values,
sequences and pixel data fragments are skipped, not read), checks that the structure
is complete (no length runs past the end, every undefined-length sequence and item is
closed), and keeps the raw bytes of the few top-level attributes the index needs.
Text is decoded with pydicom's own converters, so Specific Character Set is honoured
exactly as pydicom honours it.

A file that fails these checks raises :class:`Malformed`; nothing else is judged here
(a wrong value in an indexed attribute is indexed as well as it can be).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from struct import Struct

import attrs
from pydicom.charset import convert_encodings
from pydicom.values import convert_PN, convert_text

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
#: Explicit VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
#: Nesting deeper than this is not a real data set.
MAX_DEPTH = 64
#: A deflated data set may not inflate beyond this (bytes).
MAX_INFLATED = 4 << 30

_LE_TAG, _BE_TAG = Struct("<HH"), Struct(">HH")
_LE_U16, _BE_U16 = Struct("<H"), Struct(">H")
_LE_U32, _BE_U32 = Struct("<I"), Struct(">I")


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
_WANTED_TAGS = frozenset(WANTED)


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


def read_meta(buf: bytes | memoryview) -> FileMeta:
    """The file meta group at the start of ``buf`` (preamble, ``DICM``, group 0002)."""
    end = len(buf)
    if end < 132 or bytes(buf[128:132]) != b"DICM":
        raise Malformed("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    values: dict[int, bytes] = {}
    while pos + 8 <= end:
        group, element = _LE_TAG.unpack_from(buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > end:
                raise Malformed("file meta information is truncated")
            length = _LE_U32.unpack_from(buf, pos + 8)[0]
            start = pos + 12
        else:
            length = _LE_U16.unpack_from(buf, pos + 6)[0]
            start = pos + 8
        stop = start + length
        if length == UNDEFINED or stop > end:
            raise Malformed(f"file meta element (0002,{element:04X}) is truncated")
        values[element] = bytes(buf[start:stop])
        pos = stop
    if 0x0010 not in values:
        raise Malformed("file meta information has no Transfer Syntax UID")
    return FileMeta(
        transfer_syntax=_uid(values[0x0010]), sop_class_uid=_uid(values.get(0x0002, b"")),
        sop_instance_uid=_uid(values.get(0x0003, b"")),
        source_ae=_ascii(values.get(0x0016, b"")), dataset_offset=pos)


def read_header(buf: bytes | memoryview, meta: FileMeta) -> Header:
    """Check the data set after ``meta`` and decode its indexed attributes."""
    syntax = meta.transfer_syntax
    offset = meta.dataset_offset
    if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        buf, offset = _inflate(buf, offset), 0
    little = syntax != EXPLICIT_VR_BIG_ENDIAN
    implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
    found = walk(buf, offset, little, implicit)
    try:
        return _decode(found)
    except Exception as exc:  # pydicom's converters on values it cannot make sense of
        raise Malformed(f"cannot decode the indexed attributes: {exc}") from exc


def walk(buf: bytes | memoryview, offset: int, little: bool, implicit: bool
         ) -> dict[int, bytes]:
    """Walk a whole data set; return the raw values of the wanted top-level elements.

    Like pydicom, a data set (or undefined-length item) whose first element is
    encoded with the other VR convention than expected is read with that one.
    """
    walker = _Walker(buf, little)
    try:
        implicit = walker.detect_implicit(offset, implicit)
        walker.elements(offset, implicit, nested=False, depth=0)
    except RecursionError:
        raise Malformed("sequences nested too deep") from None
    return walker.found


class _Walker:
    def __init__(self, buf: bytes | memoryview, little: bool):
        self.buf = buf
        self.end = len(buf)
        self.tag = _LE_TAG if little else _BE_TAG
        self.u16 = _LE_U16 if little else _BE_U16
        self.u32 = _LE_U32 if little else _BE_U32
        self.found: dict[int, bytes] = {}

    def detect_implicit(self, pos: int, assumed: bool) -> bool:
        if pos + 6 > self.end:
            return assumed
        first, second = self.buf[pos + 4], self.buf[pos + 5]
        group = self.tag.unpack_from(self.buf, pos)[0]
        if group == 0xFFFE:  # an empty item: nothing to tell from
            return assumed
        return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)

    def elements(self, pos: int, implicit: bool, nested: bool, depth: int) -> int:
        """Skip data elements from ``pos``: to the end of the buffer at the top level,
        to the item delimiter when ``nested``. Returns the position after them."""
        buf, end, tag_of, u16, u32 = self.buf, self.end, self.tag, self.u16, self.u32
        found = None if nested else self.found
        while pos < end:
            if pos + 8 > end:
                if not nested and not any(buf[pos:end]):
                    return end  # zero padding after the last element
                raise Malformed(f"data set ends inside an element header at offset {pos}")
            group, element = tag_of.unpack_from(buf, pos)
            if group == 0xFFFE:
                tag = group << 16 | element
                if nested and tag == ITEM_END:
                    return pos + 8
                raise Malformed(f"unexpected delimiter ({group:04X},{element:04X}) "
                                f"at offset {pos}")
            if group == 0 and element == 0 and not nested and not any(buf[pos:end]):
                return end  # zero padding after the last element
            if implicit:
                length = u32.unpack_from(buf, pos + 4)[0]
                start = pos + 8
                unknown_sequence = False
            else:
                vr = bytes(buf[pos + 4:pos + 6])
                if vr in LONG_VRS:
                    if pos + 12 > end:
                        raise Malformed(f"data set ends inside an element header at {pos}")
                    length = u32.unpack_from(buf, pos + 8)[0]
                    start = pos + 12
                else:
                    length = u16.unpack_from(buf, pos + 6)[0]
                    start = pos + 8
                unknown_sequence = vr == b"UN"
            if length == UNDEFINED:
                if depth >= MAX_DEPTH:
                    raise Malformed("sequences nested too deep")
                pos = self.items(start, implicit or unknown_sequence, depth + 1)
                continue
            stop = start + length
            if stop > end:
                raise Malformed(
                    f"element ({group:04X},{element:04X}) at offset {pos} is {length} "
                    f"bytes long, only {end - start} are left")
            if found is not None:
                tag = group << 16 | element
                if tag in _WANTED_TAGS:
                    found[tag] = bytes(buf[start:stop])
            pos = stop
        if nested:
            raise Malformed("data set ends inside an item of undefined length")
        return pos

    def items(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip the items of an undefined-length value up to its sequence delimiter."""
        buf, end, tag_of, u32 = self.buf, self.end, self.tag, self.u32
        while True:
            if pos + 8 > end:
                raise Malformed("data set ends inside a sequence of undefined length")
            group, element = tag_of.unpack_from(buf, pos)
            tag = group << 16 | element
            length = u32.unpack_from(buf, pos + 4)[0]
            if tag == SEQUENCE_END:
                return pos + 8
            if tag != ITEM:
                raise Malformed(f"expected an item at offset {pos}, found "
                                f"({group:04X},{element:04X})")
            if length == UNDEFINED:
                inner = self.detect_implicit(pos + 8, implicit)
                pos = self.elements(pos + 8, inner, nested=True, depth=depth)
            else:
                pos += 8 + length
                if pos > end:
                    raise Malformed(f"item at offset {pos - 8 - length} runs past the end")


def _inflate(buf: bytes | memoryview, offset: int) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(bytes(buf[offset:]), MAX_INFLATED)
    except zlib.error as exc:
        raise Malformed(f"deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise Malformed("deflated data set is truncated or too large")
    return data


def _ascii(raw: bytes) -> str:
    return raw.decode("latin-1").strip("\0 ")


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


def _decode(found: dict[int, bytes]) -> Header:
    charset = found.get(SPECIFIC_CHARACTER_SET)
    encodings = None
    if charset:
        terms = [term.strip("\0 ") for term in charset.decode("latin-1").split("\\")]
        encodings = convert_encodings(terms if len(terms) > 1 else terms[0])

    def text(tag: int) -> str:
        raw = found.get(tag)
        if not raw:
            return ""
        value = convert_text(raw, encodings)
        if not isinstance(value, str):
            value = "\\".join(str(part) for part in value)
        return value.strip("\0 ")

    def person(tag: int) -> str:
        raw = found.get(tag)
        if not raw:
            return ""
        value = convert_PN(raw, encodings)
        if not isinstance(value, str) and not hasattr(value, "components"):
            value = value[0] if len(value) else ""
        return str(value).strip("\0 ")

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
