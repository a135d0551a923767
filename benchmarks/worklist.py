"""Modality Worklist C-FIND latency: dicomgate beside DCMTK wlmscpfs.

One device asks for its worklist of today, on an association that stays open, from a
pynetdicom client with TCP_NODELAY; each query's round trip (request sent to final
response received) is timed. The same scheduled items are served by both SCPs: spread
over 50 devices and 30 days (today in the middle), in tiers of 1,000, 10,000 and
100,000 items, so one device has about N / 1,500 items today.

* dicomgate: ``dicomgate serve --config X`` as a subprocess, its SQLite database filled
  through the worklist's Python API (``api.add_orders``) before it starts.
* wlmscpfs: the same items as ``.wl`` files written with pydicom into one folder named
  after the called AE title (how wlmscpfs finds them). wlmscpfs does not filter by
  calling AE title, so its query names the device in Scheduled Station AE Title; the
  dicomgate query carries the same keys.

    .venv/bin/python benchmarks/worklist.py                      # all tiers (~5 min)
    .venv/bin/python benchmarks/worklist.py --tiers 1000,10000 --queries 20
    .venv/bin/python benchmarks/worklist.py --json benchmarks/.work/worklist.json

Needs DCMTK (``/usr/bin/wlmscpfs``) and dicomgate installed in this interpreter's
environment. Everything listens on 127.0.0.1; every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind as MWL

HERE = Path(__file__).resolve().parent
DEVICES = 50
DAYS = 30
DEVICE = "MOD07"  # the device whose daily query is timed
WLM_AE = "WLMSCP"
PROCESSES: list[subprocess.Popen] = []
#: The timed queries: the device's whole worklist of today, and one patient of it.


# The items ------------------------------------------------------------------------------


def item(index: int, today: date) -> dict:
    """Item ``index`` of any tier: the first N items of a bigger tier are a smaller tier."""
    device = f"MOD{index % DEVICES + 1:02d}"
    day = today + timedelta(days=(index // DEVICES) % DAYS - DAYS // 2)
    minutes = 7 * 60 + (index * 7) % (12 * 60)
    return {
        "patient": {"id": f"PID{index:07d}", "name": f"Patient{index}^Test",
                    "birth_date": f"19{40 + index % 60:02d}0{1 + index % 9}1{index % 10}",
                    "sex": "MF"[index % 2]},
        "accession": f"ACC{index:09d}", "procedure_id": f"RP{index:09d}",
        "description": "CT chest" if index % 3 else "CT head",
        "study_uid": f"2.25.{100000000 + index}",
        "steps": [{"id": f"SPS{index:09d}", "modality": "CT", "station_ae": device,
                   "station_name": device, "start_date": day.strftime("%Y%m%d"),
                   "start_time": f"{minutes // 60:02d}{minutes % 60:02d}00",
                   "description": "CT protocol", "performing_physician": "Doctor^Who"}],
    }


def wl_dataset(order: dict) -> Dataset:
    step = order["steps"][0]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = order["accession"]
    ds.PatientName = order["patient"]["name"]
    ds.PatientID = order["patient"]["id"]
    ds.PatientBirthDate = order["patient"]["birth_date"]
    ds.PatientSex = order["patient"]["sex"]
    ds.StudyInstanceUID = order["study_uid"]
    ds.RequestedProcedureID = order["procedure_id"]
    ds.RequestedProcedureDescription = order["description"]
    ds.RequestedProcedurePriority = ""
    ds.ReferringPhysicianName = ""
    ds.RequestingPhysician = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = step["station_ae"]
    sps.ScheduledStationName = step["station_name"]
    sps.ScheduledProcedureStepStartDate = step["start_date"]
    sps.ScheduledProcedureStepStartTime = step["start_time"]
    sps.Modality = step["modality"]
    sps.ScheduledPerformingPhysicianName = step["performing_physician"]
    sps.ScheduledProcedureStepDescription = step["description"]
    sps.ScheduledProcedureStepID = step["id"]
    sps.ScheduledProcedureStepLocation = ""
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


def write_wl_files(folder: Path, count: int, today: date) -> None:
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == f"{count} {today:%Y%m%d}":
        return
    if folder.exists():
        shutil.rmtree(folder)
    (folder / WLM_AE).mkdir(parents=True)
    (folder / WLM_AE / "lockfile").touch()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MWL
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for index in range(count):
        ds = wl_dataset(item(index, today))
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta = meta
        ds.save_as(folder / WLM_AE / f"item{index:07d}.wl", enforce_file_format=True)
    marker.write_text(f"{count} {today:%Y%m%d}")


# The servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{process.args[0]} did not listen on {port}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process in PROCESSES:
        PROCESSES.remove(process)


def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                               env={**os.environ, **(env or {})})
    PROCESSES.append(process)
    return process


def dicomgate_config(folder: Path, port: int) -> Path:
    peers = "".join(f'[[peers]]\nae_title = "MOD{n:02d}"\n' for n in range(1, DEVICES + 1))
    config = folder / "dicomgate.toml"
    config.write_text(f"""[gateway]
