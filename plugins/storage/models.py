"""The index of stored instances: patient, study, series and instance tables.

Attribute values are kept as DICOM has them (dates ``YYYYMMDD``, times ``HHMMSS.ffffff``,
multiple values joined by a backslash), text decoded according to Specific Character
Set. Every timestamp is UTC without a time zone. Counts and sizes of studies and
series are updated in the transaction that adds, replaces or removes an instance.
"""

from __future__ import annotations

import peewee

from dicomgate import Model, Schema

UID_LENGTH = 64


class Patient(Model):
    """A patient as the senders identify them: Patient ID and Issuer of Patient ID.

    ``identity`` is the key stored instances are matched by: a hash of (ID, issuer),
    or, for instances without a Patient ID, of the study, so that two different
    people without an ID are never merged.
    """

    identity = peewee.CharField(max_length=64, unique=True)
    patient_id = peewee.CharField(max_length=64, default="", index=True)
    issuer = peewee.CharField(max_length=64, default="")
    name = peewee.TextField(default="")
    #: ``name`` and the ID case-folded, ``^`` and ``=`` as spaces, for searching.
    search = peewee.TextField(default="", index=True)
    birth_date = peewee.CharField(max_length=16, default="")
    sex = peewee.CharField(max_length=16, default="")
    num_studies = peewee.IntegerField(default=0)
    created = peewee.DateTimeField()

    class Meta:
        table_name = "storage_patient"


class Study(Model):
    patient = peewee.ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    study_uid = peewee.CharField(max_length=UID_LENGTH, unique=True)
    study_id = peewee.CharField(max_length=16, default="")
    date = peewee.CharField(max_length=16, default="", index=True)
    time = peewee.CharField(max_length=16, default="")
    accession = peewee.CharField(max_length=64, default="", index=True)
    description = peewee.TextField(default="")
    referring_physician = peewee.TextField(default="")
    #: Modalities of the study's series, sorted, joined by a backslash.
    modalities = peewee.CharField(max_length=255, default="")
    num_series = peewee.IntegerField(default=0)
    num_instances = peewee.IntegerField(default=0)
    size = peewee.BigIntegerField(default=0)
    created = peewee.DateTimeField()
    updated = peewee.DateTimeField()

    class Meta:
        table_name = "storage_study"


class Series(Model):
    study = peewee.ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    series_uid = peewee.CharField(max_length=UID_LENGTH, unique=True)
    modality = peewee.CharField(max_length=16, default="", index=True)
    number = peewee.IntegerField(null=True)
    description = peewee.TextField(default="")
    body_part = peewee.CharField(max_length=64, default="")
    num_instances = peewee.IntegerField(default=0)
    size = peewee.BigIntegerField(default=0)
    created = peewee.DateTimeField()
    updated = peewee.DateTimeField()

    class Meta:
        table_name = "storage_series"


class Instance(Model):
    series = peewee.ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    study = peewee.ForeignKeyField(Study, backref="instances", on_delete="CASCADE")
    sop_class_uid = peewee.CharField(max_length=UID_LENGTH)
    sop_instance_uid = peewee.CharField(max_length=UID_LENGTH, unique=True)
    instance_number = peewee.IntegerField(null=True)
    transfer_syntax = peewee.CharField(max_length=UID_LENGTH)
    #: Relative to the storage root, with ``/`` separators.
    path = peewee.CharField(max_length=255, unique=True)
    size = peewee.BigIntegerField()
    #: SHA-256 of the whole stored file (preamble and file meta included), hex.
    sha256 = peewee.CharField(max_length=64)
    calling_ae = peewee.CharField(max_length=16, default="")
    address = peewee.CharField(max_length=64, default="")
    received = peewee.DateTimeField()
    #: Number of Frames, 1 for a single-frame image, 0 for an instance without pixels.
    frames = peewee.IntegerField(default=0)

    class Meta:
        table_name = "storage_instance"


MODELS = (Patient, Study, Series, Instance)
SCHEMA = Schema("storage", 1, MODELS)
