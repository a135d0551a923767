"""The storage plugin on a real gateway: durability, duplicates, failures, permissions,
hooks, concurrency and the command line. (pydicom's test files: test_storage_corpus.py)"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.sop_class import Verification

from dicomgate import hookimpl
from dicomgate.cli import cli
from dicomgate.plugins.storage import StoredInstance
from dicomgate.plugins.storage.models import Instance, Patient, Series, Study
from dicomgate.plugins.storage.scp import encode_file_meta
from dicomgate.plugins.storage.store import search_text

PLUGINS = ["verification", "storage"]
CYRILLIC = "Иванов^Иван Петрович"


# Helpers -------------------------------------------------------------------------------


def start(dicomgate_start: Any, extra: dict[str, Any] | None = None, peers: Any = None,
          **storage: Any) -> Any:
    settings = {"storage": {"reserve_mb": 0, **storage}}
    return dicomgate_start(plugins=PLUGINS, extra_plugins=extra, settings=settings, peers=peers)


def image(study: str | None = None, series: str | None = None, uid: str | None = None,
          patient: str = "Doe^John", patient_id: str = "P1", charset: Any = "ISO_IR 192",
          size: int = 16, number: int = 1, **extra: Any) -> Dataset:
    """A small secondary capture image."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.PatientName = patient
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19800102"
    ds.PatientSex = "M"
    ds.StudyDate = "20240305"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyDescription = "Chest"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes([number % 256]) * (size * size)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def associate(gw: Any, ae_title: str = "SENDER", echo: bool = False) -> Any:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    if echo:
        ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae.associate(gw.host, gw.port, ae_title=gw.ae_title)


def send(gw: Any, items: Sequence[Dataset | Path], ae_title: str = "SENDER") -> list[int | None]:
    """C-STORE each dataset (or Part 10 file, sent as its bytes) on one association."""
    assoc = associate(gw, ae_title)
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    statuses = []
    try:
        for item in items:
            _config.STORE_SEND_CHUNKED_DATASET = isinstance(item, Path)
            status = assoc.send_c_store(item)
            statuses.append(getattr(status, "Status", None))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def echo(gw: Any, ae_title: str = "SENDER") -> int | None:
    assoc = associate(gw, ae_title, echo=True)
    assert assoc.is_established
    try:
        return getattr(assoc.send_c_echo(), "Status", None)
    finally:
        assoc.release()


def rows(gw: Any, model: Any) -> list[Any]:
    with gw.gateway.database.connection_context():
        return list(model.select())


def root_of(gw: Any) -> Path:
    return gw.data_dir / "files"


def stored_files(gw: Any) -> list[Path]:
    """Files in the fan-out folders (not the working folders)."""
    root = root_of(gw)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not p.relative_to(root).parts[0].startswith("."))


def working_files(gw: Any) -> list[Path]:
    root = root_of(gw)
    return sorted(p for name in (".spool", ".tmp") for p in (root / name).glob("*"))


def assert_consistent(gw: Any) -> None:
    """Every row has its file with the indexed size and checksum, every file a row,
    and the counts of series, studies and patients add up."""
    instances = rows(gw, Instance)
    on_disk = {p.relative_to(root_of(gw)).as_posix() for p in stored_files(gw)}
    assert on_disk == {row.path for row in instances}
    for row in instances:
        data = (root_of(gw) / row.path).read_bytes()
        assert len(data) == row.size and hashlib.sha256(data).hexdigest() == row.sha256
    for series in rows(gw, Series):
        mine = [i for i in instances if i.series_id == series.id]
        assert series.num_instances == len(mine) > 0
        assert series.size == sum(i.size for i in mine)
    all_series = rows(gw, Series)
    for study in rows(gw, Study):
        mine = [i for i in instances if i.study_id == study.id]
        assert study.num_instances == len(mine) > 0
        assert study.size == sum(i.size for i in mine)
        assert study.num_series == sum(1 for s in all_series if s.study_id == study.id)
    for patient in rows(gw, Patient):
        assert patient.num_studies == sum(1 for s in rows(gw, Study) if s.patient_id == patient.id)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def part10(ds: Dataset, folder: Path, name: str) -> Path:
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.stored: list[tuple[StoredInstance, Any]] = []
        self.received: list[tuple[list[StoredInstance], Any]] = []
        self.fail = fail

    @hookimpl
    def instance_stored(self, instance: StoredInstance, association: Any) -> None:
        self.stored.append((instance, association))
        if self.fail:
            raise RuntimeError("boom")

    @hookimpl
    def instances_received(self, instances: Sequence[StoredInstance], association: Any) -> None:
        self.received.append((list(instances), association))


# Storing and indexing ----------------------------------------------------------------


