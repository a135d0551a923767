"""The outbox: events for the HIS written in the transaction of the change they report,
and a worker that hands them to the notifiers plugins register.

Guarantees (documented in ``docs/plugins/mpps.md``):

* **Durable**: an event exists exactly when the change it reports was committed; the
  worker only reads the table, so a restart or a HIS outage loses nothing.
* **At least once, idempotent**: a delivery is repeated until a notifier accepts it,
  always with the same body and the same event id (a UUID), which the receiver uses
  to drop repeats. A delivery cut off by a stop is repeated after the restart.
* **In order per stream**: each event belongs to one stream (an order, or an MPPS
  that no order was found for) and carries its sequence number there; a notifier gets
  an event only after every earlier event of its stream was delivered to it.
* **Dead letters**: an event failing for longer than ``dead_letter_after`` is set
  aside (state ``dead``), listed, and holds back the later events of its stream until
  ``dicomgate outbox retry`` puts it back in line. Nothing is ever dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import peewee

from dicomgate import __version__
from dicomgate.db import write_transaction
from dicomgate.plugins.mpps.models import (
    DEAD,
    DELIVERED,
    PENDING,
    Delivery,
    OutboxEvent,
    Stream,
)

log = logging.getLogger("dicomgate.mpps.outbox")

#: The version of the event schema; a receiver checks ``"version"`` in each body.
SCHEMA_VERSION = 1
#: Deliveries fetched per round.
BATCH = 50


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds") + "Z"


@attrs.frozen
class Event:
    """What a notifier's ``deliver`` receives: one event, on one attempt."""

    #: The event's UUID: the same on every attempt (the idempotency key).
    id: str
    type: str
    #: The ordered stream the event belongs to, and its number there (1, 2, ...).
    stream: str
    sequence: int
    #: The JSON body, UTF-8, exactly the same bytes on every attempt.
    body: bytes
    #: 1 for the first attempt.
    attempt: int
    created: datetime

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


class DeliveryError(Exception):
    """A notifier could not deliver an event; it will be tried again."""


def order_stream(order_study_uid: str) -> str:
    return f"order:{order_study_uid}"


def mpps_stream(mpps_uid: str) -> str:
    return f"mpps:{mpps_uid}"


