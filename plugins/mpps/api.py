"""What an MPPS does to dicomgate: records, links to orders, completeness, events.

The DIMSE handlers (:mod:`dicomgate.plugins.mpps.scp`) call :func:`create` and
:func:`update`; the command line and other code read through :func:`find`,
:func:`describe` and :func:`order_status`. Each accepted message is one database
transaction: the step's row and history, the worklist's status change (through the
``change_step_status`` hook, run on the same connection) and the outbox events all
commit together, or none of them does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import attrs
import peewee
from pydicom import Dataset

from dicomgate.plugins.mpps import attributes as attr
from dicomgate.plugins.mpps.attributes import Refusal
from dicomgate.plugins.mpps.models import (
    COMPLETED,
    DISCONTINUED,
    FINAL,
    IN_PROGRESS,
    Delivery,
    LinkedStep,
    Message,
    OutboxEvent,
    PerformedInstance,
    PerformedStep,
    Reference,
)
from dicomgate.db import write_transaction
from dicomgate.plugins.mpps.outbox import (
    mpps_stream,
    order_stream,
    outbox_for,
    utcnow,
)

log = logging.getLogger("dicomgate.mpps")

#: The ``source`` of status changes MPPS asks of the worklist.
SOURCE = "mpps"
#: Scheduled Procedure Step Status a worklist step takes for the MPPS linked to it.
STARTED = "STARTED"

EVENT_FOR = {IN_PROGRESS: "mpps.in_progress", COMPLETED: "mpps.completed",
             DISCONTINUED: "mpps.discontinued"}


@attrs.frozen
class Origin:
    """Who sent a message, and how its data set was encoded."""

    calling_ae: str = ""
    address: str = ""
    transfer_syntax: str = ""


# Accepting messages ------------------------------------------------------------------------


def create(gateway: Any, uid: str, ds: Dataset, raw: bytes | None, origin: Origin) -> None:
    """Accept an N-CREATE, or raise :class:`Refusal` (and change nothing)."""
    attr.check_create(ds)
    received = attr.to_json(ds)
    current = attr.merge({}, received)
    merged = attr.dataset_of(current)
    fields = attr.summary_fields(merged)
    refs = attr.references(merged)
    now = utcnow()
    box = outbox_for(gateway)
    try:
        with write_transaction(gateway.database):
            if PerformedStep.select().where(PerformedStep.sop_instance_uid == uid).exists():
                raise Refusal(attr.DUPLICATE_SOP_INSTANCE, f"MPPS {uid} already exists")
            row = PerformedStep.create(
                sop_instance_uid=uid, charset=attr.text(ds, "SpecificCharacterSet")[:255],
                attributes=attr.dumps(current), calling_ae=origin.calling_ae[:16],
                address=origin.address[:64], created=now, updated=now, **fields)
            Message.create(mpps=row, message="N-CREATE", status=row.status,
                           calling_ae=origin.calling_ae[:16], address=origin.address[:64],
                           transfer_syntax=origin.transfer_syntax, raw=raw,
                           dataset=attr.dumps(received), received=now)
            Reference.insert_many([
                {"mpps": row.id, "position": n, "study_uid": ref.study_uid[:64],
                 "accession": ref.accession[:64],
                 "requested_procedure_id": ref.requested_procedure_id[:64],
                 "scheduled_step_id": ref.scheduled_step_id[:64]}
                for n, ref in enumerate(refs, start=1)]).execute()
            _replace_instances(row, attr.performed_series(merged))
            _count(gateway, row)
            steps = _link(gateway, row)
            row.save()
            _emit_mpps(box, row, merged, EVENT_FOR[IN_PROGRESS])
            _apply(gateway, box, row, merged, steps)
    except peewee.IntegrityError:
        raise Refusal(attr.DUPLICATE_SOP_INSTANCE, f"MPPS {uid} already exists") from None
    log.info("MPPS %s IN PROGRESS from %s: %s %s, %s", uid, origin.calling_ae or "-",
             row.modality, row.patient_id or "-",
             _linked_text(row) if row.scheduled else "unscheduled (no order found)")
    _after_commit(gateway, row.sop_instance_uid)


def update(gateway: Any, uid: str, ds: Dataset, raw: bytes | None, origin: Origin) -> str:
    """Accept an N-SET, or raise :class:`Refusal` (and change nothing). Returns the
    step's status after it."""
    box = outbox_for(gateway)
    now = utcnow()
    with write_transaction(gateway.database):
        query = PerformedStep.select().where(PerformedStep.sop_instance_uid == uid)
        if not isinstance(gateway.database, peewee.SqliteDatabase):
            query = query.for_update()
        row = query.first()
        if row is None:
            raise Refusal(attr.NO_SUCH_OBJECT_INSTANCE, f"no MPPS {uid}")
        if row.status != IN_PROGRESS:
            raise Refusal(attr.PROCESSING_FAILURE, attr.NO_LONGER_UPDATABLE,
                          error_id=attr.NO_LONGER_UPDATABLE_ERROR_ID)
        ds = attr.decoded(ds, row.charset)
        received = attr.to_json(ds)
        current = json.loads(row.attributes)
        status = attr.check_set(ds, current, received, row.status)
        updated = attr.merge(current, received)
        merged = attr.dataset_of(updated)
        fields = attr.summary_fields(merged)
        fields["status"] = status
        for name, value in fields.items():
            setattr(row, name, value)
        row.attributes = attr.dumps(updated)
        row.updated = now
        Message.create(mpps=row, message="N-SET", status=status,
                       calling_ae=origin.calling_ae[:16], address=origin.address[:64],
                       transfer_syntax=origin.transfer_syntax, raw=raw,
                       dataset=attr.dumps(received), received=now)
        if "PerformedSeriesSequence" in ds:
            _replace_instances(row, attr.performed_series(merged))
        _count(gateway, row)
        steps = _link(gateway, row)
        row.save()
        if status in FINAL:
            gaps = attr.final_state_gaps(merged)
            if gaps:
                log.warning("MPPS %s %s without %s (accepted as sent)", uid, status,
                            ", ".join(gaps))
            _emit_mpps(box, row, merged, EVENT_FOR[status])
        _apply(gateway, box, row, merged, steps)
    if status in FINAL:
        log.info("MPPS %s %s from %s: performed %d instance(s), received %s; %s", uid, status,
                 origin.calling_ae or "-", row.performed,
                 "?" if row.received is None else row.received,
                 _linked_text(row) if row.scheduled else "unscheduled")
    _after_commit(gateway, uid)
    return status


