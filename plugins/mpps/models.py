"""The MPPS tables: performed procedure steps, every message that built them, what they
refer to, and the outbox of events for the HIS.

Timestamps are UTC without a time zone. Received data sets are kept twice: the bytes
exactly as they crossed the network (with their transfer syntax), and as DICOM JSON
(PS3.18 F.2, text decoded to Unicode) for people and tools to read.
"""

from __future__ import annotations

import peewee

from dicomgate import Model, Schema

UID_LENGTH = 64

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
#: Performed Procedure Step Status values (PS3.3 C.4.14).
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL = (COMPLETED, DISCONTINUED)


class PerformedStep(Model):
    """One Modality Performed Procedure Step SOP Instance, as its messages left it."""

    sop_instance_uid = peewee.CharField(max_length=UID_LENGTH, unique=True)
    status = peewee.CharField(max_length=16, index=True)
    #: Performed Procedure Step ID, as the device sent it.
    step_id = peewee.CharField(max_length=64, default="")
    station_ae = peewee.CharField(max_length=64, default="")
    station_name = peewee.CharField(max_length=64, default="")
    modality = peewee.CharField(max_length=16, default="")
    description = peewee.TextField(default="")
    patient_id = peewee.CharField(max_length=64, default="", index=True)
    patient_name = peewee.TextField(default="")
    #: Study Instance UID of the first Scheduled Step Attributes item.
    study_uid = peewee.CharField(max_length=UID_LENGTH, default="", index=True)
    #: Start and end as the device sent them (DA ``YYYYMMDD``, TM ``HHMMSS.ffffff``).
    start_date = peewee.CharField(max_length=16, default="")
    start_time = peewee.CharField(max_length=32, default="")
    end_date = peewee.CharField(max_length=16, default="")
    end_time = peewee.CharField(max_length=32, default="")
    #: True once at least one worklist step is linked; false: unscheduled, to reconcile.
    scheduled = peewee.BooleanField(default=False, index=True)
    #: Instances the device listed in Performed Series Sequence, and how many of them
    #: the storage plugin has; ``received`` is null when nothing stores images here.
    performed = peewee.IntegerField(default=0)
    received = peewee.IntegerField(null=True)
    #: Specific Character Set of the N-CREATE, for N-SETs that do not repeat it.
    charset = peewee.CharField(max_length=255, default="")
    #: The current attributes as DICOM JSON (N-CREATE with every N-SET applied).
    attributes = peewee.TextField()
    calling_ae = peewee.CharField(max_length=16, default="")
    address = peewee.CharField(max_length=64, default="")
    created = peewee.DateTimeField(index=True)
    updated = peewee.DateTimeField()

    class Meta:
        table_name = "mpps_step"


class Message(Model):
    """One accepted N-CREATE or N-SET: the data set as received."""

    mpps = peewee.ForeignKeyField(PerformedStep, backref="messages", on_delete="CASCADE")
    message = peewee.CharField(max_length=16)
    #: The step's status after this message.
    status = peewee.CharField(max_length=16)
    calling_ae = peewee.CharField(max_length=16, default="")
    address = peewee.CharField(max_length=64, default="")
    transfer_syntax = peewee.CharField(max_length=UID_LENGTH, default="")
    #: The data set's bytes as they arrived (encoded in ``transfer_syntax``).
    raw = peewee.BlobField(null=True)
    #: The data set as DICOM JSON, text decoded to Unicode.
    dataset = peewee.TextField(default="{}")
    received = peewee.DateTimeField()

    class Meta:
        table_name = "mpps_message"


class Reference(Model):
    """One item of the Scheduled Step Attributes Sequence, as the device sent it."""

    mpps = peewee.ForeignKeyField(PerformedStep, backref="references", on_delete="CASCADE")
    position = peewee.IntegerField()
    study_uid = peewee.CharField(max_length=UID_LENGTH, default="")
    accession = peewee.CharField(max_length=64, default="", index=True)
    requested_procedure_id = peewee.CharField(max_length=64, default="")
    scheduled_step_id = peewee.CharField(max_length=64, default="")
    #: True when the worklist named a step for this item.
    linked = peewee.BooleanField(default=False)

    class Meta:
        table_name = "mpps_reference"


