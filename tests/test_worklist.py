"""The worklist SCP with pynetdicom as the modality: per-device worklists, routing,
lifecycle, limits, C-CANCEL, the adjust hook, and queries as real devices send them."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind, StudyRootQueryRetrieveInformationModelFind

from dicomgate import hookimpl
from dicomgate.plugins.worklist import api
from dicomgate.plugins.worklist.testing import Client, encoded, find, query

PLUGINS = ["verification", "worklist"]


def start(dicomgate_start, peers=None, settings=None, **options):
    peers = [{"ae_title": "CT1"}, {"ae_title": "MR1"}] if peers is None else peers
    return dicomgate_start(plugins=PLUGINS, peers=peers,
                           settings={"worklist": {"timezone": "UTC", **(settings or {})}},
                           **options)


def order(accession, station="CT1", modality="CT", day=None, time="0900", name="Doe^John",
          pid=None, **step):
    step_data = {"modality": modality, "station_ae": station, "start_time": time, **step}
    if day is not None:
        step_data["start_date"] = day.strftime("%Y%m%d")
    return {"patient": {"id": pid or "P" + accession, "name": name}, "accession": accession,
            "steps": [step_data]}


def answers(port, calling="CT1", identifier=None, **options):
    responses = find(port, identifier if identifier is not None else query({}, AccessionNumber=""),
                     calling=calling, **options)
    assert responses[-1].status == 0x0000, responses[-1]
    return sorted(r.identifier.AccessionNumber for r in responses[:-1])


# Who sees what ----------------------------------------------------------------------------


def test_devices_see_only_their_own_items(dicomgate_start):
    gw = start(dicomgate_start)
    api.add_orders(gw.gateway, [order("C1"), order("C2"), order("M1", station="MR1",
                                                                 modality="MR")])
    assert answers(gw.port, "CT1") == ["C1", "C2"]
    assert answers(gw.port, "MR1") == ["M1"]
    # Only PatientName=*, no sequence: still only the caller's own items.
    only_name = Dataset()
    only_name.PatientName = "*"
    only_name.AccessionNumber = ""
    assert answers(gw.port, "MR1", only_name) == ["M1"]
    # Asking for another device's station explicitly gives nothing.
    assert answers(gw.port, "MR1", query({"ScheduledStationAETitle": "CT1"},
                                          AccessionNumber="")) == []


def test_stations_and_see_all_widen_a_device(dicomgate_start):
    peers = [{"ae_title": "CT1"}, {"ae_title": "CT1B"},
             {"ae_title": "CTCON", "worklist": {"stations": ["CT1", "CT1B"]}},
             {"ae_title": "RIS", "worklist": {"see_all": True}}]
    gw = start(dicomgate_start, peers=peers)
    api.add_orders(gw.gateway, [order("A", "CT1"), order("B", "CT1B"), order("C", "CTCON"),
                                order("D", "OTHER")])
    assert answers(gw.port, "CTCON") == ["A", "B", "C"]
    assert answers(gw.port, "CTCON", query({"ScheduledStationAETitle": "CT1B"},
                                            AccessionNumber="")) == ["B"]
    assert answers(gw.port, "RIS") == ["A", "B", "C", "D"]
    assert answers(gw.port, "CT1") == ["A"]


@pytest.mark.parametrize("policy, expected", [("none", []), ("own-ae-title", ["U"]),
                                              ("all", ["C", "U"])])
def test_unknown_devices(dicomgate_start, policy, expected):
    gw = start(dicomgate_start, peers=[{"ae_title": "CT1"}], accept_unknown_peers=True,
               settings={"unknown_devices": policy})
    api.add_orders(gw.gateway, [order("C", "CT1"), order("U", "STRANGER")])
    assert answers(gw.port, "STRANGER") == expected
    assert answers(gw.port, "CT1") == ["C"]


def test_routing_rules_for_orders_without_a_station(dicomgate_start):
    routes = [
        {"modality": "CT", "location": ["Room 2", "room 2a"], "ae_titles": ["CT2"]},
        {"modality": ["CT"], "ae_titles": ["CT1", "CT1B"]},
        {"station_name": "US-WARD", "ae_titles": "US1"},
    ]
    peers = [{"ae_title": t} for t in ("CT1", "CT1B", "CT2", "US1", "MR1")]
    gw = start(dicomgate_start, peers=peers, settings={"routes": routes})
    api.add_orders(gw.gateway, [
        order("R2", station="", location="ROOM 2A"),
        order("R1", station=""),
        order("U", station="", modality="US", station_name="us-ward"),
        order("X", station="", modality="MR"),  # no rule: nobody's
        order("D", station="CT2"),  # named station: no rule applies
    ])
    assert answers(gw.port, "CT2") == ["D", "R2"]
    assert answers(gw.port, "CT1") == ["R1"]
    assert answers(gw.port, "CT1B") == ["R1"]
    assert answers(gw.port, "US1") == ["U"]
    assert answers(gw.port, "MR1") == []
    # The routed item is answered with the station it was routed to.
    responses = find(gw.port, query({"ScheduledStationAETitle": ""}, AccessionNumber=""),
                     calling="CT1B")
    assert responses[0].identifier.ScheduledProcedureStepSequence[0].ScheduledStationAETitle \
        == "CT1B"
    responses = find(gw.port, query({"ScheduledStationAETitle": "CT1"}, AccessionNumber=""),
                     calling="CT1")
    assert [r.get("AccessionNumber") for r in responses[:-1]] == ["R1"]


# Lifecycle --------------------------------------------------------------------------------


def test_cancelled_completed_and_old_items_leave_the_worklist(dicomgate_start):
    changes = []

    class Listener:
        @hookimpl
        def procedure_step_changed(self, gateway, step, status, source):
            changes.append((step.accession, step.status, status, source))

    gw = start(dicomgate_start, settings={"keep_days": 3},
               extra_plugins={"listener": Listener()})
    today = api.today(gw.gateway)
    api.add_orders(gw.gateway, [order("KEEP"), order("CANCEL"), order("DONE"),
                                order("OLD", day=today - timedelta(days=4)),
                                order("RECENT", day=today - timedelta(days=3))])
    assert answers(gw.port) == ["CANCEL", "DONE", "KEEP", "RECENT"]
    cancelled = api.cancel(gw.gateway, accession="CANCEL", reason="patient left")
    assert [step.status for step in cancelled] == ["CANCELED"]
    done = api.find_steps(gw.gateway, accession="DONE")[0]
    api.set_status(gw.gateway, done.pk, "STARTED", source="mpps")
    assert answers(gw.port) == ["DONE", "KEEP", "RECENT"]  # STARTED is still listed
    api.set_status(gw.gateway, done.pk, "COMPLETED", source="mpps")
    assert answers(gw.port) == ["KEEP", "RECENT"]
    assert changes == [("CANCEL", "CANCELED", "CANCELED", "api"),
                       ("DONE", "STARTED", "STARTED", "mpps"),
                       ("DONE", "COMPLETED", "COMPLETED", "mpps")]
    history = api.history(gw.gateway, done.pk)
    assert [(h.previous, h.status, h.source) for h in history] == [
        ("", "SCHEDULED", "api"), ("SCHEDULED", "STARTED", "mpps"),
        ("STARTED", "COMPLETED", "mpps")]
    with pytest.raises(api.OrderError):
        api.set_status(gw.gateway, done.pk, "SCHEDULED")
    api.set_status(gw.gateway, done.pk, "SCHEDULED", force=True, reason="rescheduled")
    assert answers(gw.port) == ["DONE", "KEEP", "RECENT"]


def test_orders_get_ids_and_a_study_uid(dicomgate_start):
    gw = start(dicomgate_start)
    record = api.add_order(gw.gateway, {"patient": {"id": "P1", "name": "Doe^Jane"},
                                        "steps": [{"modality": "CT"}, {"modality": "CT",
                                                                      "station_ae": "CT1"}]})
    assert record.study_uid.count(".") > 3 and record.procedure_id.startswith("RP")
    assert len({step.step_id for step in record.steps}) == 2
    assert all(step.start_date == api.today(gw.gateway).strftime("%Y%m%d")
               for step in record.steps)
    with pytest.raises(api.OrderError, match="steps"):
        api.add_order(gw.gateway, {"patient": {"id": "P1", "name": "X"}, "steps": []})
    with pytest.raises(api.OrderError, match=r"orders\[0\].patient.name: required"):
        api.add_order(gw.gateway, {"patient": {"id": "P1"}, "steps": [{"modality": "CT"}]})
    api.add_order(gw.gateway, order("SAME"))
    with pytest.raises(api.OrderError, match="already ordered"):
        api.add_order(gw.gateway, order("SAME"))
    # The patient's details follow the latest order.
    api.add_order(gw.gateway, order("NEW", pid="P1", name="Doe^Jane^Ann"))
    assert api.get_order(gw.gateway, accession="NEW").patient.name == "Doe^Jane^Ann"


# Limits and cancel ------------------------------------------------------------------------


def test_max_answers_returns_the_first_items_then_success(dicomgate_start, caplog):
    peers = [{"ae_title": "CT1", "worklist": {"max_answers": 3}}, {"ae_title": "MR1"}]
    gw = start(dicomgate_start, peers=peers, settings={"max_answers": 5})
    api.add_orders(gw.gateway, [order(f"A{n}", time=f"{8 + n:02d}00") for n in range(8)] +
                   [order(f"M{n}", station="MR1") for n in range(8)])
    with caplog.at_level(logging.WARNING, logger="dicomgate.worklist"):
        responses = find(gw.port, query({}, AccessionNumber=""), calling="CT1")
    assert [r.status for r in responses] == [0xFF00] * 3 + [0x0000]
    assert [r.get("AccessionNumber") for r in responses[:-1]] == ["A0", "A1", "A2"]
    assert "max_answers" in caplog.text
    assert len(answers(gw.port, "MR1")) == 5


def test_c_cancel_stops_the_answers(dicomgate_start, monkeypatch):
    from dicomgate.services import Request

    # The handler only queues answers, faster than a C-CANCEL can come back over the
    # network; a slow link (2 ms an answer) makes the race the test needs certain.
    checked = Request.is_cancelled

    def slow_link(self):
        time.sleep(0.002)
        return checked(self)

    monkeypatch.setattr(Request, "is_cancelled", slow_link)
    gw = start(dicomgate_start, settings={"max_answers": 0})
    api.add_orders(gw.gateway, [order(f"A{n:04d}") for n in range(1500)], source="test",
                   records=False)
    with Client(gw.port, "CT1") as client:
        responses = client.find(query({}, AccessionNumber="", PatientName=""), cancel_after=1)
        assert responses[-1].status == 0xFE00
        assert 1 <= len(responses) - 1 < 1500
        # The association goes on serving.
        assert len(client.find(query({"ScheduledProcedureStepID": "A0001.1"},
                                     AccessionNumber=""))) == 2


# The adjust hook ------------------------------------------------------------------------


def test_plugins_can_drop_and_rewrite_answers(dicomgate_start):
    seen = {}

    class SiteRules:
        @hookimpl
        def adjust_worklist_answers(self, gateway, association, query, answers):
            seen["calling"] = association.calling_ae
            seen["query"] = "PatientName" in query
            answers[:] = [a for a in answers if a.AccessionNumber != "DROP"]
            for answer in answers:
                answer.PatientName = str(answer.PatientName).upper() + "^ЖЁЛТЫЙ"

    class Broken:
        @hookimpl
        def adjust_worklist_answers(self, answers):
            raise RuntimeError("a plugin bug")

    peers = [{"ae_title": "CT1", "worklist": {"charset": "ISO_IR 100"}}]
    gw = start(dicomgate_start, peers=peers,
               extra_plugins={"site": SiteRules(), "broken": Broken()})
    api.add_orders(gw.gateway, [order("KEEP", name="Doe^John"), order("DROP")])
    responses = find(gw.port, query({}, AccessionNumber="", PatientName=""))
    assert [r.status for r in responses] == [0xFF00, 0x0000]
    assert responses[0].get("AccessionNumber") == "KEEP"
    # Rewritten in Unicode by the plugin, then transliterated for the Latin-1 device.
    assert str(responses[0].get("PatientName")) == "DOE^JOHN^ZhELTYI"
    assert seen == {"calling": "CT1", "query": True}


# Queries as devices send them -------------------------------------------------------------


def _real_device_query(today: str) -> Dataset:
    """Group lengths (also inside the item), trailing spaces, empty sequences, zero-length
    US and DS, unknown, retired and private keys."""
    identifier = Dataset()
    identifier.add_new(0x00080000, "UL", 0)
    identifier.SpecificCharacterSet = ""
    identifier.AccessionNumber = ""
    identifier.add_new(0x00090010, "LO", "ACME 1.0")
    identifier.add_new(0x00091001, "LO", "private matching value")
    identifier.add_new(0x00100000, "UL", 0)
    identifier.PatientName = "* "
    identifier.PatientID = ""
    identifier.PatientWeight = None  # DS, zero length
    identifier.PregnancyStatus = None  # US, zero length
    identifier.StudyDescription = ""  # not a worklist key
    identifier.OtherPatientIDs = ""  # retired
    identifier.ReferencedStudySequence = Sequence()  # empty sequence
    codes = Dataset()
    codes.CodeValue = ""
    codes.CodingSchemeDesignator = ""
    codes.CodeMeaning = ""
    identifier.RequestedProcedureCodeSequence = [codes]  # one item of empty keys
    item = Dataset()
    item.add_new(0x00400000, "UL", 0)
    item.ScheduledStationAETitle = "CT1 "
    item.ScheduledProcedureStepStartDate = today
    item.ScheduledProcedureStepStartTime = ""
    item.Modality = ""
    item.ScheduledProtocolCodeSequence = Sequence()
    identifier.ScheduledProcedureStepSequence = [item]
    return identifier


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_queries_as_real_devices_send_them(dicomgate_start, implicit):
    gw = start(dicomgate_start)
    today = api.today(gw.gateway).strftime("%Y%m%d")
    api.add_order(gw.gateway, {
        "patient": {"id": "P1", "name": "Doe^John", "other_ids": [{"id": "X9", "issuer": "OLD"}]},
        "accession": "A1", "codes": [{"value": "CTHEAD", "scheme": "99LOCAL",
                                      "meaning": "CT head"}],
        "steps": [{"modality": "CT", "station_ae": "CT1", "protocol_codes": [
            {"value": "P1", "scheme": "99LOCAL", "meaning": "Protocol 1"}]}]})
    identifier = _real_device_query(today)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    with Client(gw.port, "CT1", transfer_syntax=syntax) as client:
        responses = client.find_raw(encoded(identifier, implicit))
    assert [r.status for r in responses] == [0xFF00, 0x0000]
    answer = responses[0].identifier
    assert answer.AccessionNumber == "A1"
    assert 0x00091001 not in answer and 0x00090010 not in answer  # private: dropped
    assert 0x00080000 not in answer and 0x00100000 not in answer  # group lengths: dropped
    assert answer.StudyDescription == "" and answer.PatientWeight is None
    assert answer.PregnancyStatus is None
    assert answer.OtherPatientIDs == "X9"
    assert len(answer.ReferencedStudySequence) == 0
    code = answer.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == \
        ("CTHEAD", "99LOCAL", "CT head")
    item = answer.ScheduledProcedureStepSequence[0]
    assert 0x00400000 not in item
    assert item.ScheduledStationAETitle == "CT1" and item.Modality == "CT"
    assert item.ScheduledProtocolCodeSequence[0].CodeValue == "P1"
    assert answer.SpecificCharacterSet == "ISO_IR 192"


def test_empty_sequence_returns_every_step_attribute(dicomgate_start):
    gw = start(dicomgate_start)
    api.add_order(gw.gateway, order("A1", location="Room 1", description="Head"))
    identifier = Dataset()
    identifier.PatientName = ""
    identifier.ScheduledProcedureStepSequence = Sequence()
    responses = find(gw.port, identifier)
    item = responses[0].identifier.ScheduledProcedureStepSequence[0]
    assert item.ScheduledProcedureStepLocation == "Room 1"
    assert item.ScheduledProcedureStepDescription == "Head"
    assert item.ScheduledStationAETitle == "CT1" and item.ScheduledProcedureStepStatus == \
        "SCHEDULED"
    assert "AccessionNumber" not in responses[0].identifier


def test_a_key_matched_on_that_is_not_supported_warns_with_ff01(dicomgate_start):
    gw = start(dicomgate_start)
    api.add_order(gw.gateway, order("A1"))
    responses = find(gw.port, query({}, AccessionNumber="", StudyDescription="Head*"))
    assert [r.status for r in responses] == [0xFF01, 0x0000]


# Bad queries ----------------------------------------------------------------------------


@pytest.mark.parametrize("sps, keys, status, comment", [
    ({"ScheduledProcedureStepStartDate": "2025-13-45x"}, {}, 0xC000, "StartDate"),
    ({"ScheduledProcedureStepStartTime": "2561"}, {}, 0xC000, "not a time"),
    ({}, {"PatientBirthDate": "yesterday"}, 0xC000, "not a date"),
    ({}, {"StudyInstanceUID": "1.2.*"}, 0xC000, "wildcards"),
], ids=["bad-date", "bad-time", "bad-birth-date", "uid-wildcard"])
def test_invalid_values_are_refused_and_the_server_goes_on(dicomgate_start, sps, keys, status,
                                                           comment):
    gw = start(dicomgate_start)
    api.add_order(gw.gateway, order("A1"))
    with Client(gw.port, "CT1") as client:
        bad = client.find(query(sps, AccessionNumber="", **keys))
        assert [r.status for r in bad] == [status]
        assert comment in bad[0].error_comment
        good = client.find(query({}, AccessionNumber=""))
        assert [r.status for r in good] == [0xFF00, 0x0000]


def test_malformed_identifiers_are_refused_and_the_server_goes_on(dicomgate_start):
    gw = start(dicomgate_start)
    api.add_order(gw.gateway, order("A1"))
    two_items = query({}, AccessionNumber="")
    two_items.ScheduledProcedureStepSequence.append(Dataset())
    with Client(gw.port, "CT1") as client:
        # An element of a VR that does not exist, and a sequence item cut short.
        for garbage in (b"\x10\x00\x10\x00ZZ\x04\x00abcd",
                        b"\x40\x00\x00\x01SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0"
                        b"\x10\x00\x00\x00garbage"):
            assert [r.status for r in client.find_raw(garbage)] == [0xA900]
        assert [r.status for r in client.find(two_items)] == [0xA900]
        assert [r.status for r in client.find(query({}, AccessionNumber=""))] == \
            [0xFF00, 0x0000]


def test_other_sop_classes_are_not_negotiated(dicomgate_start):
    gw = start(dicomgate_start)
    ae = AE(ae_title="CT1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGATE")
    try:
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        assert accepted == {ModalityWorklistInformationFind}
    finally:
        assoc.release()


def test_a_peer_not_allowed_the_service_is_refused(dicomgate_start):
    gw = start(dicomgate_start, peers=[{"ae_title": "CT1", "allow": ["echo"]}])
    responses = find(gw.port, query({}, AccessionNumber=""))
    assert [r.status for r in responses] == [0x0124]


# The hooks the MPPS plugin calls --------------------------------------------------------


def test_mpps_finds_steps_and_changes_them_in_its_transaction(dicomgate_start):
    changes = []

    class Listener:
        @hookimpl
        def procedure_step_changed(self, step, status, source):
            changes.append((step.step_id, status, source))

    gw = start(dicomgate_start, extra_plugins={"listener": Listener()})
    gateway = gw.gateway
    order_a = api.add_order(gateway, {
        "patient": {"id": "P1", "name": "Doe^John"}, "accession": "A1",
        "steps": [{"id": "S1", "modality": "CT", "station_ae": "CT1"},
                  {"id": "S2", "modality": "CT", "station_ae": "CT2"}]})
    hook = gateway.hook
    ref = {"study_uid": "", "accession": "A1", "requested_procedure_id": "",
           "scheduled_step_id": ""}
    assert [s.step_id for s in hook.find_scheduled_steps(
        gateway=gateway, references=[ref], station_ae="CT2")] == ["S2"]
    assert [s.step_id for s in hook.find_scheduled_steps(
        gateway=gateway, references=[ref], station_ae="")] == ["S1", "S2"]
    by_uid = dict(ref, accession="", study_uid=order_a.study_uid, scheduled_step_id="S1")
    [step] = hook.find_scheduled_steps(gateway=gateway, references=[by_uid], station_ae="")
    assert step.step_id == "S1"
    unscheduled = dict.fromkeys(ref, "")
    assert hook.find_scheduled_steps(gateway=gateway, references=[unscheduled],
                                     station_ae="CT1") == []
    performed = {"sop_instance_uid": "1.2.3", "status": "IN PROGRESS"}
    # The change belongs to the caller's transaction: rolled back with it.
    with gateway.database.connection_context():
        try:
            with gateway.database.atomic():
                result = hook.change_step_status(gateway=gateway, step=step, status="STARTED",
                                                 source="mpps", performed=performed)
                assert result.status == "STARTED"
                raise RuntimeError("the MPPS could not be stored")
        except RuntimeError:
            pass
    assert api.get_step(gateway, step.pk).status == "SCHEDULED"
    with gateway.database.connection_context(), gateway.database.atomic():
        hook.change_step_status(gateway=gateway, step=step, status="COMPLETED", source="mpps",
                                performed=dict(performed, status="COMPLETED"))
    assert api.get_step(gateway, step.pk).status == "COMPLETED"
    # A finished step stays finished; an unchanged one notifies no one.
    with gateway.database.connection_context(), gateway.database.atomic():
        again = hook.change_step_status(gateway=gateway, step=step, status="DISCONTINUED",
                                        source="mpps", performed=performed)
    assert again.status == "COMPLETED"
    assert changes[-1] == ("S1", "COMPLETED", "mpps")
    assert "1.2.3" in api.history(gateway, step.pk)[-1].reason
