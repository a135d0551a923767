"""C-STORE ingest benchmark: dicomgate beside DCMTK storescp and Orthanc.

One run generates (or reuses) the same data for every receiver, starts each receiver
fresh for each scenario on a free loopback port with an empty storage folder, sends
with DCMTK ``storescu`` (one association, or four at once; sender with and without
TCP_NODELAY), checks what was acknowledged and what the receiver holds, and prints a
table with throughput, peak memory and durability, and the time ratios of dicomgate to
each peer. See benchmarks/README.md.

    .venv/bin/python benchmarks/ingest.py                      # full run (~7 min)
    .venv/bin/python benchmarks/ingest.py --large 100 --small 300   # quick run (~3 min)
    .venv/bin/python benchmarks/ingest.py --export ...         # + dicomgate with JPEG export

``dicomgate-export`` is dicomgate (fsync) with the JPEG export plugin on; besides the
ingest figures its rows say how long after the end of the send the last document was
ready, and how many pictures were made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402
from _peers import (  # noqa: E402
    Dicomgate, Orthanc, PynetdicomNoop, Receiver, SendResult, Storescp, ChildPeakSampler,
)

HERE = Path(__file__).resolve().parent
#: Receivers of a run without --receivers.
RECEIVERS = ("storescp", "orthanc", "pynetdicom-noop", "dicomgate", "dicomgate-nofsync")
#: Every receiver, in table order: dicomgate-export only with --export or --receivers
#: (it waits for its pictures after each send, which makes a full run longer).
ALL_RECEIVERS = ("storescp", "orthanc", "pynetdicom-noop", "dicomgate", "dicomgate-nofsync",
                 "dicomgate-export")
EXPORT = "dicomgate-export"
PEERS = ("storescp", "orthanc")
LABELS = {"storescp": "DCMTK storescp", "orthanc": "Orthanc",
          "pynetdicom-noop": "pynetdicom no-op",
          "dicomgate": "dicomgate (fsync)", "dicomgate-nofsync": "dicomgate (no fsync)",
          EXPORT: "dicomgate (export)"}


@dataclass
class Scenario:
    key: str
    kind: str            # "large" or "small"
    files: list[Path]
    associations: int
    nodelay: bool
    note: str = ""

    @property
    def bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def title(self) -> str:
        what = "CT 512x512" if self.kind == "large" else "small 64x64"
        sender = "sender TCP_NODELAY=1" if self.nodelay else "sender Nagle on (no TCP_NODELAY)"
        assoc = "1 association" if self.associations == 1 else f"{self.associations} associations at once"
        return (f"{len(self.files):,} {what} ({self.bytes / 1e6:.1f} MB), {assoc}, {sender}"
                + (f" -- {self.note}" if self.note else ""))


@dataclass
class Row:
    scenario: str
    receiver: str
    images: int
    bytes: int
    seconds: float | None = None
    process_seconds: float | None = None
    acknowledged: int | None = None
    failed: int | None = None
    stored: int | None = None
    peak_mb: float | None = None
    rss_before_mb: float | None = None
    child_peak_mb: float | None = None
    cpu_seconds: float | None = None
    durability: str = ""
    max_pdu: str = ""
    error: str = ""
    runs: list[float] = field(default_factory=list)
    # JPEG export (dicomgate-export only), all measured after the send's figures:
    #: seconds from the last storescu's exit until no document was collecting/rendering
    export_seconds: float | None = None
    export_documents: dict[str, int] | None = None
    pictures: int | None = None
    picture_failures: int | None = None
    #: first to last picture file written (their mtimes), and how many were written
    #: before the send ended
    render_span_seconds: float | None = None
    pictures_before_send_end: int | None = None
    #: receiver's VmHWM once the export finished, and its CPU seconds from the end of
    #: the send to then
    export_peak_mb: float | None = None
    export_cpu_seconds: float | None = None
    export_runs: list[float] = field(default_factory=list)
    #: what went wrong with the export (the ingest figures stand on their own)
    export_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.seconds is not None

    @property
    def pictures_per_s(self) -> float | None:
        """Pictures / seconds from the end of the send until every document was ready."""
        if self.pictures is None or not self.export_seconds:
            return None
        return self.pictures / self.export_seconds

    @property
    def render_pictures_per_s(self) -> float | None:
        """Pictures / seconds from the first picture file written to the last."""
        if not self.pictures or not self.render_span_seconds:
            return None
        return self.pictures / self.render_span_seconds

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.ok and self.seconds else None

    @property
    def mb_per_s(self) -> float | None:
        return self.bytes / 1e6 / self.seconds if self.ok and self.seconds else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_receiver(name: str, workdir: Path, args, strace_out: Path | None = None) -> Receiver:
    common = dict(nodelay=not args.receiver_nagle, strace_out=strace_out)
    if name == "storescp":
        return Storescp(workdir, fork=args.storescp_fork, pdu=args.peer_max_pdu,
                        bit_preserving=not args.storescp_normal, **common)
    if name == "orthanc":
        return Orthanc(workdir, pdu=args.peer_max_pdu, **common)
    if name == "pynetdicom-noop":
        return PynetdicomNoop(workdir, **common)
    if name == "dicomgate":
        return Dicomgate(workdir, durable=True, max_pdu=args.dicomgate_max_pdu, **common)
    if name == "dicomgate-nofsync":
        return Dicomgate(workdir, durable=False, max_pdu=args.dicomgate_max_pdu, **common)
    if name == EXPORT:
        return Dicomgate(workdir, durable=True, max_pdu=args.dicomgate_max_pdu,
                         jpeg=_peers.EXPORT_JPEG_SETTINGS, **common)
    raise ValueError(name)


def wait_for_export(receiver: Dicomgate, row: Row, sent: SendResult, args) -> None:
    """After a send to dicomgate-export: poll its index (read-only) until no document
    is collecting or rendering and every acknowledged image has a picture (or a
    recorded failure), then note the time since the last storescu exited, the
    pictures, and the receiver's memory and CPU. The receiver keeps running meanwhile.

    The picture check is there because the plugin hears of a study only once the
    association that brought its images has ended, a moment after storescu exited:
    right after the send there can be no document yet, or a ready one that is about
    to learn of more images."""
    pid = receiver.pid
    cpu_start = _peers.cpu_seconds(pid)
    expected = sent.acknowledged
    deadline = time.monotonic() + args.export_timeout
    last_seen, stalled_since = None, None
    with _peers.ExportReader(receiver.data_dir) as reader:
        while True:
            progress = reader.read()
            now = time.time()
            finished = progress.total and not progress.pending
            if finished and progress.covered >= expected:
                break
            seen = (tuple(sorted(progress.documents.items())), progress.covered)
            if finished and seen == last_seen:
                # Nothing pending, images without a picture, and no change: the export
                # is not going to make them (instances it skips, a lost hook...).
                if now - stalled_since > args.export_stall:
                    row.export_error = (f"export stopped with {progress.covered}/{expected} images "
                                 f"rendered or failed")
                    break
            else:
                last_seen, stalled_since = seen, now
            if time.monotonic() > deadline:
                row.export_error = (f"export not done after {args.export_timeout:.0f} s: documents "
                             f"{progress.documents}, {progress.covered}/{expected} images")
                break
            time.sleep(args.export_poll)
    row.export_seconds = now - sent.ended
    row.export_documents = progress.documents
    row.pictures = progress.pictures
    row.picture_failures = progress.failures
    if progress.failures and not row.export_error:
        row.export_error = f"{progress.failures} image(s) could not be rendered"
    row.export_peak_mb = _peers.proc_status(pid).get("VmHWM", 0) / 1024 or None
    cpu_end = _peers.cpu_seconds(pid)
    if cpu_start is not None and cpu_end is not None:
        row.export_cpu_seconds = cpu_end - cpu_start
    times = _peers.picture_file_times(receiver.pictures_root)
    if times:
        row.render_span_seconds = times[-1] - times[0]
        row.pictures_before_send_end = sum(1 for moment in times if moment < sent.ended)


def run_one(scenario: Scenario, name: str, args, run_root: Path) -> Row:
    """Start ``name`` fresh, send the scenario's files, measure, stop, check."""
    row = Row(scenario.key, name, len(scenario.files), scenario.bytes)
    workdir = run_root / f"{scenario.key}-{name}"
    receiver = make_receiver(name, workdir, args)
    row.durability = receiver.durability().summary
    row.max_pdu = receiver.max_pdu()
    result: SendResult | None = None
    try:
        receiver.start(ready_timeout=args.ready_timeout)
        pid = receiver.pid
        row.rss_before_mb = _peers.proc_status(pid).get("VmRSS", 0) / 1024
        cpu_before = _peers.cpu_seconds(pid) or 0.0
        sampler = ChildPeakSampler(pid) if name == "storescp" and args.storescp_fork else None
        if sampler:
            sampler.__enter__()
        try:
            result = _peers.send(scenario.files, receiver.port, receiver.ae_title,
                                 associations=scenario.associations, nodelay=scenario.nodelay,
                                 timeout=args.send_timeout, log_dir=workdir / "send")
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
                row.child_peak_mb = sampler.peak_kb / 1024
        status = _peers.proc_status(pid)
        row.peak_mb = status.get("VmHWM", 0) / 1024 or None
        cpu_after = _peers.cpu_seconds(pid)
        row.cpu_seconds = None if cpu_after is None else cpu_after - cpu_before
        row.stored = receiver.stored_count()
        if name == EXPORT:
            # Before stop(): the server must finish the pictures it was making.
            try:
                wait_for_export(receiver, row, result, args)
            except Exception as exc:
                row.export_error = f"measuring the export failed: {type(exc).__name__}: {exc}"
    except Exception as exc:  # one receiver failing must not end the run
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        receiver.stop()
    if not row.error:
        try:
            after = receiver.stored_count_after_stop()
            if after is not None or name.startswith("dicomgate"):
                row.stored = after
        except Exception as exc:
            row.error = f"counting stored instances failed: {exc}"
    if result is not None:
        row.seconds = result.seconds
        row.process_seconds = result.process_seconds
        row.acknowledged = result.acknowledged
        row.failed = result.failed + (result.files - result.acknowledged - result.failed)
        problems = []
        if result.timed_out:
            problems.append(f"send timed out after {args.send_timeout:.0f} s")
        if result.acknowledged != result.files:
            problems.append(f"{result.acknowledged}/{result.files} acknowledged"
                            + (f" ({'; '.join(result.errors[:2])})" if result.errors else ""))
        if row.stored is not None and row.stored != result.files:
            problems.append(f"receiver holds {row.stored}, expected {result.files}")
        if row.stored is None and not row.error:
            problems.append("could not count stored instances")
        if problems and not row.error:
            row.error = "; ".join(problems)
    if not args.keep:
        _peers.drop_folder(workdir)
    _peers.sync_disks()
    return row