class LinkedStep(Model):
    """A worklist step this MPPS performs (found through ``find_scheduled_steps``)."""

    mpps = peewee.ForeignKeyField(PerformedStep, backref="steps", on_delete="CASCADE")
    #: The worklist's key of the step (its record's ``pk``).
    step_pk = peewee.IntegerField(index=True)
    step_id = peewee.CharField(max_length=64, default="")
    accession = peewee.CharField(max_length=64, default="", index=True)
    requested_procedure_id = peewee.CharField(max_length=64, default="")
    #: Study Instance UID of the order: the key of its event stream.
    order_study_uid = peewee.CharField(max_length=UID_LENGTH, default="", index=True)
    #: The step's status as last seen or set.
    step_status = peewee.CharField(max_length=16, default="")

    class Meta:
        table_name = "mpps_linked_step"
        indexes = ((("mpps", "step_pk"), True),)


class PerformedInstance(Model):
    """An instance the device listed as made during the step, and whether it arrived."""

    mpps = peewee.ForeignKeyField(PerformedStep, backref="instances", on_delete="CASCADE")
    series_uid = peewee.CharField(max_length=UID_LENGTH, default="")
    sop_class_uid = peewee.CharField(max_length=UID_LENGTH, default="")
    sop_instance_uid = peewee.CharField(max_length=UID_LENGTH, index=True)
    received = peewee.BooleanField(default=False)

    class Meta:
        table_name = "mpps_instance"
        indexes = ((("mpps", "sop_instance_uid"), True),)


# Outbox ---------------------------------------------------------------------------------

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"


class Stream(Model):
    """The last sequence number given in one ordered stream of events (one per order,
    or per unscheduled MPPS). Updating this row serialises writers of one stream."""

    key = peewee.CharField(max_length=128, primary_key=True)
    last_sequence = peewee.IntegerField(default=0)

    class Meta:
        table_name = "mpps_stream"


class OutboxEvent(Model):
    """An event for the HIS, written in the transaction of the change it reports."""

    uuid = peewee.CharField(max_length=36, unique=True)
    type = peewee.CharField(max_length=64)
    stream = peewee.CharField(max_length=128)
    sequence = peewee.IntegerField()
    #: The MPPS the event is about, if any (for listing).
    mpps_uid = peewee.CharField(max_length=UID_LENGTH, default="", index=True)
    #: The JSON body exactly as it is sent every time.
    body = peewee.TextField()
    created = peewee.DateTimeField(index=True)

    class Meta:
        table_name = "mpps_outbox"
        indexes = ((("stream", "sequence"), True),)


class Delivery(Model):
    """One event on its way to one notifier."""

    event = peewee.ForeignKeyField(OutboxEvent, backref="deliveries", on_delete="CASCADE")
    notifier = peewee.CharField(max_length=64)
    #: Copied from the event: a delivery waits for every earlier one of its stream.
    stream = peewee.CharField(max_length=128)
    sequence = peewee.IntegerField()
    state = peewee.CharField(max_length=16, default=PENDING)
    attempts = peewee.IntegerField(default=0)
    next_attempt = peewee.DateTimeField()
    #: When the current run of failures began (the dead-letter clock), or null.
    failing_since = peewee.DateTimeField(null=True)
    last_attempt = peewee.DateTimeField(null=True)
    last_error = peewee.TextField(default="")
    delivered = peewee.DateTimeField(null=True)

    class Meta:
        table_name = "mpps_delivery"
        indexes = (
            (("event", "notifier"), True),
            (("notifier", "state", "next_attempt"), False),
            (("notifier", "stream", "sequence"), False),
        )


MODELS = (PerformedStep, Message, Reference, LinkedStep, PerformedInstance, Stream,
          OutboxEvent, Delivery)
SCHEMA = Schema("mpps", 1, MODELS)
