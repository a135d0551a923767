"""Documents: when a study's pictures are due, making them, and telling the HIS.

Every function here runs in whatever thread calls it, with the gateway's database;
the worker (``worker.py``) and the command line share them. A document's row is its
job: ``collecting`` until ``due``, ``rendering`` while a worker holds it (renewing
``claimed``, so that a crashed worker's document is taken again after
:data:`LEASE`), then ``ready`` or ``failed``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import peewee

from dicomgate import UsageError, write_transaction
from dicomgate.files import remove_durably, write_durably
from dicomgate.plugins.jpeg.models import (
    BY_MPPS,
    BY_QUIET,
    BY_REQUEST,
    COLLECTING,
    FAILED,
    READY,
    RENDERING,
    Document,
    Failure,
    Picture,
)
from dicomgate.plugins.jpeg.render import NotAnImage, RenderOptions
from dicomgate.plugins.jpeg.settings import FILES, JpegSettings, parse_window

log = logging.getLogger("dicomgate.jpeg")

#: A worker renews its claim on a document while it renders (every quarter of this);
#: a claim older than this is a worker that died, and the document is taken again.
LEASE = timedelta(minutes=2)
_EXTENSION = re.compile(r"\.[a-z0-9]{1,8}")

READY_EVENT = "document.ready"
FAILED_EVENT = "document.failed"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"


def render_options(settings: JpegSettings, **changes: Any) -> RenderOptions:
    """The renderers' options from the ``[jpeg]`` section, with ``changes`` applied."""
    options = RenderOptions(quality=settings.quality, max_size=settings.max_size,
                            frames=settings.frames, voi_index=settings.voi_index,
                            fallback_window=parse_window(settings.fallback_window),
                            caption=settings.caption, font=settings.font)
    return attrs.evolve(options, **changes)


def pictures_root(gateway: Any) -> Path:
    root = gateway.settings("jpeg").root
    return root if root.is_absolute() else gateway.data_dir / root


# When documents are due ---------------------------------------------------------------------


def note_arrivals(gateway: Any, instances: Sequence[Any]) -> None:
    """Images arrived (``instances_received``): each study gets its document, or its
    documents learn that there is more to render."""
    settings: JpegSettings = gateway.settings("jpeg")
    by_study: dict[str, list[Any]] = defaultdict(list)
    for instance in instances:
        by_study[str(instance.study_uid)].append(instance)
    now = utcnow()
    with gateway.database.connection_context():
        for study_uid, arrived in by_study.items():
            with write_transaction(gateway.database):
                documents = list(Document.select().where(Document.study_uid == study_uid))
                if not documents:
                    first = arrived[0]
                    Document.create(
                        uuid=str(uuid.uuid4()), study_uid=study_uid,
                        accession=str(getattr(first, "accession", ""))[:64],
                        patient_id=str(first.patient_id)[:64],
                        patient_name=str(first.patient_name), state=COLLECTING,
                        trigger=BY_QUIET if settings.quiet_seconds else "",
                        due=now + timedelta(seconds=settings.quiet_seconds)
                        if settings.quiet_seconds else None,
                        revision=1, created=now, updated=now)
                    continue
                for document in documents:
                    _more_arrived(document, settings, now)


def _more_arrived(document: Document, settings: JpegSettings, now: datetime) -> None:
    settle = now + timedelta(seconds=settings.settle_seconds)
    changes: dict[Any, Any] = {Document.revision: Document.revision + 1,
                               Document.updated: now}
    if document.state in (READY, FAILED):
        # Images after the pictures were made: the document is made again, soon.
        changes.update({Document.state: COLLECTING, Document.due: settle})
    elif document.state == COLLECTING:
        if document.trigger == BY_QUIET:
            changes[Document.due] = now + timedelta(seconds=settings.quiet_seconds)
        elif document.trigger in (BY_MPPS, BY_REQUEST):
            changes[Document.due] = max(document.due or settle, settle)
        elif settings.quiet_seconds:
            changes.update({Document.trigger: BY_QUIET,
                            Document.due: now + timedelta(seconds=settings.quiet_seconds)})
    # RENDERING: the worker sees the new revision when it finishes and goes again.
    Document.update(changes).where(Document.id == document.id).execute()


