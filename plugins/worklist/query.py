"""One worklist query: what a device asked (the identifier), which items it may see,
the SQL that finds them, and the answer identifiers built from the rows.

:func:`parse` reads the identifier into a :class:`Query`: the conditions of the keys
that carry a value, and the shape of the answer (every key the device sent, in
its order, sequences included). :func:`search` runs it for one :class:`Device` and
:func:`answer` turns each row into a Dataset holding exactly the requested keys.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, timedelta
from typing import Any

import attrs
import peewee
from pydicom import Dataset
from pydicom.config import IGNORE
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from dicomgate.plugins.worklist import matching
from dicomgate.plugins.worklist.models import (
    ACTIVE,
    RequestedProcedure,
    ScheduledStep,
    WorklistPatient,
)
from dicomgate.plugins.worklist.settings import Route

SPS_SEQUENCE = Tag(0x0040, 0x0100)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
CODE_KEYS = ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning")
ID_KEYS = ("PatientID", "IssuerOfPatientID", "TypeOfPatientID")


class InvalidQuery(Exception):
    """The identifier cannot be answered: ``status`` says why (PS3.4 C.4.1.1.4)."""

    def __init__(self, status: int, comment: str, tag: BaseTag | None = None):
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.tag = tag


#: Identifier does not match SOP class.
NOT_AN_IDENTIFIER = 0xA900
#: Unable to process: a matching value is not valid for its key.
INVALID_VALUE = 0xC000


@attrs.frozen
class Key:
    """A key dicomgate stores: how it is matched and where its answer comes from."""

    keyword: str
    kind: str  # text, name, date, uid, ae, codes, ids, other_ids, start_date, start_time, start_dt
    column: Any = None
    #: For names: the case-folded column, and the transliterated ones.
    folded: Any = None
    latin: tuple[Any, ...] = ()
    #: The row field the answer comes from.
    field: str = ""


def _keys() -> dict[str, Key]:
    step, proc, patient = ScheduledStep, RequestedProcedure, WorklistPatient
    keys = [
        # Patient, visit, imaging service request and requested procedure (top level).
        Key("PatientName", "name", patient.name, patient.name_folded,
            (patient.name_icao, patient.name_gost), "name"),
        Key("PatientID", "text", patient.patient_id, field="patient_id"),
        Key("IssuerOfPatientID", "text", patient.issuer, field="issuer"),
        Key("PatientBirthDate", "date", patient.birth_date, field="birth_date"),
        Key("PatientSex", "text", patient.sex, field="sex"),
        Key("OtherPatientIDs", "other_ids", field="other_ids"),
        Key("OtherPatientIDsSequence", "ids", field="other_ids"),
        Key("AccessionNumber", "text", proc.accession, field="accession"),
        Key("ReferringPhysicianName", "text", proc.referring_physician,
            field="referring_physician"),
        Key("StudyInstanceUID", "uid", proc.study_uid, field="study_uid"),
        Key("RequestingPhysician", "text", proc.requesting_physician,
            field="requesting_physician"),
        Key("RequestedProcedureDescription", "text", proc.description,
            field="procedure_description"),
        Key("RequestedProcedureCodeSequence", "codes", field="codes"),
        Key("RequestedProcedureID", "text", proc.procedure_id, field="procedure_id"),
        Key("RequestedProcedurePriority", "text", proc.priority, field="priority"),
        # Scheduled Procedure Step (inside Scheduled Procedure Step Sequence).
        Key("Modality", "text", step.modality, field="modality"),
        Key("ScheduledStationAETitle", "ae", step.station_ae, field="station_ae"),
        Key("ScheduledProcedureStepStartDate", "start_date", step.start_date,
            field="start_date"),
        Key("ScheduledProcedureStepStartTime", "start_time", step.start_time,
            field="start_time"),
        Key("ScheduledProcedureStepStartDateTime", "start_dt", step.start, field="start"),
        Key("ScheduledPerformingPhysicianName", "name", step.performing_physician,
            step.performing_folded, (), "performing_physician"),
        Key("ScheduledProcedureStepDescription", "text", step.description,
            field="step_description"),
        Key("ScheduledProtocolCodeSequence", "codes", field="protocol_codes"),
        Key("ScheduledProcedureStepID", "text", step.step_id, field="step_id"),
        Key("ScheduledStationName", "text", step.station_name, field="station_name"),
        Key("ScheduledProcedureStepLocation", "text", step.location, field="location"),
        Key("ScheduledProcedureStepStatus", "text", step.status, field="status"),
    ]
    return {key.keyword: key for key in keys}


KEYS = _keys()

#: The columns every search reads, with the names the answer builder uses.
def _columns() -> list[Any]:
    step, proc, patient = ScheduledStep, RequestedProcedure, WorklistPatient
    return [
        step.id.alias("step_pk"), step.step_id, step.station_ae, step.station_name,
        step.station_name_key, step.modality, step.location, step.location_key,
        step.start_date, step.start_time, step.start, step.performing_physician,
        step.description.alias("step_description"), step.protocol_codes, step.status,
        proc.procedure_id, proc.description.alias("procedure_description"), proc.codes,
        proc.accession, proc.study_uid, proc.referring_physician, proc.requesting_physician,
        proc.priority, patient.patient_id, patient.issuer, patient.name, patient.birth_date,
        patient.sex, patient.other_ids,
    ]


#: What the step-level answer holds when the device sent an empty Scheduled Procedure
#: Step Sequence (zero items, or one item without keys): everything dicomgate keeps.
SPS_RETURN_ALL = ("Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                  "ScheduledProcedureStepStartTime", "ScheduledPerformingPhysicianName",
                  "ScheduledProcedureStepDescription", "ScheduledProtocolCodeSequence",
                  "ScheduledProcedureStepID", "ScheduledStationName",
                  "ScheduledProcedureStepLocation", "ScheduledProcedureStepStatus")


# The device asking ---------------------------------------------------------------------


@attrs.frozen
class Device:
    """Whose items a query may see: ``stations`` (Scheduled Station AE Titles, and the
    routes that lead to them), or everything when ``see_all``."""

    calling_ae: str
    stations: frozenset[str] = frozenset()
    see_all: bool = False
    case_insensitive_names: bool = True
    #: The transliteration the device is shown, for Latin name queries.
    scheme: str = "icao"

    @property
    def sees_nothing(self) -> bool:
        return not self.see_all and not self.stations


def _route_condition(route: Route) -> Any | None:
    step = ScheduledStep
    conditions = []
    if route.modality:
        conditions.append(step.modality.in_([m.upper() for m in route.modality]))
    if route.station_name:
        conditions.append(step.station_name_key.in_([s.upper() for s in route.station_name]))
    if route.location:
        conditions.append(step.location_key.in_([s.upper() for s in route.location]))
    return matching.all_of(conditions) if conditions else None


def routes_match(route: Route, row: dict[str, Any]) -> bool:
    """The Python twin of :func:`_route_condition`, for answering a routed item."""
    return ((not route.modality or row["modality"].upper() in
             {m.upper() for m in route.modality})
            and (not route.station_name or row["station_name_key"] in
                 {s.upper() for s in route.station_name})
            and (not route.location or row["location_key"] in
                 {s.upper() for s in route.location}))


def station_condition(database: peewee.Database, routes: Sequence[Route],
                      titles: Iterable[str] | None = None,
                      patterns: Sequence[str] = ()) -> Any | None:
    """Items of the stations ``titles`` (or of the titles matching the DICOM
    ``patterns``): ordered for them by Scheduled Station AE Title, or routed to them
    by the first route that matches an item without one. ``None``: no item."""
    step = ScheduledStep
    conditions = []
    if titles is not None:
        titles = sorted(set(titles))
        if titles:
            conditions.append(step.station_ae.in_(titles))
        wanted = set(titles).__contains__
    else:
        conditions.append(matching.text(database, step.station_ae, patterns))
        wanted = lambda title: any(_matches(pattern, title) for pattern in patterns)  # noqa: E731
    routed = []
    earlier: list[Any] = []
    for route in routes:
        condition = _route_condition(route)
        if any(wanted(title) for title in route.ae_titles):
            parts = [condition] if condition is not None else []
            parts += [~previous for previous in earlier]
            routed.append(matching.all_of(parts) if parts else peewee.SQL("1 = 1"))
        if condition is None:
            break  # a rule without conditions takes every item no earlier rule took
        earlier.append(condition)
    if routed:
        conditions.append((step.station_ae == "") & matching.any_of(routed))
    return matching.any_of(conditions) if conditions else None


def _matches(pattern: str, value: str) -> bool:
    """DICOM wild card matching in Python (for AE titles of routes)."""
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def routed_title(row: dict[str, Any], routes: Sequence[Route], device: Device) -> str:
    """The Scheduled Station AE Title answered for an item whose order named none."""
    for route in routes:
        if routes_match(route, row):
            for title in route.ae_titles:
                if title == device.calling_ae:
                    return title
            for title in route.ae_titles:
                if title in device.stations:
                    return title
            return route.ae_titles[0]
    return ""


# Reading the identifier ----------------------------------------------------------------


@attrs.define
class Query:
    """A parsed identifier."""

    identifier: Dataset
    conditions: list[Any] = attrs.Factory(list)
    #: (keyword or None, element) at the top level, in the order sent.
    template: list[DataElement] = attrs.Factory(list)
    #: The Scheduled Procedure Step item's elements; ``None``: not requested.
    sps_template: list[DataElement] | None = None
    sps_all: bool = False
    #: Scheduled Station AE Title values asked for, if any.
    station_patterns: list[str] | None = None
    #: A key carried a value that is not matched on (answered as a return key).
    unsupported_matching: list[str] = attrs.Factory(list)


def _values(element: DataElement) -> list[str] | None:
    """The matching values of a text element, spaces stripped; ``None``: universal."""
    value = element.value
    if value is None or value == "":
        return None
    items = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    texts = []
    for item in items:
        if isinstance(item, bytes):
            return None
        text = str(item).strip()
        if text:
            texts.append(text)
    if not texts or all(set(text) == {"*"} for text in texts):
        return None
    return texts


def _is_empty(element: DataElement) -> bool:
    """No matching value: zero length, only ``*``, or a sequence whose items hold none."""
    value = element.value
    if element.VR == "SQ":
        return all(_is_empty(inner) for item in value or [] for inner in item
                   if _usable(inner))
    if isinstance(value, (bytes, int, float)) or element.VR in ("US", "SS", "UL", "SL", "FL",
                                                                "FD", "DS", "IS"):
        return value is None or value == b"" or value == "" or (
            isinstance(value, (MultiValue, list)) and not value)
    try:
        return _values(element) is None
    except Exception:
        return False


def _usable(element: DataElement) -> bool:
    """Elements that take part in the answer: no group lengths, no private elements."""
    return element.tag.element != 0 and not element.tag.is_private


def parse(identifier: Dataset, database: peewee.Database, device: Device,
          routes: Sequence[Route]) -> Query:
    """The conditions and answer shape of ``identifier``, or :class:`InvalidQuery`."""
    query = Query(identifier)
    start: dict[str, str | None] = {"start_date": None, "start_time": None}
    try:
        elements = list(identifier)
    except Exception as exc:
        raise InvalidQuery(NOT_AN_IDENTIFIER, f"identifier cannot be decoded: {exc}") from None
    for element in elements:
        if not _usable(element) or element.tag == SPECIFIC_CHARACTER_SET:
            continue
        query.template.append(element)
        if element.tag == SPS_SEQUENCE:
            _parse_sps(query, element, database, device, start)
            continue
        _condition(query, element, database, device, start)
    _start(query, start)
    return query


def _parse_sps(query: Query, element: DataElement, database: peewee.Database,
               device: Device, start: dict[str, str | None]) -> None:
    if element.VR != "SQ" or not isinstance(element.value, (DicomSequence, list)):
        raise InvalidQuery(NOT_AN_IDENTIFIER, "Scheduled Procedure Step Sequence is not a "
                           "sequence", element.tag)
    items = list(element.value)
    if len(items) > 1:
        raise InvalidQuery(NOT_AN_IDENTIFIER, "Scheduled Procedure Step Sequence has more "
                           "than one item (a key sequence has at most one)", element.tag)
    query.sps_template = []
    if items:
        for inner in items[0]:
            if not _usable(inner) or inner.tag == SPECIFIC_CHARACTER_SET:
                continue
            query.sps_template.append(inner)
            _condition(query, inner, database, device, start)
    if not query.sps_template:
        query.sps_all = True


def _condition(query: Query, element: DataElement, database: peewee.Database,
               device: Device, start: dict[str, str | None]) -> None:
    keyword = keyword_for_tag(element.tag)
    key = KEYS.get(keyword)
    if key is None:
        if not _is_empty(element):
            query.unsupported_matching.append(keyword or str(element.tag))
        return
    if key.kind in ("codes", "ids", "other_ids"):
        if not _is_empty(element):
            query.unsupported_matching.append(keyword)
        return
    if element.VR == "SQ":
        raise InvalidQuery(NOT_AN_IDENTIFIER, f"{keyword} is a sequence", element.tag)
    try:
        values = _values(element)
    except Exception as exc:
        raise InvalidQuery(INVALID_VALUE, f"{keyword}: unreadable value ({exc})",
                           element.tag) from None
    if values is None:
        return
    try:
        if key.kind in ("start_date", "start_time"):
            if len(values) > 1:
                raise matching.InvalidValue(f"{keyword}: one value expected")
            start[key.kind] = values[0]
        elif key.kind == "start_dt":
            query.conditions.append(matching.any_of([
                matching.between(key.column, *matching.datetime_range(value, keyword))
                for value in values]))
        elif key.kind == "date":
            query.conditions.append(matching.any_of([
                matching.between(key.column, *matching.date_range(value, keyword))
                for value in values]))
        elif key.kind == "uid":
            if any(matching.has_wildcards(value) for value in values):
                raise matching.InvalidValue(f"{keyword}: wildcards are not allowed in UIDs")
            query.conditions.append(key.column.in_(values) if len(values) > 1
                                    else key.column == values[0])
        elif key.kind == "ae":
            query.station_patterns = (query.station_patterns or []) + values
        elif key.kind == "name":
            query.conditions.append(_name_condition(database, key, values, device))
        else:
            query.conditions.append(matching.text(database, key.column, values))
    except matching.InvalidValue as exc:
        raise InvalidQuery(INVALID_VALUE, str(exc), element.tag) from None


def _name_condition(database: peewee.Database, key: Key, values: list[str],
                    device: Device) -> Any:
    if not device.case_insensitive_names:
        return matching.text(database, key.column, [matching.strip_name(v) for v in values])
    folded = [matching.fold(value) for value in values]
    conditions = [matching.text(database, key.folded, folded)]
    latin = [value for value in folded if value.isascii()]
    if latin and key.latin:
        column = key.latin[0] if device.scheme == "icao" else key.latin[1]
        conditions.append(matching.text(database, column, latin))
    return matching.any_of(conditions)


def _start(query: Query, start: dict[str, str | None]) -> None:
    step = ScheduledStep
    try:
        condition = matching.start_condition(start["start_date"], start["start_time"],
                                             step.start_date, step.start_time, step.start)
    except matching.InvalidValue as exc:
        raise InvalidQuery(INVALID_VALUE, str(exc)) from None
    if condition is not None:
        query.conditions.append(condition)


# Finding the items ---------------------------------------------------------------------


def search(query: Query, device: Device, routes: Sequence[Route], database: peewee.Database,
           today: date, keep_days: int, limit: int | None) -> list[dict[str, Any]]:
    """The rows of the items ``device`` may see that match ``query``, oldest first."""
    if device.sees_nothing:
        return []
    step = ScheduledStep
    conditions = [step.status.in_(ACTIVE), *query.conditions]
    if keep_days:
        # Wrapped in a function so that planners (SQLite's) never pick this wide range
        # over the query's own date for the (station, date) index.
        cutoff = (today - timedelta(days=keep_days)).strftime("%Y%m%d")
        conditions.append(peewee.fn.COALESCE(step.start_date, "") >= cutoff)
    if not device.see_all:
        own = station_condition(database, routes, titles=device.stations)
        if own is None:
            return []
        conditions.append(own)
    if query.station_patterns:
        plain = [p for p in query.station_patterns if not matching.has_wildcards(p)]
        if len(plain) == len(query.station_patterns):
            asked = station_condition(database, routes, titles=plain)
        else:
            asked = station_condition(database, routes, patterns=query.station_patterns)
        if asked is None:
            return []
        conditions.append(asked)
    select = (step.select(*_columns())
              .join(RequestedProcedure).join(WorklistPatient)
              .where(matching.all_of(conditions))
              .order_by(step.start, step.id))
    if limit:
        select = select.limit(limit)
    return list(select.dicts())


# Building the answers ------------------------------------------------------------------


def _vr(element: DataElement) -> str:
    vr = element.VR
    if " or " in vr or vr in ("UN", ""):
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            vr = "UN"
        if " or " in vr:
            vr = vr.split(" or ")[0]
    return vr


def _element(tag: BaseTag, vr: str, value: Any) -> DataElement:
    """A DataElement built without pydicom's per-value validation: values come from the
    database (checked when the order was added) or are empty."""
    return DataElement(tag, vr, value, validation_mode=IGNORE)


def _codes(text: str, template: Sequence[tuple[BaseTag, str, str]] | None) -> DicomSequence:
    items = []
    for code in json.loads(text or "[]"):
        item = Dataset()
        values = {"CodeValue": code.get("value", ""),
                  "CodingSchemeDesignator": code.get("scheme", ""),
                  "CodingSchemeVersion": code.get("version", ""),
                  "CodeMeaning": code.get("meaning", "")}
        if template:
            for tag, vr, keyword in template:
                item.add(_element(tag, vr, values.get(keyword) or None))
        else:
            for keyword in CODE_KEYS:
                if values[keyword] or keyword != "CodingSchemeVersion":
                    setattr(item, keyword, values[keyword])
        items.append(item)
    return DicomSequence(items)


def _other_ids(text: str, template: Sequence[tuple[BaseTag, str, str]] | None) -> DicomSequence:
    items = []
    for other in json.loads(text or "[]"):
        item = Dataset()
        values = {"PatientID": other.get("id", ""), "IssuerOfPatientID": other.get("issuer", ""),
                  "TypeOfPatientID": other.get("type", "TEXT")}
        if template:
            for tag, vr, keyword in template:
                item.add(_element(tag, vr, values.get(keyword) or None))
        else:
            for keyword in ID_KEYS:
                setattr(item, keyword, values[keyword])
        items.append(item)
    return DicomSequence(items)


def _item_template(element: DataElement) -> list[tuple[BaseTag, str, str]] | None:
    """The keys of a return sequence's single item; ``None``: return all."""
    if element.VR != "SQ" or not element.value:
        return None
    keys = [(inner.tag, _vr(inner), keyword_for_tag(inner.tag))
            for inner in element.value[0] if _usable(inner)]
    return keys or None


