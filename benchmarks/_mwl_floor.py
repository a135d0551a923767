"""The floor of a worklist query's round trip: an SCP with no database and no work.

It answers every Modality Worklist C-FIND by yielding the same prebuilt answers (the
ones dicomgate gave for that query, read from a DICOM JSON file), through pynetdicom
with dicomgate's reactor tuning, as dicomgate's own server runs it. What a query costs
here is what pynetdicom on both ends costs; dicomgate's figure minus this one is the
cost of dicomgate's own work (search, answer building, character sets).

    python benchmarks/_mwl_floor.py PORT ANSWERS.json
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind as MWL

from dicomgate import tuning


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    with open(path, encoding="utf-8") as fh:
        answers = [Dataset.from_json(item) for item in json.load(fh)]
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    def find(event):
        for answer in answers:
            yield 0xFF00, answer

    ae = AE("DICOMGATE")
    ae.add_supported_context(MWL)
    ae.maximum_pdu_size = 262_144
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_FIND, find), (evt.EVT_CONN_OPEN, lambda event: tuning.speed_up(event.assoc))])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
