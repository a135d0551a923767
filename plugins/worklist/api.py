"""The worklist's Python API: orders in, status changes, and look-ups.

Used by ``dicomgate worklist ...`` and meant for the HTTP API and the MPPS plugin (via
hooks). Every function takes the open :class:`dicomgate.gateway.Gateway` first.

An order is given as an :class:`Order` or as a dict of the JSON import schema
(``docs/plugins/worklist.md``)::

    add_order(gateway, {
        "patient": {"id": "P1", "name": "Иванов^Пётр", "birth_date": "19800521", "sex": "M"},
        "accession": "A1001", "description": "CT head",
        "steps": [{"modality": "CT", "station_ae": "CT1", "start": "2025-05-20T10:30"}],
    })

Steps are answered on the worklist until they are completed, discontinued or
cancelled (:func:`set_status`, :func:`cancel`), or until their start date is older
than ``[worklist] keep_days``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any

import attrs
import peewee
from pydicom.uid import generate_uid

from dicomgate import UsageError, write_transaction
from dicomgate.plugins.worklist import charsets, matching
from dicomgate.plugins.worklist.models import (
    ACTIVE,
    FINISHED,
    PRIORITIES,
    STATUSES,
    RequestedProcedure,
    ScheduledStep,
    StepStatusChange,
    WorklistPatient,
)

log = logging.getLogger("dicomgate.worklist")

NAME = "worklist"
#: Rows per INSERT when many orders are added at once.
BATCH = 500


class OrderError(UsageError, ValueError):
    """An order (or a status change) that cannot be accepted; the message names the field."""


class NotFound(UsageError, LookupError):
    """No order or step matches what was asked for."""


# Input ---------------------------------------------------------------------------------


def _check_text(value: Any, where: str, limit: int, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise OrderError(f"{where}: expected a string, got {value!r}")
    value = unicodedata.normalize("NFC", value.strip())
    if required and not value:
        raise OrderError(f"{where}: required")
    if len(value) > limit:
        raise OrderError(f"{where}: longer than {limit} characters")
    if "\\" in value or any(ord(char) < 32 for char in value):
        raise OrderError(f"{where}: backslashes and control characters are not allowed")
    return value


def _check_name(value: Any, where: str, required: bool = False) -> str:
    name = matching.strip_name(_check_text(value, where, 64 * 3 + 2, required))
    for group in name.split("="):
        if len(group) > 64:
            raise OrderError(f"{where}: a name group is longer than 64 characters")
    if required and not name:
        raise OrderError(f"{where}: required")
    return name


def _check_ae(value: Any, where: str) -> str:
    title = _check_text(value, where, 16)
    if title and not all(" " <= char <= "~" for char in title):
        raise OrderError(f"{where}: {title!r} is not an AE title")
    return title


def _check_code_string(value: Any, where: str, limit: int = 16) -> str:
    text = _check_text(value, where, limit).upper()
    if text and not re.fullmatch(r"[A-Z0-9_ ]*", text):
        raise OrderError(f"{where}: {text!r} has characters a code string cannot hold")
    return text


@attrs.frozen
class Code:
    """A coded entry: (value, coding scheme, meaning), as in a Code Sequence item."""

    value: str
    scheme: str
    meaning: str = ""
    version: str = ""

    @classmethod
    def from_json(cls, data: Any, where: str) -> Code:
        if isinstance(data, Code):
            return data
        if not isinstance(data, Mapping):
            raise OrderError(f"{where}: expected an object with value, scheme, meaning")
        _unknown(data, {"value", "scheme", "meaning", "version"}, where)
        return cls(_check_text(data.get("value"), f"{where}.value", 16, required=True),
                   _check_text(data.get("scheme"), f"{where}.scheme", 16, required=True),
                   _check_text(data.get("meaning"), f"{where}.meaning", 64),
                   _check_text(data.get("version"), f"{where}.version", 16))

    def to_json(self) -> dict[str, str]:
        data = {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}
        if self.version:
            data["version"] = self.version
        return data


def _codes(data: Any, where: str) -> tuple[Code, ...]:
    if data is None:
        return ()
    if not isinstance(data, (list, tuple)):
        raise OrderError(f"{where}: expected a list of codes")
    return tuple(Code.from_json(item, f"{where}[{n}]") for n, item in enumerate(data))


def _unknown(data: Mapping, known: set[str], where: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise OrderError(f"{where}: unknown field {', '.join(extra)}")


@attrs.frozen
class Patient:
    id: str
    name: str
    issuer: str = ""
    birth_date: str = ""
    sex: str = ""
    #: ({"id": ..., "issuer": ..., "type": ...}, ...)
    other_ids: tuple[Mapping[str, str], ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str = "patient") -> Patient:
        if isinstance(data, Patient):
            return data
        if not isinstance(data, Mapping):
            raise OrderError(f"{where}: expected an object")
        _unknown(data, {"id", "name", "issuer", "birth_date", "sex", "other_ids"}, where)
        birth = _check_text(data.get("birth_date"), f"{where}.birth_date", 10)
        if birth:
            try:
                birth = matching.parse_date_for_storage(birth, f"{where}.birth_date")
            except matching.InvalidValue as exc:
                raise OrderError(str(exc)) from None
        sex = _check_code_string(data.get("sex"), f"{where}.sex")
        if sex not in ("", "M", "F", "O"):
            raise OrderError(f"{where}.sex: {sex!r} is not M, F or O")
        others = []
        for n, other in enumerate(data.get("other_ids") or ()):
            at = f"{where}.other_ids[{n}]"
            if isinstance(other, str):
                other = {"id": other}
            if not isinstance(other, Mapping):
                raise OrderError(f"{at}: expected an object with id and issuer")
            _unknown(other, {"id", "issuer", "type"}, at)
            entry = {"id": _check_text(other.get("id"), f"{at}.id", 64, required=True),
                     "issuer": _check_text(other.get("issuer"), f"{at}.issuer", 64)}
            if other.get("type"):
                entry["type"] = _check_code_string(other.get("type"), f"{at}.type")
            others.append(entry)
        return cls(id=_check_text(data.get("id"), f"{where}.id", 64, required=True),
                   name=_check_name(data.get("name"), f"{where}.name", required=True),
                   issuer=_check_text(data.get("issuer"), f"{where}.issuer", 64),
                   birth_date=birth, sex=sex, other_ids=tuple(others))


def _start(data: Mapping, where: str, today: date) -> tuple[str, str]:
    """``start`` (``2025-05-20T10:30``, ``202505201030``) or ``start_date`` and
    ``start_time``, as (YYYYMMDD, HHMMSS)."""
    try:
        if data.get("start"):
            text = _check_text(data["start"], f"{where}.start", 32)
            compact = re.sub(r"[-:T ]", "", text)
            if not re.fullmatch(r"\d{8}(\d{2}(\d{2}(\d{2})?)?)?", compact):
                raise OrderError(f"{where}.start: {text!r} is not a date and time "
                                 "(2025-05-20T10:30 or 202505201030)")
            day = matching.parse_date_for_storage(compact[:8], f"{where}.start")
            return day, matching.parse_time_for_storage(compact[8:], f"{where}.start")
        day_text = _check_text(data.get("start_date"), f"{where}.start_date", 10)
        day = (matching.parse_date_for_storage(day_text, f"{where}.start_date") if day_text
               else today.strftime("%Y%m%d"))
        time_text = _check_text(data.get("start_time"), f"{where}.start_time", 16)
        return day, matching.parse_time_for_storage(time_text, f"{where}.start_time")
    except matching.InvalidValue as exc:
        raise OrderError(str(exc)) from None


@attrs.frozen
class Step:
    """A scheduled procedure step of an order (what one device is to do)."""

    modality: str
    start_date: str
    start_time: str = "000000"
    id: str = ""
    station_ae: str = ""
    station_name: str = ""
    location: str = ""
    performing_physician: str = ""
    description: str = ""
    protocol_codes: tuple[Code, ...] = ()
    status: str = "SCHEDULED"

    FIELDS = frozenset({"id", "modality", "start", "start_date", "start_time", "station_ae",
                        "station_name", "location", "performing_physician", "description",
                        "protocol_codes", "status"})

    @classmethod
    def from_json(cls, data: Any, where: str, today: date) -> Step:
        if isinstance(data, Step):
            return data
        if not isinstance(data, Mapping):
            raise OrderError(f"{where}: expected an object")
        _unknown(data, set(cls.FIELDS), where)
        day, time = _start(data, where, today)
        status = _check_code_string(data.get("status") or "SCHEDULED", f"{where}.status")
        if status not in ACTIVE:
            raise OrderError(f"{where}.status: a new step is one of {', '.join(ACTIVE)}")
        modality = _check_code_string(data.get("modality"), f"{where}.modality")
        if not modality:
            raise OrderError(f"{where}.modality: required")
        return cls(modality=modality, start_date=day, start_time=time,
                   id=_check_text(data.get("id"), f"{where}.id", 16),
                   station_ae=_check_ae(data.get("station_ae"), f"{where}.station_ae"),
                   station_name=_check_text(data.get("station_name"), f"{where}.station_name",
                                            16),
                   location=_check_text(data.get("location"), f"{where}.location", 16),
                   performing_physician=_check_name(data.get("performing_physician"),
                                                    f"{where}.performing_physician"),
                   description=_check_text(data.get("description"), f"{where}.description",
                                           64),
                   protocol_codes=_codes(data.get("protocol_codes"), f"{where}.protocol_codes"),
                   status=status)


@attrs.frozen
class Order:
    """An order of the HIS: a patient, one requested procedure, and its steps."""

    patient: Patient
    steps: tuple[Step, ...]
    accession: str = ""
    procedure_id: str = ""
    description: str = ""
    codes: tuple[Code, ...] = ()
    study_uid: str = ""
    referring_physician: str = ""
    requesting_physician: str = ""
    priority: str = ""

    FIELDS = frozenset({"patient", "steps", "accession", "procedure_id", "description",
                        "codes", "study_uid", "referring_physician", "requesting_physician",
                        "priority"})

    @classmethod
    def from_json(cls, data: Any, where: str = "order", today: date | None = None) -> Order:
        if isinstance(data, Order):
            return data
        if not isinstance(data, Mapping):
            raise OrderError(f"{where}: expected an object")
        _unknown(data, set(cls.FIELDS), where)
        today = today or date.today()
        steps = data.get("steps")
        if not isinstance(steps, (list, tuple)) or not steps:
            raise OrderError(f"{where}.steps: at least one scheduled procedure step")
        study_uid = _check_text(data.get("study_uid"), f"{where}.study_uid", 64)
        if study_uid and not re.fullmatch(r"\d+(\.\d+)+", study_uid):
            raise OrderError(f"{where}.study_uid: {study_uid!r} is not a UID")
        priority = _check_code_string(data.get("priority"), f"{where}.priority")
        if priority not in PRIORITIES:
            raise OrderError(f"{where}.priority: {priority!r} is not one of "
                             f"{', '.join(p for p in PRIORITIES if p)}")
        step_list = tuple(Step.from_json(step, f"{where}.steps[{n}]", today)
                          for n, step in enumerate(steps))
        ids = [step.id for step in step_list if step.id]
        if len(ids) != len(set(ids)):
            raise OrderError(f"{where}.steps: two steps have the same id")
        return cls(
            patient=Patient.from_json(data.get("patient"), f"{where}.patient"),
            steps=step_list,
            accession=_check_text(data.get("accession"), f"{where}.accession", 16),
            procedure_id=_check_text(data.get("procedure_id"), f"{where}.procedure_id", 16),
            description=_check_text(data.get("description"), f"{where}.description", 64),
            codes=_codes(data.get("codes"), f"{where}.codes"),
            study_uid=study_uid,
            referring_physician=_check_name(data.get("referring_physician"),
                                            f"{where}.referring_physician"),
            requesting_physician=_check_name(data.get("requesting_physician"),
                                             f"{where}.requesting_physician"),
            priority=priority)


# Output --------------------------------------------------------------------------------


@attrs.frozen
class StepRecord:
    """A scheduled procedure step as the worklist records it: what the
    ``procedure_step_changed`` hook hands other plugins as ``step``."""

    pk: int
    step_id: str
    status: str
    modality: str
    station_ae: str
    station_name: str
    location: str
    start_date: str
    start_time: str
    description: str
    performing_physician: str
    procedure_id: str
    accession: str
    study_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    protocol_codes: tuple[Code, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["protocol_codes"] = [code.to_json() for code in self.protocol_codes]
        return data


@attrs.frozen
class OrderRecord:
    """An order as stored: the patient, the requested procedure and its steps."""

    pk: int
    patient: Patient
    accession: str
    procedure_id: str
    study_uid: str
    description: str
    codes: tuple[Code, ...]
    referring_physician: str
    requesting_physician: str
    priority: str
    source: str
    created: datetime
    steps: tuple[StepRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "pk": self.pk,
            "patient": {"id": self.patient.id, "issuer": self.patient.issuer,
                        "name": self.patient.name, "birth_date": self.patient.birth_date,
                        "sex": self.patient.sex, "other_ids": list(self.patient.other_ids)},
            "accession": self.accession, "procedure_id": self.procedure_id,
            "study_uid": self.study_uid, "description": self.description,
            "codes": [code.to_json() for code in self.codes],
            "referring_physician": self.referring_physician,
            "requesting_physician": self.requesting_physician, "priority": self.priority,
            "source": self.source, "created": self.created.isoformat(),
            "steps": [step.to_json() for step in self.steps],
        }


def _codes_from(text: str) -> tuple[Code, ...]:
    return tuple(Code(c.get("value", ""), c.get("scheme", ""), c.get("meaning", ""),
                      c.get("version", "")) for c in json.loads(text or "[]"))


def _step_record(step: ScheduledStep, procedure: RequestedProcedure,
                 patient: WorklistPatient) -> StepRecord:
    return StepRecord(
        pk=step.id, step_id=step.step_id, status=step.status, modality=step.modality,
        station_ae=step.station_ae, station_name=step.station_name, location=step.location,
        start_date=step.start_date, start_time=step.start_time, description=step.description,
        performing_physician=step.performing_physician, procedure_id=procedure.procedure_id,
        accession=procedure.accession, study_uid=procedure.study_uid,
        patient_id=patient.patient_id, issuer=patient.issuer, patient_name=patient.name,
        protocol_codes=_codes_from(step.protocol_codes))


def _patient_of(row: WorklistPatient) -> Patient:
    return Patient(id=row.patient_id, name=row.name, issuer=row.issuer,
                   birth_date=row.birth_date, sex=row.sex,
                   other_ids=tuple(json.loads(row.other_ids or "[]")))


def _order_record(procedure: RequestedProcedure) -> OrderRecord:
    patient = procedure.patient
    steps = (ScheduledStep.select().where(ScheduledStep.procedure == procedure)
             .order_by(ScheduledStep.start, ScheduledStep.id))
    return OrderRecord(
        pk=procedure.id, patient=_patient_of(patient), accession=procedure.accession,
        procedure_id=procedure.procedure_id, study_uid=procedure.study_uid,
        description=procedure.description, codes=_codes_from(procedure.codes),
        referring_physician=procedure.referring_physician,
        requesting_physician=procedure.requesting_physician, priority=procedure.priority,
        source=procedure.source, created=procedure.created,
        steps=tuple(_step_record(step, procedure, patient) for step in steps))


# Adding orders -------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def today(gateway: Any) -> date:
    """Today in the gateway's configured time zone (``[worklist] timezone``)."""
    return datetime.now(gateway.settings(NAME).zone()).date()


