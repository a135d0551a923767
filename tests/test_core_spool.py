"""C-STORE services with a spool folder get each data set as a Part 10 file there,
and a transfer cut off midway leaves nothing behind."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from conftest import wait_until
from dicomgate import Dimse, Service, hookimpl, tuning


def image(rows: int, columns: int, frames: int = 1) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Spool", "SPOOL1", "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(range(256)) * (rows * columns * frames * 2 // 256) or b"\0\0" * rows * columns
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class Spooling:
    """A C-STORE service that keeps a copy of what it was handed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.received: list[tuple[Path, bytes]] = []
        self.digests: list[tuple[int, str] | None] = []

    @hookimpl
    def register_services(self, register):
        register(Service(name="store", sop_classes=[SecondaryCaptureImageStorage],
                         handlers={Dimse.C_STORE: self.store}, spool_dir=self.folder))

    def store(self, request):
        path = request.dataset_path
        self.received.append((path, path.read_bytes()))
        self.digests.append(request.dataset_digest)
        return 0x0000


def store_association(port: int):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="DICOMGATE")


def test_the_handler_gets_a_part10_file_in_the_spool_folder(dicomgate_start, tmp_path):
    spool = tmp_path / "spool"
    spooling = Spooling(spool)
    running = dicomgate_start(extra_plugins={"spooling": spooling})
    sent = image(32, 32)
    assoc = store_association(running.port)
    try:
        assert assoc.send_c_store(sent).Status == 0x0000
    finally:
        assoc.release()
    [(path, data)] = spooling.received
    assert path.parent == spool
    assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(data)
    received = pydicom.dcmread(copy)
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert received.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert received.PixelData == sent.PixelData
    assert wait_until(lambda: not any(spool.iterdir()))  # pynetdicom removes it after


def test_a_transfer_cut_off_midway_leaves_no_file(dicomgate_start, tmp_path):
    spool = tmp_path / "spool"
    spooling = Spooling(spool)
    running = dicomgate_start(extra_plugins={"spooling": spooling})
    assoc = store_association(running.port)
    big = image(1024, 1024, frames=24)  # 48 MiB: still arriving when the reset comes
    sender = threading.Thread(target=lambda: assoc.send_c_store(big), daemon=True)
    sender.start()
    assert wait_until(lambda: any(p.stat().st_size > 1_000_000 for p in spool.iterdir()),
                      seconds=20)
    raw: socket.socket = assoc.dul.socket.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # a TCP reset in the middle of the data set
    assert wait_until(lambda: running.server.ae.active_associations == [], seconds=10)
    assert wait_until(lambda: not any(spool.iterdir()))
    assert spooling.received == []
    again = store_association(running.port)
    try:
        assert again.send_c_store(image(16, 16)).Status == 0x0000
    finally:
        again.release()


def test_leftovers_from_before_a_restart_are_swept_at_start(dicomgate_start, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "incoming-abc.dcm").write_bytes(b"half a data set")
    (spool / "not-ours.txt").write_text("kept")
    dicomgate_start(extra_plugins={"spooling": Spooling(spool)})
    assert sorted(p.name for p in spool.iterdir()) == ["not-ours.txt"]


def test_the_handler_gets_the_digest_computed_while_the_data_arrived(dicomgate_start,
                                                                      tmp_path):
    spooling = Spooling(tmp_path / "spool")
    running = dicomgate_start(extra_plugins={"spooling": spooling})
    assoc = store_association(running.port)
    try:
        # one small data set, and one spread over several PDUs and fragments
        for sent in (image(8, 8), image(512, 512, 3)):
            assert assoc.send_c_store(sent).Status == 0x0000
    finally:
        assoc.release()
    assert len(spooling.received) == 2
    for (path, data), digest in zip(spooling.received, spooling.digests):
        assert digest == (len(data), hashlib.sha256(data).hexdigest())
    # once pynetdicom closed the file, the server no longer vouches for it
    assert tuning.received_digest(spooling.received[0][0]) is None


def test_the_spool_file_meta_is_what_pydicom_writes_for_pynetdicom():
    """The fast file meta encoder writes pydicom's bytes for pynetdicom's file meta."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID, ImplicitVRLittleEndian, JPEG2000Lossless
    from pynetdicom.dsutils import create_file_meta

    for sop_class, sop_instance, syntax in [
            (SecondaryCaptureImageStorage, "1.2.3", ExplicitVRLittleEndian),  # odd
            ("1.2.840.10008.5.1.4.1.1.2", "1.2.34", ImplicitVRLittleEndian),  # even
            ("1.2.840.10008.5.1.4.1.1.2", generate_uid(), JPEG2000Lossless)]:
        expected = BytesIO()
        write_file_meta_info(expected, create_file_meta(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax)))
        encoded = tuning.encode_file_meta(sop_class, sop_instance, syntax)
        assert encoded[:132] == b"\0" * 128 + b"DICM"
        assert encoded[132:] == expected.getvalue()


def test_spool_files_start_write_back_of_each_fragment(tmp_path, monkeypatch):
    ranges = []
    monkeypatch.setattr(tuning, "_start_write_back",
                        lambda fd, offset, count: ranges.append((offset, count)))
    spool = tuning._SpoolFile(tmp_path, write_back=True)
    spool.write(b"\0" * 132)
    spool.flush()  # too little to bother the disk with
    spool.write(b"a" * 100_000)
    spool.file.flush()
    spool.write(b"b" * 70_000)
    spool.flush()
    spool.close()
    assert ranges == [(0, 100_132), (100_132, 70_000)]
    quiet = tuning._SpoolFile(tmp_path)  # without write_back: never
    quiet.write(b"c" * 100_000)
    quiet.flush()
    quiet.close()
    assert len(ranges) == 2
    assert Path(quiet.name).read_bytes() == b"c" * 100_000
    assert quiet.digest() == (100_000, hashlib.sha256(b"c" * 100_000).hexdigest())
    assert Path(spool.name).name.startswith(tuning.SPOOL_PREFIX)
    assert oct(Path(spool.name).stat().st_mode & 0o777) == oct(tuning.SPOOL_MODE)
