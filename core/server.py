"""The association server: one pynetdicom AE on one port for every role.

It accepts the presentation contexts the enabled plugins' services declare, checks who
calls (called AE title, configured peer, address), hands each DIMSE request to the
dispatcher, logs every association from connection to close, and shuts down cleanly.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

import attrs
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicomgate import tuning
from dicomgate.dispatch import Dispatcher
from dicomgate.errors import PluginError
from dicomgate.gateway import Gateway
from dicomgate.services import AssociationInfo

log = logging.getLogger("dicomgate.server")

REJECT_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03

# What the (result source, diagnostic) of an A-ASSOCIATE-RJ means, for the log.
REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given (ACSE)",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded (too many associations)",
}


@attrs.define
class _Connection:
    """What the server tracks about one TCP connection while it lasts."""

    number: int
    address: str
    port: int
    opened: float = attrs.field(factory=time.monotonic)
    association: AssociationInfo | None = None
    requests: int = 0
    rejection: str | None = None


class Server:
    """Serves one gateway on its configured host and port until :meth:`stop`."""

    def __init__(self, gateway: Gateway):
        tuning.check_compatible()
        self.gateway = gateway
        self._connections: dict[Any, _Connection] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self.dispatcher = Dispatcher(gateway, self._request_arrived)
        self.ae = self._make_ae()
        self._server: Any = None

    def _make_ae(self) -> AE:
        # pynetdicom's standard handlers describe every PDU and DIMSE message for its
        # DEBUG log; that costs more than the message itself unless someone reads it.
        debugging = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
        _config.LOG_HANDLER_LEVEL = "standard" if debugging else "none"
        # Likewise every C-FIND identifier and answer, formatted even when not logged.
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = debugging
        limits = self.gateway.config.limits
        ae = AE(ae_title=self.gateway.ae_title)
        ae.maximum_associations = limits.max_associations
        ae.maximum_pdu_size = limits.max_pdu
        ae.acse_timeout = limits.acse_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.network_timeout = limits.network_timeout
        ae.require_called_aet = True
        for service in self.gateway.services:
            for sop_class in service.sop_classes:
                ae.add_supported_context(sop_class, list(service.transfer_syntaxes))
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when the config asked for port 0."""
        return self._server.server_address[:2]

    def _prepare_spool(self) -> None:
        """Stream received data sets to the folder a C-STORE service asked for."""
        folders = {service.spool_dir for service in self.gateway.services if service.spool_dir}
        if len(folders) > 1:
            raise PluginError("services ask for different spool folders: "
                              + ", ".join(sorted(map(str, folders))))
        folder = folders.pop() if folders else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in folder.glob(tuning.SPOOL_PREFIX + "*"):
                log.warning("removing %s, left by a transfer cut off before a restart",
                            leftover)
                leftover.unlink(missing_ok=True)
        # With durable, each file is flushed before the answer: start early
        tuning.spool_received_datasets(folder, write_back=self.gateway.config.gateway.durable)

    def start(self) -> tuple[str, int]:
        self._prepare_spool()
        gateway = self.gateway.config.gateway
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_ACCEPTED, self._on_accepted),
            *self.dispatcher.event_handlers(),
        ]
        self._server = self.ae.start_server((gateway.host, gateway.port), block=False,
                                            evt_handlers=handlers)
        if self.gateway.config.gateway.accept_unknown_peers:
            log.warning("any calling AE title is accepted from any address "
                        "(no config file, or gateway.accept_unknown_peers = true)")
        log.info("%s listening on %s:%d with %s", self.gateway.ae_title, *self.address,
                 ", ".join(service.name for service in self.gateway.services) or "no services")
        try:
            with self.gateway.database.connection_context():
                self.gateway.hook.gateway_started(gateway=self.gateway)
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self) -> None:
        """Stop accepting, let running associations finish for the grace period, then
        abort what is left."""
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + self.gateway.config.limits.shutdown_grace
        # Only established associations have work to finish; a connection still
        # waiting for its A-ASSOCIATE-RQ is dropped at once.
        while (any(assoc.is_established for assoc in self.ae.active_associations)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        busy = [assoc for assoc in self.ae.active_associations if assoc.is_established]
        if busy:
            log.warning("aborting %d association(s) still running at shutdown", len(busy))
        self.ae.shutdown()
        for association in busy:
            association.join(timeout=5)
        tuning.spool_received_datasets(None)
        self._server = None
        self.gateway.notify("gateway_stopping", gateway=self.gateway)
        log.info("%s stopped", self.gateway.ae_title)

    # Association life, each step in the thread pynetdicom calls it from ---------------

    def _on_connect(self, event: Any) -> None:
        address, port = event.address[:2]
        connection = _Connection(next(self._numbers), str(address), int(port))
        association = event.assoc
        with self._lock:
            self._connections[association] = connection
        tuning.speed_up(association)
        run = association.run

        def run_then_close() -> None:
            try:
                run()
            finally:
                self._on_finished(association)

        # The association's thread runs every handler; wrapping its run() is the one
        # place where "no request of this association is still being answered" holds.
        association.run = run_then_close

    def _on_requested(self, event: Any) -> None:
        connection = self._connections[event.assoc]
        # The requestor's ae_title is filled in only after EVT_REQUESTED; the primitive has it.
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        peers = self.gateway.peers
        if peers.identify(calling, connection.address) is None and not peers.accept_unknown:
            event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNISED)
            event.assoc.kill()

    def _on_acse_sent(self, event: Any) -> None:
        primitive = event.primitive
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00):
            reason = REJECT_REASONS.get((primitive.result_source, primitive.diagnostic),
                                        f"diagnostic {primitive.diagnostic}")
            self._connections[event.assoc].rejection = reason

    def _on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        connection = self._connections[assoc]
        calling = assoc.requestor.ae_title.strip()
        info = AssociationInfo(
            id=connection.number, calling_ae=calling,
            called_ae=assoc.acceptor.ae_title.strip(), address=connection.address,
            port=connection.port, peer=self.gateway.peers.identify(calling, connection.address),
            started=datetime.now(timezone.utc))
        connection.association = info
        contexts = len(assoc.accepted_contexts)
        log.info("association %d accepted: %s (%s), %d presentation context(s)", info.id,
                 info.describe(), info.peer.kind if info.peer else "unknown peer", contexts)
        self.gateway.notify("association_accepted", gateway=self.gateway, association=info)

    def _request_arrived(self, assoc: Any) -> AssociationInfo | None:
        """Count a request of ``assoc`` and say which association it is."""
        connection = self._connections.get(assoc)
        if connection is None:
            return None
        connection.requests += 1
        return connection.association

    def _on_finished(self, assoc: Any) -> None:
        tuning.discard_partial_dataset(assoc)
        with self._lock:
            connection = self._connections.pop(assoc, None)
        if connection is None:
            return
        seconds = time.monotonic() - connection.opened
        info = connection.association
        who = f"{connection.address}:{connection.port}"
        if info is None:
            calling = getattr(assoc.requestor, "ae_title", "") or "?"
            if connection.rejection:
                log.warning("association from %s (%s) rejected: %s", who, calling.strip(),
                            connection.rejection)
            else:
                log.info("connection from %s closed after %.2f s without an association",
                         who, seconds)
            return
        outcome = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "closed"
        log.info("association %d %s: %s after %.2f s, %d request(s)", info.id, outcome,
                 info.describe(), seconds, connection.requests)
        self.gateway.notify("association_closed", gateway=self.gateway, association=info,
                            outcome=outcome)