def _ref(row: Reference) -> attr.ScheduledReference:
    return attr.ScheduledReference(study_uid=row.study_uid, accession=row.accession,
                                   requested_procedure_id=row.requested_procedure_id,
                                   scheduled_step_id=row.scheduled_step_id)


def _linked_text(row: PerformedStep) -> str:
    links = list(row.steps)
    return "performs " + ", ".join(
        f"step {link.step_id} of order {link.accession or link.order_study_uid}"
        for link in links)


def _after_commit(gateway: Any, uid: str) -> None:
    """Look for images again once the step is committed: one that was stored while
    the transaction ran was invisible to both the transaction and ``instance_stored``."""
    row = PerformedStep.get_or_none(PerformedStep.sop_instance_uid == uid)
    if row is not None and row.received is not None and row.received < row.performed:
        refresh_completeness(gateway, uid)
    outbox_for(gateway).wake()


# Orders ------------------------------------------------------------------------------------


def _link(gateway: Any, row: PerformedStep) -> list[Any]:
    """Ask the worklist which steps the Scheduled Step Attributes items name, one item
    at a time; link new ones. Returns the worklist's records of every step linked to
    this MPPS that it still knows (an order that appears after the N-CREATE is linked
    at the next N-SET)."""
    found: dict[int, Any] = {}
    for ref in row.references.order_by(Reference.position):
        answer = gateway.hook.find_scheduled_steps(
            gateway=gateway, references=[_ref(ref).as_dict()], station_ae=row.station_ae)
        for step in answer or ():
            found.setdefault(int(step.pk), step)
        if bool(answer) != ref.linked:
            ref.linked = bool(answer)
            ref.save()
    known = {link.step_pk for link in LinkedStep.select(LinkedStep.step_pk)
             .where(LinkedStep.mpps == row)}
    for pk, step in found.items():
        if pk not in known:
            LinkedStep.create(
                mpps=row, step_pk=pk, step_id=str(getattr(step, "step_id", ""))[:64],
                accession=str(getattr(step, "accession", ""))[:64],
                requested_procedure_id=str(getattr(step, "procedure_id", ""))[:64],
                order_study_uid=str(getattr(step, "study_uid", ""))[:64],
                step_status=str(getattr(step, "status", ""))[:16])
            log.debug("MPPS %s linked to worklist step %s", row.sop_instance_uid, pk)
    missing = known - set(found)
    if missing:
        log.warning("MPPS %s: linked worklist step(s) %s no longer found", row.sop_instance_uid,
                    ", ".join(map(str, sorted(missing))))
    row.scheduled = bool(known or found)
    return [found[pk] for pk in sorted(found)]