class Outbox:
    """The outbox of one gateway: writing events, and the delivery worker."""

    def __init__(self, gateway: Any):
        self.gateway = gateway
        self.settings = gateway.settings("mpps")
        self._notifiers: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sending: Any = None
        self._look_again_until = 0.0

    # Notifiers ---------------------------------------------------------------------------

    def notifiers(self) -> dict[str, Any]:
        """Every notifier the plugins registered (``register_notifiers``), by name."""
        with self._lock:
            if self._notifiers is None:
                self._notifiers = self.gateway.collect_named("register_notifiers",
                                                             "notifier", "deliver")
            return self._notifiers

    # Writing -----------------------------------------------------------------------------

    def append(self, type_: str, stream: str, payload: Mapping[str, Any],
               mpps_uid: str = "") -> str:
        """Add an event; call it inside the transaction of the change it reports.

        The body is fixed now: every attempt sends the same bytes. Returns the event id.
        """
        database = self.gateway.database
        if not database.in_transaction():
            raise RuntimeError("outbox events are written inside the change's transaction")
        Stream.insert(key=stream, last_sequence=0).on_conflict_ignore().execute()
        Stream.update(last_sequence=Stream.last_sequence + 1).where(
            Stream.key == stream).execute()
        sequence = Stream.select(Stream.last_sequence).where(Stream.key == stream).scalar()
        event_id = str(uuid.uuid4())
        now = utcnow()
        body = {"version": SCHEMA_VERSION, "id": event_id, "type": type_,
                "occurred": iso(now), "stream": stream, "sequence": sequence,
                "gateway": {"ae_title": self.gateway.ae_title, "version": __version__},
                **payload}
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        event = OutboxEvent.create(uuid=event_id, type=type_, stream=stream, sequence=sequence,
                                   mpps_uid=mpps_uid[:64], body=text, created=now)
        rows = [{"event": event.id, "notifier": name, "stream": stream, "sequence": sequence,
                 "state": PENDING, "next_attempt": now} for name in self.notifiers()]
        if rows:
            Delivery.insert_many(rows).execute()
        log.debug("outbox: %s %s #%d (%s)", type_, stream, sequence, event_id)
        return event_id

    # Delivering --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def wake_after_commit(self) -> None:
        """Wake the worker for an event written in a transaction still open: it looks
        again every 50 ms for the next two seconds instead of waiting a poll interval."""
        self._look_again_until = time.monotonic() + 2.0
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None or not self.notifiers():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicomgate-outbox", daemon=True)
        self._thread.start()
        log.info("outbox: delivering events to %s", ", ".join(sorted(self.notifiers())))

    def stop(self) -> None:
        """Stop the worker: a delivery in progress is cut off (and repeated after the
        next start, with the same event id)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        sending = self._sending
        if sending is not None and callable(getattr(sending, "cancel", None)):
            try:
                sending.cancel()
            except Exception:
                log.exception("outbox: cancelling a delivery failed")
        thread.join(timeout=self.settings.webhook_timeout + 5)
        if thread.is_alive():
            log.warning("outbox: the delivery worker did not stop in time")
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.gateway.database.connection_context():
                    sent = self.deliver_due()
                    wait = 0.0 if sent else self._seconds_to_next()
                    if wait > 0 and time.monotonic() < self._look_again_until:
                        wait = min(wait, 0.05)
            except Exception:
                log.exception("outbox: delivery round failed")
                wait = self.settings.poll_interval
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()

    def _seconds_to_next(self) -> float:
        """Until the earliest pending head of a stream is due, at most poll_interval."""
        names = list(self.notifiers())
        poll = self.settings.poll_interval
        if not names:
            return poll
        earliest = (self._heads(names).select(peewee.fn.MIN(Delivery.next_attempt)).scalar())
        if earliest is None:
            return poll
        if isinstance(earliest, str):
            earliest = datetime.fromisoformat(earliest)
        return max(0.0, min(poll, (earliest - utcnow()).total_seconds()))

    @staticmethod
    def _heads(names: list[str]) -> peewee.ModelSelect:
        """Pending deliveries with no undelivered earlier delivery in their stream."""
        earlier = Delivery.alias("earlier")
        blocking = earlier.select(peewee.SQL("1")).where(
            (earlier.notifier == Delivery.notifier) & (earlier.stream == Delivery.stream)
            & (earlier.sequence < Delivery.sequence) & (earlier.state != DELIVERED))
        return Delivery.select().where(Delivery.notifier.in_(names), Delivery.state == PENDING,
                                       ~peewee.fn.EXISTS(blocking))

    def deliver_due(self, limit: int = BATCH) -> int:
        """One round: hand every due head of a stream to its notifier. Returns how many
        deliveries were attempted."""
        notifiers = self.notifiers()
        if not notifiers:
            return 0
        due = list(self._heads(list(notifiers)).where(Delivery.next_attempt <= utcnow())
                   .order_by(Delivery.id).limit(limit))
        attempted = 0
        for delivery in due:
            if self._stop.is_set():
                break
            self._attempt(delivery, notifiers[delivery.notifier])
            attempted += 1
        return attempted

    def _attempt(self, delivery: Delivery, notifier: Any) -> None:
        row = OutboxEvent.get_by_id(delivery.event_id)
        event = Event(id=row.uuid, type=row.type, stream=row.stream, sequence=row.sequence,
                      body=row.body.encode("utf-8"), attempt=delivery.attempts + 1,
                      created=row.created)
        self._sending = notifier
        try:
            notifier.deliver(event)
            error = None
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        finally:
            self._sending = None
        now = utcnow()
        settings = self.settings
        changes: dict[Any, Any] = {Delivery.attempts: Delivery.attempts + 1,
                                   Delivery.last_attempt: now}
        if error is None:
            changes.update({Delivery.state: DELIVERED, Delivery.delivered: now,
                            Delivery.last_error: "", Delivery.failing_since: None})
            log.info("outbox: %s %s #%d delivered to %s (attempt %d)", event.type,
                     event.stream, event.sequence, delivery.notifier, event.attempt)
        else:
            since = delivery.failing_since or now
            delay = min(settings.retry_max,
                        settings.retry_initial * settings.retry_factor ** delivery.attempts)
            changes.update({Delivery.failing_since: since, Delivery.last_error: error[:1000],
                            Delivery.next_attempt: now + timedelta(seconds=delay)})
            if (now - since).total_seconds() >= settings.dead_letter_after:
                changes[Delivery.state] = DEAD
                log.error("outbox: %s %s #%d to %s failed for %.0f s, set aside as a dead "
                          "letter (later events of the stream wait): %s", event.type,
                          event.stream, event.sequence, delivery.notifier,
                          (now - since).total_seconds(), error)
            else:
                log.warning("outbox: %s %s #%d to %s failed (attempt %d, next in %.1f s): %s",
                            event.type, event.stream, event.sequence, delivery.notifier,
                            event.attempt, delay, error)
        with write_transaction(self.gateway.database):
            Delivery.update(changes).where(Delivery.id == delivery.id).execute()


def retry(database: peewee.Database, event_ids: list[str] | None = None) -> int:
    """Put dead letters (or the given events, dead or pending) back in line, due now,
    with a fresh dead-letter clock. Returns how many deliveries were changed."""
    query = Delivery.update(state=PENDING, next_attempt=utcnow(), failing_since=None)
    if event_ids:
        ids = OutboxEvent.select(OutboxEvent.id).where(OutboxEvent.uuid.in_(event_ids))
        query = query.where(Delivery.event.in_(ids), Delivery.state != DELIVERED)
    else:
        query = query.where(Delivery.state == DEAD)
    with write_transaction(database):
        return query.execute()


def outbox_for(gateway: Any) -> Outbox:
    """The gateway's outbox (one per gateway, created on first use)."""
    return gateway.plugin_object("mpps.outbox", Outbox)