def note_completed(gateway: Any, step: Any) -> None:
    """A procedure step was reported COMPLETED: its study's documents are due once
    trailing images had ``settle_seconds`` to arrive. Called inside the transaction
    of the status change, so the document commits with it."""
    settings: JpegSettings = gateway.settings("jpeg")
    study_uid = str(step.study_uid or "")
    if not study_uid:
        return
    now = utcnow()
    due = now + timedelta(seconds=settings.settle_seconds)
    with gateway.database.atomic():
        documents = list(Document.select().where(Document.study_uid == study_uid))
        if not documents:
            Document.create(uuid=str(uuid.uuid4()), study_uid=study_uid,
                            accession=str(step.accession or "")[:64],
                            patient_id=str(step.patient_id or "")[:64],
                            patient_name=str(step.patient_name or ""), state=COLLECTING,
                            trigger=BY_MPPS, due=due, created=now, updated=now)
            return
        for document in documents:
            changes: dict[Any, Any] = {Document.updated: now}
            if not document.accession and step.accession:
                changes[Document.accession] = str(step.accession)[:64]
            if document.state == COLLECTING:
                changes.update({Document.trigger: BY_MPPS,
                                Document.due: min(document.due or due, due)})
            Document.update(changes).where(Document.id == document.id).execute()


def request(gateway: Any, study_uid: str = "", accession: str = "",
            document_id: str = "") -> Document:
    """Attach a study's pictures to a document now (``documents attach``).

    The study is named by its UID, or by an accession number that a document or an
    order (the ``find_scheduled_steps`` lookup) knows. With ``document_id`` the HIS
    names the document: a study's automatic document without a name takes it.
    Without one, the study's only document is made again.
    """
    if len(document_id) > 128:
        raise UsageError("a document ID has at most 128 characters")
    with gateway.database.connection_context():
        study_uid = study_uid or _study_of_accession(gateway, accession)
        now = utcnow()
        with write_transaction(gateway.database):
            document = _document_for(study_uid, document_id)
            if document is None:
                document = Document.create(uuid=str(uuid.uuid4()), document_id=document_id,
                                           study_uid=study_uid, accession=accession[:64],
                                           state=COLLECTING, trigger=BY_REQUEST, due=now,
                                           created=now, updated=now)
            elif document.state != RENDERING:
                Document.update(document_id=document_id or document.document_id,
                                state=COLLECTING, trigger=BY_REQUEST, due=now, updated=now,
                                built_revision=-1).where(Document.id == document.id).execute()
            else:
                Document.update(document_id=document_id or document.document_id,
                                revision=Document.revision + 1, updated=now).where(
                    Document.id == document.id).execute()
        return Document.get_by_id(document.id)


def _document_for(study_uid: str, document_id: str) -> Document | None:
    """The study's document a request means: the one with the HIS's ID, else the
    study's unnamed one; without an ID, the study's only document, whatever its name."""
    of_study = list(Document.select().where(Document.study_uid == study_uid))
    for wanted in ([document_id, ""] if document_id else [""]):
        for document in of_study:
            if document.document_id == wanted:
                return document
    return of_study[0] if not document_id and len(of_study) == 1 else None


def _study_of_accession(gateway: Any, accession: str) -> str:
    if not accession:
        raise UsageError("name the study: --study UID or --accession NUMBER")
    document = Document.get_or_none(Document.accession == accession)
    if document is not None:
        return document.study_uid
    steps = gateway.hook.find_scheduled_steps(
        gateway=gateway, references=[{"study_uid": "", "accession": accession,
                                      "requested_procedure_id": "", "scheduled_step_id": ""}],
        station_ae="")
    studies = sorted({str(step.study_uid) for step in steps or () if step.study_uid})
    if len(studies) == 1:
        return studies[0]
    if not studies:
        raise UsageError(f"no order or document has accession number {accession!r}; "
                         "name the study with --study UID")
    raise UsageError(f"accession number {accession!r} names {len(studies)} studies; "
                     "name one with --study UID")


# Taking and making documents -------------------------------------------------------------


def claim_due(gateway: Any, now: datetime | None = None) -> int | None:
    """Take the next due document for this thread: its id, or None when none is due."""
    now = now or utcnow()
    due = ((Document.state == COLLECTING) & Document.due.is_null(False) & (Document.due <= now)) \
        | ((Document.state == RENDERING) & (Document.claimed < now - LEASE))
    # Looked for without the write lock: most looks find nothing, and a writer must not
    # queue behind them. The update takes it only if nobody took it meanwhile.
    candidate = Document.select(Document.id).where(due).order_by(Document.due).first()
    if candidate is None:
        return None
    with write_transaction(gateway.database):
        taken = Document.update(state=RENDERING, claimed=now,
                                attempts=Document.attempts + 1).where(
            (Document.id == candidate.id) & due).execute()
    return candidate.id if taken else None