def _target(step_pk: int) -> str:
    """The status a step takes from every MPPS linked to it: STARTED while one is in
    progress, then COMPLETED if any completed, else DISCONTINUED."""
    statuses = {row.status for row in PerformedStep.select(PerformedStep.status)
                .join(LinkedStep).where(LinkedStep.step_pk == step_pk)}
    if IN_PROGRESS in statuses:
        return STARTED
    return COMPLETED if COMPLETED in statuses else DISCONTINUED


def _apply(gateway: Any, box: Any, row: PerformedStep, merged: Dataset,
           steps: Sequence[Any]) -> None:
    """Ask the worklist to move each linked step; an order status event for each move."""
    performed = _performed_brief(row, merged)
    for step in steps:
        previous = str(getattr(step, "status", ""))
        target = _target(int(step.pk))
        result = gateway.hook.change_step_status(gateway=gateway, step=step, status=target,
                                                 source=SOURCE, performed=performed)
        if result is None:
            continue
        now_status = str(getattr(result, "status", ""))
        LinkedStep.update(step_status=now_status[:16]).where(
            LinkedStep.step_pk == int(step.pk)).execute()
        if now_status != previous:
            box.append("order.status_changed", order_stream(str(result.study_uid)),
                       {"order": order_json(result), "step": step_json(result, previous),
                        "source": SOURCE, "mpps": performed},
                       mpps_uid=row.sop_instance_uid)
        elif now_status != target:
            log.info("MPPS %s: worklist step %s stays %s (not %s)", row.sop_instance_uid,
                     getattr(step, "step_id", step.pk), now_status, target)


def order_json(step: Any) -> dict[str, Any]:
    """The order a worklist step record belongs to, as events show it."""
    return {"accession": str(getattr(step, "accession", "")),
            "requested_procedure_id": str(getattr(step, "procedure_id", "")),
            "study_uid": str(getattr(step, "study_uid", "")),
            "patient": {"id": str(getattr(step, "patient_id", "")),
                        "issuer": str(getattr(step, "issuer", "")),
                        "name": str(getattr(step, "patient_name", ""))}}


def step_json(step: Any, previous: str | None) -> dict[str, Any]:
    return {"scheduled_step_id": str(getattr(step, "step_id", "")),
            "status": str(getattr(step, "status", "")), "previous_status": previous,
            "modality": str(getattr(step, "modality", "")),
            "station_ae": str(getattr(step, "station_ae", "")),
            "description": str(getattr(step, "description", ""))}


def step_changed(gateway: Any, step: Any, status: str, source: str) -> None:
    """``procedure_step_changed`` from anyone but MPPS (the command line, the API, a
    HIS interface): an order status event. MPPS writes its own, with its details,
    in the transaction of the N-CREATE or N-SET."""
    if source == SOURCE:
        return
    box = outbox_for(gateway)
    with gateway.database.connection_context(), write_transaction(gateway.database):
        box.append("order.status_changed", order_stream(str(step.study_uid)),
                   {"order": order_json(step), "step": {**step_json(step, None),
                                                        "status": status},
                    "source": source, "mpps": None})
    box.wake()


# Events ------------------------------------------------------------------------------------


def _performed_brief(row: PerformedStep, merged: Dataset) -> dict[str, Any]:
    return {"sop_instance_uid": row.sop_instance_uid, "status": row.status,
            "performed_procedure_step_id": row.step_id, "station_ae": row.station_ae,
            "started": attr.iso_datetime(row.start_date, row.start_time),
            "ended": attr.iso_datetime(row.end_date, row.end_time),
            "images": images_json(row)}


def images_json(row: PerformedStep) -> dict[str, Any]:
    return {"performed": row.performed, "received": row.received,
            "complete": None if row.received is None else row.received >= row.performed}