ae_title = "DICOMGATE"
host = "127.0.0.1"
port = {port}
data_dir = "{folder / 'data'}"
[plugins]
enabled = ["verification", "worklist"]
[worklist]
keep_days = {DAYS}
max_answers = 0
{peers}""", encoding="utf-8")
    return config


def fill_dicomgate(config: Path, count: int, today: date) -> float:
    """Add the tier's orders with the Python API; seconds taken."""
    from dicomgate.config import read_config
    from dicomgate.gateway import Gateway, configure
    from dicomgate.manager import Plugins
    from dicomgate.plugins.worklist import api

    data = config.parent / "data"
    if data.exists():
        shutil.rmtree(data)
    settings = read_config(config)
    plugins = Plugins()
    plugins.load(settings.plugins)
    gateway = Gateway.open(configure(settings, plugins), plugins)
    started = time.perf_counter()
    try:
        chunk = 20_000
        for first in range(0, count, chunk):
            api.add_orders(gateway, [item(i, today) for i in range(first, min(count, first + chunk))],
                           source="benchmark", records=False)
    finally:
        gateway.close()
    return time.perf_counter() - started


# The device -------------------------------------------------------------------------------


#: Item scheduled today for DEVICE in every tier: what a barcode scan at the console asks.
LOOKUP_INDEX = (DAYS // 2) * DEVICES + int(DEVICE[3:]) - 1
SCENARIOS = {"today": "", "patient": f"PID{LOOKUP_INDEX:07d}"}


def device_query(today: date, patient_id: str = "") -> Dataset:
    query = Dataset()
    query.PatientName = ""
    query.PatientID = patient_id
    query.PatientBirthDate = ""
    query.PatientSex = ""
    query.AccessionNumber = ""
    query.StudyInstanceUID = ""
    query.RequestedProcedureID = ""
    query.RequestedProcedureDescription = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = DEVICE
    sps.ScheduledProcedureStepStartDate = today.strftime("%Y%m%d")
    sps.ScheduledProcedureStepStartTime = ""
    sps.Modality = ""
    sps.ScheduledProcedureStepID = ""
    sps.ScheduledProcedureStepDescription = ""
    sps.ScheduledPerformingPhysicianName = ""
    query.ScheduledProcedureStepSequence = [sps]
    return query


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, called: str, queries: int, today: date, warmup: int = 3,
            patient_id: str = "", server_pid: int | None = None) -> dict:
    ae = AE(ae_title=DEVICE)
    ae.add_requested_context(MWL, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"association with {called} on {port} failed")
    # pynetdicom does not set TCP_NODELAY on its sockets.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    query = device_query(today, patient_id)
    times, answers = [], set()
    cpu_before = client_before = 0.0
    try:
        for number in range(warmup + queries):
            if number == warmup:
                client_before = time.process_time()
                if server_pid:
                    cpu_before = cpu_seconds(server_pid)
            started = time.perf_counter()
            responses = list(assoc.send_c_find(query, MWL))
            elapsed = time.perf_counter() - started
            if responses[-1][0].Status != 0x0000:
                raise RuntimeError(f"{called}: final status 0x{responses[-1][0].Status:04X}")
            if number >= warmup:
                times.append(elapsed * 1000)
                answers.add(len(responses) - 1)
        server_cpu = (cpu_seconds(server_pid) - cpu_before) * 1000 / queries if server_pid \
            else None
        client_cpu = (time.process_time() - client_before) * 1000 / queries
    finally:
        assoc.release()
    times.sort()
    return {"queries": len(times), "answers": sorted(answers), "server_cpu_ms": server_cpu,
            "client_cpu_ms": client_cpu,
            "last_answers": [ds.to_json_dict() for _, ds in responses[:-1]],
            "p50_ms": statistics.median(times),
            "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
            "mean_ms": statistics.fmean(times)}


