"""``dicomgate mpps list|show``, ``dicomgate orders status``, ``dicomgate outbox list|retry``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dicomgate import UsageError
from dicomgate.cli import config_option, open_gateway
from dicomgate.plugins.mpps import api
from dicomgate.plugins.mpps.models import DEAD, DELIVERED, PENDING, STATUSES, Delivery, OutboxEvent
from dicomgate.plugins.mpps.outbox import retry as retry_deliveries


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


def _orders_text(record: dict[str, Any]) -> str:
    if not record["orders"]:
        return "UNSCHEDULED"
    return ", ".join(f"{o['accession'] or o['study_uid']}/{o['scheduled_step_id']}"
                     for o in record["orders"])


# mpps --------------------------------------------------------------------------------------


@click.group(name="mpps")
def mpps() -> None:
    """Performed procedure steps the devices reported (MPPS)."""


@mpps.command(name="list")
@config_option
@click.option("--status", type=click.Choice(STATUSES, case_sensitive=False),
              help="Only steps with this status.")
@click.option("--unscheduled", is_flag=True,
              help="Only steps no worklist order was found for (to reconcile).")
@click.option("--patient-id", default=None, help="Only this patient's steps.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(config_file: Path | None, status: str | None, unscheduled: bool,
                 patient_id: str | None, limit: int, as_json: bool) -> None:
    """List performed procedure steps, newest first."""
    with open_gateway() as gateway:
        records = api.find(gateway, status=status, unscheduled=unscheduled,
                           patient_id=patient_id, limit=limit)
    if as_json:
        _echo_json(records)
        return
    for r in records:
        click.echo(f"{r['created'][:19]}  {r['status']:<12} {r['modality']:<4} "
                   f"{r['station_ae']:<16} {r['patient_id'] or '-':<12} "
                   f"{api.images_text(r['images']):<32} {_orders_text(r)}  "
                   f"{r['sop_instance_uid']}")
    if not records:
        click.echo("no performed procedure steps", err=True)


@mpps.command()
@config_option
@click.argument("uid")
@click.option("--datasets", is_flag=True, help="Include every received data set (JSON).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(config_file: Path | None, uid: str, datasets: bool, as_json: bool) -> None:
    """Show one performed procedure step: what it performs, its series with what
    arrived, its history and its events."""
    with open_gateway() as gateway:
        record = api.describe(gateway, uid.strip(), datasets=datasets)
    if record is None:
        raise UsageError(f"no performed procedure step {uid}")
    if as_json:
        _echo_json(record)
        return
    detail = record["detail"]
    click.echo(f"MPPS {record['sop_instance_uid']}: {record['status']}")
    click.echo(f"  device      {record['station_ae']} ({record['modality']}), "
               f"step ID {record['performed_procedure_step_id']}")
    click.echo(f"  patient     {record['patient_id']}  {record['patient_name']}")
    click.echo(f"  performed   {record['started'] or '?'} .. {record['ended'] or '-'}  "
               f"{record['description']}")
    click.echo(f"  images      {api.images_text(record['images'])}")
    if detail["discontinuation_reason"]:
        reason = detail["discontinuation_reason"]
        click.echo(f"  reason      {reason['meaning']} ({reason['value']}, {reason['scheme']})")
    click.echo("  scheduled steps:")
    for ref in detail["scheduled_steps"]:
        state = "linked" if ref["linked"] else "NO ORDER FOUND"
        click.echo(f"    accession {ref['accession'] or '-'}, requested procedure "
                   f"{ref['requested_procedure_id'] or '-'}, step "
                   f"{ref['scheduled_step_id'] or '-'}, study {ref['study_uid']}: {state}")
    for order in record["orders"]:
        click.echo(f"    -> worklist step {order['step_pk']} ({order['scheduled_step_id']}) "
                   f"of {order['accession'] or order['study_uid']}: {order['step_status']}")
    click.echo("  series:")
    for series in detail["series"]:
        click.echo(f"    {series['series_uid']}  {series['description'] or '-'}: performed "
                   f"{series['performed']}, received {series['received']}")
    click.echo("  history:")
    for message in record["history"]:
        click.echo(f"    {message['received'][:19]}  {message['message']:<8} -> "
                   f"{message['status']:<12} from {message['calling_ae']}@{message['address']}")
    click.echo("  events:")
    for event in record["events"]:
        states = ", ".join(f"{d['notifier']} {d['state']}" for d in event["deliveries"])
        click.echo(f"    {event['created'][:19]}  {event['type']:<22} {event['stream']} "
                   f"#{event['sequence']}  {states or 'no notifier'}")


# orders ------------------------------------------------------------------------------------


@click.group(name="orders")
def orders() -> None:
    """What was performed for an order."""


@orders.command(name="status")
@config_option
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def order_status(config_file: Path | None, key: str, as_json: bool) -> None:
    """Show an order (KEY: accession number, Study Instance UID or requested procedure
    ID): each step's status, the MPPS that performed it with the images performed and
    received, and the events sent to the HIS."""
    with open_gateway() as gateway:
        record = api.order_status(gateway, key.strip())
    if record is None:
        raise UsageError("no plugin keeps orders (enable the worklist plugin), and no MPPS "
                         f"names {key!r}")
    if record["order"] is None:
        raise UsageError(f"no order {key!r}")
    if as_json:
        _echo_json(record)
        return
    order = record["order"]
    click.echo(f"order {order['accession'] or '-'} (requested procedure "
               f"{order['requested_procedure_id'] or '-'}, study {order['study_uid']})")
    for step in record["steps"]:
        click.echo(f"  step {step['scheduled_step_id']}: {step['status']}")
        for line in step["mpps"]:
            click.echo(f"    MPPS {line['sop_instance_uid']} {line['status']} on "
                       f"{line['station_ae']}: {api.images_text(line['images'])}")
        if not step["mpps"]:
            click.echo("    no MPPS")
    click.echo("  events:")
    for event in record["events"]:
        states = ", ".join(f"{d['notifier']} {d['state']}" for d in event["deliveries"])
        click.echo(f"    #{event['sequence']:<3} {event['created'][:19]}  {event['type']:<22} "
                   f"{states or 'no notifier'}  {event['id']}")


# outbox ------------------------------------------------------------------------------------


@click.group(name="outbox")
def outbox() -> None:
    """Events for the HIS: what is waiting, what failed, and sending again."""


@outbox.command(name="list")
@config_option
@click.option("--dead", is_flag=True, help="Only dead letters (set aside after failing).")
@click.option("--all", "show_all", is_flag=True, help="Delivered events too.")
@click.option("--limit", type=click.IntRange(1), default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def outbox_list(config_file: Path | None, dead: bool, show_all: bool, limit: int,
                as_json: bool) -> None:
    """List deliveries not yet made (oldest first): pending ones, and dead letters."""
    with open_gateway() as gateway, gateway.database.connection_context():
        query = (Delivery.select(Delivery, OutboxEvent).join(OutboxEvent)
                 .order_by(Delivery.id).limit(limit))
        if dead:
            query = query.where(Delivery.state == DEAD)
        elif not show_all:
            query = query.where(Delivery.state != DELIVERED)
        rows = [{"event": d.event.uuid, "type": d.event.type, "stream": d.stream,
                 "sequence": d.sequence, "notifier": d.notifier, "state": d.state,
                 "attempts": d.attempts, "created": d.event.created.isoformat(),
                 "next_attempt": d.next_attempt.isoformat() if d.state == PENDING else None,
                 "failing_since": d.failing_since.isoformat() if d.failing_since else None,
                 "delivered": d.delivered.isoformat() if d.delivered else None,
                 "last_error": d.last_error} for d in query]
        undelivered = OutboxEvent.select().where(~OutboxEvent.id.in_(
            Delivery.select(Delivery.event))).count()
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['created'][:19]}  {r['state']:<9} {r['notifier']:<10} "
                   f"{r['type']:<22} {r['stream']} #{r['sequence']}  attempts "
                   f"{r['attempts']}  {r['event']}"
                   + (f"\n      last error: {r['last_error']}" if r["last_error"] else ""))
    if not rows:
        click.echo("nothing waiting" if not dead else "no dead letters", err=True)
    if undelivered:
        click.echo(f"{undelivered} event(s) were written while no notifier was configured "
                   "(kept, not sent)", err=True)


@outbox.command(name="retry")
@config_option
@click.argument("event_ids", nargs=-1)
def outbox_retry(config_file: Path | None, event_ids: tuple[str, ...]) -> None:
    """Send dead letters again (all of them, or the EVENT_IDS given, which may also be
    pending events to try at once). A running gateway picks them up within
    [mpps] poll_interval seconds."""
    with open_gateway() as gateway, gateway.database.connection_context():
        changed = retry_deliveries(gateway.database, list(event_ids) or None)
    click.echo(f"{changed} delivery(ies) queued again")


def add_commands(cli: click.Group) -> None:
    cli.add_command(mpps)
    cli.add_command(orders)
    cli.add_command(outbox)