def run_huge(path: Path, args, run_root: Path) -> dict:
    """Send the ~1 GB instance once to dicomgate; report the memory it grew by."""
    size = path.stat().st_size
    report: dict = {"file": str(path), "bytes": size, "receiver": "dicomgate (fsync)",
                    "max_pdu": str(args.dicomgate_max_pdu or "unlimited")}
    workdir = run_root / "huge-dicomgate"
    receiver = make_receiver("dicomgate", workdir, args)
    try:
        receiver.start(ready_timeout=args.ready_timeout)
        pid = receiver.pid
        before = _peers.proc_status(pid)
        report["rss_before_mb"] = before.get("VmRSS", 0) / 1024
        report["lifetime_peak_before_mb"] = before.get("VmHWM", 0) / 1024
        report["peak_reset"] = _peers.reset_peak(pid)
        result = _peers.send([path], receiver.port, receiver.ae_title, associations=1,
                             nodelay=True, timeout=max(args.send_timeout, 900),
                             log_dir=workdir / "send")
        after = _peers.proc_status(pid)
        report["peak_mb"] = after.get("VmHWM", 0) / 1024
        report["rss_after_mb"] = after.get("VmRSS", 0) / 1024
        report["growth_mb"] = report["peak_mb"] - report["rss_before_mb"]
        report["seconds"] = result.seconds
        report["mb_per_s"] = size / 1e6 / result.seconds if result.seconds else None
        report["acknowledged"] = result.acknowledged
        report["errors"] = result.errors
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        receiver.stop()
    if "error" not in report:
        try:
            report["stored"] = receiver.stored_count_after_stop()
            files = receiver.stored_files()
            report["stored_file_bytes"] = max((p.stat().st_size for p in files), default=0)
        except Exception as exc:
            report["error"] = f"counting stored instances failed: {exc}"
    if not args.keep:
        _peers.drop_folder(workdir)
    _peers.sync_disks()
    return report


