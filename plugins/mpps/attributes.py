"""What an MPPS data set must, may and may not carry (PS3.4 F.7.2, Table F.7.2-1), and
the values dicomgate reads from it.

The checks insist on what the standard makes Type 1 for the SCU at N-CREATE and on the
attributes an N-SET may not change; they tolerate what real devices are known to send:
Type 2 attributes left out, an empty Performed Series Sequence and end date/time at
N-CREATE, an N-SET with nothing but the status, Specific Character Set repeated in
every N-SET, values under the wrong VR (Performed Procedure Step ID as CS), and a final
N-SET without end date/time or series (logged, kept as sent).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag

from dicomgate.plugins.mpps.models import IN_PROGRESS, STATUSES

log = logging.getLogger("dicomgate.mpps")

# Statuses (PS3.7 C.4 and PS3.4 F.7.2.2.4) -------------------------------------------------

SUCCESS = 0x0000
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_OBJECT_INSTANCE = 0x0117
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
#: PS3.4 Table F.7.2-2: the Error ID that goes with "may no longer be updated".
NO_LONGER_UPDATABLE_ERROR_ID = 0xA710
NO_LONGER_UPDATABLE = "Performed Procedure Step Object may no longer be updated"

# Which attributes ------------------------------------------------------------------------

#: Type 1 at N-CREATE (Table F.7.2-1, SCU column), checked at the top level.
CREATE_TYPE1 = (
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)

#: "Not allowed" in the N-SET column of Table F.7.2-1 (with SOP Class and Instance UID):
#: an N-SET that changes one of these is refused with 0x0105; repeating the value the
#: step already has is accepted, as devices that resend everything do.
NOT_SETTABLE = tuple(Tag(tag_for_keyword(keyword)) for keyword in (
    "SOPClassUID",
    "SOPInstanceUID",
    "ScheduledStepAttributesSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedPatientSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence",
    "ServiceEpisodeDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationName",
    "PerformedLocation",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Modality",
    "StudyID",
))

SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
UTF8 = "ISO_IR 192"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@attrs.frozen
class Refusal(Exception):
    """A request answered with a failure status; nothing was changed."""

    status: int
    comment: str
    tags: tuple[int, ...] = ()
    error_id: int | None = None

    def __str__(self) -> str:
        return f"0x{self.status:04X}: {self.comment}"

    def as_status(self, identifiers: bool = True) -> Dataset:
        """Status, Error Comment (LO, 64 characters), Error ID and, where the response
        has the field (N-SET, not N-CREATE), Attribute Identifier List, as pynetdicom
        puts them in the response."""
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment.encode("ascii", "replace").decode()[:64]
        if self.error_id is not None:
            ds.ErrorID = self.error_id
        if self.tags and identifiers:
            ds.AttributeIdentifierList = [Tag(tag) for tag in self.tags]
        return ds


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and bool(_UID.match(value))


# Reading values --------------------------------------------------------------------------


def text(ds: Dataset | None, keyword: str) -> str:
    """The value of ``keyword`` as one string (multiple values joined by a backslash),
    stripped of padding; "" when absent or empty."""
    if ds is None or keyword not in ds:
        return ""
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(item).strip() for item in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    return str(value).strip(" \0")


def items(ds: Dataset | None, keyword: str) -> list[Dataset]:
    if ds is None or keyword not in ds:
        return []
    value = ds[keyword].value
    return list(value) if value else []


def _empty(ds: Dataset, keyword: str) -> bool:
    value = ds[keyword].value
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return not value.strip(b" \0" if isinstance(value, bytes) else " \0")
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("MultiValue", "Sequence"):
        return len(value) == 0
    return str(value).strip() == ""


def _check_type1(ds: Dataset, keywords: Iterable[str], where: str = "") -> None:
    missing = [k for k in keywords if k not in ds]
    if missing:
        raise Refusal(MISSING_ATTRIBUTE, f"missing {where}{', '.join(missing)}",
                      tuple(tag_for_keyword(k) for k in missing))
    empty = [k for k in keywords if _empty(ds, k)]
    if empty:
        raise Refusal(MISSING_ATTRIBUTE_VALUE, f"no value: {where}{', '.join(empty)}",
                      tuple(tag_for_keyword(k) for k in empty))


def _check_series(ds: Dataset) -> None:
    """Performed Series Sequence items name their series and every referenced instance
    (Type 1 inside the items: what completeness is counted by)."""
    for number, series in enumerate(items(ds, "PerformedSeriesSequence"), start=1):
        _check_type1(series, ["SeriesInstanceUID"], f"Performed Series item {number} ")
        for keyword in ("ReferencedImageSequence",
                        "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in items(series, keyword):
                _check_type1(ref, ["ReferencedSOPInstanceUID"], f"series {number} reference ")


def status_of(ds: Dataset) -> str:
    return text(ds, "PerformedProcedureStepStatus").upper()


def check_create(ds: Dataset) -> None:
    """Raise :class:`Refusal` if an N-CREATE data set cannot be accepted."""
    _check_type1(ds, CREATE_TYPE1)
    for number, item in enumerate(items(ds, "ScheduledStepAttributesSequence"), start=1):
        _check_type1(item, ["StudyInstanceUID"], f"Scheduled Step Attributes item {number} ")
    status = status_of(ds)
    if status != IN_PROGRESS:
        raise Refusal(INVALID_ATTRIBUTE_VALUE,
                      f"Performed Procedure Step Status must be IN PROGRESS, not {status!r}",
                      (tag_for_keyword("PerformedProcedureStepStatus"),))
    _check_series(ds)


def check_set(ds: Dataset, current: Mapping[str, Any], modification: Mapping[str, Any],
              current_status: str) -> str:
    """Raise :class:`Refusal` if an N-SET modification list cannot be applied to a step
    whose current attributes (DICOM JSON) are ``current``; returns the status it sets
    (``current_status`` when it sets none)."""
    changed = []
    for key, element in modification.items():
        tag = int(key, 16)
        if tag in NOT_SETTABLE and not _same(current.get(key), element):
            changed.append(tag)
    if changed:
        raise Refusal(NO_SUCH_ATTRIBUTE, "may not be changed by N-SET: " +
                      ", ".join(_name(tag) for tag in changed), tuple(changed))
    if "PerformedProcedureStepStatus" in ds:
        if _empty(ds, "PerformedProcedureStepStatus"):
            raise Refusal(MISSING_ATTRIBUTE_VALUE, "no value: PerformedProcedureStepStatus",
                          (tag_for_keyword("PerformedProcedureStepStatus"),))
        status = status_of(ds)
        if status not in STATUSES:
            raise Refusal(INVALID_ATTRIBUTE_VALUE,
                          f"Performed Procedure Step Status {status!r} is not one of "
                          f"{', '.join(STATUSES)}",
                          (tag_for_keyword("PerformedProcedureStepStatus"),))
    else:
        status = current_status
    _check_series(ds)
    return status


def _normalise(element: Any) -> Any:
    """A DICOM JSON element compared without regard to padding and VR (a device that
    resends a value under another VR still means the same value)."""
    if not isinstance(element, Mapping):
        return element
    values = element.get("Value", [])
    out = []
    for value in values:
        if isinstance(value, str):
            out.append(value.strip())
        elif isinstance(value, Mapping) and "vr" not in value and not any(
                key in value for key in ("Alphabetic", "Ideographic", "Phonetic")):
            out.append({key: _normalise(item) for key, item in sorted(value.items())})
        elif isinstance(value, Mapping):
            out.append({key: item.strip() if isinstance(item, str) else item
                        for key, item in sorted(value.items())})
        else:
            out.append(value)
    while out and out[-1] in ("", None):
        out.pop()
    return out


def _same(stored: Any, sent: Any) -> bool:
    return _normalise(stored) == _normalise(sent)


# Converting ------------------------------------------------------------------------------


def decoded(ds: Dataset, charset: str = "") -> Dataset:
    """``ds`` made to decode its text with ``charset`` when it names none itself: an
    N-SET's text is in the character set of the N-CREATE (PS3.4 F.7.2.2.1)."""
    if charset and SPECIFIC_CHARACTER_SET not in ds:
        terms = charset.split("\\") if "\\" in charset else charset
        # pydicom decodes elements read from bytes with the character set it read;
        # tell it the N-CREATE's before any element is converted.
        implicit, little = ds.original_encoding
        ds.set_original_encoding(implicit, little, convert_encodings(terms))
    return ds


