"""The MPPS SCP with pynetdicom as the modality and a local HTTP server as the HIS: the
whole path from order to webhook, refusals per PS3.4 F.7.2, device quirks, several
steps and several MPPS, late images, and a HIS outage across a restart."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from dicomgate.cli import cli
from dicomgate.plugins.mpps import api as mpps_api
from dicomgate.plugins.mpps.models import Delivery, Message, OutboxEvent, PerformedStep
from dicomgate.plugins.worklist import api as worklist
from dicomgate.plugins.worklist.testing import find, query
from test_mpps_support import (
    His,
    Modality,
    create,
    image,
    mpps_create,
    mpps_final,
    n_set,
    store,
    wait_for,
    webhook_settings,
)

PLUGINS = ["verification", "worklist", "storage", "mpps"]
PEERS = [{"ae_title": "CT1"}, {"ae_title": "MR1"}]


def start(dicomgate_start: Any, his: His | None = None, mpps: dict | None = None,
          **options: Any) -> Any:
    settings = {"worklist": {"timezone": "UTC"}, "storage": {"reserve_mb": 0},
                "mpps": {**(webhook_settings(his) if his else {}), **(mpps or {})}}
    return dicomgate_start(plugins=PLUGINS, settings=settings,
                           peers=PEERS, **options)


def add_order(gw: Any, accession: str, station: str = "CT1", patient_id: str = "P1",
              steps: int = 1) -> Any:
    return worklist.add_order(gw.gateway, {
        "patient": {"id": patient_id, "name": "Doe^John"}, "accession": accession,
        "steps": [{"modality": "CT", "station_ae": station}] * steps})


def create_for(order: Any, step: Any = None, **extra: Any) -> Dataset:
    step = step or order.steps[0]
    return mpps_create(order.study_uid, order.accession, order.procedure_id, step.step_id,
                       patient_id=order.patient.id, **extra)


def step_status(gw: Any, step: Any) -> str:
    return worklist.get_step(gw.gateway, step.pk).status


def rows(gw: Any, model: Any, *where: Any) -> list[Any]:
    with gw.gateway.database.connection_context():
        query = model.select()
        return list(query.where(*where) if where else query)


def config_file(tmp_path: Path, data_dir: Path, his: His | None = None) -> str:
    path = tmp_path / "dicomgate.toml"
    mpps = f'\n[mpps]\nwebhook_url = "{his.url}"\nwebhook_secret = "x"\n' if his else ""
    path.write_text(f'[gateway]\ndata_dir = "{data_dir}"\n[plugins]\n'
                    f'enabled = {json.dumps(PLUGINS)}\n[worklist]\ntimezone = "UTC"\n'
                    f'[storage]\nreserve_mb = 0\n{mpps}', encoding="utf-8")
    return str(path)


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# The whole path ------------------------------------------------------------------------------


def test_order_to_webhook(dicomgate_start, tmp_path):
    his = His().start()
    gw = start(dicomgate_start, his)
    order = add_order(gw, "A100")
    step = order.steps[0]

    # The device asks for its worklist and takes the keys from the answer.
    answers = find(gw.port, query({"ScheduledStationAETitle": "CT1",
                                   "ScheduledProcedureStepID": ""},
                                  AccessionNumber="", StudyInstanceUID="",
                                  RequestedProcedureID=""))
    item = answers[0].identifier
    assert item.AccessionNumber == "A100"
    sps_id = item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID

    series = generate_uid()
    images = [generate_uid() for _ in range(3)]
    uid = generate_uid()
    with Modality(gw.port) as modality:
        status, confirmed = modality.create(
            mpps_create(item.StudyInstanceUID, item.AccessionNumber,
                        item.RequestedProcedureID, sps_id), uid)
        assert status == 0x0000 and confirmed == uid
        assert step_status(gw, step) == "STARTED"
        assert store(gw.port, [image(item.StudyInstanceUID, series, sop, number=n)
                               for n, sop in enumerate(images, start=1)]) == [0, 0, 0]
        done = modality.set(uid, mpps_final(series=[(series, images)]))
        assert done.Status == 0x0000

    assert step_status(gw, step) == "COMPLETED"
    history = worklist.history(gw.gateway, step.pk)
    assert [(h.status, h.source) for h in history] == [
        ("SCHEDULED", "api"), ("STARTED", "mpps"), ("COMPLETED", "mpps")]
    state = mpps_api.order_status(gw.gateway, "A100")
    assert state["steps"][0]["status"] == "COMPLETED"
    assert mpps_api.images_text(state["steps"][0]["mpps"][0]["images"]) == \
        "performed 3 images, received 3"

    assert wait_for(lambda: len(his.events()) == 4)
    types = [e["type"] for e in his.events()]
    assert types == ["mpps.in_progress", "order.status_changed", "mpps.completed",
                     "order.status_changed"]
    for request in his.received:
        assert request.signed
        assert request.headers["Idempotency-Key"] == request.json["id"]
        assert request.headers["X-Dicomgate-Event"] == request.json["type"]
    events = his.events()
    assert {e["stream"] for e in events} == {f"order:{order.study_uid}"}
    assert [e["sequence"] for e in events] == [1, 2, 3, 4]
    assert [e["step"]["status"] for e in events if e["type"] == "order.status_changed"] == \
        ["STARTED", "COMPLETED"]
    completed = his.events("mpps.completed")[0]
    assert completed["version"] == 1
    assert completed["order"]["accession"] == "A100"
    assert completed["mpps"]["sop_instance_uid"] == uid
    assert completed["mpps"]["images"] == {"performed": 3, "received": 3, "complete": True}
    (performed,) = completed["mpps"]["series"]
    assert performed["series_uid"] == series
    assert [i["sop_instance_uid"] for i in performed["instances"]] == images
    assert completed["mpps"]["ended"] == "2025-05-20T10:45:00"
    assert completed["mpps"]["scheduled_steps"][0]["linked"] is True

    # Every message is kept with the data set as received.
    messages = rows(gw, Message)
    assert [m.message for m in messages] == ["N-CREATE", "N-SET"]
    assert all(m.raw for m in messages)
    assert json.loads(messages[1].dataset)["00400252"]["Value"] == ["COMPLETED"]

    data_dir = gw.data_dir
    gw.stop()
    config = config_file(tmp_path, data_dir)
    shown = run("orders", "status", "--config", config, "A100")
    assert shown.exit_code == 0, shown.output
    assert "performed 3 images, received 3" in shown.output and "COMPLETED" in shown.output
    listed = run("mpps", "list", "--config", config)
    assert uid in listed.output and "A100" in listed.output
    detail = run("mpps", "show", "--config", config, uid, "--json")
    assert json.loads(detail.output)["images"]["received"] == 3
    assert "N-SET" in run("mpps", "show", "--config", config, uid).output
    his.stop()


def test_discontinued(dicomgate_start):
    his = His().start()
    gw = start(dicomgate_start, his)
    order = add_order(gw, "D1")
    uid = generate_uid()
    assert create(gw.port, create_for(order), uid) == 0x0000
    reason = Dataset()
    reason.CodeValue = "110514"
    reason.CodingSchemeDesignator = "DCM"
    reason.CodeMeaning = "Incorrect worklist entry selected"
    status = n_set(gw.port, uid, mpps_final(
        "DISCONTINUED", PerformedProcedureStepDiscontinuationReasonCodeSequence=[reason]))
    assert status.Status == 0x0000
    assert step_status(gw, order.steps[0]) == "DISCONTINUED"
    assert wait_for(lambda: len(his.events()) == 4)
    stopped = his.events("mpps.discontinued")[0]
    assert stopped["mpps"]["discontinuation_reason"] == {
        "value": "110514", "scheme": "DCM", "meaning": "Incorrect worklist entry selected"}
    assert his.events()[-1]["step"]["status"] == "DISCONTINUED"


def test_unscheduled_procedures_are_kept_for_reconciliation(dicomgate_start, tmp_path):
    his = His().start()
    gw = start(dicomgate_start, his)
    order = add_order(gw, "U1")
    device_study = generate_uid()  # the device made up its own study
    uid = generate_uid()
    assert create(gw.port, mpps_create(device_study, patient_id="EMERG1"), uid) == 0x0000
    assert n_set(gw.port, uid, mpps_final()).Status == 0x0000
    assert step_status(gw, order.steps[0]) == "SCHEDULED"  # nothing touched
    (found,) = mpps_api.find(gw.gateway, unscheduled=True)
    assert found["sop_instance_uid"] == uid and found["status"] == "COMPLETED"
    assert found["orders"] == []
    assert wait_for(lambda: len(his.events()) == 2)
    assert [(e["type"], e["stream"], e["order"]) for e in his.events()] == [
        ("mpps.in_progress", f"mpps:{uid}", None), ("mpps.completed", f"mpps:{uid}", None)]
    assert his.events()[1]["mpps"]["scheduled_steps"][0]["linked"] is False

    data_dir = gw.data_dir
    gw.stop()
    listed = run("mpps", "list", "--unscheduled", "--config", config_file(tmp_path, data_dir))
    assert uid in listed.output and "UNSCHEDULED" in listed.output


def test_refusals_change_nothing(dicomgate_start, caplog):
    his = His().start()
    gw = start(dicomgate_start, his)
    order = add_order(gw, "R1")
    step = order.steps[0]
    uid = generate_uid()
    with Modality(gw.port) as modality:
        assert modality.create(create_for(order), uid)[0] == 0x0000
        # The same SOP Instance UID again: duplicate.
        assert modality.create(create_for(order, PatientName="Other^Name"), uid)[0] == 0x0111
        # N-SET of an instance nobody created.
        assert modality.set(generate_uid(), mpps_final()).Status == 0x0112
        # N-SET values the step may not change, or may not take.
        changed = modality.set(uid, mpps_final(PatientID="SOMEONE-ELSE"))
        assert changed.Status == 0x0105
        named = changed.AttributeIdentifierList
        assert [Tag(t) for t in (named if isinstance(named, list) else [named])] == \
            [Tag("PatientID")]
        assert modality.set(uid, mpps_final("FINISHED")).Status == 0x0106
        assert modality.set(uid, mpps_final("")).Status == 0x0121
        assert step_status(gw, step) == "STARTED"
        # Completed; from then on the object may no longer be updated.
        assert modality.set(uid, mpps_final()).Status == 0x0000
        late = modality.set(uid, mpps_final("DISCONTINUED"))
        assert late.Status == 0x0110
        assert late.ErrorComment == "Performed Procedure Step Object may no longer be updated"
        assert late.ErrorID == 0xA710
        assert modality.set(uid, mpps_final(
            PerformedProcedureStepDescription="changed")).Status == 0x0110

    # Missing attributes at N-CREATE.
    def without(keyword: str) -> Dataset:
        ds = create_for(order)
        delattr(ds, keyword)
        return ds

    def emptied(keyword: str) -> Dataset:
        ds = create_for(order)
        setattr(ds, keyword, [] if keyword.endswith("Sequence") else "")
        return ds

    no_study = create_for(order)
    del no_study.ScheduledStepAttributesSequence[0].StudyInstanceUID
    cases = [(without("PerformedStationAETitle"), 0x0120),
             (without("ScheduledStepAttributesSequence"), 0x0120),
             (without("PerformedProcedureStepStatus"), 0x0120),
             (without("PerformedProcedureStepStartDate"), 0x0120),
             (no_study, 0x0120),
             (emptied("Modality"), 0x0121),
             (emptied("ScheduledStepAttributesSequence"), 0x0121),
             (emptied("PerformedProcedureStepID"), 0x0121),
             (create_for(order, PerformedProcedureStepStatus="COMPLETED"), 0x0106)]
    with Modality(gw.port) as modality:
        for ds, expected in cases:
            assert modality.create(ds, generate_uid())[0] == expected
    assert step_status(gw, step) == "COMPLETED"
    (row,) = rows(gw, PerformedStep)
    assert row.sop_instance_uid == uid and row.status == "COMPLETED"
    assert row.patient_name == "Doe^John"
    assert [m.message for m in rows(gw, Message)] == ["N-CREATE", "N-SET"]
    assert [e.type for e in rows(gw, OutboxEvent)] == [
        "mpps.in_progress", "order.status_changed", "mpps.completed", "order.status_changed"]
    assert "may no longer be updated" in caplog.text


def test_what_real_devices_send_is_accepted(dicomgate_start):
    gw = start(dicomgate_start)
    order = add_order(gw, "Q1")
    ds = create_for(order, charset="ISO_IR 144", patient_name="Иванов^Пётр")
    # Performed Procedure Step ID sent as CS instead of SH.
    ds["PerformedProcedureStepID"] = DataElement(0x00400253, "CS", "PPS 1")
    del ds.PerformedProcedureStepEndDate  # empty or absent end date at N-CREATE
    with Modality(gw.port, transfer_syntax=ImplicitVRLittleEndian) as implicit:
        # No Affected SOP Instance UID: dicomgate assigns one and returns it.
        status, assigned = implicit.create(ds, None)
    assert status == 0x0000 and assigned
    (row,) = rows(gw, PerformedStep)
    assert row.sop_instance_uid == assigned and row.step_id == "PPS 1"
    assert row.patient_name == "Иванов^Пётр"
    with Modality(gw.port) as modality:
        # The character set repeated, unchanged attributes resent, text in ISO_IR 144.
        again = Dataset()
        again.SpecificCharacterSet = "ISO_IR 144"
        again.PatientName = "Иванов^Пётр"
        again.CommentsOnThePerformedProcedureStep = "Контраст"
        assert modality.set(assigned, again).Status == 0x0000
        # No character set: the N-CREATE's applies (PS3.4 F.7.2.2.1).
        more = Dataset()
        more["PerformedProcedureStepDescription"] = DataElement(
            0x00400254, "LO", "КТ головы".encode("iso8859-5"))
        assert modality.set(assigned, more).Status == 0x0000
        # Nothing but the status.
        only = Dataset()
        only.PerformedProcedureStepStatus = "COMPLETED"
        assert modality.set(assigned, only).Status == 0x0000
    (row,) = rows(gw, PerformedStep)
    assert row.status == "COMPLETED" and row.description == "КТ головы"
    assert step_status(gw, order.steps[0]) == "COMPLETED"
    detail = mpps_api.describe(gw.gateway, assigned, datasets=True)
    assert detail["detail"]["comments"] == "Контраст"
    assert detail["images"] == {"performed": 0, "received": 0, "complete": True}
    assert [m["message"] for m in detail["history"]] == ["N-CREATE", "N-SET", "N-SET", "N-SET"]
    assert detail["attributes"]["00080005"]["Value"] == ["ISO_IR 192"]


# Several steps, several MPPS, late images ----------------------------------------------------


def test_one_mpps_for_two_orders_and_two_mpps_for_one_step(dicomgate_start):
    his = His().start()
    gw = start(dicomgate_start, his)
    first, second, third = add_order(gw, "G1"), add_order(gw, "G2"), add_order(gw, "S1")
    grouped = generate_uid()
    # Grouped procedures: one study UID the device made for both (PS3.4 F.7.2.1.2 note 2),
    # each item with its order's accession number and step.
    device_study = generate_uid()
    refs = [{"study_uid": device_study, "accession": o.accession,
             "procedure_id": o.procedure_id, "step_id": o.steps[0].step_id}
            for o in (first, second)]
    part_a, part_b = generate_uid(), generate_uid()
    with Modality(gw.port) as modality:
        assert modality.create(mpps_create("", references=refs), grouped)[0] == 0x0000
        assert [step_status(gw, o.steps[0]) for o in (first, second)] == ["STARTED"] * 2
        assert modality.set(grouped, mpps_final()).Status == 0x0000
        assert [step_status(gw, o.steps[0]) for o in (first, second)] == ["COMPLETED"] * 2

        assert modality.create(create_for(third), part_a)[0] == 0x0000
        assert modality.create(create_for(third), part_b)[0] == 0x0000
        assert modality.set(part_a, mpps_final()).Status == 0x0000
        assert step_status(gw, third.steps[0]) == "STARTED"  # part B still running
        assert modality.set(part_b, mpps_final("DISCONTINUED")).Status == 0x0000
        assert step_status(gw, third.steps[0]) == "COMPLETED"  # one part completed
    assert wait_for(lambda: len(his.events()) == 14)
    by_stream: dict[str, list[str]] = {}
    for event in his.events():
        by_stream.setdefault(event["stream"], []).append(event["type"])
    assert by_stream[f"order:{first.study_uid}"] == by_stream[f"order:{second.study_uid}"] == [
        "mpps.in_progress", "order.status_changed", "mpps.completed", "order.status_changed"]
    assert by_stream[f"order:{third.study_uid}"] == [
        "mpps.in_progress", "order.status_changed", "mpps.in_progress", "mpps.completed",
        "mpps.discontinued", "order.status_changed"]
    state = mpps_api.order_status(gw.gateway, "S1")
    assert sorted(m["status"] for m in state["steps"][0]["mpps"]) == ["COMPLETED",
                                                                      "DISCONTINUED"]


def test_images_that_arrive_after_the_mpps(dicomgate_start):
    his = His().start()
    gw = start(dicomgate_start, his)
    order = add_order(gw, "L1")
    series = generate_uid()
    images = [generate_uid() for _ in range(2)]
    uid = generate_uid()
    assert create(gw.port, create_for(order, series=[(series, [])]), uid) == 0x0000
    assert n_set(gw.port, uid, mpps_final(series=[(series, images)])).Status == 0x0000
    assert mpps_api.find(gw.gateway)[0]["images"] == {"performed": 2, "received": 0,
                                                      "complete": False}
    assert store(gw.port, [image(order.study_uid, series, images[0])]) == [0]
    assert mpps_api.find(gw.gateway)[0]["images"]["received"] == 1
    assert store(gw.port, [image(order.study_uid, series, images[1], number=2)]) == [0]
    assert mpps_api.find(gw.gateway)[0]["images"] == {"performed": 2, "received": 2,
                                                      "complete": True}
    assert wait_for(lambda: his.events("mpps.images_complete"))
    (late,) = his.events("mpps.images_complete")
    assert late["mpps"]["images"]["complete"] is True
    assert his.events()[-1]["type"] == "mpps.images_complete"


def test_storage_answers_what_it_has_of_a_study(dicomgate_start):
    gw = start(dicomgate_start)
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(2)]
    assert store(gw.port, [image(study, series, uid, number=n)
                           for n, uid in enumerate(uids, start=1)]) == [0, 0]
    found = gw.gateway.hook.instances_of_study(gateway=gw.gateway, study_uid=study)
    assert [i.sop_instance_uid for i in found] == uids
    assert found[0].series_uid == series and found[0].calling_ae == "CT1"
    assert found[0].absolute_path.is_file() and found[0].received.tzinfo is not None
    assert gw.gateway.hook.instances_of_study(gateway=gw.gateway,
                                              study_uid=generate_uid()) == []


def test_status_changes_from_elsewhere_reach_the_his(dicomgate_start):
    his = His().start()
    gw = start(dicomgate_start, his)
    order = add_order(gw, "C1")
    database = gw.gateway.database
    # The event is written in the transaction of the change: rolled back with it.
    with database.connection_context():
        try:
            with database.atomic():
                worklist.set_status(gw.gateway, order.steps[0].pk, "ARRIVED", source="api")
                raise RuntimeError("the caller's work failed")
        except RuntimeError:
            pass
    assert step_status(gw, order.steps[0]) == "SCHEDULED" and rows(gw, OutboxEvent) == []
    worklist.cancel(gw.gateway, accession="C1", reason="patient left", source="cli")
    assert wait_for(lambda: his.events())
    (event,) = his.events()
    assert event["type"] == "order.status_changed" and event["source"] == "cli"
    assert event["step"]["status"] == "CANCELED" and event["order"]["accession"] == "C1"
    assert event["stream"] == f"order:{order.study_uid}"


# The HIS down, dicomgate restarted -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_nothing_is_lost_when_the_his_is_down_across_a_restart(dicomgate_start, backend,
                                                               request, caplog):
    database = request.getfixturevalue("postgres_database") if backend == "postgresql" else ""
    caplog.set_level(logging.ERROR, logger="dicomgate.mpps.outbox")
    his = His()  # not listening yet
    settings = {"webhook_timeout": 0.5}
    gw = start(dicomgate_start, his, settings, database=database)
    data_dir = gw.data_dir
    orders = [add_order(gw, f"H{n}", patient_id=f"P{n}") for n in range(3)]
    uids = [generate_uid() for _ in orders]
    with Modality(gw.port) as modality:
        for order, uid in zip(orders, uids, strict=True):
            assert modality.create(create_for(order), uid)[0] == 0x0000
        for uid in uids[:2]:
            assert modality.set(uid, mpps_final()).Status == 0x0000
    # Only the first event of each order is tried: the later ones wait behind it.
    assert wait_for(lambda: all(d.attempts >= 1 for d in rows(gw, Delivery,
                                                               Delivery.sequence == 1)))
    assert all(d.attempts == 0 for d in rows(gw, Delivery, Delivery.sequence > 1))
    gw.stop()

    # Restarted, with the HIS still down for a while; the last MPPS completes meanwhile.
    gw = start(dicomgate_start, his, settings, database=database, data_dir=data_dir)
    assert n_set(gw.port, uids[2], mpps_final()).Status == 0x0000
    assert wait_for(lambda: rows(gw, Delivery, Delivery.attempts >= 2))
    # Back, but slow at first: the first answer comes after dicomgate gave up waiting,
    # so that event arrives twice, with the same id and body.
    his.start()
    slow = {"left": 1}

    def answer(_: Any) -> int:
        if slow["left"]:
            slow["left"] -= 1
            import time
            time.sleep(0.8)
        return 200

    his.answer = answer
    expected = {e.uuid: e.body for e in rows(gw, OutboxEvent)}
    assert len(expected) == 12
    assert wait_for(lambda: {r.json["id"] for r in his.received} == set(expected), 20)
    for attempt in his.attempts:
        assert attempt.body.decode() == expected[attempt.json["id"]]
        assert attempt.signed
    assert len(his.attempts) > len(expected)  # at least the slow one was repeated
    per_stream: dict[str, list[int]] = {}
    first_seen: dict[str, int] = {}
    for request in his.received:
        event = request.json
        if event["id"] not in first_seen:
            first_seen[event["id"]] = event["sequence"]
            per_stream.setdefault(event["stream"], []).append(event["sequence"])
    assert all(sequence == sorted(sequence) == list(range(1, 5))
               for sequence in per_stream.values())
    assert wait_for(lambda: all(d.state == "delivered" for d in rows(gw, Delivery)))
    his.stop()