def test_stores_and_indexes_an_instance(dicomgate_start: Any) -> None:
    recorder = Recorder()
    gw = start(dicomgate_start, extra={"recorder": recorder})
    ds = image(patient=CYRILLIC, patient_id="ID-7", IssuerOfPatientID="CLINIC",
               ReferringPhysicianName="Петров^Пётр", SeriesDescription="Серия 1",
               BodyPartExamined="CHEST", StudyID="S1")
    assert send(gw, [ds], ae_title="CT_ROOM1") == [0x0000]
    [(instance, association)] = recorder.stored
    assert association.calling_ae == "CT_ROOM1"
    assert instance.sop_instance_uid == ds.SOPInstanceUID and not instance.replaced
    assert instance.patient_name == CYRILLIC and instance.modality == "OT"
    assert (instance.accession, instance.study_date, instance.series_number,
            instance.instance_number, instance.frames) == ("ACC1", "20240305", 1, 1, 1)
    assert instance.absolute_path == root_of(gw) / instance.path
    # the path comes from the UID's hash, not from received text
    digest = hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest()
    assert instance.path == f"{digest[:2]}/{digest}.dcm"

    data = instance.absolute_path.read_bytes()
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    stored = dcmread(BytesIO(data))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.get("SourceApplicationEntityTitle", "CT_ROOM1") == "CT_ROOM1"
    sent = DicomBytesIO()
    sent.is_little_endian, sent.is_implicit_VR = True, False
    write_dataset(sent, ds)
    meta_length = struct.unpack_from("<I", data, 140)[0]
    assert data[144 + meta_length:] == sent.getvalue()  # the data set as received

    [row] = rows(gw, Instance)
    assert (row.path, row.size, row.sha256) == (instance.path, len(data),
                                                hashlib.sha256(data).hexdigest())
    assert (row.calling_ae, row.address, row.frames, row.instance_number) == (
        "CT_ROOM1", "127.0.0.1", 1, 1)
    assert row.sop_class_uid == SecondaryCaptureImageStorage
    [patient] = rows(gw, Patient)
    assert (patient.patient_id, patient.issuer, patient.name, patient.birth_date,
            patient.sex) == ("ID-7", "CLINIC", CYRILLIC, "19800102", "M")
    assert "иванов иван петрович" in patient.search
    [study] = rows(gw, Study)
    assert (study.study_uid, study.date, study.time, study.accession, study.description,
            study.referring_physician, study.study_id, study.modalities) == (
        ds.StudyInstanceUID, "20240305", "101500", "ACC1", "Chest", "Петров^Пётр", "S1", "OT")
    [series] = rows(gw, Series)
    assert (series.series_uid, series.modality, series.number, series.description,
            series.body_part) == (ds.SeriesInstanceUID, "OT", 1, "Серия 1", "CHEST")
    [looked_up] = gw.gateway.hook.instances_of_study(gateway=gw.gateway,
                                                     study_uid=ds.StudyInstanceUID)
    assert looked_up == instance  # the same record, read back from the index
    assert (looked_up.accession, looked_up.study_date, looked_up.series_number,
            looked_up.instance_number, looked_up.frames) == ("ACC1", "20240305", 1, 1, 1)
    assert_consistent(gw)
    assert working_files(gw) == []


@pytest.mark.parametrize("charset", ["ISO_IR 144", ["", "ISO 2022 IR 144"], "ISO_IR 192"])
def test_cyrillic_character_sets(dicomgate_start: Any, charset: Any) -> None:
    gw = start(dicomgate_start)
    ds = image(patient=CYRILLIC, charset=charset, StudyDescription="Грудная клетка")
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    assert "Иванов".encode() not in encoded.getvalue() or charset == "ISO_IR 192"
    assert send(gw, [ds]) == [0x0000]
    [patient] = rows(gw, Patient)
    assert patient.name == CYRILLIC
    assert patient.search == search_text(CYRILLIC, "P1")
    [study] = rows(gw, Study)
    assert study.description == "Грудная клетка"


def test_instances_received_once_per_association(dicomgate_start: Any) -> None:
    recorder = Recorder()
    gw = start(dicomgate_start, extra={"recorder": recorder})
    study = generate_uid()
    datasets = [image(study=study, number=n) for n in range(1, 4)]
    assert send(gw, datasets, ae_title="MR1") == [0] * 3
    assert echo(gw) == 0x0000  # an association that stored nothing: no notification
    wait_until(lambda: len(recorder.received) >= 1)
    time.sleep(0.2)
    [(instances, association)] = recorder.received
    assert [i.sop_instance_uid for i in instances] == [d.SOPInstanceUID for d in datasets]
    assert association.calling_ae == "MR1"
    assert [i for i, _ in recorder.stored] == instances
    [study_row] = rows(gw, Study)
    assert study_row.num_instances == 3 and study_row.num_series == 3
    assert_consistent(gw)


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-filesystem", "other-filesystem"])
def test_streamed_data_sets(dicomgate_start: Any, monkeypatch: pytest.MonkeyPatch,
                            elsewhere: bool) -> None:
    """Data sets that arrive as a file (request.dataset_path) are stored the same way,
    even from a folder outside the store (pynetdicom's own temporary folder here)."""
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    if elsewhere:
        from dicomgate.plugins.storage.store import Store

        monkeypatch.setattr(Store, "on_store_filesystem", lambda self, path: False)
    gw = start(dicomgate_start)
    datasets = [image(number=n) for n in range(3)]
    assert send(gw, datasets) == [0x0000] * 3
    assert len(rows(gw, Instance)) == 3
    ordered = sorted(rows(gw, Instance), key=lambda r: r.instance_number)
    for row, ds in zip(ordered, datasets, strict=True):
        data = (root_of(gw) / row.path).read_bytes()
        assert data[:128] == bytes(128) and data.endswith(_encoded(ds))
    assert_consistent(gw)
    assert working_files(gw) == []