def mpps_json(row: PerformedStep, merged: Dataset) -> dict[str, Any]:
    """Everything an event says about one MPPS."""
    received = {i.sop_instance_uid for i in row.instances.where(PerformedInstance.received)}
    series = []
    for item in attr.performed_series(merged):
        instances = [{"sop_class_uid": cls, "sop_instance_uid": uid,
                      "received": uid in received} for cls, uid in item.instances]
        series.append({"series_uid": item.series_uid, "description": item.description,
                       "protocol": item.protocol, "retrieve_ae": item.retrieve_ae,
                       "operators": item.operators,
                       "performing_physician": item.performing_physician,
                       "performed": len(instances),
                       "received": sum(1 for i in instances if i["received"]),
                       "instances": instances})
    return {
        "sop_instance_uid": row.sop_instance_uid, "status": row.status,
        "performed_procedure_step_id": row.step_id, "description": row.description,
        "modality": row.modality, "station_ae": row.station_ae,
        "station_name": row.station_name,
        "location": attr.text(merged, "PerformedLocation"),
        "started": attr.iso_datetime(row.start_date, row.start_time),
        "ended": attr.iso_datetime(row.end_date, row.end_time),
        "patient": {"id": row.patient_id, "name": row.patient_name,
                    "birth_date": attr.text(merged, "PatientBirthDate"),
                    "sex": attr.text(merged, "PatientSex")},
        "procedure_code": attr.code_of(merged, "ProcedureCodeSequence"),
        "discontinuation_reason": attr.code_of(
            merged, "PerformedProcedureStepDiscontinuationReasonCodeSequence"),
        "comments": attr.text(merged, "CommentsOnThePerformedProcedureStep"),
        "scheduled": row.scheduled,
        "scheduled_steps": [{**_ref(ref).as_dict(), "linked": ref.linked}
                            for ref in row.references.order_by(Reference.position)],
        "series": series,
        "images": images_json(row),
    }


def _emit_mpps(box: Any, row: PerformedStep, merged: Dataset, type_: str) -> None:
    """One event per order the MPPS performs (each in that order's stream), or one in
    the MPPS's own stream when no order was found."""
    body = mpps_json(row, merged)
    orders: dict[str, LinkedStep] = {}
    for link in row.steps.order_by(LinkedStep.id):
        orders.setdefault(link.order_study_uid, link)
    if not orders:
        box.append(type_, mpps_stream(row.sop_instance_uid), {"order": None, "mpps": body},
                   mpps_uid=row.sop_instance_uid)
    for study_uid, link in orders.items():
        order = {"accession": link.accession,
                 "requested_procedure_id": link.requested_procedure_id,
                 "study_uid": study_uid,
                 "patient": {"id": row.patient_id, "issuer": "", "name": row.patient_name}}
        box.append(type_, order_stream(study_uid), {"order": order, "mpps": body},
                   mpps_uid=row.sop_instance_uid)


# Completeness ------------------------------------------------------------------------------


def _replace_instances(row: PerformedStep, series: Sequence[attr.PerformedSeries]) -> None:
    """The instances the device listed, keeping what is known to have arrived."""
    arrived = {i.sop_instance_uid for i in PerformedInstance.select(
        PerformedInstance.sop_instance_uid).where(PerformedInstance.mpps == row,
                                                  PerformedInstance.received)}
    PerformedInstance.delete().where(PerformedInstance.mpps == row).execute()
    rows: dict[str, dict[str, Any]] = {}
    for item in series:
        for sop_class, sop_instance in item.instances:
            rows.setdefault(sop_instance[:64], {
                "mpps": row.id, "series_uid": item.series_uid[:64],
                "sop_class_uid": sop_class[:64], "sop_instance_uid": sop_instance[:64],
                "received": sop_instance[:64] in arrived})
    values = list(rows.values())
    for start in range(0, len(values), 500):
        PerformedInstance.insert_many(values[start:start + 500]).execute()


