"""``dicomgate worklist add | list | show | cancel | status | import``."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from dicomgate import UsageError
from dicomgate.cli import config_option, open_gateway
from dicomgate.plugins.worklist import api
from dicomgate.plugins.worklist.models import STATUSES


@click.group(name="worklist")
def worklist() -> None:
    """Modality worklist: add, list, show, cancel and import orders."""


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


def _step_line(step: api.StepRecord) -> str:
    start = f"{step.start_date[:4]}-{step.start_date[4:6]}-{step.start_date[6:]} " \
            f"{step.start_time[:2]}:{step.start_time[2:4]}"
    station = step.station_ae or "(routed)"
    return (f"{step.pk:>7} {start} {step.status:<12} {step.modality:<4} {station:<16} "
            f"{step.accession or '-':<16} {step.patient_id:<12} {step.patient_name}  "
            f"{step.description}")


@worklist.command()
@config_option
@click.option("--patient-id", required=True, help="Patient ID.")
@click.option("--patient-name", required=True, help="Patient's name, DICOM style: Family^Given^Middle.")
@click.option("--issuer", default="", help="Issuer of Patient ID.")
@click.option("--birth-date", default="", help="YYYY-MM-DD or YYYYMMDD.")
@click.option("--sex", default="", type=click.Choice(["", "M", "F", "O"], case_sensitive=False))
@click.option("--accession", default="", help="Accession number (unique).")
@click.option("--procedure-id", default="", help="Requested Procedure ID [default: the "
              "accession number, or generated].")
@click.option("--description", default="", help="Requested procedure description.")
@click.option("--referring-physician", default="")
@click.option("--requesting-physician", default="")
@click.option("--priority", default="", type=click.Choice(["", "STAT", "HIGH", "ROUTINE",
                                                           "MEDIUM", "LOW"],
                                                          case_sensitive=False))
@click.option("--modality", required=True, help="CT, MR, US, DX ...")
@click.option("--station-ae", default="", help="Scheduled Station AE Title [default: none, "
              "the routing rules decide].")
@click.option("--station-name", default="")
@click.option("--location", default="", help="Scheduled Procedure Step Location (room).")
@click.option("--start", default=None, help="Start: 2025-05-20T10:30 [default: now].")
@click.option("--performing-physician", default="")
@click.option("--step-description", default="", help="Scheduled procedure step description "
              "[default: the procedure description].")
@click.option("--json", "as_json", is_flag=True, help="Print the stored order as JSON.")
def add(config_file: Path | None, patient_id: str, patient_name: str, issuer: str,
        birth_date: str, sex: str, accession: str, procedure_id: str, description: str,
        referring_physician: str, requesting_physician: str, priority: str, modality: str,
        station_ae: str, station_name: str, location: str, start: str | None,
        performing_physician: str, step_description: str, as_json: bool) -> None:
    """Add an order with one scheduled procedure step."""
    with open_gateway() as gateway:
        if start is None:
            start = datetime.now(gateway.settings(api.NAME).zone()).strftime("%Y%m%d%H%M")
        order = {
            "patient": {"id": patient_id, "name": patient_name, "issuer": issuer,
                        "birth_date": birth_date, "sex": sex.upper()},
            "accession": accession, "procedure_id": procedure_id, "description": description,
            "referring_physician": referring_physician,
            "requesting_physician": requesting_physician, "priority": priority.upper(),
            "steps": [{"modality": modality, "station_ae": station_ae,
                       "station_name": station_name, "location": location, "start": start,
                       "performing_physician": performing_physician,
                       "description": step_description or description}],
        }
        record = api.add_order(gateway, order, source="cli")
    if as_json:
        _echo_json(record.to_json())
        return
    click.echo(f"order {record.pk}: accession {record.accession or '-'}, study "
               f"{record.study_uid}")
    for step in record.steps:
        click.echo(_step_line(step))


@worklist.command(name="list")
@config_option
@click.option("--date", "day", default="today",
              help="YYYY-MM-DD, 'today' [default] or 'all'.")
@click.option("--station-ae", default=None, help="Scheduled Station AE Title as ordered.")
@click.option("--modality", default=None)
@click.option("--status", default="active",
              help="'active' [default: still on a worklist], 'all', or a status "
                   f"({', '.join(STATUSES)}).")
@click.option("--accession", default=None)
@click.option("--patient-id", default=None)
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_steps(config_file: Path | None, day: str, station_ae: str | None,
               modality: str | None, status: str, accession: str | None,
               patient_id: str | None, limit: int | None, as_json: bool) -> None:
    """List scheduled procedure steps (today's active ones by default)."""
    with open_gateway() as gateway:
        when: Any = None
        if day == "today":
            when = api.today(gateway)
        elif day != "all":
            when = day
        wanted: Any = None if status == "all" else status
        if wanted not in (None, "active") and wanted.upper() not in STATUSES:
            raise UsageError(f"--status {status!r}: 'active', 'all' or one of "
                             f"{', '.join(STATUSES)}")
        try:
            steps = api.find_steps(gateway, day=when, station_ae=station_ae, modality=modality,
                                   status=wanted, accession=accession, patient_id=patient_id,
                                   limit=limit)
        except ValueError as exc:
            raise UsageError(f"--date: {exc}") from None
    if as_json:
        _echo_json([step.to_json() for step in steps])
        return
    for step in steps:
        click.echo(_step_line(step))
    click.echo(f"{len(steps)} step(s)", err=True)


@worklist.command()
@config_option
@click.argument("accession", required=False)
@click.option("--study-uid", default=None, help="Find the order by Study Instance UID.")
@click.option("--step", "step_pk", type=int, default=None,
              help="Find the order of this step (the number `list` shows).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(config_file: Path | None, accession: str | None, study_uid: str | None,
         step_pk: int | None, as_json: bool) -> None:
    """Show an order (by ACCESSION, --study-uid or --step) with each step's history."""
    with open_gateway() as gateway:
        if step_pk is not None:
            study_uid = api.get_step(gateway, step_pk).study_uid
        if accession is None and study_uid is None:
            raise UsageError("give an ACCESSION, --study-uid or --step")
        record = api.get_order(gateway, accession=accession, study_uid=study_uid)
        histories = {step.pk: api.history(gateway, step.pk) for step in record.steps}
    if as_json:
        data = record.to_json()
        for step in data["steps"]:
            step["history"] = [{"status": h.status, "previous": h.previous,
                                "source": h.source, "reason": h.reason,
                                "at": h.at.isoformat()} for h in histories[step["pk"]]]
        _echo_json(data)
        return
    patient = record.patient
    click.echo(f"Patient:     {patient.name} (ID {patient.id}"
               f"{', issuer ' + patient.issuer if patient.issuer else ''})"
               f"{', born ' + patient.birth_date if patient.birth_date else ''}"
               f"{', ' + patient.sex if patient.sex else ''}")
    click.echo(f"Accession:   {record.accession or '-'}   Procedure ID: {record.procedure_id}"
               f"   Priority: {record.priority or '-'}")
    click.echo(f"Study UID:   {record.study_uid}")
    click.echo(f"Procedure:   {record.description}")
    if record.referring_physician or record.requesting_physician:
        click.echo(f"Physicians:  referring {record.referring_physician or '-'}, "
                   f"requesting {record.requesting_physician or '-'}")
    click.echo(f"Ordered:     {record.created:%Y-%m-%d %H:%M:%S} UTC by {record.source or '-'}")
    for step in record.steps:
        click.echo("")
        click.echo(f"Step {step.step_id} [{step.pk}]: {step.status}, {step.modality} at "
                   f"{step.station_ae or '(routed)'}"
                   f"{' / ' + step.station_name if step.station_name else ''}"
                   f"{', ' + step.location if step.location else ''}, "
                   f"{step.start_date} {step.start_time}  {step.description}")
        for change in histories[step.pk]:
            click.echo(f"    {change.at:%Y-%m-%d %H:%M:%S} {change.previous or '-':>12} -> "
                       f"{change.status:<12} {change.source}"
                       f"{': ' + change.reason if change.reason else ''}")


@worklist.command()
@config_option
@click.argument("accession", required=False)
@click.option("--study-uid", default=None, help="Cancel the order with this Study Instance UID.")
@click.option("--step", "step_pk", type=int, default=None, help="Cancel only this step.")
@click.option("--reason", default="", help="Recorded in the step's history.")
def cancel(config_file: Path | None, accession: str | None, study_uid: str | None,
           step_pk: int | None, reason: str) -> None:
    """Cancel an order (by ACCESSION or --study-uid) or one step: it leaves the worklist."""
    if accession is None and study_uid is None and step_pk is None:
        raise UsageError("give an ACCESSION, --study-uid or --step")
    with open_gateway() as gateway:
        changed = api.cancel(gateway, accession=accession, study_uid=study_uid,
                             step_pk=step_pk, reason=reason, source="cli")
    click.echo(f"cancelled {len(changed)} step(s)")


@worklist.command(name="status")
@config_option
@click.argument("step_pk", type=int)
@click.argument("status", type=click.Choice(STATUSES, case_sensitive=False))
@click.option("--reason", default="", help="Recorded in the step's history.")
@click.option("--force", is_flag=True, help="Change a completed, discontinued or cancelled step.")
def set_status(config_file: Path | None, step_pk: int, status: str, reason: str,
               force: bool) -> None:
    """Set the status of step STEP_PK (the number `list` shows)."""
    with open_gateway() as gateway:
        step = api.set_status(gateway, step_pk, status, source="cli", reason=reason, force=force)
    click.echo(_step_line(step))


@worklist.command(name="import")
@config_option
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
def import_orders(config_file: Path | None, file: Path) -> None:
    """Add the orders of a JSON FILE ('-': standard input): a list of orders, or
    {"orders": [...]}. All or none are added."""
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{file}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and "orders" in data:
        data = data["orders"]
    if not isinstance(data, list):
        raise UsageError(f"{file}: expected a list of orders or {{\"orders\": [...]}}")
    with open_gateway() as gateway:
        try:
            added = api.add_orders(gateway, data, source="import", records=False)
        except api.OrderError as exc:
            raise UsageError(f"{file}: {exc}") from None
    del added
    steps = sum(len(order.get("steps") or ()) for order in data if isinstance(order, dict))
    click.echo(f"imported {len(data)} order(s), {steps} step(s)")


def add_commands(cli: click.Group) -> None:
    cli.add_command(worklist)
