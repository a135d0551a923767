"""How many small C-STOREs one association carries: stock pynetdicom vs dicomgate.tuning.

Starts a no-op storage SCP (pynetdicom) on loopback twice, once stock and once with
``dicomgate.tuning.speed_up`` bound to ``EVT_CONN_OPEN``, and sends N small (8x8 CT)
datasets to each over a single association:

* from a pynetdicom SCU, run in a child process so it does not share the SCP's GIL
  (its socket gets TCP_NODELAY, otherwise Nagle + delayed ACK cap it at ~20/s, and
  its own reactor is parked, see _park_reactor);
* from DCMTK ``storescu`` (if installed), with ``TCP_NODELAY=1`` in its environment.

Prints images/s for each run and the tuned/stock ratio. The pynetdicom SCU figure is
measured inside the client from the first request to the last response; the storescu
figure is the wall time of the whole storescu process (so it includes its start-up and
association set-up, a few ms). Finally it holds one association open and idle from a
child process and prints the SCP process's CPU use (CPU seconds per second).

Usage::

    PYTHONPATH=... python benchmarks/reactor_latency.py [-n 2000] [--storescu PATH] [--idle SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

STUDY_UID = generate_uid()
SERIES_UID = generate_uid()


def small_ct(number: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Bench^Mark"
    ds.PatientID = "BENCH"
    ds.Modality = "CT"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(8 * 8 * 2)
    return ds


# ------------------------------------------------------------------------------ client


def _park_reactor(self) -> None:
    """Stand-in for the SCU association's ``_run_reactor``: stay paused until killed.

    Stock pynetdicom's reactor loop can slip past a pause that send_c_store() asks
    for and take the C-STORE-RSP off the queue ("Received unexpected C-STORE service
    message", then a DIMSE timeout); over thousands of requests that happened in
    most runs. This client never serves requests, so its reactor has nothing to do.
    """
    self._is_paused = True
    while not self._kill:
        time.sleep(0.05)


def _on_client_connect(event) -> None:
    assoc = event.assoc
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Fires in the DUL thread during negotiation, before run_reactor() looks this up
    assoc._run_reactor = types.MethodType(_park_reactor, assoc)


def run_idle_client(port: int, seconds: float) -> None:
    """Child-process mode: hold one association open and idle for `seconds`."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="BENCHSCP")
    print("ready" if assoc.is_established else "failed", flush=True)
    time.sleep(seconds)
    if assoc.is_established:
        assoc.release()


def run_client(port: int, count: int) -> None:
    """Child-process mode: send `count` datasets over one association, print JSON."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="BENCHSCP", evt_handlers=[(evt.EVT_CONN_OPEN, _on_client_connect)]
    )
    if not assoc.is_established:
        print(json.dumps({"error": "association not established"}))
        sys.exit(1)
    ds = small_ct()
    failed = 0
    start = time.perf_counter()
    for _ in range(count):
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) != 0x0000:
            failed += 1
    elapsed = time.perf_counter() - start
    assoc.release()
    print(json.dumps({"elapsed": elapsed, "failed": failed}))


# ------------------------------------------------------------------------------ server


class Scp:
    def __init__(self, tuned: bool) -> None:
        self.received = 0
        ae = AE(ae_title="BENCHSCP")
        ae.add_supported_context(CTImageStorage)
        ae.maximum_associations = 4
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        if tuned:
            from dicomgate import tuning

            tuning.check_compatible()
            handlers.append((evt.EVT_CONN_OPEN, lambda event: tuning.speed_up(event.assoc)))
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _on_store(self, event) -> int:
        self.received += 1
        return 0x0000

    def wait_idle(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.shutdown()


def bench_pynetdicom(scp: Scp, count: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--client", str(scp.port), "-n", str(count)],
        capture_output=True, text=True, timeout=600, env=os.environ.copy(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stdout}{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} C-STOREs failed")
    return count / result["elapsed"]


def bench_storescu(scp: Scp, count: int, storescu: str, folder: Path) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    before = scp.received
    start = time.perf_counter()
    out = subprocess.run(
        [storescu, "-aet", "BENCHSCU", "-aec", "BENCHSCP", "+sd", "127.0.0.1",
         str(scp.port), str(folder)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed ({out.returncode}): {out.stderr}")
    if scp.received - before != count:
        raise RuntimeError(f"SCP received {scp.received - before} of {count}")
    return count / elapsed


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def idle_cpu(scp: Scp, seconds: float) -> float:
    """CPU seconds per second the SCP process uses while one association idles."""
    client = subprocess.Popen(
        [sys.executable, __file__, "--client", str(scp.port), "--idle", str(seconds + 1.5)],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        if client.stdout is None or client.stdout.readline().strip() != "ready":
            raise RuntimeError("idle client could not associate")
        time.sleep(0.5)  # let association set-up finish
        before, start = process_cpu(), time.perf_counter()
        time.sleep(seconds)
        return (process_cpu() - before) / (time.perf_counter() - start)
    finally:
        client.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="datasets per run")
    parser.add_argument("--storescu", default=shutil.which("storescu") or "/usr/bin/storescu")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="seconds to measure the SCP's CPU with one idle association")
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:
        if "--idle" in sys.argv:
            run_idle_client(args.client, args.idle)
        else:
            run_client(args.client, args.n)
        return

    have_storescu = os.access(args.storescu, os.X_OK)
    results: dict[str, dict[str, float]] = {}
    idle: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="reactor-latency-") as tmp:
        folder = Path(tmp)
        if have_storescu:
            for number in range(1, args.n + 1):
                small_ct(number).save_as(folder / f"ct{number:05d}.dcm", enforce_file_format=True)
        for label, tuned in (("stock", False), ("tuned", True)):
            scp = Scp(tuned)
            try:
                results[label] = {"pynetdicom": bench_pynetdicom(scp, args.n)}
                scp.wait_idle()
                if have_storescu:
                    results[label]["storescu"] = bench_storescu(scp, args.n, args.storescu, folder)
                    scp.wait_idle()
                if args.idle > 0:
                    idle[label] = idle_cpu(scp, args.idle)
                    scp.wait_idle()
            finally:
                scp.stop()

    print(f"{args.n} small C-STOREs over one association (SCP on 127.0.0.1, {os.cpu_count()} CPUs)")
    for client in results["stock"]:
        stock, tuned = results["stock"][client], results["tuned"][client]
        print(
            f"  {client:<11} stock {stock:8.0f} images/s   tuned {tuned:8.0f} images/s"
            f"   ratio {tuned / stock:5.2f}x"
        )
    if idle:
        print(
            f"  SCP process CPU with one idle association: stock {idle['stock']:.3f} s/s,"
            f" tuned {idle['tuned']:.3f} s/s"
        )
    if not have_storescu:
        print(f"  storescu: {args.storescu} not found, skipped")


if __name__ == "__main__":
    main()
