"""One dispatcher for every DIMSE request: find the service, check the peer may use
it, call its handler, and turn an exception into the message's failure status."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pynetdicom import evt

from dicomgate.services import AssociationInfo, Dimse, Request, Service

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from dicomgate.gateway import Gateway

log = logging.getLogger("dicomgate.dimse")

EVENTS = {
    Dimse.C_ECHO: evt.EVT_C_ECHO,
    Dimse.C_STORE: evt.EVT_C_STORE,
    Dimse.C_FIND: evt.EVT_C_FIND,
    Dimse.C_GET: evt.EVT_C_GET,
    Dimse.C_MOVE: evt.EVT_C_MOVE,
    Dimse.N_EVENT_REPORT: evt.EVT_N_EVENT_REPORT,
    Dimse.N_GET: evt.EVT_N_GET,
    Dimse.N_SET: evt.EVT_N_SET,
    Dimse.N_ACTION: evt.EVT_N_ACTION,
    Dimse.N_CREATE: evt.EVT_N_CREATE,
    Dimse.N_DELETE: evt.EVT_N_DELETE,
}

#: The status a request gets when its handler fails (PS3.4 and PS3.7 annex C).
FAILURE = {
    Dimse.C_ECHO: 0x0110,  # Processing failure
    Dimse.C_STORE: 0xC211,  # Cannot understand: the handler could not process it
    Dimse.C_FIND: 0xC311,  # Unable to process
    Dimse.C_GET: 0xC411,
    Dimse.C_MOVE: 0xC511,
}
GENERAL_FAILURE = 0x0110  # Processing failure, for the N-services
NOT_AUTHORISED = 0x0124  # Refused: not authorised
NO_SUCH_SOP_CLASS = 0x0118  # for N-services; C-services use 0x0122 below
SOP_CLASS_NOT_SUPPORTED = 0x0122


def failure_status(message: Dimse) -> int:
    return FAILURE.get(message, GENERAL_FAILURE)


class Dispatcher:
    """Routes pynetdicom's intervention events to the services' handlers."""

    def __init__(self, gateway: Gateway,
                 request_arrived: Callable[[Any], AssociationInfo | None]):
        self.gateway = gateway
        self.request_arrived = request_arrived
        self.routes: dict[tuple[Dimse, str], Service] = {
            (message, sop_class): service
            for service in gateway.services
            for sop_class in service.sop_classes
            for message in service.handlers
        }

    def event_handlers(self) -> list[tuple[Any, Callable, list[Any]]]:
        """pynetdicom ``evt_handlers`` for every message some service answers."""
        messages = {message for message, _ in self.routes}
        return [(EVENTS[message], self.handle, [message]) for message in sorted(
            messages, key=lambda m: m.value)]

    def handle(self, event: Event, message: Dimse) -> Any:
        association = self.request_arrived(event.assoc)
        sop_class = str(event.context.abstract_syntax)
        service = self.routes.get((message, sop_class))
        if service is None or association is None:
            status = SOP_CLASS_NOT_SUPPORTED if message.value.startswith("C-") else NO_SUCH_SOP_CLASS
            log.warning("%s: %s for %s has no service", association and association.describe(),
                        message.value, sop_class)
            return self._answer(message, status)
        peer = association.peer
        if peer is not None and not peer.may_use(service.name):
            log.warning("%s: refused %s (%s): peer %r may not use service %r",
                        association.describe(), message.value, sop_class, peer.ae_title,
                        service.name)
            return self._answer(message, NOT_AUTHORISED)
        request = Request(message=message, sop_class_uid=sop_class,
                          transfer_syntax=str(event.context.transfer_syntax),
                          association=association, gateway=self.gateway, event=event)
        handler = service.handlers[message]
        if message.answers_many:
            return self._guarded_iteration(handler, request)
        try:
            with self.gateway.database.connection_context():
                return handler(request)
        except Exception:
            log.exception("%s: service %r failed on %s", association.describe(), service.name,
                          message.value)
            return self._answer(message, failure_status(message))

    def _guarded_iteration(self, handler: Callable, request: Request) -> Iterator[Any]:
        """Yield a C-FIND/C-GET/C-MOVE handler's answers; a failure ends them with a status."""
        try:
            with self.gateway.database.connection_context():
                answers: Iterable[Any] = handler(request)
                yield from answers
        except Exception:
            log.exception("%s: service failed on %s", request.association.describe(),
                          request.message.value)
            if request.message is not Dimse.C_FIND:
                # Once a C-GET/C-MOVE handler has started yielding, only pynetdicom
                # knows which answer it expected next; it sends the failure itself.
                raise
            yield failure_status(request.message), None

    @staticmethod
    def _answer(message: Dimse, status: int) -> Any:
        if message.answers_many:
            return iter([(status, None)])
        if message.value.startswith("N-"):
            return status, None
        return status
