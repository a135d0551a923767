"""Every storage instance among pydicom's test files, sent by DCMTK storescu and by
pynetdicom to the storage plugin, is stored as received and indexed correctly.

One gateway serves the whole module: the files are sent in a few associations (one
per DCMTK transfer-syntax option, one for pynetdicom) by a module fixture, which
records what each send answered and what was stored at that moment; the
parametrized tests then check each file. The duplicate policy is ``overwrite``
because several test files share a SOP Instance UID: every accepted file is then
stored again, and checked as the copy it was.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs
import pydicom
import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.sop_class import _STORAGE_CLASSES

from dicomgate import hookimpl
from dicomgate.config import PluginSelection
from dicomgate.gateway import Gateway, configure
from dicomgate.manager import Plugins
from dicomgate.plugins.storage.models import Instance, Patient, Series, Study
from dicomgate.server import Server
from dicomgate.testing import build_config, find_dcmtk, free_port, missing

DATA = Path(pydicom.__file__).parent / "data"
STORAGE_CLASSES = set(_STORAGE_CLASSES.values())
#: Files whose data set is cut short: both senders must get a failure, nothing stored.
TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
#: DCMTK storescu option that proposes a file's transfer syntax (with -R).
DCMTK_OPTION = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
SENDERS = ("dcmtk", "pynetdicom")
#: Files DCMTK storescu cannot parse, so never sends (it skips them with a warning).
DCMTK_UNREADABLE = {
    "SC_rgb_jpeg.dcm": "DCMTK cannot parse it: implicit VR data set in an explicit VR file",
    "rtdose_rle.dcm": "DCMTK cannot parse it: Pixel Data of odd length",
    "rtdose_rle_1frame.dcm": "DCMTK cannot parse it: Pixel Data of odd length",
}
#: The request's UIDs come from the file meta with pynetdicom, from the data set with
#: DCMTK: a file whose two disagree is refused (0xA900) when pynetdicom sends it.
META_MISMATCH = "file meta and data set UIDs differ"
NO_STUDY = "no Study/Series Instance UID"


@attrs.frozen
class CorpusFile:
    path: Path
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    #: "stored", or the reason a failure status is expected
    expect: str
    meta_matches: bool = True

    def expect_for(self, sender: str) -> str:
        if self.expect == "stored" and sender == "pynetdicom" and not self.meta_matches:
            return META_MISMATCH
        return self.expect

    @property
    def name(self) -> str:
        return self.path.relative_to(DATA).as_posix()


def classify(path: Path) -> CorpusFile | str:
    """A file to send, or the reason it is not a storage instance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            return "not a DICOM Part 10 file"
        except Exception as exc:  # pragma: no cover - pydicom cannot read it at all
            return f"unreadable ({type(exc).__name__})"
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta else None
    if syntax is None:
        return "no transfer syntax in file meta"
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    if sop_class not in STORAGE_CLASSES:
        name = getattr(sop_class, "name", None) or "none"
        return f"not a storage SOP class ({name})"
    expect = "stored"
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        expect = "no SOP Class/Instance UID in the data set"
    elif path.name in TRUNCATED:
        expect = "truncated"
    elif "StudyInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        expect = NO_STUDY
    matches = (ds.get("SOPInstanceUID") == meta.get("MediaStorageSOPInstanceUID")
               and ds.get("SOPClassUID") == meta.get("MediaStorageSOPClassUID"))
    return CorpusFile(path, str(syntax), str(sop_class),
                      str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")),
                      expect, matches)


def corpus() -> tuple[list[CorpusFile], list[Any]]:
    files, params = [], []
    for path in sorted([*DATA.joinpath("test_files").rglob("*"),
                        *DATA.joinpath("charset_files").rglob("*")]):
        if not path.is_file():
            continue
        found = classify(path)
        name = path.relative_to(DATA).as_posix()
        if isinstance(found, str):
            for sender in SENDERS:
                params.append(pytest.param(sender, name, id=f"{sender}-{name}-skip({found})",
                                           marks=pytest.mark.skip(reason=found)))
            continue
        files.append(found)
        for sender in SENDERS:
            if sender == "dcmtk" and path.name in DCMTK_UNREADABLE:
                reason = DCMTK_UNREADABLE[path.name]
                params.append(pytest.param(sender, name, id=f"{sender}-{name}-skip({reason})",
                                           marks=pytest.mark.skip(reason=reason)))
                continue
            expect = found.expect_for(sender)
            label = "" if expect == "stored" else f"-refused({expect})"
            params.append(pytest.param(sender, name, id=f"{sender}-{name}{label}"))
    return files, params


FILES, PARAMS = corpus()


@attrs.define
class Sent:
    """One file sent by one sender: what it answered, what was stored then."""

    success: bool
    status: str
    stored: dict[str, Any] | None = None


