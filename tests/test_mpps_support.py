"""Helpers for the MPPS tests (no tests here): a modality that sends MPPS and images,
and a HIS that receives webhooks."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from dicomgate.plugins.mpps.webhook import SIGNATURE_HEADER, verify

MPPS = ModalityPerformedProcedureStep
SECRET = "s3cret-shared-with-the-HIS"


# The modality -------------------------------------------------------------------------------


def mpps_create(study_uid: str, accession: str = "", procedure_id: str = "",
                step_id: str = "", station: str = "CT1", modality: str = "CT",
                patient_id: str = "P1", patient_name: str = "Doe^John",
                series: Sequence[tuple[str, Sequence[str]]] = (), charset: str | None = None,
                references: Sequence[dict[str, str]] | None = None, **extra: Any) -> Dataset:
    """An N-CREATE attribute list as a modality sends it (IN PROGRESS)."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    items = []
    for ref in references or [{"study_uid": study_uid, "accession": accession,
                               "procedure_id": procedure_id, "step_id": step_id}]:
        item = Dataset()
        item.StudyInstanceUID = ref["study_uid"]
        item.ReferencedStudySequence = []
        item.AccessionNumber = ref.get("accession", "")
        item.RequestedProcedureID = ref.get("procedure_id", "")
        item.RequestedProcedureDescription = ""
        item.ScheduledProcedureStepID = ref.get("step_id", "")
        item.ScheduledProcedureStepDescription = ""
        item.ScheduledProtocolCodeSequence = []
        items.append(item)
    ds.ScheduledStepAttributesSequence = items
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19800102"
    ds.PatientSex = "M"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS" + generate_uid()[-8:]
    ds.PerformedStationAETitle = station
    ds.PerformedStationName = "CT room 1"
    ds.PerformedLocation = "Room 1"
    ds.PerformedProcedureStepStartDate = "20250520"
    ds.PerformedProcedureStepStartTime = "103000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT head"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = []
    ds.Modality = modality
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = [series_item(uid, refs) for uid, refs in series]
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def series_item(series_uid: str, instance_uids: Iterable[str],
                sop_class: str = SecondaryCaptureImageStorage) -> Dataset:
    item = Dataset()
    item.PerformingPhysicianName = ""
    item.ProtocolName = "Head routine"
    item.OperatorsName = "Tech^One"
    item.SeriesInstanceUID = series_uid
    item.SeriesDescription = "Axial"
    item.RetrieveAETitle = ""
    refs = []
    for uid in instance_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    item.ReferencedImageSequence = refs
    item.ReferencedNonImageCompositeSOPInstanceSequence = []
    return item


def mpps_final(status: str = "COMPLETED", series: Sequence[tuple[str, Sequence[str]]] = (),
               charset: str | None = None, **extra: Any) -> Dataset:
    """An N-SET modification list that finishes the step."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20250520"
    ds.PerformedProcedureStepEndTime = "104500"
    ds.PerformedSeriesSequence = [series_item(uid, refs) for uid, refs in series]
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def settle(assoc: Any) -> None:
    """Wait until a requestor association's reactor has resumed after the last request.

    Stock pynetdicom requestors have a race (closed on dicomgate's own side by
    ``dicomgate.tuning``): a request sent right after the previous response, while the
    reactor still reports itself paused, can have its response taken by the reactor and
    dropped as "unexpected", and the request then times out. Devices send MPPS
    messages minutes apart; tests send them back to back.
    """
    deadline = time.monotonic() + 2.0
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.0005)


@attrs.define
class Modality:
    """An MPPS SCU on one association (a context manager)."""

    port: int
    calling: str = "CT1"
    called: str = "DICOMGATE"
    transfer_syntax: str = ExplicitVRLittleEndian
    assoc: Any = None
    #: The Affected SOP Instance UID of each N-CREATE response, in order.
    created_uids: list[str | None] = attrs.Factory(list)

    def __enter__(self) -> Modality:
        ae = AE(ae_title=self.calling)
        ae.add_requested_context(MPPS, self.transfer_syntax)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        self.assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called,
                                  evt_handlers=[(evt.EVT_DIMSE_RECV, self._received)])
        assert self.assoc.is_established, "association refused"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def _received(self, event: Any) -> None:
        message = event.message
        if type(message).__name__ == "N_CREATE_RSP":
            uid = message.command_set.get("AffectedSOPInstanceUID")
            self.created_uids.append(str(uid) if uid else None)

    def create(self, ds: Dataset, uid: str | None = None) -> tuple[int, str | None]:
        """N-CREATE; returns (status, the instance UID the SCP confirmed)."""
        settle(self.assoc)
        status, _ = self.assoc.send_n_create(ds, MPPS, uid)
        return int(status.Status), self.created_uids[-1] if self.created_uids else None

    def set(self, uid: str, ds: Dataset) -> Dataset:
        """N-SET; returns the status data set (Status, ErrorComment ...)."""
        settle(self.assoc)
        status, _ = self.assoc.send_n_set(ds, MPPS, uid)
        return status


def create(port: int, ds: Dataset, uid: str | None = None, calling: str = "CT1") -> int:
    with Modality(port, calling) as modality:
        return modality.create(ds, uid)[0]


def n_set(port: int, uid: str, ds: Dataset, calling: str = "CT1") -> Dataset:
    with Modality(port, calling) as modality:
        return modality.set(uid, ds)


def image(study_uid: str, series_uid: str, uid: str, patient_id: str = "P1",
          number: int = 1, accession: str = "") -> Dataset:
    """A small secondary capture image of the study."""
    from pydicom.dataset import FileMetaDataset

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Doe^John"
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.StudyDate = "20250520"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes([number % 256]) * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def store(port: int, datasets: Sequence[Dataset], calling: str = "CT1") -> list[int]:
    """C-STORE each data set on one association; their statuses."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATE")
    assert assoc.is_established
    try:
        statuses = []
        for ds in datasets:
            settle(assoc)
            statuses.append(int(assoc.send_c_store(ds).Status))
        return statuses
    finally:
        assoc.release()


# The HIS ----------------------------------------------------------------------------------


@attrs.frozen
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def signed(self) -> bool:
        return verify(SECRET, self.body, self.headers.get(SIGNATURE_HEADER, ""))


def reserve_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class His:
    """An HTTP receiver on 127.0.0.1 that records every POST. ``answer`` decides the
    HTTP status of each request (default 200); ``stop()`` makes the HIS unreachable
    and ``start()`` brings it back on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or reserve_port()
        #: Requests answered with success, and every request (retries included).
        self.received: list[Received] = []
        self.attempts: list[Received] = []
        self.answer: Callable[[Received], int] = lambda request: 200
        self.delay = 0.0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomgate/events"

    def start(self) -> His:
        his = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                request = Received(self.path, dict(self.headers.items()), body)
                with his._lock:
                    his.attempts.append(request)
                if his.delay:
                    time.sleep(his.delay)
                status = his.answer(request)
                if 200 <= status < 300:
                    with his._lock:
                        his.received.append(request)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            found = [r.json for r in self.received]
        return [e for e in found if type_ is None or e["type"] == type_]


def webhook_settings(his: His, **extra: Any) -> dict[str, Any]:
    return {"webhook_url": his.url, "webhook_secret": SECRET, "webhook_timeout": 2.0,
            "retry_initial": 0.05, "retry_factor": 2.0, "retry_max": 0.2,
            "poll_interval": 0.2, **extra}


def wait_for(predicate: Callable[[], Any], seconds: float = 10.0, step: float = 0.02) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(step)