def _short_id(prefix: str) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(10))


def _patient_fields(patient: Patient, now: datetime) -> dict[str, Any]:
    return {
        "patient_id": patient.id, "issuer": patient.issuer, "name": patient.name,
        "name_folded": matching.fold(patient.name),
        "name_icao": matching.fold(charsets.transliterate(patient.name, "icao")),
        "name_gost": matching.fold(charsets.transliterate(patient.name, "gost")),
        "birth_date": patient.birth_date, "sex": patient.sex,
        "other_ids": json.dumps(list(patient.other_ids), ensure_ascii=False),
        "updated": now,
    }


def _procedure_fields(order: Order, patient_pk: int, source: str,
                      now: datetime) -> dict[str, Any]:
    procedure_id = order.procedure_id or order.accession or _short_id("RP")
    return {
        "patient": patient_pk, "procedure_id": procedure_id, "description": order.description,
        "codes": json.dumps([code.to_json() for code in order.codes], ensure_ascii=False),
        "accession": order.accession, "study_uid": order.study_uid or generate_uid(),
        "referring_physician": order.referring_physician,
        "requesting_physician": order.requesting_physician, "priority": order.priority,
        "source": source, "created": now,
    }


def _step_fields(step: Step, number: int, procedure_id: str, procedure_pk: int,
                 now: datetime) -> dict[str, Any]:
    step_id = step.id or (f"{procedure_id}.{number}" if len(procedure_id) <= 13
                          else _short_id("SP"))
    return {
        "procedure": procedure_pk, "step_id": step_id, "station_ae": step.station_ae,
        "station_name": step.station_name, "station_name_key": step.station_name.upper(),
        "modality": step.modality, "location": step.location,
        "location_key": step.location.upper(), "start_date": step.start_date,
        "start_time": step.start_time, "start": step.start_date + step.start_time,
        "performing_physician": step.performing_physician,
        "performing_folded": matching.fold(step.performing_physician),
        "description": step.description,
        "protocol_codes": json.dumps([code.to_json() for code in step.protocol_codes],
                                     ensure_ascii=False),
        "status": step.status, "updated": now,
    }


