"""Helpers for tests that act as a modality asking dicomgate for its worklist.

:func:`find` sends one Modality Worklist C-FIND from a pynetdicom client and returns
every response with the identifier's bytes exactly as they crossed the network, so a
test can check what a device receives rather than what pydicom decodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import ModalityWorklistInformationFind

MWL = ModalityWorklistInformationFind


def query(sps: Mapping[str, Any] | None = None, **keys: Any) -> Dataset:
    """A worklist query: top-level keys by keyword, and the Scheduled Procedure Step
    Sequence item's keys in ``sps`` (``sps={}``: a sequence with one empty item)."""
    dataset = Dataset()
    for keyword, value in keys.items():
        setattr(dataset, keyword, value)
    if sps is not None:
        item = Dataset()
        for keyword, value in sps.items():
            setattr(item, keyword, value)
        dataset.ScheduledProcedureStepSequence = [item]
    return dataset


@attrs.frozen
class Response:
    status: int
    identifier: Dataset | None
    #: The identifier's bytes as received (empty for the final response).
    raw: bytes
    error_comment: str = ""

    def get(self, keyword: str, default: Any = None) -> Any:
        return default if self.identifier is None else self.identifier.get(keyword, default)


@attrs.define
class Client:
    """An open association to a worklist SCP (use as a context manager)."""

    port: int
    calling: str = "CT1"
    called: str = "DICOMGATE"
    transfer_syntax: str | None = None
    timeout: float = 10.0
    raw: list[bytes] = attrs.Factory(list)
    assoc: Any = None

    def __enter__(self) -> Client:
        ae = AE(ae_title=self.calling)
        syntaxes = [self.transfer_syntax] if self.transfer_syntax else \
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        ae.add_requested_context(MWL, syntaxes)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        self.assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called,
                                  evt_handlers=[(evt.EVT_DIMSE_RECV, self._received)])
        if not self.assoc.is_established:
            raise ConnectionError(f"association as {self.calling} not established")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def _received(self, event: Any) -> None:
        data = getattr(event.message, "data_set", None)
        self.raw.append(data.getvalue() if data is not None else b"")

    def find(self, identifier: Dataset, cancel_after: int | None = None) -> list[Response]:
        responses = []
        self.raw.clear()
        for status, found in self.assoc.send_c_find(identifier, MWL, msg_id=7):
            if status is None or "Status" not in status:
                raise ConnectionError("no response (association aborted or timed out)")
            raw = self.raw[len(responses)] if len(self.raw) > len(responses) else b""
            responses.append(Response(int(status.Status), found, raw,
                                      str(status.get("ErrorComment", ""))))
            if cancel_after is not None and len(responses) == cancel_after:
                context = self.assoc._get_valid_context(MWL, "", "scu")
                self.assoc.send_c_cancel(7, context.context_id)
        return responses

    def find_raw(self, identifier_bytes: bytes) -> list[Response]:
        """Send ``identifier_bytes`` as the C-FIND identifier, whatever they hold
        (group lengths, undecodable data ...), encoded for the association's context
        (``transfer_syntax`` of the client)."""
        import pynetdicom.association as association_module

        original = association_module.encode
        # pynetdicom encodes the Dataset it is given; hand it the bytes instead.
        association_module.encode = lambda *args, **kwargs: identifier_bytes
        try:
            placeholder = Dataset()
            placeholder.PatientName = ""
            return self.find(placeholder)
        finally:
            association_module.encode = original


def find(port: int, identifier: Dataset, calling: str = "CT1", called: str = "DICOMGATE",
         **options: Any) -> list[Response]:
    """Associate as ``calling``, send one C-FIND, release; every response in order."""
    with Client(port, calling, called, **options) as client:
        return client.find(identifier)


def encoded(dataset: Dataset, implicit: bool = False) -> bytes:
    return encode(dataset, implicit, True)