def claim(gateway: Any, document_pk: int) -> bool:
    """Take one document (the command line's ``attach``), unless a worker holds it."""
    now = utcnow()
    free = (Document.state != RENDERING) | (Document.claimed < now - LEASE)
    with write_transaction(gateway.database):
        return bool(Document.update(state=RENDERING, claimed=now,
                                    attempts=Document.attempts + 1).where(
            (Document.id == document_pk) & free).execute())


def next_due(gateway: Any) -> datetime | None:
    """When the next collecting document falls due (None: none waits)."""
    value = (Document.select(peewee.fn.MIN(Document.due))
             .where(Document.state == COLLECTING, Document.due.is_null(False)).scalar())
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value


@attrs.frozen
class Made:
    """A picture written to disk, not yet in the index."""

    instance: Any
    renderer: str
    image: Any
    relative: str
    absolute: Path
    sha256: str


def build(gateway: Any, document_pk: int, renderers: Mapping[str, Any],
          options: RenderOptions) -> Document:
    """Make the pictures of a claimed document that are missing, record them and the
    images that failed, and tell the HIS. The document must be claimed."""
    durable = gateway.config.gateway.durable
    document = Document.get_by_id(document_pk)
    revision = document.revision
    instances = gateway.hook.instances_of_study(gateway=gateway, study_uid=document.study_uid)
    if instances is None:
        return _finish_without_images(gateway, document, "no plugin stores images here "
                                      "(enable the storage plugin)")
    if not instances and Picture.select().where(Picture.document == document.id).exists():
        # The DICOM files are gone (retention) but the pictures stay: still ready.
        return _record(gateway, document, revision, [], [], set(), {})
    if not instances:
        # Reported before any image came: wait for them; their arrival makes it due.
        with write_transaction(gateway.database):
            Document.update(state=COLLECTING, due=None, claimed=None, updated=utcnow()).where(
                Document.id == document.id).execute()
        log.info("document %s: study %s has no images yet; waiting for them",
                 document.uuid, document.study_uid)
        return Document.get_by_id(document.id)
    done = {(p.sop_instance_uid, p.renderer): p.source_sha256
            for p in Picture.select(Picture.sop_instance_uid, Picture.renderer,
                                    Picture.source_sha256).where(Picture.document == document.id)}
    made: list[Made] = []
    failures: dict[tuple[str, str], str] = {}
    rendered: set[tuple[str, str]] = set()
    root = pictures_root(gateway)
    renewed = utcnow()
    try:
        for instance in instances:
            uid = str(instance.sop_instance_uid)
            for name, renderer in renderers.items():
                if done.get((uid, name)) == instance.sha256:
                    continue
                written = _render(document, instance, name, renderer, options, root, durable,
                                  failures)
                if written is not None:
                    rendered.add((uid, name))
                    made += written
            if utcnow() - renewed > LEASE / 4:
                renewed = _renew_claim(gateway, document.id)
        return _record(gateway, document, revision, instances, made, rendered, failures)
    except BaseException:
        remove_durably([m.absolute for m in made], durable)
        raise


class Unrenderable(Exception):
    """A renderer failed on one image (its message is the reason)."""


def pictures(renderer: Any, path: Path, options: RenderOptions) -> Iterator[Any]:
    """The renderer's pictures, its failures (but NotAnImage) as Unrenderable; what
    the caller does with each picture raises as it is."""
    try:
        yield from renderer.render(path, options)
    except NotAnImage:
        raise
    except Exception as exc:
        raise Unrenderable(str(exc) or type(exc).__name__) from exc


def _render(document: Document, instance: Any, name: str, renderer: Any,
            options: RenderOptions, root: Path, durable: bool,
            failures: dict[tuple[str, str], str]) -> list[Made] | None:
    """One instance through one renderer, each picture written as it comes (a
    renderer may yield them one by one: a cine loop of a thousand frames is never
    in memory at once). None when there is nothing to record: not an image, or a
    failure of the renderer, which goes into ``failures`` (it is the image's, not the
    document's). A picture that cannot be written (a full disk) is the document's:
    it raises."""
    uid = str(instance.sop_instance_uid)
    written: list[Made] = []
    try:
        for image in pictures(renderer, Path(instance.absolute_path), options):
            written.append(_write(root, document, instance, name, image, durable))
        return written
    except NotAnImage:
        error = ""
    except Unrenderable as exc:
        error = str(exc)
    except BaseException:
        remove_durably([m.absolute for m in written], durable)
        raise
    remove_durably([m.absolute for m in written], durable)
    if error:
        failures[(uid, name)] = error
        log.warning("document %s: %s could not render %s: %s", document.uuid, name, uid, error)
    return None