def add_order(gateway: Any, order: Order | Mapping[str, Any], source: str = "api") -> OrderRecord:
    """Add one order; returns it as stored (with its generated UIDs and IDs)."""
    return add_orders(gateway, [order], source=source)[0]


def add_orders(gateway: Any, orders: Iterable[Order | Mapping[str, Any]],
               source: str = "api", records: bool = True) -> list[OrderRecord]:
    """Add many orders in one transaction, inserting rows in batches (an import of
    100,000 orders takes seconds). All are checked first: one bad order adds none.

    The patient of an order is matched by (ID, issuer); their name, birth date, sex and
    other IDs are updated to the order's. Returns the stored orders (``records=False``:
    an empty list, for bulk loads that do not need them).
    """
    day = today(gateway)
    checked = [Order.from_json(order, f"orders[{n}]", day) for n, order in enumerate(orders)]
    accessions = [order.accession for order in checked if order.accession]
    if len(accessions) != len(set(accessions)):
        raise OrderError("two orders have the same accession number")
    uids = [order.study_uid for order in checked if order.study_uid]
    if len(uids) != len(set(uids)):
        raise OrderError("two orders have the same study_uid")
    pks: list[int] = []
    database = gateway.database
    with database.connection_context(), write_transaction(database):
        for start in range(0, len(checked), BATCH):
            pks += _insert_batch(checked[start:start + BATCH], source)
        if not records:
            return []
        return [_order_record(procedure) for procedure in _procedures_by_pk(pks)]