def test_failing_hook_does_not_fail_the_store(dicomgate_start: Any) -> None:
    boom = Recorder(fail=True)
    gw = start(dicomgate_start, extra={"boom": boom})
    ds = image()
    assert send(gw, [ds, image()]) == [0x0000, 0x0000]
    assert len(boom.stored) == 2
    assert len(rows(gw, Instance)) == 2
    assert_consistent(gw)


def test_missing_patient_id_is_not_merged(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start)
    assert send(gw, [image(patient_id="", patient="A^A"), image(patient_id="", patient="B^B"),
                     image(patient_id="X", patient="C^C"), image(patient_id="X", patient="C^C")]
                ) == [0] * 4
    patients = rows(gw, Patient)
    assert sorted(p.name for p in patients) == ["A^A", "B^B", "C^C"]
    assert_consistent(gw)


# Duplicates ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["keep-first", "overwrite", "overwrite-if-different"])
def test_duplicate_policy(dicomgate_start: Any, policy: str) -> None:
    recorder = Recorder()
    gw = start(dicomgate_start, extra={"recorder": recorder}, duplicates=policy)
    uid, study, series = generate_uid(), generate_uid(), generate_uid()
    first = image(uid=uid, study=study, series=series, number=1)
    second = image(uid=uid, study=study, series=series, number=2)
    assert send(gw, [first]) == [0x0000]
    [(original, _)] = recorder.stored
    original_bytes = original.absolute_path.read_bytes()
    assert send(gw, [second, second]) == [0x0000, 0x0000]
    [row] = rows(gw, Instance)
    stored = (root_of(gw) / row.path).read_bytes()
    if policy == "keep-first":
        assert len(recorder.stored) == 1
        assert stored == original_bytes and row.instance_number == 1
    elif policy == "overwrite":
        assert len(recorder.stored) == 3
        assert all(instance.replaced for instance, _ in recorder.stored[1:])
        assert row.instance_number == 2 and stored != original_bytes
    else:
        assert len(recorder.stored) == 2  # the identical third copy changes nothing
        assert recorder.stored[1][0].replaced and row.instance_number == 2
    assert len(stored_files(gw)) == 1
    [series_row] = rows(gw, Series)
    assert series_row.num_instances == 1 and series_row.size == row.size
    assert_consistent(gw)


def test_keep_first_heals_a_missing_file(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start)
    ds = image()
    assert send(gw, [ds]) == [0x0000]
    [row] = rows(gw, Instance)
    (root_of(gw) / row.path).unlink()
    assert send(gw, [ds]) == [0x0000]
    [row] = rows(gw, Instance)
    assert (root_of(gw) / row.path).is_file()
    assert_consistent(gw)


def test_overwrite_moving_an_instance_to_another_series(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start, duplicates="overwrite")
    uid, study = generate_uid(), generate_uid()
    assert send(gw, [image(uid=uid, study=study), image(uid=uid, study=generate_uid())]) == [0, 0]
    assert len(rows(gw, Study)) == 1 and len(rows(gw, Series)) == 1
    assert rows(gw, Study)[0].study_uid != study
    assert_consistent(gw)


# Failures the sender can act on ------------------------------------------------------


def test_reserve_refuses_with_out_of_resources(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start, reserve_mb=1 << 40)
    assert send(gw, [image(), image()]) == [0xA700, 0xA700]
    assert rows(gw, Instance) == [] and stored_files(gw) == [] and working_files(gw) == []
    assert echo(gw) == 0x0000


def test_disk_full_while_writing(dicomgate_start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = start(dicomgate_start)
    ok = image()
    assert send(gw, [ok]) == [0x0000]
    full = threading.Event()

    def no_space(*args: Any) -> Any:
        raise OSError(28, "No space left on device")

    for name in ("write", "fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real: no_space() if full.is_set()
                            else real(*a))
    full.set()
    assert send(gw, [image()]) == [0xA700]
    full.clear()
    # A folder flush that fails after the file was linked: the link goes too
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda *a: no_space())
    assert send(gw, [image()]) == [0xA700]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert stored_files(gw) and len(stored_files(gw)) == len(rows(gw, Instance)) == 1
    assert send(gw, [image()]) == [0x0000]
    assert len(rows(gw, Instance)) == 2  # what was stored before is still there
    assert working_files(gw) == []
    assert_consistent(gw)


