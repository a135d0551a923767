"""Worklist matching (PS3.4 C.2.2.2, K.6) through a real gateway and a pynetdicom modality,
on SQLite and on PostgreSQL: each query of the table gets exactly the expected items."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.tag import Tag

from dicomgate.gateway import Gateway, configure
from dicomgate.manager import Plugins
from dicomgate.plugins.worklist import api
from dicomgate.plugins.worklist.testing import Client, query
from dicomgate.server import Server
from dicomgate.testing import RunningGateway, build_config, free_port

PEERS = [
    {"ae_title": "CT1"},
    {"ae_title": "MR1"},
    # Sees CT1's items, but matches names case-sensitively.
    {"ae_title": "CASE1", "worklist": {"stations": ["CT1"], "case_insensitive_names": False}},
    {"ae_title": "GOST1", "worklist": {"stations": ["CT1"], "transliteration": "gost"}},
]


def _day(today: date, offset: int) -> str:
    return (today + timedelta(days=offset)).strftime("%Y%m%d")


def _orders(today: date) -> list[dict]:
    def order(acc, pid, name, start_offset, time, modality="CT", station="CT1", **extra):
        patient = {"id": pid, "name": name, **extra.pop("patient", {})}
        step = {"modality": modality, "station_ae": station,
                "start_date": _day(today, start_offset), "start_time": time,
                **extra.pop("step", {})}
        return {"patient": patient, "accession": acc, "steps": [step], **extra}

    return [
        order("A1", "P1", "Иванов^Пётр", 0, "0800", patient={
            "issuer": "HIS", "birth_date": "19800521", "sex": "M"},
            step={"id": "S1", "location": "Room 1", "performing_physician": "Петров^Иван",
                  "description": "КТ головы"}, procedure_id="RP1", priority="HIGH",
            description="CT head"),
        order("A2", "P2", "Ivanova^Anna", 0, "1030", patient={
            "birth_date": "19751231", "sex": "F"}),
        order("A3", "P3", "Сидоров^Алексей", 1, "0900", modality="MR"),
        order("A4", "P4", "100%_Test^Name", 0, "1400"),
        order("A5", "P5", "Ёлкин^Фёдор", -2, "1200"),
        order("A6", "P6", "Smith^John", 0, "0900", modality="MR", station="MR1"),
        order("A%7", "P_7", "Test^Underscore", 0, "1645"),
        order("A8", "P8", "Цой^Виктор", 5, "1100"),
    ]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def mwl(request, tmp_path_factory):
    """One gateway with the orders of :func:`_orders`, for the whole module."""
    database = ""
    schema = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        import psycopg2

        schema = f"dg_{uuid.uuid4().hex[:12]}"
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {schema}")
        database = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    data_dir = Path(tmp_path_factory.mktemp("worklist"))
    config = build_config(data_dir, free_port(), ["verification", "worklist"],
                          settings={"worklist": {"timezone": "UTC", "keep_days": 7}},
                          peers=PEERS, database=database)
    plugins = Plugins()
    plugins.load(config.plugins)
    gateway = Gateway.open(configure(config, plugins), plugins)
    server = Server(gateway)
    host, port = server.start()
    running = RunningGateway(gateway, server, host, port)
    today = api.today(gateway)
    stored = api.add_orders(gateway, _orders(today), source="test")
    clients: dict[str, Client] = {}
    yield SimpleNamespace(port=port, today=today, gateway=gateway, clients=clients,
                          uids={order.accession: order.study_uid for order in stored})
    for client in clients.values():
        client.__exit__()
    running.stop()
    if schema:
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")


def client(mwl, calling: str) -> Client:
    """One association per device for the whole module, as a modality keeps one open."""
    if calling not in mwl.clients:
        mwl.clients[calling] = Client(mwl.port, calling).__enter__()
    return mwl.clients[calling]


def accessions(mwl, identifier: Dataset, calling: str = "CT1") -> list[str]:
    responses = client(mwl, calling).find(identifier)
    assert responses[-1].status == 0x0000, responses[-1]
    return sorted(r.identifier.AccessionNumber for r in responses[:-1])


def q(sps=None, **keys):
    keys.setdefault("AccessionNumber", "")
    values = [str(v) for v in [*keys.values(), *(sps or {}).values()]]
    if not all(value.isascii() for value in values):
        keys.setdefault("SpecificCharacterSet", "ISO_IR 192")
    return query(sps=sps, **keys)


CT1_ACTIVE = ["A%7", "A1", "A2", "A3", "A4", "A5", "A8"]
TODAY = ["A%7", "A1", "A2", "A4"]

# (id, top-level keys, SPS item keys (dates as day offsets "{d+1}"), expected accessions)
CASES = [
    ("universal", {}, {}, CT1_ACTIVE),
    ("no-sps-sequence", {"PatientName": "*"}, None, CT1_ACTIVE),
    ("star-with-space", {"PatientName": "* "}, {"ScheduledStationAETitle": ""}, CT1_ACTIVE),
    ("own-station-trailing-space", {}, {"ScheduledStationAETitle": "CT1 "}, CT1_ACTIVE),
    ("other-station", {}, {"ScheduledStationAETitle": "MR1"}, []),
    ("station-wildcard", {}, {"ScheduledStationAETitle": "C*"}, CT1_ACTIVE),
    ("name-prefix", {"PatientName": "Иванов*"}, {}, ["A1"]),
    ("name-upper-cyrillic", {"PatientName": "ИВАНОВ*"}, {}, ["A1"]),
    ("name-single", {"PatientName": "иванов^пётр"}, {}, ["A1"]),
    ("name-yo-as-ye", {"PatientName": "Иванов^Петр"}, {}, ["A1"]),
    ("name-latin-finds-cyrillic", {"PatientName": "ivanov*"}, {}, ["A1", "A2"]),
    ("name-icao-ts", {"PatientName": "TSOI*"}, {}, ["A8"]),
    ("name-question-mark", {"PatientName": "?ванов*"}, {}, ["A1"]),
    ("name-percent-literal", {"PatientName": "100%*"}, {}, ["A4"]),
    ("name-percent-not-wildcard", {"PatientName": "%*"}, {}, []),
    ("name-underscore-literal", {"PatientName": "*_*"}, {}, ["A4"]),
    ("id-underscore-literal", {"PatientID": "P_7"}, {}, ["A%7"]),
    ("id-underscore-not-wildcard", {"PatientID": "P_"}, {}, []),
    ("id-question-mark", {"PatientID": "P?"}, {}, ["A1", "A2", "A3", "A4", "A5", "A8"]),
    ("id-case-sensitive", {"PatientID": "p1"}, {}, []),
    ("accession-percent", {"AccessionNumber": "A%7"}, {}, ["A%7"]),
    ("accession-percent-not-wildcard", {"AccessionNumber": "A%"}, {}, []),
    ("issuer", {"IssuerOfPatientID": "HIS"}, {}, ["A1"]),
    ("birth-date", {"PatientBirthDate": "19800521"}, {}, ["A1"]),
    ("birth-date-range", {"PatientBirthDate": "19700101-19791231"}, {}, ["A2"]),
    ("birth-date-open-start", {"PatientBirthDate": "-19791231"}, {}, ["A2"]),
    ("sex", {"PatientSex": "F"}, {}, ["A2"]),
    ("date-today", {}, {"ScheduledProcedureStepStartDate": "{d+0}"}, TODAY),
    ("date-today-trailing-space", {}, {"ScheduledProcedureStepStartDate": "{d+0} "}, TODAY),
    ("date-range", {}, {"ScheduledProcedureStepStartDate": "{d+0}-{d+1}"}, TODAY + ["A3"]),
    ("date-open-end", {}, {"ScheduledProcedureStepStartDate": "{d+1}-"}, ["A3", "A8"]),
    ("date-open-start", {}, {"ScheduledProcedureStepStartDate": "-{d-1}"}, ["A5"]),
    ("time-only", {}, {"ScheduledProcedureStepStartTime": "0900-1100"}, ["A2", "A3", "A8"]),
    ("date-and-time-range-combined", {}, {"ScheduledProcedureStepStartDate": "{d+0}-{d+1}",
                                          "ScheduledProcedureStepStartTime": "1000-0930"},
     ["A%7", "A2", "A3", "A4"]),
    ("date-and-time-open-end", {}, {"ScheduledProcedureStepStartDate": "{d+0}",
                                    "ScheduledProcedureStepStartTime": "-0900"}, ["A1"]),
    ("date-and-time-single", {}, {"ScheduledProcedureStepStartDate": "{d+0}",
                                  "ScheduledProcedureStepStartTime": "1030"}, ["A2"]),
    ("modality", {}, {"Modality": "MR"}, ["A3"]),
    ("modality-and-date", {}, {"Modality": "CT", "ScheduledProcedureStepStartDate": "{d+0}"},
     TODAY),
    ("step-id", {}, {"ScheduledProcedureStepID": "S1"}, ["A1"]),
    ("location", {}, {"ScheduledProcedureStepLocation": "Room 1"}, ["A1"]),
    ("performing-physician", {}, {"ScheduledPerformingPhysicianName": "петров*"}, ["A1"]),
    ("status", {}, {"ScheduledProcedureStepStatus": "SCHEDULED"}, CT1_ACTIVE),
    ("status-none", {}, {"ScheduledProcedureStepStatus": "STARTED"}, []),
    ("procedure-id", {"RequestedProcedureID": "RP1"}, {}, ["A1"]),
    ("priority", {"RequestedProcedurePriority": "HIGH"}, {}, ["A1"]),
    ("description-wildcard", {"RequestedProcedureDescription": "CT*"}, {}, ["A1"]),
    ("step-datetime-range", {}, {"ScheduledProcedureStepStartDateTime": "{d+0}1000-{d+0}1500"},
     ["A2", "A4"]),
]


def _expand(value, today):
    if isinstance(value, str):
        for offset in range(-7, 8):
            value = value.replace(f"{{d{offset:+d}}}", _day(today, offset))
    return value


@pytest.mark.parametrize("keys, sps, expected", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_matching(mwl, keys, sps, expected):
    top = {k: _expand(v, mwl.today) for k, v in keys.items()}
    item = None if sps is None else {k: _expand(v, mwl.today) for k, v in sps.items()}
    assert accessions(mwl, q(item, **top)) == sorted(expected)


def test_uid_list(mwl):
    uids = [mwl.uids["A1"], mwl.uids["A2"]]
    assert accessions(mwl, q({}, StudyInstanceUID=uids)) == ["A1", "A2"]
    assert accessions(mwl, q({}, StudyInstanceUID=mwl.uids["A4"])) == ["A4"]
    assert accessions(mwl, q({}, StudyInstanceUID=mwl.uids["A6"])) == []  # MR1's item


def test_two_devices_see_disjoint_worklists(mwl):
    assert accessions(mwl, q({}), calling="MR1") == ["A6"]
    assert accessions(mwl, q(PatientName="*"), calling="MR1") == ["A6"]
    assert "A6" not in accessions(mwl, q({}), calling="CT1")


def test_case_sensitive_names_per_device(mwl):
    assert accessions(mwl, q({}, PatientName="ИВАНОВ*"), calling="CASE1") == []
    assert accessions(mwl, q({}, PatientName="Иванов*"), calling="CASE1") == ["A1"]


def test_latin_query_matches_the_devices_transliteration(mwl):
    # GOST R 52535.1 writes ц as tc, ICAO as ts.
    assert accessions(mwl, q({}, PatientName="TCOI*"), calling="GOST1") == ["A8"]
    assert accessions(mwl, q({}, PatientName="TCOI*"), calling="CT1") == []


def test_every_requested_key_and_nothing_else(mwl):
    identifier = q({"ScheduledStationAETitle": "", "ScheduledProcedureStepStartDate": "",
                    "ScheduledProcedureStepStartTime": "", "Modality": "",
                    "ScheduledProcedureStepID": "S1", "ScheduledProcedureStepDescription": "",
                    "ScheduledProtocolCodeSequence": [],
                    "ScheduledPerformingPhysicianName": ""},
                   PatientName="", PatientID="", PatientBirthDate="", PatientSex="",
                   StudyInstanceUID="", RequestedProcedureID="", RequestedProcedureDescription="",
                   RequestedProcedureCodeSequence=[], ReferencedStudySequence=[],
                   AdmissionID="", PatientWeight=None, PregnancyStatus=None,
                   StudyDescription="")
    responses = client(mwl, "CT1").find(identifier)
    assert [r.status for r in responses] == [0xFF00, 0x0000]
    answer = responses[0].identifier
    asked = {element.tag for element in identifier} | {Tag("SpecificCharacterSet")}
    assert {element.tag for element in answer} == asked
    sps_asked = {element.tag for element in identifier.ScheduledProcedureStepSequence[0]}
    item = answer.ScheduledProcedureStepSequence[0]
    assert {element.tag for element in item} == sps_asked
    assert answer.PatientName == "Иванов^Пётр"
    assert answer.StudyInstanceUID == mwl.uids["A1"]
    assert answer.RequestedProcedureID == "RP1"
    assert answer.PatientWeight is None and answer.PregnancyStatus is None
    assert answer.AdmissionID == "" and answer.StudyDescription == ""
    assert len(answer.ReferencedStudySequence) == 0
    assert item.ScheduledStationAETitle == "CT1"
    assert item.ScheduledProcedureStepStartDate == _day(mwl.today, 0)
    assert item.ScheduledProcedureStepStartTime == "080000"
    assert item.ScheduledProcedureStepDescription == "КТ головы"
    assert item.ScheduledPerformingPhysicianName == "Петров^Иван"
    assert answer.PatientBirthDate == "19800521" and answer.PatientSex == "M"