def _procedures_by_pk(pks: Sequence[int]) -> list[RequestedProcedure]:
    found: dict[int, RequestedProcedure] = {}
    for start in range(0, len(pks), BATCH):
        chunk = pks[start:start + BATCH]
        query = (RequestedProcedure.select(RequestedProcedure, WorklistPatient)
                 .join(WorklistPatient).where(RequestedProcedure.id.in_(chunk)))
        found.update({procedure.id: procedure for procedure in query})
    return [found[pk] for pk in pks]


def _insert_batch(orders: Sequence[Order], source: str) -> list[int]:
    now = _now()
    # Patients: update those known, insert the others.
    wanted = {(order.patient.id, order.patient.issuer): order.patient for order in orders}
    ids = sorted({key[0] for key in wanted})
    known = {(row.patient_id, row.issuer): row for row in
             WorklistPatient.select().where(WorklistPatient.patient_id.in_(ids))}
    new_rows = []
    for key, patient in wanted.items():
        fields = _patient_fields(patient, now)
        row = known.get(key)
        if row is None:
            new_rows.append({**fields, "created": now})
        elif any(getattr(row, name) != value for name, value in fields.items()
                 if name != "updated"):
            WorklistPatient.update(**fields).where(WorklistPatient.id == row.id).execute()
    if new_rows:
        WorklistPatient.insert_many(new_rows).execute()
        known = {(row.patient_id, row.issuer): row for row in
                 WorklistPatient.select().where(WorklistPatient.patient_id.in_(ids))}
    # Requested procedures.
    rows = [_procedure_fields(order, known[(order.patient.id, order.patient.issuer)].id,
                              source, now) for order in orders]
    taken = {row.study_uid for row in RequestedProcedure.select(RequestedProcedure.study_uid)
             .where(RequestedProcedure.study_uid.in_([row["study_uid"] for row in rows]))}
    if taken:
        raise OrderError(f"study_uid {sorted(taken)[0]} is already ordered")
    accessions = [row["accession"] for row in rows if row["accession"]]
    if accessions:
        taken = {row.accession for row in RequestedProcedure.select(RequestedProcedure.accession)
                 .where(RequestedProcedure.accession.in_(accessions))}
        if taken:
            raise OrderError(f"accession number {sorted(taken)[0]} is already ordered")
    RequestedProcedure.insert_many(rows).execute()
    by_uid = {procedure.study_uid: procedure for procedure in
              RequestedProcedure.select(RequestedProcedure.id, RequestedProcedure.study_uid)
              .where(RequestedProcedure.study_uid.in_([row["study_uid"] for row in rows]))}
    pks = [by_uid[row["study_uid"]].id for row in rows]
    # Scheduled procedure steps, and the first entry of each one's history.
    steps = []
    for order, row, pk in zip(orders, rows, pks):
        for number, step in enumerate(order.steps, start=1):
            steps.append(_step_fields(step, number, row["procedure_id"], pk, now))
    for start in range(0, len(steps), BATCH):
        ScheduledStep.insert_many(steps[start:start + BATCH]).execute()
    history = [{"step": step.id, "status": step.status, "previous": "", "source": source,
                "reason": "ordered", "at": now}
               for step in ScheduledStep.select(ScheduledStep.id, ScheduledStep.status)
               .where(ScheduledStep.procedure.in_(pks))]
    for start in range(0, len(history), BATCH):
        StepStatusChange.insert_many(history[start:start + BATCH]).execute()
    return pks