class Recorder:
    """Snapshots the stored file and its index rows whenever an instance is stored."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    @hookimpl
    def instance_stored(self, instance: Any) -> None:
        row = (Instance.select(Instance, Series, Study, Patient).join(Series)
               .join(Study).join(Patient).where(Instance.id == instance.id).get())
        self.events.append({
            "instance": instance,
            "bytes": instance.absolute_path.read_bytes(),
            "row": row,
        })


def parse_storescu(output: str) -> list[tuple[str, str]]:
    """(file, response) for each file DCMTK storescu sent, from its -v output."""
    results: list[tuple[str, str]] = []
    current = None
    for line in output.splitlines():
        sending = re.match(r"I: Sending file: (.*)$", line)
        if sending:
            current = sending.group(1).strip()
            continue
        response = re.match(r"I: Received Store Response \((.*)\)", line)
        if response and current is not None:
            results.append((current, response.group(1)))
            current = None
        elif current is not None and line.startswith("E: Store Failed"):
            results.append((current, "not sent"))
            current = None
    return results


def send_with_dcmtk(storescu: str, port: int, recorder: Recorder,
                    results: dict[tuple[str, str], Sent]) -> None:
    groups: dict[str, list[CorpusFile]] = defaultdict(list)
    for item in FILES:
        if item.transfer_syntax in DCMTK_OPTION and item.expect in ("stored", NO_STUDY):
            groups[item.transfer_syntax].append(item)
    by_path = {str(item.path): item for item in FILES}
    env = dict(os.environ, TCP_NODELAY="1")
    for syntax, items in groups.items():
        seen = len(recorder.events)
        done = subprocess.run(
            [storescu, "-v", "-R", "-nh", DCMTK_OPTION[syntax], "-aet", "CORPUS",
             "-aec", "DICOMGATE", "127.0.0.1", str(port), *(str(i.path) for i in items)],
            env=env, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        for sent_path, response in parse_storescu(output):
            item = by_path[sent_path]
            success = response == "Success"
            sent = Sent(success, response)
            if success:
                sent.stored = recorder.events[seen]
                seen += 1
            results[("dcmtk", item.name)] = sent
    # DCMTK refuses to read truncated files and files without SOP Class/Instance
    # UID at all (and stops the whole run): nothing to send.
    for item in FILES:
        results.setdefault(("dcmtk", item.name), Sent(False, "not sent by DCMTK"))


def send_with_pynetdicom(port: int, recorder: Recorder,
                         results: dict[tuple[str, str], Sent]) -> None:
    ae = AE(ae_title="CORPUS")
    for pair in sorted({(item.sop_class_uid, item.transfer_syntax) for item in FILES}):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATE")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        for item in FILES:
            seen = len(recorder.events)
            status = assoc.send_c_store(item.path)
            code = getattr(status, "Status", None)
            sent = Sent(code == 0x0000, "none" if code is None else f"0x{code:04X}")
            if sent.success:
                assert len(recorder.events) == seen + 1
                sent.stored = recorder.events[seen]
            results[("pynetdicom", item.name)] = sent
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Sent]:
    storescu = find_dcmtk("storescu")
    if storescu is None:
        missing("DCMTK's storescu is not installed")
    data_dir = tmp_path_factory.mktemp("corpus")
    config = build_config(data_dir, free_port(), ["verification", "storage"],
                          settings={"storage": {"duplicates": "overwrite", "reserve_mb": 0}})
    plugins = Plugins()
    plugins.load(PluginSelection(enabled=("verification", "storage")))
    recorder = Recorder()
    plugins.register(recorder, "recorder", package="test")
    plugins.check()
    gateway = Gateway.open(configure(config, plugins), plugins)
    server = Server(gateway)
    results: dict[tuple[str, str], Sent] = {}
    try:
        _, port = server.start()
        send_with_dcmtk(storescu, port, recorder, results)
        send_with_pynetdicom(port, recorder, results)
        # Nothing outside the storage root, no leftover working files
        root = data_dir / "files"
        for path in data_dir.rglob("*"):
            if path.is_file():
                assert path.is_relative_to(root) or path.name.startswith("index.sqlite"), path
        assert not any((root / ".spool").iterdir())
        assert not any((root / ".tmp").iterdir())
        yield results
    finally:
        server.stop()
        gateway.close()


def _dataset_bytes(data: bytes) -> tuple[Any, bytes]:
    from dicomgate.plugins.storage.header import read_meta

    meta = read_meta(data)
    return meta, data[meta.dataset_offset:]


@functools.cache
def _read_file(path: Path) -> pydicom.Dataset:
    return _read(path.read_bytes())


def _read(data: bytes) -> pydicom.Dataset:
    from io import BytesIO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(BytesIO(data))


def _same_elements(first: pydicom.Dataset, second: pydicom.Dataset) -> None:
    """Same elements and values; group lengths and trailing padding (which a sender may
    drop or add when it re-encodes) aside."""

    def tags(ds: pydicom.Dataset) -> set[int]:
        return {elem.tag for elem in ds if elem.tag.element != 0 and elem.tag != 0xFFFCFFFC}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first_tags, second_tags = tags(first), tags(second)
        assert first_tags == second_tags
        for elem in first:
            if elem.tag not in first_tags or elem.VR == "SQ" or elem.tag == 0x7FE00010:
                continue
            assert elem.value == second[elem.tag].value, elem


@pytest.mark.parametrize(("sender", "name"), PARAMS)
def test_corpus_file(sent: dict[tuple[str, str], Sent], sender: str, name: str) -> None:
    item = next(item for item in FILES if item.name == name)
    result = sent.get((sender, name))
    assert result is not None, f"{sender} did not send {name}"
    expect = item.expect_for(sender)
    if expect != "stored":
        assert not result.success, f"{name} ({expect}) was acknowledged"
        if expect == META_MISMATCH:
            assert result.status == "0xA900"
        elif sender == "pynetdicom":
            assert result.status.startswith("0xC"), result.status
        return
    assert result.success, f"{sender} got {result.status} for {name}"
    stored = result.stored
    data: bytes = stored["bytes"]
    instance = stored["instance"]
    row = stored["row"]
    original = item.path.read_bytes()

    # A Part 10 file: zeroed preamble, file meta from the request
    assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"
    meta, dataset = _dataset_bytes(data)
    assert meta.sop_class_uid == item.sop_class_uid
    assert meta.sop_instance_uid == item.sop_instance_uid
    assert meta.transfer_syntax == instance.transfer_syntax

    # As received: byte-identical when sent in the file's own transfer syntax
    original_meta, original_dataset = _dataset_bytes(original)
    stored_ds, original_ds = _read(data), _read_file(item.path)
    if sender == "pynetdicom" or meta.transfer_syntax != item.transfer_syntax:
        if meta.transfer_syntax == item.transfer_syntax:
            assert dataset == original_dataset
        else:
            _same_elements(stored_ds, original_ds)
    else:
        # DCMTK re-encodes what it read (group lengths, padding, sequence lengths),
        # so the bytes it sends differ from the file's: same elements, same pixel data.
        # (Byte identity with what arrived is shown by pynetdicom's raw sends.)
        _same_elements(stored_ds, original_ds)
        if "PixelData" in original_ds:
            assert stored_ds.PixelData == original_ds.PixelData

    # Indexed as pydicom reads it
    assert row.sop_instance_uid == item.sop_instance_uid
    assert row.sop_class_uid == item.sop_class_uid
    assert row.transfer_syntax == meta.transfer_syntax
    assert row.size == len(data) == instance.size
    assert row.sha256 == hashlib.sha256(data).hexdigest() == instance.sha256
    assert row.path == instance.path and not row.path.startswith(("/", "."))
    assert row.calling_ae == "CORPUS" and row.address == "127.0.0.1"
    assert row.instance_number == _integer(original_ds.get("InstanceNumber"))
    frames = _integer(original_ds.get("NumberOfFrames"))
    expected_frames = frames if frames is not None else (1 if "Rows" in original_ds else 0)
    assert row.frames == expected_frames
    series, study, patient = row.series, row.series.study, row.series.study.patient
    assert series.series_uid == original_ds.SeriesInstanceUID
    assert study.study_uid == original_ds.StudyInstanceUID
    # Series, study and patient rows hold the values of the file that created them
    # (files sharing these UIDs may differ): one of the files with that UID.
    same_series = [i for i in FILES if i.expect == "stored"
                   and _read_file(i.path).SeriesInstanceUID == series.series_uid]
    candidates = [_read_file(i.path) for i in same_series]
    assert series.modality in {str(ds.get("Modality", "")) for ds in candidates}
    assert study.date in {str(ds.get("StudyDate", "")) for ds in candidates}
    assert study.accession in {str(ds.get("AccessionNumber", "")) for ds in candidates}
    assert patient.name in {str(ds.get("PatientName", "")) for ds in candidates} | {
        str(i.get("PatientName", "")) for i in _patients_with(patient.patient_id)}
    assert series.num_instances >= 1 and study.num_instances >= series.num_instances


def _integer(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _patients_with(patient_id: str) -> list[pydicom.Dataset]:
    return [ds for ds in (_read_file(i.path) for i in FILES if i.expect == "stored")
            if str(ds.get("PatientID", "")) == patient_id]


def test_corpus_has_cyrillic_names(sent: dict[tuple[str, str], Sent]) -> None:
    """pydicom's ISO_IR 144 file is indexed with its Cyrillic name."""
    result = sent[("pynetdicom", "charset_files/chrRuss.dcm")]
    assert result.success
    expected = str(_read(DATA.joinpath("charset_files/chrRuss.dcm").read_bytes()).PatientName)
    assert any("\u0400" <= ch <= "\u04ff" for ch in expected)
    assert result.stored["instance"].patient_name == expected
