"""The worklist tables: patients, requested procedures (orders), their scheduled
procedure steps, and the history of each step's status.

Values are kept as DICOM has them: dates ``YYYYMMDD``, times ``HHMMSS``, person names
with ``^`` between components (trailing empty components removed), text as Unicode.
Coded entries (procedure and protocol codes) and Other Patient IDs are JSON lists.
Timestamps are UTC without a time zone.

The columns a device's query filters on are on the step table itself (station AE
title, start date, status, modality) or on the patient (ID, case-folded name), and
indexed, so that the daily query of one device reads only that device's rows.
"""

from __future__ import annotations

import peewee

from dicomgate import Model, Schema

UID_LENGTH = 64

#: Scheduled Procedure Step Status defined terms (PS3.3 C.4.10).
STATUSES = ("SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "DISCONTINUED",
            "CANCELED")
#: Steps with these statuses are still on a worklist.
ACTIVE = ("SCHEDULED", "ARRIVED", "READY", "STARTED")
#: Steps with these statuses have left the worklist for good.
FINISHED = ("COMPLETED", "DISCONTINUED", "CANCELED")
PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW", "")


class WorklistPatient(Model):
    """A patient as the HIS identifies them: Patient ID and Issuer of Patient ID."""

    patient_id = peewee.CharField(max_length=64, index=True)
    issuer = peewee.CharField(max_length=64, default="")
    name = peewee.TextField(default="")
    #: ``name`` case-folded (ё as е), what case-insensitive name matching compares.
    name_folded = peewee.TextField(default="", index=True)
    #: ``name`` transliterated (ICAO Doc 9303 / GOST R 52535.1) and case-folded, so a
    #: Latin-only device finds the names it is shown.
    name_icao = peewee.TextField(default="")
    name_gost = peewee.TextField(default="")
    birth_date = peewee.CharField(max_length=8, default="")
    sex = peewee.CharField(max_length=16, default="")
    #: JSON list of {"id": ..., "issuer": ...}.
    other_ids = peewee.TextField(default="[]")
    created = peewee.DateTimeField()
    updated = peewee.DateTimeField()

    class Meta:
        table_name = "worklist_patient"
        indexes = ((("patient_id", "issuer"), True),)


class RequestedProcedure(Model):
    """One order of the HIS: a requested procedure with its accession number and the
    Study Instance UID the images will carry."""

    patient = peewee.ForeignKeyField(WorklistPatient, backref="procedures",
                                     on_delete="CASCADE")
    procedure_id = peewee.CharField(max_length=16, index=True)
    description = peewee.TextField(default="")
    #: JSON list of {"value", "scheme", "meaning", "version"}.
    codes = peewee.TextField(default="[]")
    accession = peewee.CharField(max_length=64, default="", index=True)
    study_uid = peewee.CharField(max_length=UID_LENGTH, unique=True)
    referring_physician = peewee.TextField(default="")
    requesting_physician = peewee.TextField(default="")
    priority = peewee.CharField(max_length=16, default="")
    #: Who created it ("cli", "api", "import", a HIS name ...).
    source = peewee.CharField(max_length=64, default="")
    created = peewee.DateTimeField()

    class Meta:
        table_name = "worklist_procedure"


class ScheduledStep(Model):
    """A scheduled procedure step: what one device is to do, and when."""

    procedure = peewee.ForeignKeyField(RequestedProcedure, backref="steps",
                                       on_delete="CASCADE")
    step_id = peewee.CharField(max_length=16)
    #: Scheduled Station AE Title as the order gave it (may be empty: routing rules).
    station_ae = peewee.CharField(max_length=16, default="")
    station_name = peewee.CharField(max_length=16, default="")
    #: Upper-cased ``station_name`` / ``location`` / ``modality`` for routing rules.
    station_name_key = peewee.CharField(max_length=16, default="")
    modality = peewee.CharField(max_length=16, default="")
    location = peewee.CharField(max_length=64, default="")
    location_key = peewee.CharField(max_length=64, default="")
    start_date = peewee.CharField(max_length=8)
    start_time = peewee.CharField(max_length=6, default="")
    #: ``start_date`` + ``start_time`` (``YYYYMMDDHHMMSS``), for combined range matching.
    start = peewee.CharField(max_length=14)
    performing_physician = peewee.TextField(default="")
    performing_folded = peewee.TextField(default="")
    description = peewee.TextField(default="")
    #: JSON list of {"value", "scheme", "meaning", "version"}.
    protocol_codes = peewee.TextField(default="[]")
    status = peewee.CharField(max_length=16, default="SCHEDULED")
    updated = peewee.DateTimeField()

    class Meta:
        table_name = "worklist_step"
        indexes = (
            (("station_ae", "start_date"), False),
            (("start_date", "status"), False),
            (("modality", "start_date"), False),
            (("procedure", "step_id"), True),
        )


class StepStatusChange(Model):
    """Every status a step has had: who changed it, when, from what."""

    step = peewee.ForeignKeyField(ScheduledStep, backref="history", on_delete="CASCADE")
    status = peewee.CharField(max_length=16)
    previous = peewee.CharField(max_length=16, default="")
    source = peewee.CharField(max_length=64, default="")
    reason = peewee.TextField(default="")
    at = peewee.DateTimeField(index=True)

    class Meta:
        table_name = "worklist_step_status"


MODELS = (WorklistPatient, RequestedProcedure, ScheduledStep, StepStatusChange)
SCHEMA = Schema("worklist", 1, MODELS)