# Looking up ----------------------------------------------------------------------------


def _steps_query() -> peewee.ModelSelect:
    return (ScheduledStep.select(ScheduledStep, RequestedProcedure, WorklistPatient)
            .join(RequestedProcedure).join(WorklistPatient))


def _records(query: peewee.ModelSelect) -> list[StepRecord]:
    return [_step_record(step, step.procedure, step.procedure.patient) for step in query]


def find_steps(gateway: Any, *, day: date | str | None = None, station_ae: str | None = None,
               modality: str | None = None, status: str | Sequence[str] | None = None,
               accession: str | None = None, patient_id: str | None = None,
               study_uid: str | None = None, step_id: str | None = None,
               limit: int | None = None) -> list[StepRecord]:
    """Steps matching every filter given (exact values), oldest start first.

    ``status``: one status, a list, or ``"active"`` for those still on a worklist.
    ``station_ae`` compares the Scheduled Station AE Title the order named (routing
    rules are not applied here).
    """
    conditions = []
    if day is not None:
        text = day.strftime("%Y%m%d") if isinstance(day, date) else \
            matching.parse_date_for_storage(day, "day")
        conditions.append(ScheduledStep.start_date == text)
    if station_ae is not None:
        conditions.append(ScheduledStep.station_ae == station_ae.strip())
    if modality is not None:
        conditions.append(ScheduledStep.modality == modality.strip().upper())
    if status is not None:
        statuses = ACTIVE if status == "active" else \
            [status] if isinstance(status, str) else list(status)
        conditions.append(ScheduledStep.status.in_([s.upper() for s in statuses]))
    if accession is not None:
        conditions.append(RequestedProcedure.accession == accession)
    if patient_id is not None:
        conditions.append(WorklistPatient.patient_id == patient_id)
    if study_uid is not None:
        conditions.append(RequestedProcedure.study_uid == study_uid)
    if step_id is not None:
        conditions.append(ScheduledStep.step_id == step_id)
    query = _steps_query()
    if conditions:
        query = query.where(matching.all_of(conditions))
    query = query.order_by(ScheduledStep.start, ScheduledStep.id)
    if limit:
        query = query.limit(limit)
    with gateway.database.connection_context():
        return _records(query)