def _count(gateway: Any, row: PerformedStep) -> None:
    """``performed`` and ``received`` of the step, asking the storage plugin
    (``instances_of_study``) for the studies the MPPS names."""
    studies = sorted({ref.study_uid for ref in row.references if ref.study_uid}
                     | ({row.study_uid} if row.study_uid else set()))
    stored: set[str] = set()
    answered = False
    for study_uid in studies:
        found = gateway.hook.instances_of_study(gateway=gateway, study_uid=study_uid)
        if found is None:
            continue
        answered = True
        stored.update(str(instance.sop_instance_uid) for instance in found)
    waiting = [(i.id, i.sop_instance_uid) for i in PerformedInstance.select(
        PerformedInstance.id, PerformedInstance.sop_instance_uid).where(
        PerformedInstance.mpps == row, ~PerformedInstance.received)]
    arrived = [pk for pk, uid in waiting if uid in stored]
    for start in range(0, len(arrived), 500):
        PerformedInstance.update(received=True).where(
            PerformedInstance.id.in_(arrived[start:start + 500])).execute()
    row.performed = PerformedInstance.select().where(PerformedInstance.mpps == row).count()
    received = PerformedInstance.select().where(PerformedInstance.mpps == row,
                                                PerformedInstance.received).count()
    # None: nothing here stores images, so nothing can be said about what arrived.
    row.received = received if answered or received or row.received is not None else None


def _completed_now(box: Any, row: PerformedStep, before: int | None) -> None:
    """``mpps.images_complete`` when the last listed image of a finished step arrives."""
    if (row.status in FINAL and row.performed and row.received == row.performed
            and (before or 0) < row.performed):
        _emit_mpps(box, row, attr.dataset_of(row.attributes), "mpps.images_complete")


def refresh_completeness(gateway: Any, uid: str) -> None:
    box = outbox_for(gateway)
    with write_transaction(gateway.database):
        row = PerformedStep.get_or_none(PerformedStep.sop_instance_uid == uid)
        if row is None:
            return
        before = row.received
        _count(gateway, row)
        if row.received != before:
            row.save()
            _completed_now(box, row, before)
    box.wake()


def instance_arrived(gateway: Any, sop_instance_uid: str) -> None:
    """``instance_stored``: an image an MPPS listed arrived (after the MPPS said so)."""
    waiting = list(PerformedInstance.select(PerformedInstance.id, PerformedInstance.mpps)
                   .where(PerformedInstance.sop_instance_uid == sop_instance_uid[:64],
                          ~PerformedInstance.received))
    if not waiting:
        return
    box = outbox_for(gateway)
    with write_transaction(gateway.database):
        PerformedInstance.update(received=True).where(
            PerformedInstance.id.in_([i.id for i in waiting])).execute()
        for mpps_id in sorted({i.mpps_id for i in waiting}):
            row = PerformedStep.get_by_id(mpps_id)
            before = row.received
            row.received = PerformedInstance.select().where(
                PerformedInstance.mpps == row, PerformedInstance.received).count()
            row.save()
            _completed_now(box, row, before)
    box.wake()


# Reading -----------------------------------------------------------------------------------


def row_json(row: PerformedStep) -> dict[str, Any]:
    return {
        "sop_instance_uid": row.sop_instance_uid, "status": row.status,
        "performed_procedure_step_id": row.step_id, "modality": row.modality,
        "station_ae": row.station_ae, "station_name": row.station_name,
        "description": row.description, "patient_id": row.patient_id,
        "patient_name": row.patient_name, "study_uid": row.study_uid,
        "started": attr.iso_datetime(row.start_date, row.start_time),
        "ended": attr.iso_datetime(row.end_date, row.end_time),
        "scheduled": row.scheduled, "images": images_json(row),
        "orders": [{"accession": link.accession, "study_uid": link.order_study_uid,
                    "requested_procedure_id": link.requested_procedure_id,
                    "scheduled_step_id": link.step_id, "step_pk": link.step_pk,
                    "step_status": link.step_status}
                   for link in row.steps.order_by(LinkedStep.id)],
        "calling_ae": row.calling_ae, "address": row.address,
        "created": row.created.isoformat(), "updated": row.updated.isoformat(),
    }


def find(gateway: Any, *, status: str | None = None, unscheduled: bool = False,
         patient_id: str | None = None, limit: int | None = 100) -> list[dict[str, Any]]:
    """MPPS, newest first: all, or only those with ``status``, or the unscheduled ones
    (no worklist step found: to reconcile)."""
    with gateway.database.connection_context():
        query = PerformedStep.select().order_by(PerformedStep.created.desc(),
                                                PerformedStep.id.desc())
        if status:
            query = query.where(PerformedStep.status == status.upper())
        if unscheduled:
            query = query.where(~PerformedStep.scheduled)
        if patient_id:
            query = query.where(PerformedStep.patient_id == patient_id)
        if limit:
            query = query.limit(limit)
        return [row_json(row) for row in query]