Builder = Callable[[dict[str, Any]], DataElement]


class Answerer:
    """Builds the answer identifiers of one query for one device.

    The query's keys are turned once into one small function per key (row -> element),
    so that each answer costs only the elements it holds.
    """

    def __init__(self, query: Query, device: Device, routes: Sequence[Route]):
        self.query = query
        self.device = device
        self.routes = routes
        self.top = [self._builder(element) for element in query.template
                    if element.tag != SPS_SEQUENCE]
        self.has_sps = any(element.tag == SPS_SEQUENCE for element in query.template)
        self.order = [element.tag for element in query.template]
        sps = query.sps_template or []
        if query.sps_all:
            sps = [DataElement(Tag(keyword), dictionary_VR(Tag(keyword)), None)
                   for keyword in SPS_RETURN_ALL]
        self.sps = [self._builder(element) for element in sps]

    def _builder(self, element: DataElement) -> Builder:
        tag = element.tag
        keyword = keyword_for_tag(tag)
        vr = _vr(element)
        key = KEYS.get(keyword)
        if key is None or (vr == "SQ" and key.kind not in ("codes", "ids")):
            empty: Any = [] if vr == "SQ" else None
            return lambda row: _element(tag, vr, DicomSequence() if vr == "SQ" else empty)
        if key.kind in ("codes", "ids"):
            template = _item_template(element)
            make = _codes if key.kind == "codes" else _other_ids
            field = key.field
            return lambda row: _element(tag, "SQ", make(row[field], template))
        vr = dictionary_VR(tag)
        field = key.field
        if keyword == "ScheduledStationAETitle":
            return lambda row: _element(tag, vr, row[field] or routed_title(
                row, self.routes, self.device) or None)
        if key.kind == "other_ids":
            return lambda row: _element(tag, vr, [other.get("id", "") for other in
                                                  json.loads(row[field] or "[]")] or None)
        return lambda row: _element(tag, vr, row[field] if row[field] != "" else None)

    def answer(self, row: dict[str, Any]) -> Dataset:
        dataset = Dataset()
        for build in self.top:
            dataset.add(build(row))
        if self.has_sps:
            item = Dataset()
            for build in self.sps:
                item.add(build(row))
            dataset.add(_element(SPS_SEQUENCE, "SQ", DicomSequence([item])))
        return dataset

    def answers(self, rows: Iterable[dict[str, Any]]) -> Iterator[Dataset]:
        for row in rows:
            yield self.answer(row)