def _step_by_pk(pk: int) -> StepRecord:
    found = _records(_steps_query().where(ScheduledStep.id == pk))
    if not found:
        raise NotFound(f"no scheduled procedure step {pk}")
    return found[0]


def get_step(gateway: Any, pk: int) -> StepRecord:
    """One step by its database key (the number ``dicomgate worklist list`` shows)."""
    with gateway.database.connection_context():
        return _step_by_pk(pk)


def get_order(gateway: Any, *, accession: str | None = None, study_uid: str | None = None,
              pk: int | None = None) -> OrderRecord:
    """One order by accession number, Study Instance UID or database key."""
    query = RequestedProcedure.select(RequestedProcedure, WorklistPatient).join(WorklistPatient)
    if accession is not None:
        query = query.where(RequestedProcedure.accession == accession)
    elif study_uid is not None:
        query = query.where(RequestedProcedure.study_uid == study_uid)
    elif pk is not None:
        query = query.where(RequestedProcedure.id == pk)
    else:
        raise NotFound("give an accession number, a Study Instance UID or a key")
    with gateway.database.connection_context():
        procedure = query.first()
        if procedure is None:
            raise NotFound("no such order: " + str(accession or study_uid or pk))
        return _order_record(procedure)


@attrs.frozen
class StatusChange:
    status: str
    previous: str
    source: str
    reason: str
    at: datetime