def get_row(uid: str) -> PerformedStep | None:
    return PerformedStep.get_or_none(PerformedStep.sop_instance_uid == uid)


def describe(gateway: Any, uid: str, datasets: bool = False) -> dict[str, Any] | None:
    """One MPPS: its fields, attributes, series with completeness, history and events."""
    with gateway.database.connection_context():
        row = get_row(uid)
        if row is None:
            return None
        merged = attr.dataset_of(row.attributes)
        data = row_json(row)
        data["detail"] = mpps_json(row, merged)
        data["history"] = [
            {"message": m.message, "status": m.status, "calling_ae": m.calling_ae,
             "address": m.address, "received": m.received.isoformat(),
             "transfer_syntax": m.transfer_syntax,
             **({"dataset": json.loads(m.dataset)} if datasets else {})}
            for m in row.messages.order_by(Message.received, Message.id)]
        if datasets:
            data["attributes"] = json.loads(row.attributes)
        data["events"] = events_json(OutboxEvent.select().where(OutboxEvent.mpps_uid == uid))
        return data


def events_json(query: peewee.ModelSelect) -> list[dict[str, Any]]:
    out = []
    for event in query.order_by(OutboxEvent.id):
        out.append({"id": event.uuid, "type": event.type, "stream": event.stream,
                    "sequence": event.sequence, "created": event.created.isoformat(),
                    "deliveries": [
                        {"notifier": d.notifier, "state": d.state, "attempts": d.attempts,
                         "last_error": d.last_error}
                        for d in event.deliveries.order_by(Delivery.notifier)]})
    return out


def order_status(gateway: Any, key: str) -> dict[str, Any] | None:
    """An order by accession number, Study Instance UID or requested procedure ID: its
    steps as the worklist has them, the MPPS of each step with "performed N, received
    M", and the order's events. ``None`` when no plugin knows the order."""
    with gateway.database.connection_context():
        steps: list[Any] = []
        answered = False
        for field in ("accession", "study_uid", "requested_procedure_id"):
            reference = {"study_uid": "", "accession": "", "requested_procedure_id": "",
                         "scheduled_step_id": "", field: key}
            answer = gateway.hook.find_scheduled_steps(gateway=gateway, references=[reference],
                                                       station_ae="")
            answered = answered or answer is not None
            if answer:
                steps = list(answer)
                break
        if steps:
            which = LinkedStep.step_pk.in_([int(step.pk) for step in steps])
        else:
            which = (LinkedStep.accession == key) | (LinkedStep.order_study_uid == key)
        links = list(LinkedStep.select(LinkedStep, PerformedStep).join(PerformedStep)
                     .where(which))
        if not steps and not links:
            return None if not answered else {"key": key, "order": None, "steps": [],
                                              "events": []}
        study_uids = ({str(step.study_uid) for step in steps}
                      | {link.order_study_uid for link in links})
        out_steps = []
        for step in steps:
            mine = [link for link in links if link.step_pk == int(step.pk)]
            out_steps.append({**step_json(step, None), "pk": int(step.pk),
                              "mpps": [_mpps_line(link.mpps) for link in mine]})
        if not steps:  # the worklist no longer knows it: what MPPS recorded
            for link in links:
                out_steps.append({"scheduled_step_id": link.step_id,
                                  "status": link.step_status, "pk": link.step_pk,
                                  "mpps": [_mpps_line(link.mpps)]})
        order = order_json(steps[0]) if steps else {
            "accession": links[0].accession, "study_uid": links[0].order_study_uid,
            "requested_procedure_id": links[0].requested_procedure_id}
        events = events_json(OutboxEvent.select().where(
            OutboxEvent.stream.in_([order_stream(uid) for uid in sorted(study_uids)])))
        return {"key": key, "order": order, "steps": out_steps, "events": events}


def _mpps_line(row: PerformedStep) -> dict[str, Any]:
    return {"sop_instance_uid": row.sop_instance_uid, "status": row.status,
            "station_ae": row.station_ae,
            "started": attr.iso_datetime(row.start_date, row.start_time),
            "ended": attr.iso_datetime(row.end_date, row.end_time),
            "images": images_json(row)}


def images_text(images: dict[str, Any]) -> str:
    """``performed 12 images, received 12`` (received ``?`` when nothing stores images)."""
    received = "?" if images["received"] is None else images["received"]
    noun = "image" if images["performed"] == 1 else "images"
    return f"performed {images['performed']} {noun}, received {received}"
