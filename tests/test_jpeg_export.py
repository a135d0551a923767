"""JPEG export and the no-PACS flow against real peers: an order reaches the device's
worklist, DCMTK storescu sends the images, the device reports MPPS COMPLETED, and the
HIS (a local HTTP server) receives "document.ready" with the pictures. Also the
other triggers (quiet study, request), late images, undecodable images, renderers
added by plugins, and the command line."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE

from dicomgate import hookimpl
from dicomgate.cli import cli
from dicomgate.plugins.jpeg.models import Document, Failure, Picture
from dicomgate.plugins.worklist import api as worklist
from dicomgate.plugins.worklist.testing import find, query
from test_mpps_support import His, Modality, mpps_create, mpps_final, wait_for, webhook_settings

PLUGINS = ["verification", "storage", "worklist", "mpps", "jpeg"]
PEERS = [{"ae_title": "CT1"}]
NAME = "Иванов^Пётр"


def start(dicomgate_start: Any, his: His | None, jpeg: dict | None = None,
          plugins: list[str] = PLUGINS, **options: Any) -> Any:
    settings = {"worklist": {"timezone": "UTC"}, "storage": {"reserve_mb": 0},
                "mpps": webhook_settings(his) if his else {},
                "jpeg": {"settle_seconds": 0.2, "quiet_seconds": 0, "poll_interval": 0.2,
                         **(jpeg or {})}}
    return dicomgate_start(plugins=plugins, settings=settings, peers=PEERS, **options)


def ct_image(study_uid: str, series_uid: str, number: int, patient_id: str = "P1",
             accession: str = "A1", name: str = NAME) -> Dataset:
    """A 64x64 signed CT slice: a ramp from -1000 to +1000 HU, window 40/400."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19800102"
    ds.AccessionNumber = accession
    ds.StudyDate = "20261130"
    ds.StudyDescription = "КТ головы"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    hu = np.tile(np.linspace(-1000, 1000, 64), (64, 1))
    ds.PixelData = (hu + 1024).astype("<i2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_files(folder: Path, datasets: list[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets):
        path = folder / f"image{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(dcmtk: Any, port: int, paths: list[Path], calling: str = "CT1") -> str:
    done = subprocess.run([dcmtk("storescu"), "-v", "-aet", calling, "-aec", "DICOMGATE",
                           "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})
    output = done.stdout + done.stderr
    assert output.count("Received Store Response (Success)") == len(paths), output
    return output


def picture_file(picture: dict[str, Any]) -> Path:
    return Path(url2pathname(urlsplit(picture["url"]).path))


def documents_of(gw: Any, study_uid: str) -> list[Document]:
    with gw.gateway.database.connection_context():
        return list(Document.select().where(Document.study_uid == study_uid))


def test_the_no_pacs_flow_from_order_to_document(dicomgate_start, dcmtk, tmp_path):
    his = His().start()
    try:
        gw = start(dicomgate_start, his, jpeg={"caption": ["PatientName", "StudyDescription"]})
        order = worklist.add_order(gw.gateway, {
            "patient": {"id": "P1", "name": NAME}, "accession": "A1",
            "steps": [{"modality": "CT", "station_ae": "CT1"}]})
        # The device asks for its worklist and finds the order, name intact.
        answers = [r for r in find(gw.port, query(PatientName="*", AccessionNumber="",
                                                  StudyInstanceUID="", sps={}))
                   if r.identifier is not None]
        assert [str(a.get("PatientName")) for a in answers] == [NAME]
        study_uid = str(answers[0].get("StudyInstanceUID"))
        assert study_uid == order.study_uid
        # It performs the step and sends three slices with DCMTK.
        series_uid = generate_uid()
        slices = [ct_image(study_uid, series_uid, n) for n in (1, 2, 3)]
        step = order.steps[0]
        with Modality(gw.port) as modality:
            status, mpps_uid = modality.create(mpps_create(
                study_uid, "A1", order.procedure_id, step.step_id, patient_name=NAME,
                charset="ISO_IR 192"))
            assert status == 0
            storescu(dcmtk, gw.port, write_files(tmp_path / "ct", slices))
            final = modality.set(mpps_uid, mpps_final(series=[
                (series_uid, [s.SOPInstanceUID for s in slices])]))
            assert final.Status == 0
        # The HIS hears that the order completed, then that its document is ready.
        ready = wait_for(lambda: his.events("document.ready"), seconds=30)
        assert ready, [e["type"] for e in his.events()]
        event = ready[0]
        document = event["document"]
        assert event["stream"] == f"order:{study_uid}"
        types = [e["type"] for e in his.events() if e["stream"] == event["stream"]]
        assert types.index("document.ready") > types.index("order.status_changed")
        assert document["state"] == "ready" and document["trigger"] == "mpps"
        assert document["accession"] == "A1" and document["patient"]["name"] == NAME
        assert document["failures"] == [] and document["lossy_source"] is False
        pictures = document["pictures"]
        assert [p["sop_instance_uid"] for p in pictures] == [s.SOPInstanceUID for s in slices]
        assert [p["instance_number"] for p in pictures] == [1, 2, 3]
        for picture in pictures:
            assert picture["window"] == {"center": 40.0, "width": 400.0}
            data = picture_file(picture).read_bytes()
            assert picture["size"] == len(data) and picture["media_type"] == "image/jpeg"
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "JPEG"
                assert (im.width, im.height) == (picture["width"], picture["height"])
                assert im.width == 64 and im.height > 64  # the caption band is below
        # The DICOM files stay in storage.
        assert len(gw.gateway.hook.instances_of_study(gateway=gw.gateway,
                                                      study_uid=study_uid)) == 3
        # The command line shows the same document.
        result = dicomgate_cli(gw, "documents", "show", document["id"], "--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        assert [p["sha256"] for p in shown["pictures"]] == [p["sha256"] for p in pictures]
    finally:
        his.stop()


def dicomgate_cli(gw: Any, *args: str) -> subprocess.CompletedProcess:
    """The dicomgate command in its own process, as an operator runs it beside the
    server (one process holds one gateway: the models are bound to its database)."""
    path = gw.data_dir / "cli.toml"
    path.write_text(f'[gateway]\ndata_dir = "{gw.data_dir}"\n[plugins]\n'
                    f'enabled = {json.dumps(PLUGINS)}\n[worklist]\ntimezone = "UTC"\n'
                    f'[storage]\nreserve_mb = 0\n', encoding="utf-8")
    return subprocess.run([str(Path(sys.executable).with_name("dicomgate")), *args,
                           "--config", str(path)], capture_output=True, text=True,
                          timeout=120)


def send(port: int, datasets: list[Dataset], transfer_syntax: str = ExplicitVRLittleEndian,
         calling: str = "CT1") -> list[int]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_a_quiet_study_gets_its_document_and_late_images_update_it(dicomgate_start, tmp_path):
    his = His().start()
    try:
        gw = start(dicomgate_start, his, jpeg={"quiet_seconds": 0.3, "settle_seconds": 0.1})
        study_uid, series_uid = generate_uid(), generate_uid()
        assert send(gw.port, [ct_image(study_uid, series_uid, 1)]) == [0]
        first = wait_for(lambda: his.events("document.ready"), seconds=20)
        assert first and first[0]["document"]["trigger"] == "quiet"
        assert len(first[0]["document"]["pictures"]) == 1
        # A late image makes the document again, with both pictures, and tells the HIS.
        assert send(gw.port, [ct_image(study_uid, series_uid, 2)]) == [0]
        second = wait_for(lambda: his.events("document.ready")[1:], seconds=20)
        assert second, his.events()
        assert second[0]["document"]["id"] == first[0]["document"]["id"]
        assert [p["instance_number"] for p in second[0]["document"]["pictures"]] == [1, 2]
        # The first picture was not made twice.
        assert second[0]["document"]["pictures"][0]["sha256"] == \
            first[0]["document"]["pictures"][0]["sha256"]
        with gw.gateway.database.connection_context():
            assert Picture.select().count() == 2
    finally:
        his.stop()


def broken_jpeg(study_uid: str, number: int) -> Dataset:
    """A JPEG baseline secondary capture whose only fragment is not a JPEG stream:
    well-formed DICOM that storage accepts, pixel data nobody can decode."""
    ds = ct_image(study_uid, generate_uid(), number)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = encapsulate([b"\xff\xd8 this is not a JPEG stream " * 4])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def test_an_undecodable_image_is_a_clear_error_and_the_instance_is_kept(dicomgate_start):
    his = His().start()
    try:
        gw = start(dicomgate_start, his, jpeg={"quiet_seconds": 0.2})
        study_uid = generate_uid()
        good = ct_image(study_uid, generate_uid(), 1)
        bad = broken_jpeg(study_uid, 2)
        assert send(gw.port, [good]) == [0]
        assert send(gw.port, [bad], transfer_syntax=JPEGBaseline8Bit) == [0]
        ready = wait_for(lambda: [e for e in his.events("document.ready")
                                  if e["document"]["failures"]], seconds=20)
        assert ready, his.events()
        document = ready[-1]["document"]
        assert [p["sop_instance_uid"] for p in document["pictures"]] == [good.SOPInstanceUID]
        [failure] = document["failures"]
        assert failure["sop_instance_uid"] == bad.SOPInstanceUID
        assert "decode" in failure["error"].lower()
        assert "1 image(s) could not be rendered" in document["error"]
        stored = gw.gateway.hook.instances_of_study(gateway=gw.gateway, study_uid=study_uid)
        assert sorted(i.sop_instance_uid for i in stored) == sorted(
            [good.SOPInstanceUID, bad.SOPInstanceUID])
        assert all(Path(i.absolute_path).is_file() for i in stored)
        # Only undecodable images: the document failed, and the HIS is told so.
        other = generate_uid()
        assert send(gw.port, [broken_jpeg(other, 1)], transfer_syntax=JPEGBaseline8Bit) == [0]
        failed = wait_for(lambda: his.events("document.failed"), seconds=20)
        assert failed and failed[0]["document"]["study_uid"] == other
        assert failed[0]["document"]["state"] == "failed"
        # The gateway still serves.
        assert send(gw.port, [ct_image(generate_uid(), generate_uid(), 1)]) == [0]
    finally:
        his.stop()


class PngRenderer:
    """A renderer a plugin adds: one grey PNG per instance."""

    def render(self, path: Path, options: Any) -> list[Any]:
        from dicomgate.plugins.jpeg.render import RenderedImage

        out = io.BytesIO()
        Image.new("L", (8, 8), 128).save(out, format="PNG")
        return [RenderedImage(frame=1, frames=1, data=out.getvalue(), width=8, height=8,
                              window=None, lossy_source=False, media_type="image/png",
                              extension=".png")]


class PngPlugin:
    @hookimpl
    def register_renderers(self, register):
        register("png", PngRenderer())


def test_plugins_add_renderers_and_a_misnamed_one_stops_the_start(dicomgate_start):
    gw = dicomgate_start(plugins=["storage", "jpeg"], extra_plugins={"png": PngPlugin()},
                         settings={"storage": {"reserve_mb": 0},
                                   "jpeg": {"renderers": ["jpeg", "png"], "quiet_seconds": 0.2,
                                            "poll_interval": 0.2}})
    study_uid = generate_uid()
    assert send(gw.port, [ct_image(study_uid, generate_uid(), 1)]) == [0]

    def ready() -> list[Document]:
        return [d for d in documents_of(gw, study_uid) if d.state == "ready"]

    assert wait_for(ready, seconds=20)
    with gw.gateway.database.connection_context():
        kinds = sorted((p.renderer, p.media_type, Path(p.path).suffix) for p in Picture.select())
    assert kinds == [("jpeg", "image/jpeg", ".jpg"), ("png", "image/png", ".png")]
    # Without an outbox (no MPPS plugin) the document is still made and kept.
    assert ready()[0].event_id == ""
    gw.stop()
    with pytest.raises(Exception, match="no renderer named tiff"):
        dicomgate_start(plugins=["storage", "jpeg"],
                        settings={"jpeg": {"renderers": ["tiff"]}})


def test_documents_attach_on_request_and_export(dicomgate_start, tmp_path):
    gw = start(dicomgate_start, None, plugins=["storage", "worklist", "jpeg"])
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [ct_image(study_uid, series_uid, n, accession="ACC-7") for n in (1, 2)]
    assert send(gw.port, slices) == [0, 0]
    # quiet_seconds = 0 and no MPPS: nothing happens until the HIS asks.
    assert all(d.state == "collecting" for d in documents_of(gw, study_uid))
    result = dicomgate_cli(gw, "documents", "attach", "--accession", "ACC-7",
                           "--document-id", "HIS-DOC-1", "--json")
    assert result.returncode == 0, result.stderr
    attached = json.loads(result.stdout)
    assert attached["document_id"] == "HIS-DOC-1" and attached["state"] == "ready"
    assert attached["trigger"] == "request" and len(attached["pictures"]) == 2
    # The automatic document took the HIS's ID: one document for the study.
    assert [d.document_id for d in documents_of(gw, study_uid)] == ["HIS-DOC-1"]
    listed = dicomgate_cli(gw, "documents", "list", "--json")
    assert [d["document_id"] for d in json.loads(listed.stdout)] == ["HIS-DOC-1"]
    shown = dicomgate_cli(gw, "documents", "show", "HIS-DOC-1")
    assert shown.returncode == 0 and "Иванов^Пётр" in shown.stdout, shown.stdout
    unknown = dicomgate_cli(gw, "documents", "attach", "--accession", "NOPE")
    assert unknown.returncode == 2 and "'NOPE'" in unknown.stderr
    # export jpeg: a chosen window, numbered files and a manifest.
    out = tmp_path / "out"
    result = dicomgate_cli(gw, "export", "jpeg", "--series", series_uid, "--out", str(out),
                           "--window", "0/2000", "--max-size", "32")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [e["sop_instance_uid"] for e in manifest] == [s.SOPInstanceUID for s in slices]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["00001-001.jpg", "00002-001.jpg"]
    with Image.open(out / "00001-001.jpg") as im:
        assert im.size == (32, 32)
        row = np.asarray(im.convert("L"))[16]
    # -1000..+1000 HU under 0/2000 spans black to white, left to right.
    assert row[0] < 20 and row[-1] > 235 and abs(int(row[16]) - 128) < 20
    for wrong in (["--study", study_uid, "--series", series_uid], []):
        result = dicomgate_cli(gw, "export", "jpeg", *wrong, "--out", str(out))
        assert result.returncode == 2 and "exactly one" in result.stderr
    # Retention removes the DICOM files; the document keeps its pictures and stays ready.
    from dicomgate.plugins.storage import store_for

    assert store_for(gw.gateway).purge(timedelta(microseconds=1)).study_uids == (study_uid,)
    again = dicomgate_cli(gw, "documents", "attach", "--study", study_uid, "--json")
    assert again.returncode == 0, again.stderr
    kept = json.loads(again.stdout)
    assert kept["state"] == "ready" and len(kept["pictures"]) == 2
    assert all((gw.data_dir / "jpeg" / p["path"]).is_file() for p in kept["pictures"])


def test_the_no_pacs_profile(tmp_path):
    from dicomgate.config import read_config
    from dicomgate.gateway import configure
    from dicomgate.manager import Plugins

    config = read_config(None, profile="no-pacs")
    assert config.gateway.profile == "no-pacs" and config.gateway.accept_unknown_peers
    assert config.plugins.enabled == ("verification", "storage", "worklist", "mpps", "jpeg")
    plugins = Plugins()
    plugins.load(config.plugins)
    bound = configure(config, plugins)
    assert bound.plugin_settings["storage"].keep_days == 30
    assert bound.plugin_settings["jpeg"].caption[0] == "PatientName"
    # A clinic's file builds on it: its values win, key by key.
    path = tmp_path / "clinic.toml"
    path.write_text('[gateway]\nprofile = "no-pacs"\nae_title = "CLINIC"\n'
                    '[storage]\nkeep_days = 7\n', encoding="utf-8")
    clinic = configure(read_config(path), plugins)
    assert clinic.gateway.ae_title == "CLINIC" and not clinic.gateway.accept_unknown_peers
    assert clinic.plugin_settings["storage"].keep_days == 7
    assert clinic.plugin_settings["jpeg"].max_size == 2048
    path.write_text('[gateway]\nprofile = "../etc/passwd"\n', encoding="utf-8")
    with pytest.raises(Exception, match="unknown profile"):
        read_config(path)
    result = CliRunner().invoke(cli, ["config", "example", "--profile", "no-pacs"])
    assert result.exit_code == 0 and 'enabled = ["verification", "storage"' in result.output


def test_rendering_waits_for_no_c_store(dicomgate_start, monkeypatch):
    """A C-STORE is answered while a document of the same study is being made."""
    import threading

    from dicomgate.plugins.jpeg import JpegRenderer

    entered, release = threading.Event(), threading.Event()
    original = JpegRenderer.render

    def slow(self: Any, path: Path, options: Any) -> Any:
        entered.set()
        release.wait(20)
        return original(self, path, options)

    monkeypatch.setattr(JpegRenderer, "render", slow)
    gw = start(dicomgate_start, None, plugins=["storage", "jpeg"],
               jpeg={"quiet_seconds": 0.1, "settle_seconds": 0.1})
    study_uid, series_uid = generate_uid(), generate_uid()
    assert send(gw.port, [ct_image(study_uid, series_uid, 1)]) == [0]
    assert entered.wait(20)
    try:
        assert send(gw.port, [ct_image(study_uid, series_uid, 2)]) == [0]
    finally:
        release.set()
    # The image that came during rendering is in the document once it is made again.
    assert wait_for(lambda: [d for d in documents_of(gw, study_uid)
                             if d.state == "ready" and d.pictures.count() == 2], seconds=20)
    with gw.gateway.database.connection_context():
        assert Failure.select().count() == 0


def multiframe(study_uid: str, frames: int = 3) -> Dataset:
    """An 8-bit multi-frame secondary capture; frame n is filled with 40 * n."""
    ds = ct_image(study_uid, generate_uid(), 1)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    del ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth
    ds.NumberOfFrames = frames
    ds.PixelData = b"".join(bytes([40 * (n + 1)]) * 64 * 64 for n in range(frames))
    return ds


def test_frames_files_and_links_as_configured(dicomgate_start):
    """deliver = "files": the event carries the pictures; every frame is a picture."""
    his = His().start()
    try:
        gw = start(dicomgate_start, his, jpeg={"quiet_seconds": 0.2, "deliver": "files",
                                               "fallback_window": "128/256"})
        study_uid = generate_uid()
        assert send(gw.port, [multiframe(study_uid)]) == [0]
        ready = wait_for(lambda: his.events("document.ready"), seconds=20)
        assert ready, his.events()
        pictures = ready[0]["document"]["pictures"]
        assert [(p["frame"], p["frames"]) for p in pictures] == [(1, 3), (2, 3), (3, 3)]
        root = gw.data_dir / "jpeg"
        for number, picture in enumerate(pictures, start=1):
            assert "url" not in picture
            data = base64.b64decode(picture["content_base64"])
            assert data == (root / picture["path"]).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                # 40 * n under the window 128/256 (0..255 linear) stays about 40 * n.
                assert abs(int(np.asarray(im).mean()) - 40 * number) <= 2
    finally:
        his.stop()


def test_links_under_a_base_url_and_postgresql(dicomgate_start, postgres_database):
    his = His().start()
    try:
        gw = start(dicomgate_start, his, database=postgres_database,
                   jpeg={"quiet_seconds": 0.2,
                         "link_base_url": "https://files.clinic.local/jpeg/"})
        study_uid = generate_uid()
        assert send(gw.port, [ct_image(study_uid, generate_uid(), 1)]) == [0]
        assert send(gw.port, [broken_jpeg(study_uid, 2)],
                    transfer_syntax=JPEGBaseline8Bit) == [0]
        ready = wait_for(lambda: [e for e in his.events("document.ready")
                                  if e["document"]["failures"]], seconds=20)
        assert ready, his.events()
        document = ready[-1]["document"]
        [picture] = document["pictures"]
        assert picture["url"] == "https://files.clinic.local/jpeg/" + picture["path"]
        assert (gw.data_dir / "jpeg" / picture["path"]).is_file()
        assert len(document["failures"]) == 1
    finally:
        his.stop()


class HalfwayRenderer:
    """Yields one picture, then fails: what a corrupt second frame does."""

    def render(self, path: Path, options: Any):
        from dicomgate.plugins.jpeg.render import RenderedImage

        yield RenderedImage(frame=1, frames=2, data=b"\xff\xd8 first frame", width=1,
                            height=1, window=None, lossy_source=False)
        raise ValueError("frame 2: pixel data cannot be decoded")


class HalfwayPlugin:
    @hookimpl
    def register_renderers(self, register):
        register("halfway", HalfwayRenderer())


def test_a_renderer_failing_midway_leaves_no_picture_of_that_image(dicomgate_start):
    gw = dicomgate_start(plugins=["storage", "jpeg"], extra_plugins={"h": HalfwayPlugin()},
                         settings={"storage": {"reserve_mb": 0},
                                   "jpeg": {"renderers": ["halfway"], "quiet_seconds": 0.2,
                                            "poll_interval": 0.2}})
    study_uid = generate_uid()
    assert send(gw.port, [ct_image(study_uid, generate_uid(), 1)]) == [0]
    assert wait_for(lambda: [d for d in documents_of(gw, study_uid) if d.state == "failed"],
                    seconds=20)
    with gw.gateway.database.connection_context():
        assert Picture.select().count() == 0
        [failure] = list(Failure.select())
    assert failure.error == "frame 2: pixel data cannot be decoded"
    assert not [p for p in (gw.data_dir / "jpeg").rglob("*") if p.is_file()]