def history(gateway: Any, step_pk: int) -> list[StatusChange]:
    """Every status the step has had, oldest first."""
    with gateway.database.connection_context():
        return [StatusChange(row.status, row.previous, row.source, row.reason, row.at)
                for row in StepStatusChange.select().where(StepStatusChange.step == step_pk)
                .order_by(StepStatusChange.at, StepStatusChange.id)]


# Changing status -----------------------------------------------------------------------


def _change_status(step_pk: int, status: str, source: str, reason: str,
                   force: bool) -> tuple[StepRecord, str | None]:
    """Change a step's status and record it, in a transaction (a savepoint when the
    caller has one open); returns the record and the previous status, or ``None`` when
    nothing changed. Opens no connection of its own."""
    status = status.strip().upper()
    if status not in STATUSES:
        raise OrderError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    with write_transaction(ScheduledStep._meta.database):
        step = ScheduledStep.get_or_none(ScheduledStep.id == step_pk)
        if step is None:
            raise NotFound(f"no scheduled procedure step {step_pk}")
        previous = step.status
        if previous == status:
            return _step_by_pk(step_pk), None
        if previous in FINISHED and not force:
            raise OrderError(f"step {step.step_id} is already {previous}")
        now = _now()
        ScheduledStep.update(status=status, updated=now).where(
            ScheduledStep.id == step_pk).execute()
        StepStatusChange.create(step=step_pk, status=status, previous=previous,
                                source=source[:64], reason=reason, at=now)
        return _step_by_pk(step_pk), previous


def _notify(gateway: Any, record: StepRecord, previous: str, source: str, reason: str) -> None:
    log.info("worklist step %s (accession %s) %s -> %s by %s%s", record.step_id,
             record.accession or "-", previous, record.status, source,
             f": {reason}" if reason else "")
    gateway.notify("procedure_step_changed", gateway=gateway, step=record,
                   status=record.status, source=source)