# The run --------------------------------------------------------------------------------


LAUNCHER = """\
import sys
from dicomgate import tuning
import pynetdicom._config as pynetdicom_config
wait, quiet = sys.argv[1], sys.argv[2]
if wait:
    tuning.DUL_MAX_WAIT = float(wait)
if quiet == "1":
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
from dicomgate.cli import main
sys.argv = ["dicomgate", *sys.argv[3:]]
main()
"""


def dicomgate_command(config: Path, dul_max_wait: float | None, quiet: bool) -> list[str]:
    """``dicomgate serve``, or with the diagnostic changes to the core applied first."""
    if dul_max_wait is None and not quiet:
        return [str(Path(sys.executable).parent / "dicomgate"), "serve", "--config", str(config)]
    return [sys.executable, "-c", LAUNCHER, "" if dul_max_wait is None else str(dul_max_wait),
            "1" if quiet else "0", "serve", "--config", str(config)]


def run(tiers: list[int], queries: int, wlm_queries_large: int, workdir: Path,
        only: set[str], dul_max_wait: float | None = None, quiet: bool = False) -> list[dict]:
    today = date.today()
    rows = []
    wlmscpfs = "/usr/bin/wlmscpfs"
    if not Path(wlmscpfs).exists():
        raise SystemExit("DCMTK's wlmscpfs is missing (Debian: apt-get install dcmtk)")
    for count in tiers:
        print(f"\n== {count:,} items ({count / DEVICES / DAYS:.1f} per device and day)",
              flush=True)
        tier_dir = workdir / f"tier-{count}"
        tier_dir.mkdir(parents=True, exist_ok=True)
        row: dict = {"items": count}
        rows.append(row)
        if "dicomgate" in only:
            port = free_port()
            config = dicomgate_config(tier_dir, port)
            seconds = fill_dicomgate(config, count, today)
            print(f"   dicomgate database filled in {seconds:.1f} s", flush=True)
            server = spawn(dicomgate_command(config, dul_max_wait, quiet),
                           tier_dir / "dicomgate.log")
            try:
                wait_port(port, server)
                for scenario, patient in SCENARIOS.items():
                    row[f"dicomgate-{scenario}"] = ours = measure(
                        port, "DICOMGATE", queries, today, patient_id=patient,
                        server_pid=server.pid)
                    print(f"   dicomgate {scenario}: p50 {ours['p50_ms']:.1f} ms, p99 "
                          f"{ours['p99_ms']:.1f} ms, {ours['answers']} answers, server CPU "
                          f"{ours['server_cpu_ms']:.1f} ms/query, client CPU "
                          f"{ours['client_cpu_ms']:.1f} ms/query", flush=True)
            finally:
                stop(server)
            for scenario, patient in SCENARIOS.items():
                row[f"floor-{scenario}"] = floor = measure_floor(
                    tier_dir, row[f"dicomgate-{scenario}"].pop("last_answers"), queries,
                    today, patient)
                print(f"   pynetdicom floor {scenario}: p50 {floor['p50_ms']:.1f} ms, server "
                      f"CPU {floor['server_cpu_ms']:.1f} ms/query", flush=True)
        if "wlmscpfs" not in only:
            continue
        started = time.perf_counter()
        write_wl_files(tier_dir / "wl", count, today)
        print(f"   .wl files ready in {time.perf_counter() - started:.1f} s", flush=True)
        port = free_port()
        server = spawn([wlmscpfs, "-dfp", str(tier_dir / "wl"), "-dfr", str(port)],
                       tier_dir / "wlmscpfs.log", env={"TCP_NODELAY": "1"})
        try:
            wait_port(port, server)
            for scenario, patient in SCENARIOS.items():
                row[f"wlmscpfs-{scenario}"] = theirs = measure(
                    port, WLM_AE, wlm_queries_large if count >= 100_000 else queries, today,
                    warmup=1, patient_id=patient)
                theirs.pop("last_answers")
                print(f"   wlmscpfs {scenario}: p50 {theirs['p50_ms']:.1f} ms, p99 "
                      f"{theirs['p99_ms']:.1f} ms, {theirs['answers']} answers", flush=True)
        finally:
            stop(server)
    return rows