def durability_check(names: list[str], files: list[Path], args, run_root: Path) -> dict:
    """Run each receiver under strace for a few stores and count fsync-family calls."""
    findings = {}
    for name in names:
        workdir = run_root / f"strace-{name}"
        trace = run_root / f"strace-{name}.txt"
        receiver = make_receiver(name, workdir, args, strace_out=trace)
        entry = {"claimed": receiver.durability().detail}
        try:
            receiver.start(ready_timeout=args.ready_timeout * 2)
            time.sleep(0.5)
            # Calls made while starting (database creation...) are not the stores' cost.
            startup = _peers.count_syscalls(trace)
            result = _peers.send(files, receiver.port, receiver.ae_title, associations=1,
                                 nodelay=True, timeout=300, log_dir=workdir / "send")
            time.sleep(0.5)
            total = _peers.count_syscalls(trace)
            stores = {key: total.get(key, 0) - startup.get(key, 0) for key in total}
            entry["acknowledged"] = result.acknowledged
            entry["measured"] = _peers.summarise_syscalls(stores, result.acknowledged)
            entry["counts"] = stores
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            receiver.stop()
        if not args.keep:
            _peers.drop_folder(workdir)
            trace.unlink(missing_ok=True)
        findings[name] = entry
    return findings


# ---------------------------------------------------------------------------- output

