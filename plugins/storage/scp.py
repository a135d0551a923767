"""The C-STORE SCP: what is accepted, and the handler that stores each request."""

from __future__ import annotations

import logging
from typing import Any

from pydicom import uid as uids
from pynetdicom.presentation import AllStoragePresentationContexts

from dicomgate import AssociationInfo, Request
from dicomgate.tuning import encode_file_meta  # noqa: F401 - also this module's API
from dicomgate.plugins.storage.store import SUCCESS, Origin, Rejected, store_for

log = logging.getLogger("dicomgate.storage")

#: Every storage SOP class pynetdicom knows (PS3.4 annex B), retired ones included.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(context.abstract_syntax) for context in AllStoragePresentationContexts)

#: Transfer syntaxes accepted, in the order of preference when a sender offers several
#: in one presentation context. Data sets are stored as received, never transcoded.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.ExplicitVRBigEndian,
    uids.JPEGBaseline8Bit,
    uids.JPEGExtended12Bit,
    uids.JPEGLossless,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEGLSNearLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.JPEG2000MCLossless,
    uids.JPEG2000MC,
    uids.HTJ2KLossless,
    uids.HTJ2KLosslessRPCL,
    uids.HTJ2K,
    uids.RLELossless,
    # Video, as endoscopes and ultrasound send it
    uids.MPEG2MPML,
    uids.MPEG2MPHL,
    uids.MPEG4HP41,
    uids.MPEG4HP41BD,
    uids.MPEG4HP422D,
    uids.MPEG4HP423D,
    uids.MPEG4HP42STEREO,
    uids.HEVCMP51,
    uids.HEVCM10P51,
)

def handle_store(request: Request) -> Any:
    """Store one C-STORE request's data set; answer success once file and rows are
    durable, or a failure status the sender can act on."""
    gateway = request.gateway
    store = store_for(gateway)
    association = request.association
    session = store.session(association.id)
    command = request.event.request
    sop_class = str(command.AffectedSOPClassUID or request.sop_class_uid)
    sop_instance = str(command.AffectedSOPInstanceUID or "")
    try:
        source = request.dataset_path
        synced = False
        digest = None
        if source is not None and store.on_store_filesystem(source):
            digest = request.dataset_digest  # hashed while it arrived
        elif source is not None:
            # streamed elsewhere than the store's spool folder: copy, then link
            source = store.copy_in(source)
            synced = True
        elif source is None:
            data = request.event.encoded_dataset(include_meta=False)
            meta = encode_file_meta(sop_class, sop_instance, request.transfer_syntax,
                                    association.calling_ae)
            source = store.write_temporary((meta, data), len(meta) + len(data))
            synced = True
        outcome = store.ingest(
            source, origin=Origin(association.calling_ae, association.address),
            expected_class=sop_class, expected_instance=sop_instance, synced=synced,
            consume=True, session=session, digest=digest)
    except Rejected as rejected:
        session.refused += 1
        log.warning("%s: C-STORE of %s refused with 0x%04X: %s", association.describe(),
                    sop_instance or "(no SOP Instance UID)", rejected.status, rejected.comment)
        return rejected.as_status()
    if outcome.instance is None:
        session.duplicates += 1
        log.debug("%s: %s already stored, kept", association.describe(), sop_instance)
        return SUCCESS
    session.instances.append(outcome.instance)
    log.debug("%s: stored %s as %s", association.describe(), sop_instance, outcome.instance.path)
    gateway.notify("instance_stored", gateway=gateway, instance=outcome.instance,
                   association=association)
    return SUCCESS


def association_closed(gateway: Any, association: AssociationInfo, outcome: str) -> None:
    store = store_for(gateway)
    session = store.end_session(association.id)
    if session is None:
        return
    stored = len(session.instances)
    replaced = sum(1 for instance in session.instances if instance.replaced)
    if stored or session.duplicates or session.refused:
        log.info("association %d (%s, %s): stored %d instance(s)%s, %d duplicate(s) kept, "
                 "%d refused", association.id, association.describe(), outcome, stored,
                 f" ({replaced} replacing earlier copies)" if replaced else "",
                 session.duplicates, session.refused)
    if session.instances:
        gateway.notify("instances_received", gateway=gateway, instances=list(session.instances),
                       association=association)
