"""The Modality Worklist C-FIND handler: who is asking, what they may see, the answers
in their character set."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from pydicom import Dataset

from dicomgate import Request
from dicomgate.plugins.worklist import charsets
from dicomgate.plugins.worklist.query import (
    NOT_AN_IDENTIFIER,
    Answerer,
    Device,
    InvalidQuery,
    parse,
    search,
)
from dicomgate.plugins.worklist.settings import WorklistPeerSettings, WorklistSettings

log = logging.getLogger("dicomgate.worklist")

NAME = "worklist"
PENDING = 0xFF00
#: Pending, with the warning that some optional keys were not matched on.
PENDING_KEYS_NOT_MATCHED = 0xFF01
CANCELLED = 0xFE00


def device_of(request: Request, settings: WorklistSettings) -> tuple[Device, charsets.TextConverter,
                                                                      int]:
    """The calling device's view of the worklist, its text conversion and answer limit."""
    association = request.association
    calling = association.calling_ae.strip()
    peer = association.peer
    own = (peer.plugin_settings(NAME) if peer is not None else None) or WorklistPeerSettings()

    def pick(name: str) -> Any:
        value = getattr(own, name)
        return getattr(settings, name) if value is None else value

    charset, scheme = pick("charset"), pick("transliteration")
    converter = charsets.TextConverter(charset=charset, scheme=scheme, uppercase=pick("uppercase"))
    case_insensitive = pick("case_insensitive_names")
    if peer is not None:
        device = Device(calling_ae=calling, stations=frozenset({peer.ae_title, *own.stations}),
                        see_all=own.see_all, case_insensitive_names=case_insensitive, scheme=scheme)
    elif settings.unknown_devices == "all":
        device = Device(calling, see_all=True, case_insensitive_names=case_insensitive, scheme=scheme)
    elif settings.unknown_devices == "own-ae-title":
        device = Device(calling, stations=frozenset({calling}),
                        case_insensitive_names=case_insensitive, scheme=scheme)
    else:
        device = Device(calling, case_insensitive_names=case_insensitive, scheme=scheme)
    return device, converter, pick("max_answers")


def _failure(error: InvalidQuery) -> Dataset:
    status = Dataset()
    status.Status = error.status
    status.ErrorComment = error.comment[:64]
    if error.tag is not None:
        status.OffendingElement = [int(error.tag)]
    return status


def handle_find(request: Request) -> Iterator[tuple[Any, Dataset | None]]:
    """Answer one Modality Worklist C-FIND: a pending response per item, then nothing
    (pynetdicom sends the final success)."""
    gateway = request.gateway
    settings: WorklistSettings = gateway.settings(NAME)
    who = request.association.describe()
    device, converter, limit = device_of(request, settings)
    try:
        identifier = request.dataset()
    except Exception as exc:  # undecodable data set
        log.warning("%s: worklist query cannot be decoded: %s", who, exc)
        yield _failure(InvalidQuery(NOT_AN_IDENTIFIER, "identifier cannot be decoded")), None
        return
    if identifier is None:
        yield _failure(InvalidQuery(NOT_AN_IDENTIFIER, "no identifier")), None
        return
    routes = settings.routes
    try:
        query = parse(identifier, gateway.database, device, routes)
    except InvalidQuery as error:
        log.warning("%s: worklist query refused (0x%04X): %s", who, error.status, error.comment)
        yield _failure(error), None
        return
    if device.sees_nothing:
        log.info("%s: unknown device sees no worklist items ([worklist] unknown_devices)", who)
        return
    today = datetime.now(settings.zone()).date()
    started = time.perf_counter()
    rows = search(query, device, routes, gateway.database, today, settings.keep_days,
                  limit + 1 if limit else None)
    if limit and len(rows) > limit:
        log.warning("%s: worklist query matched more than %d items: answering the first %d "
                    "(max_answers)", who, limit, limit)
        rows = rows[:limit]
    answers = list(Answerer(query, device, routes).answers(rows))
    gateway.notify("adjust_worklist_answers", gateway=gateway,
                   association=request.association, query=identifier, answers=answers)
    if limit and len(answers) > limit:
        answers = answers[:limit]
    status = PENDING_KEYS_NOT_MATCHED if query.unsupported_matching else PENDING
    if query.unsupported_matching:
        log.info("%s: worklist keys not matched on (answered as return keys): %s", who,
                 ", ".join(query.unsupported_matching))
    log.info("%s: worklist query answered with %d item(s) in %.1f ms", who, len(answers),
             (time.perf_counter() - started) * 1000)
    for answer in answers:
        if request.is_cancelled():
            log.info("%s: worklist query cancelled by the device", who)
            yield CANCELLED, None
            return
        if not isinstance(answer, Dataset):
            log.warning("%s: a plugin put %r among the worklist answers: skipped", who,
                        type(answer).__name__)
            continue
        yield status, converter.apply(answer)