def fmt(value, spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def print_tables(scenarios: list[Scenario], rows: list[Row], out=sys.stdout) -> None:
    by_key = {(row.scenario, row.receiver): row for row in rows}
    header = (f"  {'receiver':<22}{'time s':>8}{'img/s':>9}{'MB/s':>8}{'acked':>7}"
              f"{'stored':>8}{'peak MB':>9}{'CPU s':>7}  durability")
    for scenario in scenarios:
        print(f"\n[{scenario.key}] {scenario.title()}", file=out)
        print(header, file=out)
        for name in ALL_RECEIVERS:
            row = by_key.get((scenario.key, name))
            if row is None:
                continue
            peak = fmt(row.peak_mb, ".0f")
            if row.child_peak_mb:
                peak += f"+{row.child_peak_mb:.0f}"
            line = (f"  {LABELS[name]:<22}{fmt(row.seconds if row.ok or row.seconds else None):>8}"
                    f"{fmt(row.images_per_s, '.0f'):>9}{fmt(row.mb_per_s, '.1f'):>8}"
                    f"{fmt(row.acknowledged, 'd'):>7}{fmt(row.stored, 'd'):>8}{peak:>9}"
                    f"{fmt(row.cpu_seconds, '.1f'):>7}  {row.durability}")
            print(line, file=out)
            if row.error:
                print(f"  {'':<22}!! {row.error}", file=out)
    print("\nRatios: dicomgate's time / the peer's time on the same scenario "
          "(below 1.00: dicomgate faster; 2.00: dicomgate takes twice as long).", file=out)
    print("Like for like on durability: dicomgate (no fsync) vs storescp, dicomgate (fsync) "
          "vs Orthanc.", file=out)
    print(f"  {'scenario':<16}{'dg/storescp':>13}{'dg-nofsync/storescp':>21}"
          f"{'dg/Orthanc':>12}{'dg-nofsync/Orthanc':>20}", file=out)

    def ratio(scenario: str, mine: str, peer: str) -> str:
        a, b = by_key.get((scenario, mine)), by_key.get((scenario, peer))
        if a is None or b is None:
            return "-"
        if not a.ok:
            return "n/a"
        if not b.ok:
            return "peer n/a"
        return f"{a.seconds / b.seconds:.2f}" + ("*" if a.error or b.error else "")

    for scenario in scenarios:
        print(f"  {scenario.key:<16}{ratio(scenario.key, 'dicomgate', 'storescp'):>13}"
              f"{ratio(scenario.key, 'dicomgate-nofsync', 'storescp'):>21}"
              f"{ratio(scenario.key, 'dicomgate', 'orthanc'):>12}"
              f"{ratio(scenario.key, 'dicomgate-nofsync', 'orthanc'):>20}", file=out)

    export_rows = [(scenario, by_key[(scenario.key, EXPORT)]) for scenario in scenarios
                   if (scenario.key, EXPORT) in by_key]
    if not export_rows:
        return
    quiet = _peers.EXPORT_JPEG_SETTINGS["quiet_seconds"]
    print(f"\nJPEG export: dicomgate (export) is dicomgate (fsync) with the jpeg plugin "
          f"([jpeg] quiet_seconds {quiet}, 1 worker, full size). A study's document falls "
          f"due {quiet} s after the association that brought its last images ended.", file=out)
    print("  on/off = ingest time with export / without (dicomgate (fsync)); export s = "
          "from the last storescu's exit until no document is collecting or rendering; "
          "pic/s = pictures / export s; render s = first to last picture file written; "
          "in send = pictures written before the send ended; peak MB = VmHWM after the "
          "send / after the export; CPU s = receiver's CPU during the export.", file=out)
    print(f"  {'scenario':<16}{'on/off':>8}{'export s':>10}{'docs':>6}{'pictures':>10}"
          f"{'pic/s':>8}{'render s':>10}{'render pic/s':>14}{'in send':>9}"
          f"{'peak MB':>12}{'CPU s':>7}", file=out)
    for scenario, row in export_rows:
        docs = None if row.export_documents is None else sum(row.export_documents.values())
        peaks = f"{fmt(row.peak_mb, '.0f')}/{fmt(row.export_peak_mb, '.0f')}"
        print(f"  {scenario.key:<16}{ratio(scenario.key, EXPORT, 'dicomgate'):>8}"
              f"{fmt(row.export_seconds):>10}{fmt(docs, 'd'):>6}{fmt(row.pictures, 'd'):>10}"
              f"{fmt(row.pictures_per_s, '.0f'):>8}{fmt(row.render_span_seconds):>10}"
              f"{fmt(row.render_pictures_per_s, '.0f'):>14}"
              f"{fmt(row.pictures_before_send_end, 'd'):>9}{peaks:>12}"
              f"{fmt(row.export_cpu_seconds, '.1f'):>7}", file=out)
        if row.export_error:
            print(f"  {'':<16}!! {row.export_error}", file=out)


def print_notes(rows: list[Row], args, durability: dict, huge: dict | None, out=sys.stdout):
    pdus = {}
    for row in rows:
        pdus.setdefault(row.receiver, row.max_pdu)
    print("\nReceivers (each started fresh per scenario, with TCP_NODELAY=1 in its "
          "environment unless --receiver-nagle):", file=out)
    notes = {
        "storescp": f"storescp {'--fork' if args.storescp_fork else '--single-process'}"
                    f"{'' if args.storescp_normal else ' +B (bit-preserving)'}, max PDU "
                    f"{pdus.get('storescp', '?')}"
                    + ("" if args.storescp_fork else
                       "; it serves the 4 associations of the parallel scenarios one after "
                       "another, and its peak memory is that of the one process"),
        "orthanc": f"Orthanc, SQLite index, StorageCompression false, no plugins, max PDU "
                   f"{pdus.get('orthanc', '?')}; peak memory is the Orthanc process's",
        "dicomgate": f"dicomgate serve, plugins verification+storage, [gateway] durable=true, "
                     f"max PDU {pdus.get('dicomgate', '?')}; peak memory is the serve process's",
        "dicomgate-nofsync": "dicomgate serve as above with [gateway] durable=false",
        EXPORT: "dicomgate (fsync) plus the jpeg plugin: "
                + ", ".join(f"{key}={value}" for key, value in
                            _peers.EXPORT_JPEG_SETTINGS.items())
                + "; stopped only once its documents are ready (not in the strace check: "
                  "its C-STORE path is dicomgate (fsync)'s)",
    }
    for name in ALL_RECEIVERS:
        if name in pdus:
            print(f"  {LABELS[name]:<22}{notes[name]}", file=out)
    if durability:
        print("\nDurability of an acknowledged C-STORE (claimed, then counted with strace -f "
              "over a few stores of small images):", file=out)
        for name, entry in durability.items():
            print(f"  {LABELS[name]}: {entry['claimed']}", file=out)
            if "measured" in entry:
                print(f"    measured: {entry['measured']}", file=out)
            if "error" in entry:
                print(f"    not measured: {entry['error']}", file=out)
    if huge is not None:
        print("\nHuge instance (one ~1 GB multi-frame instance, 1 association, "
              "sender TCP_NODELAY=1), dicomgate only:", file=out)
        if "error" in huge or "skipped" in huge:
            print(f"  {huge.get('error') or huge.get('skipped')}", file=out)
        else:
            verdict = "PASS" if huge["growth_mb"] < 100 else "FAIL"
            print(f"  {huge['bytes'] / 1e6:.0f} MB in {fmt(huge['seconds'])} s "
                  f"({fmt(huge['mb_per_s'], '.1f')} MB/s), acknowledged "
                  f"{huge['acknowledged']}, stored {huge.get('stored')} "
                  f"(largest stored file {huge.get('stored_file_bytes', 0) / 1e6:.0f} MB)", file=out)
            print(f"  memory: RSS before {huge['rss_before_mb']:.0f} MB, peak during the send "
                  f"{huge['peak_mb']:.0f} MB{'' if huge['peak_reset'] else ' (lifetime peak)'}"
                  f", growth {huge['growth_mb']:.0f} MB (target < 100 MB: {verdict})", file=out)


# ------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="C-STORE ingest benchmark: dicomgate vs DCMTK storescp vs Orthanc.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE / ".work",
                        help="generated data and receivers' folders (data is reused)")
    parser.add_argument("--large", type=int, default=None,
                        help="CT images 512x512 16-bit [default: 1000]%(default).0s")
    parser.add_argument("--small", type=int, default=None,
                        help="small images 64x64 16-bit [default: 2000]%(default).0s")
    parser.add_argument("--nagle-small", type=int, default=200,
                        help="small images in the scenarios with Nagle on at the sender (0: skip)")
    parser.add_argument("--nagle-large", type=int, default=100,
                        help="CT images in the scenario with Nagle on at the sender (0: skip)")
    parser.add_argument("--parallel", type=int, default=4,
                        help="associations at once in the parallel scenarios (0/1: skip them)")
    parser.add_argument("--huge", action=argparse.BooleanOptionalAction, default=None,
                        help="the ~1 GB instance scenario (default: on unless --large or "
                             "--small scale the run down)")
    parser.add_argument("--receivers", default=",".join(RECEIVERS),
                        help=f"comma-separated subset of {', '.join(ALL_RECEIVERS)}")
    parser.add_argument("--export", action="store_true",
                        help=f"also run {EXPORT} (dicomgate (fsync) with the JPEG export "
                             "plugin), and dicomgate (fsync) to compare it with")
    parser.add_argument("--export-timeout", type=float, default=600.0,
                        help="seconds after a send that dicomgate-export may take to make "
                             "its documents")
    parser.add_argument("--export-poll", type=float, default=0.05,
                        help="seconds between two looks at dicomgate-export's index")
    parser.add_argument("--export-stall", type=float, default=10.0,
                        help="give up when nothing is pending and images still lack a "
                             "picture for this long")
    parser.add_argument("--scenarios", default="",
                        help="comma-separated scenario keys to run (default: all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per receiver and scenario; the median time is reported")
    parser.add_argument("--durability-check", action=argparse.BooleanOptionalAction,
                        default=True, help="count each receiver's fsync calls with strace")
    parser.add_argument("--peer-max-pdu", type=int, default=None,
                        help="max PDU for storescp and Orthanc (4096..131072; default: "
                             "their shipped default, 16384)")
    parser.add_argument("--dicomgate-max-pdu", type=int, default=262_144,
                        help="dicomgate [limits] max_pdu (0: unlimited)")
    parser.add_argument("--storescp-fork", action="store_true",
                        help="run storescp --fork (a child per association) instead of one process")
    parser.add_argument("--storescp-normal", action="store_true",
                        help="run storescp without +B (parse and re-encode each data set)")
    parser.add_argument("--receiver-nagle", action="store_true",
                        help="start receivers without TCP_NODELAY=1 in their environment "
                             "(DCMTK-based receivers then wait ~40 ms per response)")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--send-timeout", type=float, default=600.0,
                        help="seconds one send (all its storescu processes) may take")
    parser.add_argument("--reuse-peers", type=Path, default=None,
                        help="take rows of receivers not run now from this earlier --json "
                             "output (same scenario keys), e.g. to re-run only dicomgate")
    parser.add_argument("--keep", action="store_true", help="keep receivers' folders")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    scaled_down = args.large is not None or args.small is not None
    args.large = 1000 if args.large is None else args.large
    args.small = 2000 if args.small is None else args.small
    if args.huge is None:
        args.huge = not scaled_down
    return args