def set_status(gateway: Any, step_pk: int, status: str, source: str = "api",
               reason: str = "", force: bool = False) -> StepRecord:
    """Change a step's status, record it in the history, and tell every plugin through
    ``procedure_step_changed(gateway, step, status, source)``.

    A completed, discontinued or cancelled step keeps its status unless ``force``.
    Setting the status a step already has records nothing and notifies no one.
    Plugins are notified inside the transaction of the change, so that what they
    record of it (the MPPS plugin's events for the HIS) commits with it.
    """
    database = gateway.database
    with database.connection_context(), write_transaction(database):
        record, previous = _change_status(step_pk, status, source, reason, force)
        if previous is not None:
            _notify(gateway, record, previous, source, reason)
    return record


def find_for_references(gateway: Any, references: Sequence[Mapping[str, str]],
                        station_ae: str = "") -> list[StepRecord]:
    """The steps that items of an MPPS's Scheduled Step Attributes Sequence name.

    Each reference (``study_uid``, ``accession``, ``requested_procedure_id``,
    ``scheduled_step_id``; ``""`` when absent) finds the order by its accession number,
    else its Requested Procedure ID, else its Study Instance UID: the first of these it
    carries that finds a step. (A device that groups procedures, or was not given the
    study's UID, sends a Study Instance UID of its own, the same in every item, beside
    each order's accession number: PS3.4 F.7.2.1.2 notes 2 and 3.) The step is found by
    its ID when given. Without a step ID, the steps of that order scheduled for
    ``station_ae`` (when it has any) are meant, else all its steps. A reference with
    none of these (an unscheduled procedure) finds nothing.
    """
    found: dict[int, StepRecord] = {}
    with gateway.database.connection_context():
        for reference in references:
            get = lambda key: str(reference.get(key) or "").strip()  # noqa: E731
            study_uid, accession = get("study_uid"), get("accession")
            procedure_id, step_id = get("requested_procedure_id"), get("scheduled_step_id")
            conditions = [condition for value, condition in (
                (accession, RequestedProcedure.accession == accession),
                (procedure_id, RequestedProcedure.procedure_id == procedure_id),
                (study_uid, RequestedProcedure.study_uid == study_uid)) if value]
            if not conditions and step_id:
                conditions = [ScheduledStep.step_id == step_id]
            steps = []
            for condition in conditions:
                if step_id:
                    condition = condition & (ScheduledStep.step_id == step_id)
                steps = _records(_steps_query().where(condition)
                                 .order_by(ScheduledStep.start, ScheduledStep.id))
                if steps:
                    break
            station = station_ae.strip()
            if not step_id and station and len(steps) > 1:
                steps = [step for step in steps if step.station_ae == station] or steps
            for step in steps:
                found.setdefault(step.pk, step)
    return list(found.values())


def change_for_mpps(gateway: Any, step_pk: int, status: str, source: str,
                    performed: Mapping[str, Any]) -> StepRecord:
    """A status change asked for by a performed procedure step: made in the caller's
    transaction (a savepoint), recorded with what was performed, and notified. A step
    that already has ``status`` or has left the worklist for good stays as it is."""
    reason = json.dumps(dict(performed), ensure_ascii=False, default=str)
    if status.strip().upper() not in STATUSES:
        raise OrderError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    current = _step_by_pk(step_pk)
    if current.status in FINISHED:
        return current  # left the worklist for good: its rules keep it so
    record, previous = _change_status(step_pk, status, source, reason, force=False)
    if previous is not None:
        _notify(gateway, record, previous, source, "")
    return record


def cancel(gateway: Any, *, accession: str | None = None, study_uid: str | None = None,
           step_pk: int | None = None, reason: str = "", source: str = "api") -> list[StepRecord]:
    """Cancel an order (every step still on the worklist) or one step; returns the
    steps changed. A step already finished is left as it is."""
    if step_pk is not None:
        steps = [get_step(gateway, step_pk)]
    else:
        order = get_order(gateway, accession=accession, study_uid=study_uid)
        steps = list(order.steps)
    return [set_status(gateway, step.pk, "CANCELED", source=source, reason=reason)
            for step in steps if step.status not in FINISHED]