def _write(root: Path, document: Document, instance: Any, renderer: str, image: Any,
           durable: bool) -> Made:
    extension = str(getattr(image, "extension", ".jpg")).lower()
    if not _EXTENSION.fullmatch(extension):
        raise ValueError(f"renderer {renderer!r} gave a bad file extension {extension!r}")
    key = "\0".join((document.uuid, str(instance.sop_instance_uid), str(image.frame), renderer,
                     str(instance.sha256)))
    name = hashlib.sha256(key.encode("utf-8")).hexdigest()
    relative = f"{name[:2]}/{name}{extension}"
    absolute = root / relative
    write_durably(absolute, image.data, durable)
    return Made(instance, renderer, image, relative, absolute,
                hashlib.sha256(image.data).hexdigest())


def _renew_claim(gateway: Any, document_pk: int) -> datetime:
    now = utcnow()
    with write_transaction(gateway.database):
        Document.update(claimed=now).where(Document.id == document_pk).execute()
    return now


def _record(gateway: Any, document: Document, revision: int, instances: Sequence[Any],
            made: list[Made], rendered: set[tuple[str, str]],
            failures: dict[tuple[str, str], str]) -> Document:
    now = utcnow()
    first = instances[0] if instances else None
    replaced: list[Path] = []
    root = pictures_root(gateway)
    with write_transaction(gateway.database):
        # Pictures of an instance that was replaced since go; the new ones come in.
        for uid, renderer in rendered:
            old = Picture.select().where(Picture.document == document.id,
                                         Picture.sop_instance_uid == uid,
                                         Picture.renderer == renderer)
            replaced += [root / p.path for p in old]
            Picture.delete().where(Picture.id.in_([p.id for p in old])).execute()
            Failure.delete().where(Failure.document == document.id,
                                   Failure.sop_instance_uid == uid,
                                   Failure.renderer == renderer).execute()
        for m in made:
            window = m.image.window
            Picture.create(document=document.id, sop_instance_uid=m.instance.sop_instance_uid,
                           sop_class_uid=m.instance.sop_class_uid,
                           series_uid=m.instance.series_uid,
                           series_number=getattr(m.instance, "series_number", None),
                           instance_number=getattr(m.instance, "instance_number", None),
                           frame=m.image.frame, frames=m.image.frames, renderer=m.renderer,
                           media_type=m.image.media_type, path=m.relative, size=len(m.image.data),
                           sha256=m.sha256, width=m.image.width, height=m.image.height,
                           window_center=window[0] if window else None,
                           window_width=window[1] if window else None,
                           lossy_source=bool(m.image.lossy_source),
                           source_sha256=m.instance.sha256, created=now)
        for (uid, renderer), error in failures.items():
            Failure.delete().where(Failure.document == document.id,
                                   Failure.sop_instance_uid == uid,
                                   Failure.renderer == renderer).execute()
            Failure.create(document=document.id, sop_instance_uid=uid, renderer=renderer,
                           error=error[:2000], at=now)
        current = Document.get_by_id(document.id)
        pictures = Picture.select().where(Picture.document == document.id).count()
        failed = Failure.select().where(Failure.document == document.id).count()
        changes: dict[Any, Any] = {
            Document.accession: current.accession or str(getattr(first, "accession", ""))[:64],
            Document.patient_id: current.patient_id or str(getattr(first, "patient_id", ""))[:64],
            Document.patient_name: current.patient_name or str(getattr(first, "patient_name", "")),
            Document.claimed: None, Document.updated: now, Document.built_revision: revision,
            Document.error: _summary(failed, failures) if failed else ""}
        if current.revision != revision:
            # More images came while these were made: again, after they settle.
            settle = gateway.settings("jpeg").settle_seconds
            changes.update({Document.state: COLLECTING,
                            Document.due: now + timedelta(seconds=settle)})
        else:
            state = FAILED if failed and not pictures else READY
            changes.update({Document.state: state, Document.due: None, Document.ready: now})
        Document.update(changes).where(Document.id == document.id).execute()
        finished = Document.get_by_id(document.id)
        if finished.state in (READY, FAILED):
            event_type = READY_EVENT if finished.state == READY else FAILED_EVENT
            event_id = gateway.hook.publish_event(
                gateway=gateway, event_type=event_type, study_uid=finished.study_uid,
                payload={"document": document_json(gateway, finished, with_content=True)})
            if event_id:
                Document.update(event_id=event_id).where(Document.id == document.id).execute()
    remove_durably(replaced, gateway.config.gateway.durable)
    finished = Document.get_by_id(document.id)
    log.info("document %s (study %s): %s, %d picture(s), %d image(s) failed", finished.uuid,
             finished.study_uid, finished.state, pictures, failed)
    return finished