def build_scenarios(args, data) -> list[Scenario]:
    scenarios = []
    par = args.parallel
    if data.large:
        scenarios.append(Scenario("large-1-nodelay", "large", data.large, 1, True))
        if par > 1:
            scenarios.append(Scenario(f"large-{par}-nodelay", "large", data.large, par, True))
    if data.small:
        scenarios.append(Scenario("small-1-nodelay", "small", data.small, 1, True))
        if par > 1:
            scenarios.append(Scenario(f"small-{par}-nodelay", "small", data.small, par, True))
    if args.nagle_small and data.small:
        files = data.small[:args.nagle_small]
        note = f"first {len(files)} small images only: Nagle costs ~40-80 ms per image"
        scenarios.append(Scenario("small-1-nagle", "small", files, 1, False, note))
        if par > 1:
            scenarios.append(Scenario(f"small-{par}-nagle", "small", files, par, False, note))
    if args.nagle_large and data.large:
        files = data.large[:args.nagle_large]
        scenarios.append(Scenario("large-1-nagle", "large", files, 1, False,
                                  f"first {len(files)} CT images only"))
    if args.scenarios:
        wanted = {key.strip() for key in args.scenarios.split(",") if key.strip()}
        scenarios = [s for s in scenarios if s.key in wanted]
    return scenarios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _peers.install_cleanup()
    receivers = [name.strip() for name in args.receivers.split(",") if name.strip()]
    if args.export:
        receivers += [name for name in ("dicomgate", EXPORT) if name not in receivers]
    receivers = [name for name in ALL_RECEIVERS if name in receivers] + [
        name for name in receivers if name not in ALL_RECEIVERS]
    unknown = set(receivers) - set(ALL_RECEIVERS)
    if unknown:
        log(f"unknown receivers: {', '.join(sorted(unknown))}")
        return 2
    started = time.monotonic()
    load_start = os.getloadavg()
    workdir = args.workdir.resolve()
    run_root = workdir / "runs"
    _peers.drop_folder(run_root)
    run_root.mkdir(parents=True, exist_ok=True)

    log(f"data in {workdir / 'data'} ({args.large} CT, {args.small} small"
        f"{', 1 huge' if args.huge else ''}); generated once, reused afterwards")
    data = _peers.prepare_data(workdir, args.large, args.small, args.huge, log=log)
    _peers.warm_cache([*data.large, *data.small])
    _peers.sync_disks()  # freshly generated data must not be written back during a run
    scenarios = build_scenarios(args, data)

    missing = None
    if any(name.startswith("dicomgate") for name in receivers):
        missing = _peers.storage_plugin_status()
        if missing:
            log(f"dicomgate: {missing}; its columns report that, the peers still run")
    missing_jpeg = None
    if EXPORT in receivers and not missing:
        missing_jpeg = _peers.jpeg_plugin_status()
        if missing_jpeg:
            log(f"{EXPORT}: {missing_jpeg}; its rows report that")
    versions = _peers.tool_versions()

    rows: list[Row] = []
    try:
        for scenario in scenarios:
            log(f"\n== {scenario.key}: {scenario.title()}")
            for name in receivers:
                why = missing or (missing_jpeg if name == EXPORT else None)
                if name.startswith("dicomgate") and why:
                    row = Row(scenario.key, name, len(scenario.files), scenario.bytes,
                              error=why)
                    placeholder = make_receiver(name, run_root / "x", args)
                    row.durability = placeholder.durability().summary
                    row.max_pdu = placeholder.max_pdu()
                    rows.append(row)
                    continue
                attempts = []
                for _ in range(max(1, args.repeat)):
                    row = run_one(scenario, name, args, run_root)
                    attempts.append(row)
                    log(f"   {LABELS[name]:<22} {fmt(row.seconds)} s  acked "
                        f"{fmt(row.acknowledged, 'd')}/{row.images}  stored "
                        f"{fmt(row.stored, 'd')}  peak {fmt(row.peak_mb, '.0f')} MB"
                        + (f"  export {fmt(row.export_seconds)} s, {fmt(row.pictures, 'd')} "
                           f"pictures, peak {fmt(row.export_peak_mb, '.0f')} MB"
                           if name == EXPORT else "")
                        + (f"  !! {row.error}" if row.error else "")
                        + (f"  !! export: {row.export_error}" if row.export_error else ""))
                good = [row for row in attempts if row.seconds is not None] or attempts
                good.sort(key=lambda row: row.seconds or 0)
                chosen = good[len(good) // 2]
                chosen.runs = [row.seconds for row in attempts if row.seconds is not None]
                chosen.export_runs = [row.export_seconds for row in attempts
                                      if row.export_seconds is not None]
                rows.append(chosen)

        huge = None
        if args.huge and "dicomgate" in receivers:
            log("\n== huge: one ~1 GB instance to dicomgate")
            if missing:
                huge = {"skipped": f"dicomgate: {missing}"}
            else:
                huge = run_huge(data.huge, args, run_root)
                log(f"   {huge}")

        durability = {}
        if args.durability_check:
            names = [n for n in receivers
                     if not (n.startswith("dicomgate") and missing)
                     and n not in (EXPORT, "pynetdicom-noop")]
            if _peers.STRACE and names and data.small:
                log("\n== durability: counting fsync calls with strace")
                durability = durability_check(names, data.small[:20], args, run_root)
            elif not _peers.STRACE:
                log("strace not installed: durability not measured")
    except KeyboardInterrupt:
        log("\ninterrupted: receivers stopped; partial results follow")
        huge, durability = None, {}
    finally:
        _peers.kill_all()

    if args.reuse_peers and args.reuse_peers.exists():
        earlier = json.loads(args.reuse_peers.read_text())
        have = {(row.scenario, row.receiver) for row in rows}
        for item in earlier.get("rows", []):
            if item["receiver"] not in receivers and (item["scenario"], item["receiver"]) not in have:
                rows.append(Row(**{key: value for key, value in item.items()
                                   if key in Row.__dataclass_fields__}))

    out = sys.stdout
    print(f"\ndicomgate C-STORE ingest benchmark -- {platform.node()}, "
          f"{platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}", file=out)
    print("  " + "; ".join(f"{key}: {value}" for key, value in versions.items()), file=out)
    print("  sender: DCMTK /usr/bin/storescu, one process per association; time = first "
          "A-ASSOCIATE-RQ to the last storescu's exit; MB = 10^6 bytes of DICOM files sent; "
          "peak MB = receiver's VmHWM at the end of the scenario", file=out)
    load_end = os.getloadavg()
    print(f"  load average (1/5/15 min) at start {'/'.join(f'{v:.2f}' for v in load_start)}, "
          f"at end {'/'.join(f'{v:.2f}' for v in load_end)}"
          + ("  -- other processes were using the CPUs: expect noise, use --repeat"
             if load_start[0] > 0.5 else ""), file=out)
    print_tables(scenarios, rows, out)
    print_notes(rows, args, durability, huge, out)
    elapsed = time.monotonic() - started
    print(f"\nwhole run: {elapsed / 60:.1f} min", file=out)

    if args.json:
        payload = {
            "versions": versions,
            "args": {key: str(value) for key, value in vars(args).items()},
            "scenarios": [{"key": s.key, "title": s.title(), "images": len(s.files),
                           "bytes": s.bytes, "associations": s.associations,
                           "nodelay": s.nodelay} for s in scenarios],
            "rows": [dict(asdict(row), images_per_s=row.images_per_s, mb_per_s=row.mb_per_s,
                          **({"pictures_per_s": row.pictures_per_s,
                              "render_pictures_per_s": row.render_pictures_per_s,
                              "export_settings": _peers.EXPORT_JPEG_SETTINGS}
                             if row.receiver == EXPORT else {}))
                     for row in rows],
            "huge": huge,
            "durability": durability,
            "seconds": elapsed,
            "load_average": {"start": load_start, "end": load_end},
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        log(f"results written to {args.json}")
    return 0 if all(row.ok and not row.export_error for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
