"""The ceiling of C-STORE ingest on dicomgate's stack: pynetdicom with dicomgate's
reactor tuning and received data sets streamed to files, exactly as ``dicomgate
serve`` runs it, and a C-STORE handler that does nothing but answer success.

Whatever dicomgate does per image (read the header, index, flush) comes on top of
this; a target below this receiver's time cannot be met without replacing pynetdicom.

    python benchmarks/_noop_store.py AE_TITLE PORT SPOOL_DIR COUNT_FILE
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicomgate import tuning


def main() -> None:
    ae_title, port, spool, count_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), \
        Path(sys.argv[4])
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    spool.mkdir(parents=True, exist_ok=True)
    tuning.spool_received_datasets(spool)
    stored = 0
    lock = threading.Lock()

    def store(event):
        nonlocal stored
        path = event.dataset_path if hasattr(event, "dataset_path") else None
        if path:
            os.unlink(path)  # keep nothing: the disk is not what is measured
        with lock:
            stored += 1
        return 0x0000

    ae = AE(ae_title)
    ae.maximum_pdu_size = 262_144
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, store), (evt.EVT_CONN_OPEN, lambda event: tuning.speed_up(event.assoc))])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    count_file.write_text(str(stored))


if __name__ == "__main__":
    main()