def measure_floor(tier_dir: Path, answers: list[dict], queries: int, today: date,
                  patient: str) -> dict:
    """The same query against an SCP that only yields dicomgate's answers (_mwl_floor.py)."""
    path = tier_dir / "floor-answers.json"
    path.write_text(json.dumps(answers), encoding="utf-8")
    port = free_port()
    server = spawn([sys.executable, str(HERE / "_mwl_floor.py"), str(port), str(path)],
                   tier_dir / "floor.log")
    try:
        wait_port(port, server)
        result = measure(port, "DICOMGATE", queries, today, patient_id=patient,
                         server_pid=server.pid)
    finally:
        stop(server)
    result.pop("last_answers")
    return result


def table(rows: list[dict]) -> str:
    lines = ["| query | items | answers | dicomgate p50 | dicomgate p99 | dicomgate CPU/query "
             "| client CPU/query | pynetdicom floor p50 | wlmscpfs p50 | wlmscpfs p99 "
             "| wlmscpfs / dicomgate (p50) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    missing = {"p50_ms": float("nan"), "p99_ms": float("nan"), "answers": [],
               "server_cpu_ms": float("nan"), "client_cpu_ms": float("nan")}
    for scenario in SCENARIOS:
        for row in rows:
            ours = row.get(f"dicomgate-{scenario}", missing)
            theirs = row.get(f"wlmscpfs-{scenario}", missing)
            floor = row.get(f"floor-{scenario}", missing)
            answers = "/".join(str(a) for a in ours["answers"] or theirs["answers"])
            lines.append(
                f"| {scenario} | {row['items']:,} | {answers} | {ours['p50_ms']:.1f} ms "
                f"| {ours['p99_ms']:.1f} ms | {ours['server_cpu_ms'] or float('nan'):.1f} ms "
                f"| {ours['client_cpu_ms']:.1f} ms | {floor['p50_ms']:.1f} ms "
                f"| {theirs['p50_ms']:.1f} ms | {theirs['p99_ms']:.1f} ms "
                f"| {theirs['p50_ms'] / ours['p50_ms']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", default="1000,10000,100000",
                        help="item counts, comma-separated [default: 1000,10000,100000]")
    parser.add_argument("--queries", type=int, default=50, help="timed queries per tier")
    parser.add_argument("--wlm-queries-large", type=int, default=10,
                        help="timed wlmscpfs queries at 100,000 items and more")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "worklist")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", default="dicomgate,wlmscpfs",
                        help="which SCPs to run, comma-separated [default: both]")
    parser.add_argument("--dul-max-wait", type=float, default=None, metavar="SECONDS",
                        help="diagnostic: run dicomgate with dicomgate.tuning.DUL_MAX_WAIT "
                             "set to this (the core's idle cap of the DUL thread)")
    parser.add_argument("--quiet-pynetdicom", action="store_true",
                        help="diagnostic: run dicomgate with pynetdicom's request/response "
                             "identifier logging off (it formats every identifier even when "
                             "the log level drops the lines)")
    args = parser.parse_args()
    tiers = [int(t.replace("_", "").replace(",", "")) for t in args.tiers.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        rows = run(tiers, args.queries, args.wlm_queries_large, args.workdir,
                   set(args.only.split(",")), args.dul_max_wait, args.quiet_pynetdicom)
    finally:
        for process in list(PROCESSES):
            stop(process)
    print()
    print(f"MWL C-FIND round trip, one device's query for today ({DEVICES} devices, "
          f"{DAYS} days), {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
