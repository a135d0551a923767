"""``dicomgate studies [purge]``, ``dicomgate import`` and ``dicomgate verify``."""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import peewee

from dicomgate import UsageError
from dicomgate.cli import config_option, load_config, load_plugins, open_gateway
from dicomgate.gateway import configure
from dicomgate.plugins.storage.header import Malformed, read_meta
from dicomgate.plugins.storage.models import Instance, Patient, Series, Study
from dicomgate.plugins.storage.retention import size_text
from dicomgate.plugins.storage.scp import STORAGE_SOP_CLASSES, encode_file_meta
from dicomgate.plugins.storage.settings import KEEP_FIRST
from dicomgate.plugins.storage.store import (
    MIB,
    Rejected,
    Session,
    Store,
    inspect_file,
    search_text,
    store_for,
)

_DATE = re.compile(r"^\d{8}$")
_STORAGE_CLASSES = frozenset(STORAGE_SOP_CLASSES)


# studies -------------------------------------------------------------------------------


def _date_filter(value: str) -> Any:
    start, dash, end = value.partition("-")
    for part in (start, end):
        if part and not _DATE.match(part):
            raise UsageError(f"--date {value!r}: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
    if not dash:
        return Study.date == start
    if start and end:
        return Study.date.between(start, end)
    if start:
        return Study.date >= start
    if end:
        return (Study.date <= end) & (Study.date != "")
    raise UsageError("--date: give at least one date")


def _contains(database: peewee.Database, column: Any, needle: str) -> Any:
    """``needle`` occurs in ``column``, with no wildcard characters in the way."""
    if isinstance(database, peewee.SqliteDatabase):
        return peewee.fn.INSTR(column, needle) > 0
    return peewee.fn.STRPOS(column, needle) > 0


def _study_record(study: Study) -> dict[str, Any]:
    patient = study.patient
    return {
        "study_uid": study.study_uid,
        "date": study.date,
        "time": study.time,
        "accession": study.accession,
        "study_id": study.study_id,
        "description": study.description,
        "referring_physician": study.referring_physician,
        "modalities": [m for m in study.modalities.split("\\") if m],
        "series": study.num_series,
        "instances": study.num_instances,
        "size": study.size,
        "patient": {
            "patient_id": patient.patient_id,
            "issuer": patient.issuer,
            "name": patient.name,
            "birth_date": patient.birth_date,
            "sex": patient.sex,
        },
    }


@click.group(invoke_without_command=True)
@config_option
@click.option("--patient", help="Words of the patient's name or ID, any case and order "
                                "(\"иван иванов\" finds ИВАНОВ^ИВАН).")
@click.option("--date", "date_range", metavar="DATE",
              help="Study date YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (an end may be open).")
@click.option("--modality", help="Only studies with a series of this modality (CT, MR ...).")
@click.option("--accession", help="Only studies with this accession number.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True,
              help="Most studies to list, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def studies(ctx: click.Context, config_file: Path | None, patient: str | None,
            date_range: str | None, modality: str | None, accession: str | None, limit: int,
            as_json: bool) -> None:
    """List the studies in the store, newest first, with filters; or (purge) remove
    old ones."""
    if ctx.invoked_subcommand is not None:
        return
    with open_gateway() as gateway, gateway.database.connection_context():
        query = Study.select(Study, Patient).join(Patient)
        if patient:
            # every word of it, in any order: "иван иванов" finds ИВАНОВ^ИВАН
            for word in search_text(patient).split():
                query = query.where(_contains(gateway.database, Patient.search, word))
        if date_range:
            query = query.where(_date_filter(date_range.strip()))
        if modality:
            query = query.where(Study.id.in_(
                Series.select(Series.study).where(Series.modality == modality.strip().upper())))
        if accession:
            query = query.where(Study.accession == accession.strip())
        query = query.order_by(Study.date.desc(), Study.time.desc(), Study.id.desc()).limit(limit)
        records = [_study_record(study) for study in query]
    if as_json:
        click.echo(json.dumps(records, indent=2, ensure_ascii=False))
        return
    if not records:
        click.echo("no studies found")
        return
    for record in records:
        patient_row = record["patient"]
        click.echo(
            f"{_format_date(record['date']):<10}  {patient_row['name'] or '(no name)'} "
            f"[{patient_row['patient_id'] or 'no ID'}]  "
            f"{'/'.join(record['modalities']) or '-'}  acc {record['accession'] or '-'}  "
            f"{record['series']} series, {record['instances']} instance(s)  "
            f"{record['description']}".rstrip())
        click.echo(f"{'':<10}  {record['study_uid']}")


def _format_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if _DATE.match(value or "") else value or "-"


@studies.command()
@config_option
@click.option("--older-than", "days", type=click.IntRange(1), metavar="DAYS",
              help="Remove the studies whose last instance arrived more than DAYS days "
                   "ago.  [default: [storage] keep_days]")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def purge(ctx: click.Context, config_file: Path | None, days: int | None, dry_run: bool,
          as_json: bool) -> None:
    """Remove whole studies (files and index rows) whose last instance arrived more
    than DAYS days ago, as the gateway's retention does with [storage] keep_days."""
    if config_file is None and ctx.parent is not None:  # dicomgate studies --config F purge
        ctx.params["config_file"] = ctx.parent.params.get("config_file")
    if days is None:  # checked before the database is opened (or created)
        config = load_config()
        days = configure(config, load_plugins(config)).plugin_settings["storage"].keep_days
        if days <= 0:
            raise UsageError("give --older-than DAYS: [storage] keep_days is not set "
                             "(0 keeps every study)")
    with open_gateway() as gateway, gateway.database.connection_context():
        report = store_for(gateway).purge(timedelta(days=days), dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": report.dry_run, "older_than_days": days,
                               "studies": report.studies, "instances": report.instances,
                               "bytes": report.bytes_freed,
                               "study_uids": list(report.study_uids)}, indent=2))
        return
    for uid in report.study_uids:
        click.echo(f"{'would remove' if dry_run else 'removed'} study {uid}")
    click.echo(f"{'would remove' if dry_run else 'removed'} {report.studies} study(ies), "
               f"{report.instances} instance(s), {size_text(report.bytes_freed)}, last "
               f"received more than {days} day(s) ago")


