"""``dicomgate export jpeg`` and ``dicomgate documents list|show|attach``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from dicomgate import UsageError
from dicomgate.cli import config_option, open_gateway
from dicomgate.files import write_durably
from dicomgate.plugins.jpeg import documents
from dicomgate.plugins.jpeg.models import COLLECTING, READY, RENDERING, STATES
from dicomgate.plugins.jpeg.render import NotAnImage, check_frames
from dicomgate.plugins.jpeg.settings import parse_window
from dicomgate.plugins.jpeg.worker import exporter_for


def add_commands(cli: click.Group) -> None:
    cli.add_command(export_group)
    cli.add_command(documents_group)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


# export ---------------------------------------------------------------------------------


@click.group(name="export")
def export_group() -> None:
    """Export stored images as pictures."""


def _window_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        window = parse_window(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if window is None:
        raise click.BadParameter("give CENTER/WIDTH, e.g. 40/400")
    return window


@export_group.command(name="jpeg")
@config_option
@click.option("--study", "study_uid", help="Every image of this study (Study Instance UID).")
@click.option("--series", "series_uid", help="Every image of this series.")
@click.option("--instance", "sop_instance_uid", help="One instance (SOP Instance UID).")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the JPEGs.")
@click.option("--window", callback=_window_option,
              help="CENTER/WIDTH instead of each file's own window, e.g. 40/400.")
@click.option("--quality", type=click.IntRange(1, 95), help="JPEG quality [default: config].")
@click.option("--max-size", type=click.IntRange(0), help="Longest side in pixels (0: as is).")
@click.option("--frames", help="all, first, middle or a frame number [default: config].")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_jpeg(config_file: Path | None, study_uid: str | None, series_uid: str | None,
                sop_instance_uid: str | None, out_dir: Path, window: Any, quality: int | None,
                max_size: int | None, frames: str | None, as_json: bool) -> None:
    """Render stored images to JPEG files in OUT.

    Files are numbered in series and instance order (00001-001.jpg: image 1, frame
    1); manifest.json beside them names the instance and frame of each. Exit code 1
    when an image could not be rendered (the others are still written).
    """
    chosen = [v for v in (study_uid, series_uid, sop_instance_uid) if v]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --study, --series, --instance")
    try:
        check_frames(frames or "all")
    except ValueError as exc:
        raise UsageError(f"--frames: {exc}") from None
    with open_gateway() as gateway:
        settings = gateway.settings("jpeg")
        changes = {key: value for key, value in (("window", window), ("quality", quality),
                                                  ("max_size", max_size), ("frames", frames))
                   if value is not None}
        options = documents.render_options(settings, **changes)
        instances = gateway.hook.find_instances(
            gateway=gateway, study_uid=study_uid or "", series_uid=series_uid or "",
            sop_instance_uid=sop_instance_uid or "")
        if instances is None:
            raise UsageError("no plugin stores images here (enable the storage plugin)")
        if not instances:
            raise UsageError("no stored instance matches")
        renderer = exporter_for(gateway).all_renderers()["jpeg"]
        durable = gateway.config.gateway.durable
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest: list[dict[str, Any]] = []
        failed = 0
        for number, instance in enumerate(instances, start=1):
            entry: dict[str, Any] = {"sop_instance_uid": instance.sop_instance_uid,
                                     "series_uid": instance.series_uid, "files": []}
            try:
                for image in documents.pictures(renderer, Path(instance.absolute_path),
                                                options):
                    name = f"{number:05d}-{image.frame:03d}.jpg"
                    write_durably(out_dir / name, image.data, durable)
                    entry["files"].append({"file": name, "frame": image.frame,
                                           "frames": image.frames, "width": image.width,
                                           "height": image.height,
                                           "lossy_source": image.lossy_source})
            except NotAnImage as exc:
                entry["skipped"] = str(exc) or "not an image"
            except documents.Unrenderable as exc:
                entry["error"] = str(exc)
                failed += 1
                if not as_json:
                    click.echo(f"{instance.sop_instance_uid}: {entry['error']}", err=True)
            manifest.append(entry)
        write_durably(out_dir / "manifest.json",
                      json.dumps(manifest, ensure_ascii=False, indent=2).encode("utf-8"),
                      durable)
    written = sum(len(entry["files"]) for entry in manifest)
    if as_json:
        _echo_json(manifest)
    else:
        click.echo(f"{written} JPEG file(s) from {len(manifest)} instance(s) in {out_dir}"
                   + (f"; {failed} could not be rendered" if failed else ""))
    if failed:
        click.get_current_context().exit(1)


# documents -------------------------------------------------------------------------------


@click.group(name="documents")
def documents_group() -> None:
    """Medical documents and the pictures attached to them."""


@documents_group.command(name="list")
@config_option
@click.option("--state", type=click.Choice(STATES), help="Only documents in this state.")
@click.option("--study", "study_uid", help="Only the documents of this study.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_documents(config_file: Path | None, state: str | None, study_uid: str | None,
                   limit: int, as_json: bool) -> None:
    """List documents, newest first."""
    with open_gateway() as gateway, gateway.database.connection_context():
        rows = list(documents.documents(state or "", study_uid or "", limit))
        if as_json:
            _echo_json([{"id": d.uuid, "document_id": d.document_id, "study_uid": d.study_uid,
                         "accession": d.accession, "patient_id": d.patient_id,
                         "patient_name": d.patient_name, "state": d.state,
                         "pictures": d.pictures.count(), "failures": d.failures.count(),
                         "created": documents.iso(d.created), "ready": documents.iso(d.ready)}
                        for d in rows])
            return
        for d in rows:
            click.echo(f"{d.uuid}  {d.state:<10} {d.pictures.count():>4} pic  "
                       f"{d.accession or '-':<16} {d.patient_name or '-'}  "
                       f"{d.document_id or ''}")


@documents_group.command(name="show")
@config_option
@click.argument("document")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_document(config_file: Path | None, document: str, as_json: bool) -> None:
    """Show DOCUMENT (its id, or the HIS's document ID) with its pictures."""
    with open_gateway() as gateway, gateway.database.connection_context():
        data = documents.document_json(gateway, documents.find_document(document))
    if as_json:
        _echo_json(data)
        return
    click.echo(f"document {data['id']}  state {data['state']}  HIS id "
               f"{data['document_id'] or '-'}")
    click.echo(f"patient {data['patient']['name'] or '-'} ({data['patient']['id'] or '-'})  "
               f"accession {data['accession'] or '-'}  study {data['study_uid']}")
    if data["error"]:
        click.echo(f"error: {data['error']}")
    for picture in data["pictures"]:
        lossy = "  lossy source" if picture["lossy_source"] else ""
        click.echo(f"  {picture['sop_instance_uid']} frame {picture['frame']}/"
                   f"{picture['frames']}  {picture['width']}x{picture['height']}  "
                   f"{picture['url']}{lossy}")
    for failure in data["failures"]:
        click.echo(f"  FAILED {failure['sop_instance_uid']}: {failure['error']}")


@documents_group.command(name="attach")
@config_option
@click.option("--study", "study_uid", default="", help="The study (Study Instance UID).")
@click.option("--accession", default="", help="Or the order's accession number.")
@click.option("--document-id", default="", help="The HIS's ID of the medical document.")
@click.option("--timeout", type=click.FloatRange(0), default=600, show_default=True,
              help="Seconds to wait when the server is already making it.")
@click.option("--json", "as_json", is_flag=True, help="Print the document as JSON.")
def attach(config_file: Path | None, study_uid: str, accession: str, document_id: str,
           timeout: float, as_json: bool) -> None:
    """Attach a study's pictures to a document now, and tell the HIS.

    The pictures are made here and then (a running server's worker may take part);
    the HIS gets its "document.ready" event through the outbox. Exit code 1 when the
    document failed.
    """
    with open_gateway() as gateway:
        document = documents.request(gateway, study_uid, accession, document_id)
        exporter = exporter_for(gateway)
        deadline = time.monotonic() + timeout
        with gateway.database.connection_context():
            while True:
                if documents.claim(gateway, document.id):
                    exporter.make(document.id)
                current = documents.find_document(document.uuid)
                if current.state != RENDERING:
                    break
                if time.monotonic() > deadline:
                    raise UsageError(f"document {current.uuid} is still being made; see "
                                     "'dicomgate documents show'")
                time.sleep(0.2)
            data = documents.document_json(gateway, current)
    if as_json:
        _echo_json(data)
    else:
        click.echo(f"document {data['id']}: {data['state']}, {len(data['pictures'])} "
                   f"picture(s), {len(data['failures'])} failure(s)"
                   + (f"; {data['error']}" if data["error"] else ""))
    if data["state"] == COLLECTING and not data["error"]:
        click.echo("no images of the study are stored yet: the document is made when "
                   "they arrive", err=True)
    elif data["state"] != READY:
        click.get_current_context().exit(1)
