"""Documents and their pictures.

A document is the examination's medical document as the HIS knows it: one study
(the order's Study Instance UID), optionally the HIS's own document ID, and the
pictures made of the study's images. Its row is also the job that makes them:
``state`` and ``due`` say when a worker takes it, ``revision`` counts the images that
arrived, so that a document built while more came is built again. Timestamps are
UTC without a time zone.
"""

from __future__ import annotations

import peewee

from dicomgate import Model, Schema

#: Waiting for its images to settle (``due`` says until when).
COLLECTING = "collecting"
#: A worker is making its pictures (``claimed`` says since when).
RENDERING = "rendering"
#: Pictures made; the HIS was told.
READY = "ready"
#: None of its images could be rendered (``error`` says why); the DICOM files are kept.
FAILED = "failed"
STATES = (COLLECTING, RENDERING, READY, FAILED)

#: What made a document due.
BY_MPPS = "mpps"
BY_QUIET = "quiet"
BY_REQUEST = "request"


class Document(Model):
    uuid = peewee.CharField(max_length=36, unique=True)
    #: The HIS's document ID ("" until the HIS names one).
    document_id = peewee.CharField(max_length=128, default="", index=True)
    study_uid = peewee.CharField(max_length=64, index=True)
    accession = peewee.CharField(max_length=64, default="", index=True)
    patient_id = peewee.CharField(max_length=64, default="")
    patient_name = peewee.TextField(default="")
    state = peewee.CharField(max_length=16, default=COLLECTING, index=True)
    trigger = peewee.CharField(max_length=16, default="")
    due = peewee.DateTimeField(null=True, index=True)
    #: Images that arrived for the study (bumped by each association that sent some).
    revision = peewee.IntegerField(default=0)
    #: The revision the pictures were last made for.
    built_revision = peewee.IntegerField(default=-1)
    claimed = peewee.DateTimeField(null=True)
    attempts = peewee.IntegerField(default=0)
    error = peewee.TextField(default="")
    #: The last "document.ready" event's id in the outbox ("" when none was written).
    event_id = peewee.CharField(max_length=36, default="")
    created = peewee.DateTimeField()
    updated = peewee.DateTimeField()
    ready = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "jpeg_document"
        indexes = ((("study_uid", "document_id"), True),)


class Picture(Model):
    """One picture of one frame of one instance, made by one renderer."""

    document = peewee.ForeignKeyField(Document, backref="pictures", on_delete="CASCADE")
    sop_instance_uid = peewee.CharField(max_length=64)
    sop_class_uid = peewee.CharField(max_length=64, default="")
    series_uid = peewee.CharField(max_length=64, default="")
    series_number = peewee.IntegerField(null=True)
    instance_number = peewee.IntegerField(null=True)
    frame = peewee.IntegerField()
    frames = peewee.IntegerField()
    renderer = peewee.CharField(max_length=32)
    media_type = peewee.CharField(max_length=64)
    #: Relative to the pictures' root, ``/``-separated, made from a hash.
    path = peewee.CharField(max_length=255, unique=True)
    size = peewee.IntegerField()
    sha256 = peewee.CharField(max_length=64)
    width = peewee.IntegerField()
    height = peewee.IntegerField()
    window_center = peewee.FloatField(null=True)
    window_width = peewee.FloatField(null=True)
    #: The source's pixel data were lossy compressed.
    lossy_source = peewee.BooleanField(default=False)
    #: SHA-256 of the DICOM file it was made from (a replaced instance is made again).
    source_sha256 = peewee.CharField(max_length=64, default="")
    created = peewee.DateTimeField()

    class Meta:
        table_name = "jpeg_picture"
        indexes = ((("document", "sop_instance_uid", "frame", "renderer"), True),)


class Failure(Model):
    """An image of a document that could not be rendered, and why."""

    document = peewee.ForeignKeyField(Document, backref="failures", on_delete="CASCADE")
    sop_instance_uid = peewee.CharField(max_length=64)
    renderer = peewee.CharField(max_length=32)
    error = peewee.TextField()
    at = peewee.DateTimeField()

    class Meta:
        table_name = "jpeg_failure"
        indexes = ((("document", "sop_instance_uid", "renderer"), True),)


MODELS = (Document, Picture, Failure)
SCHEMA = Schema("jpeg", 1, MODELS)