def test_failed_index_transaction_removes_the_file(dicomgate_start: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import peewee

    from dicomgate.plugins.storage.store import Store

    gw = start(dicomgate_start)
    assert send(gw, [image()]) == [0x0000]
    real = Store._write_rows

    def broken(self: Any, *args: Any) -> Any:
        real(self, *args)  # the rows are written, then the transaction fails
        raise peewee.OperationalError("disk I/O error")

    monkeypatch.setattr(Store, "_write_rows", broken)
    assert send(gw, [image(), image()]) == [0xA700, 0xA700]
    monkeypatch.setattr(Store, "_write_rows", real)
    assert len(rows(gw, Instance)) == 1 and len(stored_files(gw)) == 1
    assert working_files(gw) == []
    assert send(gw, [image()]) == [0x0000]
    assert_consistent(gw)


def _file_with_data_set(ds: Dataset, data_set: bytes, folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
                     + data_set)
    return path


def _encoded(ds: Dataset) -> bytes:
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    return encoded.getvalue()


def test_undecodable_and_mismatched_data_sets(dicomgate_start: Any, tmp_path: Path) -> None:
    gw = start(dicomgate_start)
    truncated = image(size=64)
    garbage = image()
    no_study = image()
    del no_study.StudyInstanceUID
    mismatch = image()
    wrong_uid = copy.deepcopy(mismatch)
    wrong_uid.SOPInstanceUID = generate_uid()
    files = [
        _file_with_data_set(truncated, _encoded(truncated)[:-100], tmp_path, "truncated.dcm"),
        _file_with_data_set(garbage, b"\x08\x00\x05\x00CS\xff\xff" + os.urandom(64), tmp_path,
                            "garbage.dcm"),
        _file_with_data_set(no_study, _encoded(no_study), tmp_path, "no_study.dcm"),
        # the request names one SOP Instance, the data set another
        _file_with_data_set(mismatch, _encoded(wrong_uid), tmp_path, "mismatch.dcm"),
    ]
    statuses = send(gw, files)
    assert statuses[0] == 0xC000 and statuses[1] == 0xC000
    assert statuses[2] == 0xC001
    assert statuses[3] == 0xA900
    assert rows(gw, Instance) == [] and stored_files(gw) == [] and working_files(gw) == []
    assert send(gw, [image()]) == [0x0000]


def test_hostile_values_stay_inside_the_store(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start)
    hostile = [
        image(uid="../../../../tmp/x", study="../../etc", series="/abs/path"),
        image(uid="1.2.3/../../4", patient="../../" * 30, patient_id="a/b\\c\0d"),
        image(study=["1.2.3", "4"]),  # a backslash cannot be in a UID
        image(patient="x" * 500, patient_id="y" * 300, StudyDescription="z\0" * 400,
              AccessionNumber="../" * 40),
        image(study="9" * 70),  # longer than a UID may be
    ]
    statuses = send(gw, hostile)
    assert statuses == [0x0000, 0x0000, 0xC001, 0x0000, 0xC001]
    root = root_of(gw).resolve()
    for path in gw.data_dir.rglob("*"):
        assert path.resolve().is_relative_to(gw.data_dir.resolve())
        if path.is_file() and not path.name.startswith("index.sqlite"):
            assert path.resolve().is_relative_to(root), path
            assert path.relative_to(gw.data_dir / "files").parts[0] in {
                p.relative_to(gw.data_dir / "files").parts[0] for p in stored_files(gw)}
    for row in rows(gw, Instance):
        assert not row.path.startswith(("/", ".")) and ".." not in row.path
    for patient in rows(gw, Patient):
        assert "\0" not in patient.patient_id
    assert_consistent(gw)


# Interrupted transfers -----------------------------------------------------------------


def _send_half_then(gw: Any, how: str) -> None:
    """Start a C-STORE of a 4 MB data set, send half of it, then reset the connection
    or send an A-ABORT."""
    assoc = associate(gw, "ABORTER")
    assert assoc.is_established
    context = assoc.accepted_contexts[0]
    ds = image(size=2048)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(_encoded(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(context.context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    sock = assoc.dul.socket.socket
    for pdu in pdus[: len(pdus) // 2]:
        sock.sendall(pdu)
    time.sleep(0.3)
    if how == "abort":
        abort = A_ABORT_RQ()
        abort.source = 0x00
        abort.reason_diagnostic = 0x00
        sock.sendall(abort.encode())
        time.sleep(0.1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with linger 0: a TCP reset
    except OSError:  # after an A-ABORT the peer may have closed it already
        pass
    assoc.kill()


@pytest.mark.parametrize("how", ["reset", "abort"])
def test_interrupted_transfer_leaves_nothing(dicomgate_start: Any, how: str) -> None:
    recorder = Recorder()
    gw = start(dicomgate_start, extra={"recorder": recorder})
    assert send(gw, [image()]) == [0x0000]
    _send_half_then(gw, how)
    wait_until(lambda: not gw.server.ae.active_associations)
    assert len(rows(gw, Instance)) == 1 and len(stored_files(gw)) == 1
    assert working_files(gw) == []
    assert echo(gw) == 0x0000
    assert send(gw, [image()]) == [0x0000]
    assert len(rows(gw, Instance)) == 2
    assert_consistent(gw)


def test_leftovers_are_swept_at_start(dicomgate_start: Any, tmp_path: Path) -> None:
    root = tmp_path / "data" / "files"
    for folder in (".spool", ".tmp"):
        (root / folder).mkdir(parents=True)
    old = time.time() - 3600
    leftovers = [root / ".spool" / "tmp123.dcm", root / ".tmp" / "4194305-abc.part"]
    for path in leftovers:
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    gw = dicomgate_start(plugins=PLUGINS, data_dir=tmp_path / "data",
                         settings={"storage": {"reserve_mb": 0}})
    assert not any(path.exists() for path in leftovers)
    assert send(gw, [image()]) == [0x0000]


# Peers and permissions -----------------------------------------------------------------


def test_peer_permissions_for_store(dicomgate_start: Any) -> None:
    peers = [{"ae_title": "STOREONLY", "allow": ["store"]},
             {"ae_title": "ECHOONLY", "allow": ["echo"]}]
    gw = start(dicomgate_start, peers=peers)
    assert send(gw, [image()], ae_title="STOREONLY") == [0x0000]
    assert echo(gw, "STOREONLY") == 0x0124
    assert send(gw, [image()], ae_title="ECHOONLY") == [0x0124]
    assert echo(gw, "ECHOONLY") == 0x0000
    unknown = associate(gw, "STRANGER")
    assert unknown.is_rejected
    assert len(rows(gw, Instance)) == 1
    assert_consistent(gw)


# Concurrency ---------------------------------------------------------------------------


def test_parallel_senders_with_overlapping_uids(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start)
    studies = [generate_uid() for _ in range(3)]
    series = {study: generate_uid() for study in studies}
    datasets = [image(study=studies[n % 3], series=series[studies[n % 3]], number=n,
                      patient_id=f"P{n % 3}") for n in range(40)]
    results: list[list[int | None]] = []
    errors: list[BaseException] = []

    def sender(index: int) -> None:
        mine = datasets[index * 5:] + datasets[: index * 5]  # everyone sends everything
        try:
            results.append(send(gw, mine[:30], ae_title=f"SENDER{index}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert all(statuses == [0x0000] * 30 for statuses in results) and len(results) == 4
    sent_uids = {ds.SOPInstanceUID for i in range(4) for ds in
                 (datasets[i * 5:] + datasets[: i * 5])[:30]}
    instances = rows(gw, Instance)
    assert sorted(i.sop_instance_uid for i in instances) == sorted(sent_uids)
    assert len(rows(gw, Study)) == 3 and len(rows(gw, Patient)) == 3
    assert_consistent(gw)
    assert working_files(gw) == []


def test_on_postgresql(dicomgate_start: Any, postgres_database: str) -> None:
    """The same statements on PostgreSQL: store, replace, concurrent senders, search."""
    gw = dicomgate_start(plugins=PLUGINS, database=postgres_database,
                         settings={"storage": {"reserve_mb": 0, "duplicates": "overwrite"}})
    study = generate_uid()
    datasets = [image(study=study, number=n, patient=CYRILLIC) for n in range(12)]
    errors: list[BaseException] = []

    def sender(index: int) -> None:
        try:
            assert send(gw, datasets[index:] + datasets[:index]) == [0] * 12
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(rows(gw, Instance)) == 12
    assert rows(gw, Patient)[0].name == CYRILLIC
    assert_consistent(gw)
    gw.stop()


# Sent by DCMTK -------------------------------------------------------------------------


def test_dcmtk_storescu_many_files(dicomgate_start: Any, dcmtk: Any, tmp_path: Path) -> None:
    gw = start(dicomgate_start)
    study = generate_uid()
    files = [part10(image(study=study, number=n, patient=CYRILLIC), tmp_path, f"{n}.dcm")
             for n in range(20)]
    done = subprocess.run(
        [dcmtk("storescu"), "-v", "-aet", "DCMTK", "-aec", gw.ae_title, gw.host, str(gw.port),
         *map(str, files)], env=dict(os.environ, TCP_NODELAY="1"), capture_output=True,
        text=True, timeout=60)
    output = done.stdout + done.stderr
    assert output.count("Received Store Response (Success)") == 20, output
    [study_row] = rows(gw, Study)
    assert study_row.num_instances == 20
    assert rows(gw, Patient)[0].name == CYRILLIC
    assert {row.calling_ae for row in rows(gw, Instance)} == {"DCMTK"}
    assert_consistent(gw)


# Command line --------------------------------------------------------------------------


def write_config(tmp_path: Path, data_dir: Path, **storage: Any) -> Path:
    lines = [f'[gateway]\ndata_dir = "{data_dir}"\nport = 11112\n',
             '[plugins]\nenabled = ["verification", "storage"]\n',
             "[storage]\nreserve_mb = 0\n"]
    lines += [f"{key} = {json.dumps(value)}\n" for key, value in storage.items()]
    path = tmp_path / "dicomgate.toml"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_studies_command(dicomgate_start: Any, tmp_path: Path) -> None:
    gw = start(dicomgate_start)
    first, second = generate_uid(), generate_uid()
    assert send(gw, [
        image(study=first, patient="ИВАНОВ^ИВАН", patient_id="R1", StudyDate="20240110"),
        image(study=first, patient="ИВАНОВ^ИВАН", patient_id="R1", StudyDate="20240110",
              Modality="SR"),
        image(study=second, patient="Smith^Anna", patient_id="S-2", StudyDate="20240301",
              AccessionNumber="ACC2", Modality="CT"),
    ]) == [0, 0, 0]
    data_dir = gw.data_dir
    gw.stop()
    config = str(write_config(tmp_path, data_dir))

    result = run("studies", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["study_uid"] for r in records] == [second, first]  # newest first
    assert records[1]["patient"]["name"] == "ИВАНОВ^ИВАН"
    assert records[1]["modalities"] == ["OT", "SR"] and records[1]["instances"] == 2

    def uids(*options: str) -> list[str]:
        found = run("studies", "--config", config, "--json", *options)
        assert found.exit_code == 0, found.output
        return [r["study_uid"] for r in json.loads(found.output)]

    assert uids("--patient", "иванов") == [first]
    assert uids("--patient", "Иван иванов") == [first]
    assert uids("--patient", "иванов smith") == []
    assert uids("--patient", "s-2") == [second]
    assert uids("--date", "20240301") == [second]
    assert uids("--date", "20240101-20240201") == [first]
    assert uids("--date", "20240201-") == [second]
    assert uids("--modality", "sr") == [first]
    assert uids("--accession", "ACC2") == [second]
    assert uids("--limit", "1") == [second]
    text = run("studies", "--config", config, "--patient", "smith")
    assert "Smith^Anna" in text.output and second in text.output
    bad = CliRunner().invoke(cli, ["studies", "--config", config, "--date", "2024"])
    assert bad.exit_code != 0


def test_import_command(dicomgate_start: Any, tmp_path: Path) -> None:
    source = tmp_path / "cd"
    (source / "sub").mkdir(parents=True)
    study = generate_uid()
    datasets = [image(study=study, number=n, patient=CYRILLIC) for n in range(5)]
    for n, ds in enumerate(datasets):
        part10(ds, source / ("sub" if n % 2 else ""), f"IM{n}")
    part10(datasets[0], source, "copy-of-IM0.dcm")
    (source / "README.txt").write_text("not DICOM")
    broken = image()
    _file_with_data_set(broken, _encoded(broken)[:-50], source, "broken.dcm")
    data_dir = tmp_path / "data"
    config = str(write_config(tmp_path, data_dir))

    result = run("import", "--config", config, str(source))
    assert result.exit_code == 1, result.output  # one file was rejected
    assert "5 stored" in result.output and "1 duplicate" in result.output
    assert "1 rejected" in result.output and "1 skipped" in result.output
    assert "README.txt" in result.output
    again = run("import", "--config", config, str(source / "sub"))
    assert again.exit_code == 0 and "2 duplicate" in again.output

    gw = dicomgate_start(plugins=PLUGINS, data_dir=data_dir,
                         settings={"storage": {"reserve_mb": 0}})
    [study_row] = rows(gw, Study)
    assert study_row.num_instances == 5
    assert rows(gw, Patient)[0].name == CYRILLIC
    assert {row.calling_ae for row in rows(gw, Instance)} == {""}
    assert_consistent(gw)
    assert working_files(gw) == []


def test_verify_command(dicomgate_start: Any, tmp_path: Path) -> None:
    gw = start(dicomgate_start)
    assert send(gw, [image(number=n) for n in range(4)]) == [0] * 4
    data_dir = gw.data_dir
    instances = rows(gw, Instance)
    gw.stop()
    root = data_dir / "files"
    config = str(write_config(tmp_path, data_dir))

    clean = run("verify", "--config", config, "--checksums")
    assert clean.exit_code == 0, clean.output

    # a missing file, an unindexed copy of a valid instance, junk in the store
    (root / instances[0].path).unlink()
    orphan = image()
    orphan_path = root / "ab" / "stray.dcm"
    orphan_path.write_bytes(encode_file_meta(orphan.SOPClassUID, orphan.SOPInstanceUID,
                                             ExplicitVRLittleEndian) + _encoded(orphan))
    junk = root / "junk.txt"
    junk.write_text("junk")
    found = run("verify", "--config", config, "--grace", "0")
    assert found.exit_code == 1
    assert "missing file" in found.output and "stray.dcm" in found.output
    assert "junk.txt" in found.output

    repaired = run("verify", "--config", config, "--grace", "0", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert not junk.exists() and any((root / ".quarantine").iterdir())
    assert run("verify", "--config", config, "--grace", "0").exit_code == 0

    # a changed byte is only seen with --checksums, and cannot be repaired
    victim = root / instances[1].path
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert run("verify", "--config", config, "--grace", "0").exit_code == 0
    corrupt = run("verify", "--config", config, "--grace", "0", "--checksums", "--repair")
    assert corrupt.exit_code == 1 and "checksum mismatch" in corrupt.output

    gw = dicomgate_start(plugins=PLUGINS, data_dir=data_dir,
                         settings={"storage": {"reserve_mb": 0}})
    uids = {row.sop_instance_uid for row in rows(gw, Instance)}
    assert orphan.SOPInstanceUID in uids and instances[0].sop_instance_uid not in uids
    assert len(uids) == 4


def test_config_example_and_defaults() -> None:
    result = run("config", "example")
    assert "[storage]" in result.output and 'duplicates = "keep-first"' in result.output
    from dicomgate.plugins.storage.settings import StorageSettings

    settings = StorageSettings()
    assert (settings.root, settings.duplicates, settings.reserve_mb) == (
        Path("files"), "keep-first", 500)
    # Flushing is the gateway's [gateway] durable, not a storage setting
    assert "fsync" not in result.output.partition("[storage]")[2]
    assert not hasattr(settings, "fsync")


@pytest.mark.parametrize("durable", [True, False])
def test_durable_decides_the_flushes(dicomgate_start: Any, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path, durable: bool) -> None:
    """[gateway] durable = true flushes the file's data and its folder before the
    commit; false flushes neither (and the core relaxes the database's commits)."""
    from dicomgate.plugins.storage.store import store_for
    from dicomgate.testing import free_port

    # dicomgate_start has no option for [gateway] keys: give the whole section
    port, data_dir = free_port(), tmp_path / "data"
    gateway = {"ae_title": "DICOMGATE", "host": "127.0.0.1", "port": port,
               "data_dir": str(data_dir), "accept_unknown_peers": True, "durable": durable}
    gw = dicomgate_start(plugins=PLUGINS, port=port, data_dir=data_dir,
                         settings={"gateway": gateway, "storage": {"reserve_mb": 0}})
    assert store_for(gw.gateway).durable is durable
    flushed: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real: Any = real, name: str = name) -> None:
            flushed.append(name + (":dir" if os.path.isdir(f"/proc/self/fd/{fd}") else ":file"))
            real(fd)

        monkeypatch.setattr(os, name, spy)
    assert send(gw, [image()]) == [0x0000]
    expected = ["fdatasync:file", "fsync:dir"] if durable else []
    assert [f for f in flushed if f in ("fdatasync:file", "fsync:dir")] == expected
    assert_consistent(gw)


# Reading headers -----------------------------------------------------------------------


def _part10_bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(buffer, enforce_file_format=True,
               implicit_vr=syntax == "1.2.840.10008.1.2",
               little_endian=syntax != "1.2.840.10008.1.2.2")
    return buffer.getvalue()


def _nested(ds: Dataset) -> Dataset:
    inner = Dataset()
    inner.PatientName = "Inner^Name"  # not the patient's: inside a sequence
    inner.ReferencedSOPInstanceUID = generate_uid()
    deeper = Dataset()
    deeper.CodeValue = "123"
    inner.ConceptNameCodeSequence = [deeper]
    ds.ReferencedImageSequence = [inner, Dataset()]
    # undefined lengths, as many devices write them: the reader must find the ends
    elem = ds["ReferencedImageSequence"]
    elem.is_undefined_length = True
    for item in elem.value:
        item.is_undefined_length_sequence_item = True
    return ds


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                    "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"])
def test_header_reader_walks_sequences(syntax: str) -> None:
    from dicomgate.plugins.storage.header import read_header, read_meta

    ds = _nested(image(patient=CYRILLIC))
    data = _part10_bytes(ds, syntax)
    header = read_header(data, read_meta(data))
    assert header.patient_name == CYRILLIC  # the top-level one
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert (header.study_date, header.instance_number, header.frames) == ("20240305", 1, 1)


SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99")


def _ending_in_a_sequence() -> Dataset:
    """An image without pixels whose last element is a sequence of undefined length
    with items of undefined length."""
    ds = _nested(image())
    del ds.PixelData
    moved = copy.deepcopy(ds["ReferencedImageSequence"])
    del ds.ReferencedImageSequence
    content = DataElement(0x0040A730, "SQ", moved.value)  # the last element
    content.is_undefined_length = True
    ds.add(content)
    return ds


@pytest.mark.parametrize("cut", [2, 9, 40, 120])
def test_header_reader_refuses_truncated_data(cut: int) -> None:
    from dicomgate.plugins.storage.header import Malformed, read_header, read_meta

    for syntax in SYNTAXES:
        data = _part10_bytes(_ending_in_a_sequence(), syntax)
        read_header(data, read_meta(data))  # whole, it is fine
        with pytest.raises(Malformed):
            read_header(data[:-cut], read_meta(data))


def _last_element_at(ds: Dataset, syntax: str, tag: int) -> tuple[bytes, int]:
    """The Part 10 bytes of ``ds`` and the offset where its element ``tag`` starts."""
    data = _part10_bytes(ds, syntax)
    without = copy.deepcopy(ds)
    del without[tag]
    return data, len(_part10_bytes(without, syntax))


def _encapsulated(ds: Dataset) -> Dataset:
    """``ds`` with JPEG-like encapsulated Pixel Data of two fragments, the second
    holding the bytes of a Sequence Delimitation Item (as pydicom's
    JPEG2000-embedded-sequence-delimiter.dcm does)."""
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    frame = b"\xff\xd8" + bytes(range(200)) + b"\xfe\xff\xdd\xe0\0\0\0\0" + b"\x01" * 60 + b"\xff\xd9"
    ds.PixelData = encapsulate([frame], fragments_per_frame=2)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("syntax", SYNTAXES[:3])
def test_header_reader_refuses_every_cut_of_the_last_element(syntax: str) -> None:
    """A file cut anywhere inside its last element (a sequence of undefined length,
    defined-length pixel data) is refused, whichever byte the cut falls on."""
    from dicomgate.plugins.storage.header import Malformed, read_header, read_meta

    cases = [_last_element_at(_ending_in_a_sequence(), syntax, 0x0040A730),
             _last_element_at(image(size=8), syntax, 0x7FE00010)]
    for data, start in cases:
        meta = read_meta(data)
        read_header(data, meta)
        read_header(data[:start], meta)  # cut between elements: a shorter data set
        for cut in range(start + 1, len(data)):
            if not any(data[start:cut]):
                continue  # nothing but zeros after the last element: padding
            with pytest.raises(Malformed):
                read_header(data[:cut], meta)


def test_header_reader_refuses_every_cut_of_encapsulated_pixel_data() -> None:
    from dicomgate.plugins.storage.header import Malformed, read_header, read_meta

    ds = _encapsulated(image())
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta = read_meta(data)
    assert read_header(data, meta).frames == 1
    start = data.index(b"\xe0\x7f\x10\x00OB")
    for cut in range(start + 1, len(data)):
        with pytest.raises(Malformed):
            read_header(data[:cut], meta)


def test_header_reader_refuses_stray_bytes_and_delimiters() -> None:
    from dicomgate.plugins.storage.header import Malformed, read_header, read_meta

    data = _part10_bytes(image())
    meta = read_meta(data)
    read_header(data + b"\0" * 5, meta)  # zero padding after the last element
    for tail in (b"\x08", b"\x10\x00\x10",  # a cut element header
                 b"\xfe\xff\x0d\xe0\0\0\0\0",  # item delimiter at the top level
                 b"\xfe\xff\xdd\xe0\0\0\0\0\x08\x00\x05\x00CS\x02\x00AB"):
        with pytest.raises(Malformed):
            read_header(data + tail, meta)


def test_dataset_offset_does_not_trust_the_group_length(tmp_path: Path) -> None:
    from dicomgate.plugins.storage.header import read_meta
    from dicomgate.plugins.storage.store import dataset_offset

    ds = image()
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    wrong = meta[:140] + struct.pack("<I", struct.unpack_from("<I", meta, 140)[0] + 8) + meta[144:]
    path = tmp_path / "wrong-group-length.dcm"
    path.write_bytes(wrong + _encoded(ds))
    assert read_meta(path.read_bytes()).dataset_offset == len(meta) == dataset_offset(path)


def test_large_values_are_skipped_not_read(tmp_path: Path) -> None:
    """A large instance costs no more memory than a small one: Pixel Data and large
    values inside sequences are skipped, the file is hashed in blocks."""
    import tracemalloc

    from dicomgate.plugins.storage.header import Malformed
    from dicomgate.plugins.storage.store import inspect_file

    ds = image(size=16)
    ds.PixelData = bytes(24 << 20)
    ds.Rows = ds.Columns = 4096
    ds.BitsAllocated = 16
    waveform = Dataset()
    waveform.WaveformBitsAllocated = 16
    waveform.WaveformData = bytes(8 << 20)  # inside a sequence item
    ds.WaveformSequence = [waveform]
    ds["WaveformSequence"].is_undefined_length = True
    waveform.is_undefined_length_sequence_item = True
    path = part10(ds, tmp_path, "large.dcm")
    tracemalloc.start()
    try:
        info = inspect_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.header.sop_instance_uid == ds.SOPInstanceUID and info.size > 32 << 20
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 2 << 20, f"{peak} bytes allocated to read a {info.size}-byte file"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(Malformed):
        inspect_file(path)
    # a value in an item that claims to run far past the end of a large file
    at = data.index(b"\x00\x54\x10\x10OW")
    path.write_bytes(data[:at + 8] + struct.pack("<I", 0xFFFFFFF0) + data[at + 12:])
    with pytest.raises(Malformed):
        inspect_file(path)


def test_large_deflated_data_set_is_inflated_in_blocks(tmp_path: Path) -> None:
    import tracemalloc

    from dicomgate.plugins.storage.header import INFLATE_IN_MEMORY, Malformed
    from dicomgate.plugins.storage.store import inspect_file

    ds = image(size=16)
    ds.PixelData = bytes(3 * INFLATE_IN_MEMORY)  # inflates past what stays in memory
    ds.Rows = ds.Columns = 2048
    ds.BitsAllocated = 16
    path = tmp_path / "deflated.dcm"
    path.write_bytes(_part10_bytes(ds, "1.2.840.10008.1.2.1.99"))
    tracemalloc.start()
    try:
        info = inspect_file(path, scratch_dir=str(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.header.sop_instance_uid == ds.SOPInstanceUID
    assert info.size < INFLATE_IN_MEMORY and peak < INFLATE_IN_MEMORY + (4 << 20)
    assert not list(tmp_path.glob("tmp*"))  # the inflated copy is gone
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(Malformed):
        inspect_file(path, scratch_dir=str(tmp_path))


def test_a_known_digest_spares_hashing_and_a_wrong_size_is_not_trusted(tmp_path):
    from dicomgate.plugins.storage.store import inspect_file, inspect_open

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = "DIGEST"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    path = tmp_path / "a.dcm"
    path.write_bytes(encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID,
                                      ExplicitVRLittleEndian) + body.getvalue())
    real = inspect_file(path)
    assert real.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as fh:
        trusted = inspect_open(fh, digest=(real.size, "f" * 64))
    assert trusted.sha256 == "f" * 64 and trusted.header == real.header
    with open(path, "rb") as fh:
        assert inspect_open(fh, digest=(real.size + 1, "f" * 64)).sha256 == real.sha256