# import --------------------------------------------------------------------------------


def _files_under(paths: tuple[Path, ...]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
            continue
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            found.extend(Path(folder, name) for name in sorted(files))
    return found


def _chunks(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(MIB):
            yield chunk


def import_file(store: Store, path: Path, session: Session) -> tuple[str, str]:
    """Store one file the way a C-STORE would be. Returns (outcome, message) with
    outcome one of stored, replaced, duplicate, rejected, skipped."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            size = os.fstat(fh.fileno()).st_size
            if len(head) < 132 or head[128:132] != b"DICM":
                return "skipped", "not a DICOM file"
            try:
                meta = read_meta(fh)
            except Malformed as exc:
                return "rejected", str(exc)
    except OSError as exc:
        return "skipped", f"cannot read: {exc.strerror or exc}"
    if meta.sop_class_uid not in _STORAGE_CLASSES:
        return "skipped", f"not a storage SOP class ({meta.sop_class_uid or 'none'})"
    file_meta = encode_file_meta(meta.sop_class_uid, meta.sop_instance_uid,
                                 meta.transfer_syntax, meta.source_ae)
    try:
        temporary = store.write_temporary(
            [file_meta, *_chunks(path, meta.dataset_offset)],
            len(file_meta) + size - meta.dataset_offset)
        outcome = store.ingest(temporary, expected_class=meta.sop_class_uid,
                               expected_instance=meta.sop_instance_uid, synced=True,
                               consume=True, session=session)
    except Rejected as rejected:
        return "rejected", f"0x{rejected.status:04X} {rejected.comment}"
    if outcome.instance is None:
        return "duplicate", "already stored"
    session.instances.append(outcome.instance)
    store.gateway.notify("instance_stored", gateway=store.gateway, instance=outcome.instance,
                         association=None)
    return ("replaced" if outcome.instance.replaced else "stored"), outcome.instance.path


@click.command(name="import")
@config_option
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
def import_command(config_file: Path | None, paths: tuple[Path, ...]) -> None:
    """Copy the DICOM files in PATHS (folders are searched recursively) into the store.

    Each file goes through the same checks, duplicate policy and index as a received
    C-STORE. Files that are not DICOM are skipped. Exits 1 when a file was rejected.
    """
    files = _files_under(paths)
    counts = dict.fromkeys(("stored", "replaced", "duplicate", "rejected", "skipped"), 0)
    with open_gateway() as gateway, gateway.database.connection_context():
        store = store_for(gateway)
        store.prepare()
        session = Session()
        with click.progressbar(files, label="importing", show_pos=True,
                               item_show_func=lambda p: p.name if p else None) as bar:
            for path in bar:
                outcome, message = import_file(store, path, session)
                counts[outcome] += 1
                if outcome in ("rejected", "skipped"):
                    # on a terminal, start below the progress bar's line
                    newline = "\n" if sys.stdout.isatty() else ""
                    click.echo(f"{newline}{outcome}: {path}: {message}", err=True)
        if session.instances:
            gateway.notify("instances_received", gateway=gateway,
                           instances=list(session.instances), association=None)
    click.echo(f"{len(files)} file(s): {counts['stored'] + counts['replaced']} stored "
               f"({counts['replaced']} replacing earlier copies), {counts['duplicate']} "
               f"duplicate(s), {counts['rejected']} rejected, {counts['skipped']} skipped")
    if counts["rejected"]:
        sys.exit(1)


# verify --------------------------------------------------------------------------------


def _store_files(store: Store) -> Iterator[Path]:
    """Every file under the root except the working folders (hidden ones)."""
    for folder, dirs, files in os.walk(store.root):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            yield Path(folder, name)


def _adopt(store: Store, path: Path) -> str:
    """Index an unindexed file found in the store, or move it to quarantine."""
    temporary = store.temporary_path()
    os.rename(path, temporary)
    reason = "already indexed under another file"
    try:
        outcome = store.ingest(temporary, consume=False, duplicates=KEEP_FIRST)
        if outcome.instance is not None:
            os.unlink(temporary)
            return f"indexed as {outcome.instance.path}"
    except Rejected as rejected:
        reason = rejected.comment
    except Exception as exc:  # keep the file whatever went wrong
        reason = f"{type(exc).__name__}: {exc}"
    store.quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = store.quarantine_dir / f"{path.name}.{secrets.token_hex(4)}"
    os.rename(temporary, target)
    return f"moved to {store.relative(target)} ({reason})"


@click.command()
@config_option
@click.option("--checksums", is_flag=True, help="Also re-read every file and compare its SHA-256.")
@click.option("--repair", is_flag=True,
              help="Remove the index rows of missing files and the files of purged "
                   "studies an interruption left; index other unindexed files, or move "
                   "those that cannot be indexed to the .quarantine folder.")
@click.option("--grace", type=click.FloatRange(0), default=300.0, show_default=True,
              help="Seconds: a newer unindexed file may be a transfer in progress, and is "
                   "left alone.")
def verify(config_file: Path | None, checksums: bool, repair: bool, grace: float) -> None:
    """Check that the files and the index agree. Exits 1 when problems remain."""
    problems = 0
    with open_gateway() as gateway, gateway.database.connection_context():
        store = store_for(gateway)
        if repair:
            purged = store.finish_purges()
            if purged:
                click.echo(f"removed {purged} file(s) of purged studies that an "
                           "interruption had left")
        # Files of purged studies: never indexed again. Those of a purge another
        # process is running are left to it.
        purging: dict[str, bool] = {}
        for journal in store.purge_journals():
            for relative in journal.files:
                if journal.active or store.purge_leftover(journal, relative):
                    purging[relative] = journal.active
        rows = list(Instance.select(Instance.id, Instance.path, Instance.size, Instance.sha256,
                                    Instance.sop_instance_uid).tuples().iterator())
        indexed = {row[1] for row in rows}
        missing: list[int] = []
        for row_id, relative, size, digest, uid in rows:
            path = store.absolute(relative)
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                # It may have been replaced since the rows were read
                current = Instance.select(Instance.path).where(Instance.id == row_id).scalar()
                if current == relative:
                    click.echo(f"missing file: {relative} (instance {uid})")
                    missing.append(row_id)
                continue
            if actual != size:
                click.echo(f"size mismatch: {relative} is {actual} bytes, index says {size}")
                problems += 1
            elif checksums:
                try:
                    found = inspect_file(path).sha256
                except (OSError, Malformed) as exc:
                    click.echo(f"unreadable: {relative}: {exc}")
                    problems += 1
                    continue
                if found != digest:
                    click.echo(f"checksum mismatch: {relative} (instance {uid})")
                    problems += 1
        orphans: list[Path] = []
        leftovers = 0
        now = time.time()
        for path in _store_files(store):
            relative = store.relative(path)
            if relative in indexed:
                continue
            stat = path.stat()
            if now - max(stat.st_mtime, stat.st_ctime) < grace:
                continue
            if Instance.select().where(Instance.path == relative).exists():
                continue
            if relative in purging:
                if not purging[relative]:
                    click.echo(f"unindexed file: {relative} (of a purged study; "
                               + ("it could not be removed)" if repair else
                                  "an interruption left it: --repair removes it)"))
                    leftovers += 1
                continue
            click.echo(f"unindexed file: {relative}")
            orphans.append(path)
        if repair:
            if missing:
                with store.transaction():
                    series = {row.series_id for row in Instance.select(Instance.series)
                              .where(Instance.id.in_(missing))}
                    Instance.delete().where(Instance.id.in_(missing)).execute()
                    store.prune(series_ids=series)
                click.echo(f"removed {len(missing)} index row(s) of missing files")
            for path in orphans:
                click.echo(f"{store.relative(path)}: {_adopt(store, path)}")
        else:
            problems += len(missing) + len(orphans)
        problems += leftovers  # with --repair: removed before, so only a failed removal
        click.echo(f"checked {len(rows)} indexed instance(s): {len(missing)} missing file(s), "
                   f"{len(orphans) + leftovers} unindexed file(s), {problems} problem(s) left")
    if problems:
        sys.exit(1)


def add_commands(cli: click.Group) -> None:
    cli.add_command(studies)
    cli.add_command(import_command)
    cli.add_command(verify)