def to_json(ds: Dataset) -> dict[str, Any]:
    """DICOM JSON of ``ds`` with every text value in Unicode; elements pydicom cannot
    convert are left out (and logged): the raw bytes are kept beside it."""
    try:
        return ds.to_json_dict(bulk_data_threshold=1 << 30)
    except Exception:
        log.warning("MPPS data set has elements that cannot be converted to JSON; "
                    "kept as received, listed without them", exc_info=True)
        return ds.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True)


def merge(current: Mapping[str, Any], modification: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes after an N-SET: each attribute sent replaces the stored one
    (sequences whole, as PS3.4 F.7.2.2.2 requires devices to send them). Text is
    Unicode throughout, so the merged data set says UTF-8."""
    merged = dict(current)
    for key, element in modification.items():
        if int(key, 16) == SPECIFIC_CHARACTER_SET:
            continue
        merged[key] = element
    merged[f"{SPECIFIC_CHARACTER_SET:08X}"] = {"vr": "CS", "Value": [UTF8]}
    return dict(sorted(merged.items()))


def unicode_json(ds: Dataset) -> dict[str, Any]:
    """An N-CREATE's attributes as stored: DICOM JSON, UTF-8 declared."""
    return merge({}, to_json(ds))


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def dataset_of(attributes: str | Mapping[str, Any]) -> Dataset:
    data = json.loads(attributes) if isinstance(attributes, str) else attributes
    return Dataset.from_json(dict(data))


# What is read ----------------------------------------------------------------------------


@attrs.frozen
class ScheduledReference:
    """One Scheduled Step Attributes item: what links the MPPS to an order."""

    study_uid: str
    accession: str
    requested_procedure_id: str
    scheduled_step_id: str

    def as_dict(self) -> dict[str, str]:
        return attrs.asdict(self)

    @property
    def is_empty(self) -> bool:
        return not (self.accession or self.requested_procedure_id or self.scheduled_step_id)


def references(ds: Dataset) -> list[ScheduledReference]:
    return [ScheduledReference(
        study_uid=text(item, "StudyInstanceUID"), accession=text(item, "AccessionNumber"),
        requested_procedure_id=text(item, "RequestedProcedureID"),
        scheduled_step_id=text(item, "ScheduledProcedureStepID"))
        for item in items(ds, "ScheduledStepAttributesSequence")]


@attrs.frozen
class PerformedSeries:
    series_uid: str
    description: str
    protocol: str
    retrieve_ae: str
    operators: str
    performing_physician: str
    #: (SOP Class UID, SOP Instance UID) of each image and non-image instance.
    instances: tuple[tuple[str, str], ...]


def performed_series(ds: Dataset) -> list[PerformedSeries]:
    found = []
    for series in items(ds, "PerformedSeriesSequence"):
        refs = [(text(ref, "ReferencedSOPClassUID"), text(ref, "ReferencedSOPInstanceUID"))
                for keyword in ("ReferencedImageSequence",
                                "ReferencedNonImageCompositeSOPInstanceSequence")
                for ref in items(series, keyword)]
        found.append(PerformedSeries(
            series_uid=text(series, "SeriesInstanceUID"),
            description=text(series, "SeriesDescription"),
            protocol=text(series, "ProtocolName"), retrieve_ae=text(series, "RetrieveAETitle"),
            operators=text(series, "OperatorsName"),
            performing_physician=text(series, "PerformingPhysicianName"),
            instances=tuple(ref for ref in refs if ref[1])))
    return found


def code_of(ds: Dataset, keyword: str) -> dict[str, str] | None:
    found = items(ds, keyword)
    if not found:
        return None
    item = found[0]
    return {"value": text(item, "CodeValue") or text(item, "LongCodeValue"),
            "scheme": text(item, "CodingSchemeDesignator"), "meaning": text(item, "CodeMeaning")}


def summary_fields(ds: Dataset) -> dict[str, str]:
    """The columns of the step's row, from its current attributes."""
    refs = references(ds)
    return {
        "step_id": text(ds, "PerformedProcedureStepID")[:64],
        "station_ae": text(ds, "PerformedStationAETitle")[:64],
        "station_name": text(ds, "PerformedStationName")[:64],
        "modality": text(ds, "Modality")[:16],
        "description": text(ds, "PerformedProcedureStepDescription"),
        "patient_id": text(ds, "PatientID")[:64],
        "patient_name": text(ds, "PatientName"),
        "study_uid": refs[0].study_uid[:64] if refs else "",
        "start_date": text(ds, "PerformedProcedureStepStartDate")[:16],
        "start_time": text(ds, "PerformedProcedureStepStartTime")[:32],
        "end_date": text(ds, "PerformedProcedureStepEndDate")[:16],
        "end_time": text(ds, "PerformedProcedureStepEndTime")[:32],
        "status": status_of(ds),
    }


def final_state_gaps(ds: Dataset) -> list[str]:
    """Final-state requirements (Table F.7.2-1, note 2) a COMPLETED or DISCONTINUED step
    does not meet; dicomgate accepts it and logs them."""
    gaps = [keyword for keyword in ("PerformedProcedureStepEndDate",
                                    "PerformedProcedureStepEndTime")
            if keyword not in ds or _empty(ds, keyword)]
    if not items(ds, "PerformedSeriesSequence"):
        gaps.append("PerformedSeriesSequence")
    return gaps


def iso_datetime(date: str, time: str) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS`` from DICOM DA and TM (as much as was given), or None."""
    if len(date) < 8 or not date[:8].isdigit():
        return None
    out = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    digits = time.replace(":", "")
    if len(digits) >= 2 and digits[:2].isdigit():
        out += f"T{digits[:2]}:{digits[2:4] or '00'}:{digits[4:6] or '00'}"
    return out

