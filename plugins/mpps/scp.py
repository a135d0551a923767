"""The Modality Performed Procedure Step SCP: N-CREATE and N-SET handlers.

Each handler returns ``(status, dataset)`` as pynetdicom expects. A refused request
is answered with its failure status, Error Comment and, for N-SET, the Attribute
Identifier List, and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomgate import Request
from dicomgate.plugins.mpps import api
from dicomgate.plugins.mpps import attributes as attr
from dicomgate.plugins.mpps.attributes import Refusal

log = logging.getLogger("dicomgate.mpps")


def _raw(stream: Any) -> bytes | None:
    try:
        return stream.getvalue() if stream is not None else None
    except (AttributeError, ValueError):
        return None


def _origin(request: Request) -> api.Origin:
    association = request.association
    return api.Origin(association.calling_ae, association.address, request.transfer_syntax)


def handle_create(request: Request) -> tuple[Any, Dataset | None]:
    """N-CREATE: a device started a procedure step."""
    command = request.event.request
    uid = str(command.AffectedSOPInstanceUID or "").strip()
    answer: Dataset | None = None
    if not uid:
        # Some devices leave the UID to the SCP (PS3.7 10.1.5.1.4): assign one and
        # return it; pynetdicom moves it from this data set into the response.
        uid = generate_uid(prefix=None)
        answer = Dataset()
        answer.AffectedSOPInstanceUID = uid
    where = request.association.describe()
    try:
        if not attr.is_uid(uid):
            raise Refusal(attr.INVALID_OBJECT_INSTANCE, "Affected SOP Instance UID is not a UID")
        api.create(request.gateway, uid, request.dataset(), _raw(command.AttributeList),
                   _origin(request))
    except Refusal as refusal:
        log.warning("%s: N-CREATE of MPPS %s refused with %s", where, uid, refusal)
        return refusal.as_status(identifiers=False), None
    return attr.SUCCESS, answer


def handle_set(request: Request) -> tuple[Any, Dataset | None]:
    """N-SET: a device updated, completed or discontinued a procedure step."""
    command = request.event.request
    uid = str(command.RequestedSOPInstanceUID or "").strip()
    where = request.association.describe()
    try:
        api.update(request.gateway, uid, request.dataset(), _raw(command.ModificationList),
                   _origin(request))
    except Refusal as refusal:
        log.warning("%s: N-SET of MPPS %s refused with %s", where, uid, refusal)
        return refusal.as_status(), None
    return attr.SUCCESS, None
