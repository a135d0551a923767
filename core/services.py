"""What a plugin offers on the network (a Service) and what it is handed when a
request arrives (a Request on an association described by AssociationInfo)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

if TYPE_CHECKING:
    from pydicom import Dataset
    from pynetdicom.events import Event

    from dicomgate.gateway import Gateway
    from dicomgate.peers import Peer


class Dimse(enum.Enum):
    """The DIMSE requests an SCP can receive, named as in PS3.7."""

    C_ECHO = "C-ECHO"
    C_STORE = "C-STORE"
    C_FIND = "C-FIND"
    C_GET = "C-GET"
    C_MOVE = "C-MOVE"
    N_EVENT_REPORT = "N-EVENT-REPORT"
    N_GET = "N-GET"
    N_SET = "N-SET"
    N_ACTION = "N-ACTION"
    N_CREATE = "N-CREATE"
    N_DELETE = "N-DELETE"

    @property
    def answers_many(self) -> bool:
        """C-FIND, C-GET and C-MOVE handlers yield a sequence of (status, dataset)."""
        return self in (Dimse.C_FIND, Dimse.C_GET, Dimse.C_MOVE)


#: Uncompressed transfer syntaxes every SCP accepts unless a service says otherwise.
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

# Where pynetdicom's event keeps the data set that came with each request.
_DATASET_OF = {
    Dimse.C_FIND: "identifier",
    Dimse.C_GET: "identifier",
    Dimse.C_MOVE: "identifier",
    Dimse.N_CREATE: "attribute_list",
    Dimse.N_SET: "modification_list",
    Dimse.N_ACTION: "action_information",
    Dimse.N_EVENT_REPORT: "event_information",
}

Handler = Callable[["Request"], Any]


def _known_messages(instance: Service, attribute: attrs.Attribute, value: Mapping) -> None:
    for message in value:
        if not isinstance(message, Dimse):
            raise TypeError(f"service {instance.name!r}: handler key {message!r} is not a Dimse")


@attrs.frozen
class Service:
    """An SCP role a plugin provides: the SOP classes it accepts, the transfer
    syntaxes it accepts them in, and the callable that answers each DIMSE message.

    ``name`` is what a peer's ``allow`` list in the config refers to (``"echo"``,
    ``"store"``, ``"worklist"``, ``"mpps"`` ...). Each (message, SOP class) pair has
    exactly one handler across all plugins; a second registration fails at start.

    A handler receives a :class:`Request` and returns what pynetdicom expects from
    the handler of that event: a status (int or Dataset) for C-ECHO and C-STORE, an
    iterable of ``(status, identifier)`` for C-FIND, ``(status, dataset)`` for the
    N-services. An exception in a handler is logged with the peer and answered with
    the message's failure status.
    """

    name: str
    sop_classes: tuple[str, ...] = attrs.field(converter=tuple)
    handlers: Mapping[Dimse, Handler] = attrs.field(validator=_known_messages)
    transfer_syntaxes: tuple[str, ...] = attrs.field(
        default=UNCOMPRESSED_TRANSFER_SYNTAXES, converter=tuple
    )
    #: C-STORE only: stream each received data set into a Part 10 file in this folder
    #: instead of memory; the handler finds it at ``request.dataset_path``, may move it
    #: (it must stay on the same filesystem), and whatever is left is removed after the
    #: handler returns or when the association ends.
    spool_dir: Path | None = None


@attrs.frozen
class AssociationInfo:
    """One association as dicomgate knows it: who called, from where, and when."""

    id: int
    calling_ae: str
    called_ae: str
    address: str
    port: int
    peer: Peer | None
    started: datetime

    def describe(self) -> str:
        """``CT1@10.0.0.5:50123 -> DICOMGATE`` for log lines."""
        return f"{self.calling_ae}@{self.address}:{self.port} -> {self.called_ae}"


@attrs.frozen
class Request:
    """A DIMSE request, handed to the one handler that answers it.

    ``event`` is pynetdicom's event, for what this class does not cover; prefer the
    attributes and methods here, which stay stable across pynetdicom versions.
    """

    message: Dimse
    sop_class_uid: str
    transfer_syntax: str
    association: AssociationInfo
    gateway: Gateway = attrs.field(repr=False)
    event: Event = attrs.field(repr=False, eq=False)

    @property
    def peer(self) -> Peer | None:
        return self.association.peer

    def dataset(self) -> Dataset:
        """The decoded data set (C-STORE, N-CREATE, N-SET ...) or identifier (C-FIND ...)."""
        return getattr(self.event, _DATASET_OF.get(self.message, "dataset"))

    @property
    def dataset_path(self) -> Path | None:
        """C-STORE to a service with ``spool_dir``: the received data set as a Part 10
        file (zeroed preamble, file meta from the request), else ``None``."""
        if self.message is not Dimse.C_STORE:
            return None
        try:
            return Path(self.event.dataset_path)
        except (AttributeError, TypeError):
            return None

    @property
    def dataset_digest(self) -> tuple[int, str] | None:
        """With :attr:`dataset_path`: (size in bytes, SHA-256 as 64 hex digits) of that
        file as the server wrote it, computed while the data arrived; ``None`` when not
        known (no spool file, or it is no longer the server's)."""
        path = self.dataset_path
        if path is None:
            return None
        from dicomgate.tuning import received_digest

        return received_digest(path)

    def is_cancelled(self) -> bool:
        """True once the peer sent C-CANCEL for this C-FIND, C-GET or C-MOVE."""
        return bool(self.event.is_cancelled)