def _summary(failed: int, failures: Mapping[tuple[str, str], str]) -> str:
    sample = next(iter(failures.items()), None)
    text = f"{failed} image(s) could not be rendered"
    if sample:
        (uid, renderer), error = sample
        text += f"; {uid} ({renderer}): {error}"
    return text[:2000]


def _finish_without_images(gateway: Any, document: Document, reason: str) -> Document:
    now = utcnow()
    with write_transaction(gateway.database):
        Document.update(state=FAILED, error=reason, claimed=None, due=None, updated=now).where(
            Document.id == document.id).execute()
    log.error("document %s: %s", document.uuid, reason)
    return Document.get_by_id(document.id)


def release(gateway: Any, document_pk: int, error: str) -> None:
    """Give a claimed document back after its build broke (a full disk, a database
    error): it is tried again after a pause, keeping the error for the operator."""
    now = utcnow()
    with write_transaction(gateway.database):
        Document.update(state=COLLECTING, claimed=None, error=error[:2000], updated=now,
                        due=now + timedelta(seconds=60)).where(
            Document.id == document_pk).execute()


# What the HIS and the command line see ---------------------------------------------------------


def picture_link(gateway: Any, picture: Picture) -> str:
    base = gateway.settings("jpeg").link_base_url
    if base:
        return f"{base.rstrip('/')}/{picture.path}"
    return (pictures_root(gateway) / picture.path).resolve().as_uri()


def document_json(gateway: Any, document: Document, with_content: bool = False) -> dict[str, Any]:
    """A document as the HIS and ``documents show --json`` see it. Pictures carry a
    ``url``, or with ``deliver = "files"`` and ``with_content`` their bytes (base64)."""
    files = with_content and gateway.settings("jpeg").deliver == FILES
    root = pictures_root(gateway)
    pictures = []
    for p in (Picture.select().where(Picture.document == document.id)
              .order_by(Picture.series_number, Picture.series_uid, Picture.instance_number,
                        Picture.sop_instance_uid, Picture.frame, Picture.renderer)):
        item: dict[str, Any] = {
            "sop_instance_uid": p.sop_instance_uid, "sop_class_uid": p.sop_class_uid,
            "series_uid": p.series_uid, "series_number": p.series_number,
            "instance_number": p.instance_number, "frame": p.frame, "frames": p.frames,
            "renderer": p.renderer, "media_type": p.media_type, "width": p.width,
            "height": p.height, "size": p.size, "sha256": p.sha256,
            "window": None if p.window_width is None else
            {"center": p.window_center, "width": p.window_width},
            "lossy_source": p.lossy_source, "path": p.path}
        if files:
            item["content_base64"] = base64.b64encode((root / p.path).read_bytes()).decode()
        else:
            item["url"] = picture_link(gateway, p)
        pictures.append(item)
    failures = [{"sop_instance_uid": f.sop_instance_uid, "renderer": f.renderer,
                 "error": f.error} for f in
                Failure.select().where(Failure.document == document.id)
                .order_by(Failure.sop_instance_uid)]
    return {"id": document.uuid, "document_id": document.document_id,
            "study_uid": document.study_uid, "accession": document.accession,
            "patient": {"id": document.patient_id, "name": document.patient_name},
            "state": document.state, "trigger": document.trigger,
            "created": iso(document.created), "ready": iso(document.ready),
            "error": document.error, "lossy_source": any(p["lossy_source"] for p in pictures),
            "pictures": pictures, "failures": failures}


def find_document(key: str) -> Document:
    """A document by its id (UUID) or the HIS's document ID."""
    document = (Document.get_or_none(Document.uuid == key)
                or Document.get_or_none(Document.document_id == key))
    if document is None:
        raise UsageError(f"no document {key!r}")
    return document


def documents(state: str = "", study_uid: str = "", limit: int = 100) -> Iterable[Document]:
    query = Document.select().order_by(Document.created.desc(), Document.id.desc())
    if state:
        query = query.where(Document.state == state)
    if study_uid:
        query = query.where(Document.study_uid == study_uid)
    return query.limit(limit)
