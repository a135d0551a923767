"""Shared helpers of dicomgate's benchmarks.

* generating test data once (CT slices, small images, one ~1 GB multi-frame instance),
* starting and stopping the receivers that are compared: DCMTK ``storescp``, Orthanc
  and dicomgate, each on a free loopback port with a fresh storage folder,
* sending with DCMTK ``storescu`` (one or several associations) and reading what it
  acknowledged,
* reading a process's memory and CPU figures from ``/proc``,
* counting a receiver's fsync-family system calls with ``strace``,
* reading how far dicomgate's JPEG export got (its SQLite index, read-only, and the
  picture files).

Everything here talks to the receivers only over loopback and only through their
public interfaces (DICOM, Orthanc's REST API, dicomgate's command line and its SQLite
file). Every process this module starts is registered and killed on exit, on Ctrl-C
and on SIGTERM.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- binaries

#: DCMTK tools, by absolute path: a virtual environment's ``bin/`` holds pynetdicom's
#: own ``storescu``/``echoscu``, which must never be picked up by accident.
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ECHOSCU = Path("/usr/bin/echoscu")
ORTHANC = Path("/usr/sbin/Orthanc")
STRACE = shutil.which("strace", path="/usr/bin:/bin")

REPO = Path(__file__).resolve().parent.parent
BENCH_AET = "BENCH"


def dicomgate_executable() -> Path:
    """The ``dicomgate`` console script of the interpreter running the benchmark, or of
    the repository's ``.venv``."""
    for candidate in (Path(sys.executable).parent / "dicomgate", REPO / ".venv/bin/dicomgate"):
        if candidate.exists():
            return candidate
    found = shutil.which("dicomgate")
    if not found:
        raise FileNotFoundError("no dicomgate executable (install the package: pip install -e .)")
    return Path(found)


def tool_versions() -> dict[str, str]:
    """First version line of each peer, for the report."""
    versions = {}
    for name, cmd in (("storescu/storescp", [str(STORESCP), "--version"]),
                      ("Orthanc", [str(ORTHANC), "--version"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            versions[name] = next((line.strip() for line in out.splitlines() if line.strip()), "?")
        except (OSError, subprocess.SubprocessError):
            versions[name] = "not found"
    try:
        out = subprocess.run([str(dicomgate_executable()), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
        versions["dicomgate"] = out.strip()
    except (OSError, subprocess.SubprocessError):
        versions["dicomgate"] = "not found"
    return versions


# ------------------------------------------------------------------ process registry

_LIVE: dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()


def spawn(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, text: bool = False
          ) -> subprocess.Popen:
    """Start ``cmd`` in its own process group and remember it for :func:`kill_all`."""
    proc = subprocess.Popen([str(part) for part in cmd], env=env, cwd=cwd, stdout=stdout,
                            stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
                            text=text)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    return proc


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    # Anything the process group left behind (forked children) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)
    return proc.returncode


def kill_all() -> None:
    """Kill every process this module started that is still registered."""
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        stop_process(proc, grace=3.0)


def install_cleanup() -> None:
    """Kill registered processes at exit, and turn SIGINT/SIGTERM/SIGHUP into
    KeyboardInterrupt. SIGINT is set explicitly because a shell starts background jobs
    with it ignored, and Python would inherit that."""
    atexit.register(kill_all)

    def _terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)


# --------------------------------------------------------------------------- network

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def echo(port: int, called_aet: str, timeout: float = 5.0) -> bool:
    """One C-ECHO with DCMTK ``echoscu``; True when it succeeded."""
    try:
        result = subprocess.run(
            [str(ECHOSCU), "-aet", BENCH_AET, "-aec", called_aet, "-to", "3", "-ta", "3",
             "-td", "3", "127.0.0.1", str(port)],
            capture_output=True, text=True, timeout=timeout, env=_env(nodelay=True))
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def _env(nodelay: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------- /proc figures

def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` ... of ``pid`` in kB (empty when the process is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key.startswith("Vm"):
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        values[key] = int(parts[0])
    except OSError:
        pass
    return values


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its reaped children so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    return sum(int(fields[index]) for index in (11, 12, 13, 14)) / ticks


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's children list)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(child) for child in fh.read().split()]
    return found


class ChildPeakSampler:
    """Polls the children of a process (``storescp --fork``) and keeps the largest
    ``VmHWM`` any of them reached. Children that live less than the poll interval can
    be missed; the figure is a lower bound."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.children_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildPeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for child in children_of(self.pid):
                self.children_seen.add(child)
                self.peak_kb = max(self.peak_kb, proc_status(child).get("VmHWM", 0))
            self._stop.wait(self.interval)


# ---------------------------------------------------------------------------- receivers

@dataclass
class Durability:
    """What a receiver's C-STORE acknowledgement promises about the data."""

    summary: str
    detail: str


class Receiver:
    """A C-STORE SCP under test, on a free port with its own fresh folder."""

    #: Short name used in tables and on the command line.
    name = "receiver"
    label = "receiver"
    ae_title = "ANY-SCP"

    def __init__(self, workdir: Path, *, nodelay: bool = True, strace_out: Path | None = None):
        self.workdir = workdir
        self.nodelay = nodelay
        self.strace_out = strace_out
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"
        self._log = None

    # Subclasses build the command line and may prepare files.
    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        pass

    def extra_env(self) -> dict[str, str]:
        return {}

    @property
    def pid(self) -> int:
        """PID of the receiving process itself (not of strace around it)."""
        assert self.proc is not None
        if self.strace_out is None:
            return self.proc.pid
        for _ in range(100):
            children = children_of(self.proc.pid)
            if children:
                return children[0]
            time.sleep(0.05)
        return self.proc.pid

    def start(self, ready_timeout: float = 60.0) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        self.port = free_port()
        self.prepare()
        cmd = self.command()
        if self.strace_out is not None:
            if not STRACE:
                raise RuntimeError("strace is not installed")
            cmd = [STRACE, "-f", "-qq", "-y", "-e", f"trace={STRACE_CALLS}",
                   "-o", str(self.strace_out), "--", *cmd]
        self._log = open(self.log_path, "wb")
        self.proc = spawn(cmd, env=_env(self.nodelay, self.extra_env()), cwd=self.workdir,
                          stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start (code {self.proc.returncode}): "
                                   f"{self.log_tail()}")
            if port_open(self.port) and echo(self.port, self.ae_title):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready after {ready_timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=15.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").strip().splitlines()
            return " | ".join(text[-lines:])
        return ""

    def stored_count(self) -> int | None:
        """How many instances the receiver holds (called while it still runs)."""
        raise NotImplementedError

    def stored_count_after_stop(self) -> int | None:
        """Counts that can only be taken once the receiver has stopped (None: not needed)."""
        return None

    def durability(self) -> Durability:
        raise NotImplementedError

    def max_pdu(self) -> str:
        return "?"


def count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file())


class Storescp(Receiver):
    """DCMTK ``storescp``: one process serving one association at a time (default),
    writing each received data set to a file, bit-preserving (``+B``)."""

    name = "storescp"
    label = "DCMTK storescp"
    ae_title = "STORESCP"

    def __init__(self, workdir: Path, *, fork: bool = False, bit_preserving: bool = True,
                 pdu: int | None = None, **kwargs):
        super().__init__(workdir, **kwargs)
        self.fork = fork
        self.bit_preserving = bit_preserving
        self.pdu = pdu

    @property
    def storage(self) -> Path:
        return self.workdir / "files"

    def prepare(self) -> None:
        self.storage.mkdir()

    def command(self) -> list[str]:
        cmd = [str(STORESCP), "-aet", self.ae_title, "-od", str(self.storage),
               "--fork" if self.fork else "--single-process"]
        if self.bit_preserving:
            cmd.append("+B")
        if self.pdu:
            cmd += ["-pdu", str(self.pdu)]
        return cmd + [str(self.port)]

    def stored_count(self) -> int:
        return count_files(self.storage)

    def max_pdu(self) -> str:
        return str(self.pdu or 16384)

    def durability(self) -> Durability:
        return Durability(
            "no fsync",
            "storescp writes each file with ordinary buffered writes and answers the "
            "C-STORE without fsync (no rename either): an acknowledged image lives in the "
            "page cache until the kernel writes it back; a power cut can lose it or leave "
            "it truncated.")


class Orthanc(Receiver):
    """Orthanc with a generated JSON config: SQLite index, files in a folder, no plugins."""

    name = "orthanc"
    label = "Orthanc"
    ae_title = "ORTHANC"

    def __init__(self, workdir: Path, *, pdu: int | None = None, **kwargs):
        super().__init__(workdir, **kwargs)
        self.pdu = pdu
        self.http_port = 0

    def prepare(self) -> None:
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        config = {
            "Name": "dicomgate-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "Plugins": [],
            "LuaScripts": [],
            # Left at Orthanc's defaults on purpose, and stated in the report:
            # "SyncStorageArea" (true since 1.7.4) and "MaximumPduLength" (16384).
        }
        if self.pdu:
            config["MaximumPduLength"] = self.pdu
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def command(self) -> list[str]:
        return [str(ORTHANC), str(self.workdir / "orthanc.json")]

    def rest(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def stored_count(self) -> int | None:
        try:
            return int(self.rest("/statistics")["CountInstances"])
        except (OSError, ValueError, KeyError):
            return None

    def max_pdu(self) -> str:
        return str(self.pdu or 16384)

    def durability(self) -> Durability:
        return Durability(
            "file fdatasync; index not synced",
            "Orthanc 1.10.1 keeps its default \"SyncStorageArea\": true (since 1.7.4): each "
            "storage file is written in place (no temporary name, no rename) and "
            "fdatasync'ed before the C-STORE is answered; the directory is not synced, and "
            "the SQLite index (WAL) is committed without any sync, so after a power cut an "
            "acknowledged instance's file can be there while the index has lost it.")


def dicomgate_plugins() -> dict[str, bool]:
    """Installed dicomgate plugins and whether a bare start would load them."""
    try:
        out = subprocess.run([str(dicomgate_executable()), "plugins", "--json"],
                             capture_output=True, text=True, timeout=120, check=True,
                             cwd=tempfile.gettempdir()).stdout
        return {row["name"]: bool(row.get("loaded")) for row in json.loads(out)}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return {}


def storage_plugin_status() -> str | None:
    """None when dicomgate can store; otherwise why it cannot (for the table)."""
    plugins = dicomgate_plugins()
    if not plugins:
        return "dicomgate not runnable"
    if "storage" not in plugins:
        return "storage plugin missing"
    return None


def jpeg_plugin_status() -> str | None:
    """None when dicomgate has the JPEG export plugin; otherwise why not."""
    plugins = dicomgate_plugins()
    if not plugins:
        return "dicomgate not runnable"
    if "jpeg" not in plugins:
        return "jpeg plugin missing"
    return None


#: ``[jpeg]`` of the ``dicomgate-export`` receiver: documents fall due half a second
#: after the association that brought a study's last images (no MPPS in the benchmark),
#: one worker thread, full-size pictures.
EXPORT_JPEG_SETTINGS = {"quiet_seconds": 0.5, "settle_seconds": 0.5, "poll_interval": 0.5,
                        "workers": 1, "max_size": 0}


class Dicomgate(Receiver):
    """``dicomgate serve`` with a generated TOML config and the storage plugin."""

    name = "dicomgate"
    label = "dicomgate"
    ae_title = "DICOMGATE"

    def __init__(self, workdir: Path, *, durable: bool | None = True, max_pdu: int = 262_144,
                 jpeg: dict[str, float | int] | None = None, **kwargs):
        super().__init__(workdir, **kwargs)
        #: ``[gateway] durable``; None leaves it out of the config (the default, true)
        self.durable = durable
        self.pdu = max_pdu
        #: ``[jpeg]`` settings; not None enables the JPEG export plugin with them
        self.jpeg = jpeg
        if durable is False:
            self.name = "dicomgate-nofsync"
            self.label = "dicomgate (durable=false)"
        if jpeg is not None:
            self.name = "dicomgate-export" if durable is not False else "dicomgate-nofsync-export"
            self.label += " + JPEG export"
        self.log_path = workdir / f"{self.name}.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def config_path(self) -> Path:
        return self.workdir / "dicomgate.toml"

    def config_text(self) -> str:
        lines = [
            "[gateway]",
            f'ae_title = "{self.ae_title}"',
            'host = "127.0.0.1"',
            f"port = {self.port}",
            f'data_dir = "{self.data_dir}"',
            'log_level = "WARNING"',
            *([f"durable = {'true' if self.durable else 'false'}"]
              if self.durable is not None else []),
            "",
            "[limits]",
            f"max_pdu = {self.pdu}",
            "",
            "[plugins]",
            'enabled = ["verification", "storage"'
            + (', "jpeg"]' if self.jpeg is not None else "]"),
            "",
            *(["[jpeg]", *(f"{key} = {value}" for key, value in self.jpeg.items()), ""]
              if self.jpeg is not None else []),
            "[[peers]]",
            f'ae_title = "{BENCH_AET}"',
            'host = "127.0.0.1"',
            'kind = "modality"',
            'allow = ["*"]',
            "",
        ]
        return "\n".join(lines)

    def prepare(self) -> None:
        self.config_path.write_text(self.config_text())
        check = subprocess.run(
            [str(dicomgate_executable()), "config", "check", str(self.config_path)],
            capture_output=True, text=True, timeout=120, cwd=self.workdir)
        if check.returncode != 0:
            raise RuntimeError("dicomgate config check failed: "
                               + (check.stderr or check.stdout).strip().replace("\n", " | "))

    def command(self) -> list[str]:
        return [str(dicomgate_executable()), "serve", "--config", str(self.config_path)]

    def stored_count(self) -> int | None:
        return None  # counted from the SQLite index once the server closed it

    def stored_count_after_stop(self) -> int | None:
        return count_index_rows(self.data_dir)

    def stored_files(self) -> list[Path]:
        """Files in the data folder that start like DICOM files (b"DICM" at 128)."""
        found = []
        for path in self.data_dir.rglob("*"):
            if path.is_file() and path.stat().st_size > 132:
                with open(path, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        found.append(path)
        return found

    def max_pdu(self) -> str:
        return "unlimited" if self.pdu == 0 else str(self.pdu)

    @property
    def pictures_root(self) -> Path:
        """``[jpeg] root`` at its default: ``jpeg/`` in the data folder."""
        return self.data_dir / "jpeg"

    def durability(self) -> Durability:
        if self.jpeg is not None and self.durable is not False:
            return Durability(
                "fsync ([gateway] durable=true)",
                "the same C-STORE path as dicomgate (fsync); the JPEG plugin adds one small "
                "transaction per study after the association ended, and writes each picture "
                "durably (file and folder flushed) in its worker thread.")
        if self.durable is False:
            return Durability(
                "no fsync ([gateway] durable=false)",
                "configured with [gateway] durable = false, the like-for-like setting for "
                "comparing with storescp: no flush of files or folders, SQLite commits with "
                "synchronous=NORMAL; not a setting for a clinic.")
        return Durability(
            "fsync ([gateway] durable=true)",
            "configured with [gateway] durable = true: the stored file, its folder and the "
            "index commit (SQLite WAL, synchronous=FULL) are meant to be on disk before the "
            "C-STORE is answered.")


class PynetdicomNoop(Receiver):
    """``_noop_store.py``: dicomgate's network stack with a handler that keeps nothing,
    the ceiling of what any work on top of pynetdicom can reach."""

    name = "pynetdicom-noop"
    label = "pynetdicom no-op"
    ae_title = "NOOP"

    @property
    def count_file(self) -> Path:
        return self.workdir / "stored.txt"

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("_noop_store.py")), self.ae_title,
                str(self.port), str(self.workdir / "spool"), str(self.count_file)]

    def stored_count(self) -> int | None:
        return None

    def stored_count_after_stop(self) -> int | None:
        try:
            return int(self.count_file.read_text())
        except (OSError, ValueError):
            return None

    def max_pdu(self) -> str:
        return "262144"

    def durability(self) -> Durability:
        return Durability(
            "keeps nothing",
            "pynetdicom with dicomgate's reactor tuning streams each data set to a spool "
            "file, and the handler deletes it and answers success: the ceiling of what "
            "work on top of pynetdicom can reach, not a receiver.")


def instance_tables(db_path: Path) -> list[tuple[str, int]]:
    """(table, row count) of each table of dicomgate's index that looks like it holds
    one row per stored instance: a name with "instance" and a SOP Instance UID column."""
    if not db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        found = []
        for table in tables:
            columns = [row[1].lower() for row in conn.execute(f'PRAGMA table_info("{table}")')]
            has_uid = any("sop_instance" in col or col in ("sop_uid", "instance_uid")
                          for col in columns)
            if "instance" in table.lower() and has_uid:
                (count,) = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                found.append((table, count))
        return found
    finally:
        conn.close()


@dataclass
class ExportProgress:
    """How far dicomgate's JPEG export got, from its SQLite index."""

    documents: dict[str, int] = field(default_factory=dict)   # state -> count
    pictures: int = 0
    failures: int = 0
    covered: int = 0   # distinct instances with a picture or a recorded failure

    @property
    def pending(self) -> int:
        return self.documents.get("collecting", 0) + self.documents.get("rendering", 0)

    @property
    def total(self) -> int:
        return sum(self.documents.values())


class ExportReader:
    """A read-only connection to dicomgate's index for polling ``jpeg_document`` and
    ``jpeg_picture`` while the server runs (WAL: readers never block its writes; every
    query is its own snapshot)."""

    def __init__(self, data_dir: Path):
        self.db_path = data_dir / "index.sqlite"
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> ExportReader:
        return self

    def __exit__(self, *exc) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def read(self) -> ExportProgress:
        if self._conn is None:
            if not self.db_path.exists():
                return ExportProgress()
            self._conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30,
                                         isolation_level=None, check_same_thread=False)
        conn = self._conn
        progress = ExportProgress()
        progress.documents = dict(conn.execute(
            "SELECT state, count(*) FROM jpeg_document GROUP BY state").fetchall())
        (progress.pictures,) = conn.execute("SELECT count(*) FROM jpeg_picture").fetchone()
        (progress.failures,) = conn.execute("SELECT count(*) FROM jpeg_failure").fetchone()
        (progress.covered,) = conn.execute(
            "SELECT count(*) FROM (SELECT sop_instance_uid FROM jpeg_picture "
            "UNION SELECT sop_instance_uid FROM jpeg_failure)").fetchone()
        return progress


def picture_file_times(root: Path) -> list[float]:
    """Modification times (epoch seconds) of the finished pictures under ``root``:
    each is written to a temporary name and renamed once flushed, so its mtime is the
    moment its data was written."""
    times = []
    if root.exists():
        for path in root.rglob("*.jpg"):
            with contextlib.suppress(OSError):
                times.append(path.stat().st_mtime)
    return sorted(times)


def count_index_rows(data_dir: Path) -> int | None:
    """Rows of the instance table of dicomgate's SQLite index (None: none found)."""
    tables = instance_tables(data_dir / "index.sqlite")
    if not tables:
        return None
    # The storage plugin's instance table; if several qualify, the largest count.
    return max(count for _, count in tables)


# ----------------------------------------------------------------------------- sending

STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStderr = false
log4cplus.appender.console.ImmediateFlush = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %p: %m%n
"""

_LINE = re.compile(r"^(\d+\.\d+) (\w+): (.*)$")


@dataclass
class SendResult:
    """What one send (one or several storescu processes at once) achieved."""

    files: int
    bytes: int
    associations: int
    nodelay: bool
    seconds: float = 0.0           # first "Requesting Association" to the last exit
    process_seconds: float = 0.0   # spawn of the first storescu to the last exit
    ended: float = 0.0             # time.time() of the last storescu's exit
    success: int = 0
    warning: int = 0
    failed: int = 0
    return_codes: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def acknowledged(self) -> int:
        return self.success + self.warning


def split(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """``items`` in ``parts`` contiguous chunks of nearly equal size."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def send(files: Sequence[Path], port: int, called_aet: str, *, associations: int = 1,
         nodelay: bool = True, timeout: float = 900.0, log_dir: Path) -> SendResult:
    """Send ``files`` with DCMTK storescu, over ``associations`` associations at once.

    Each storescu gets its part of the files on its command line and sends all of them
    on one association (``-nh``: it carries on after a failed store, so failures are
    counted instead of ending the run).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_config = log_dir / "storescu-log.cfg"
    log_config.write_text(STORESCU_LOG_CONFIG)
    chunks = split(files, associations)
    result = SendResult(files=len(files), bytes=sum(path.stat().st_size for path in files),
                        associations=len(chunks), nodelay=nodelay)
    env = _env(nodelay)
    procs: list[tuple[subprocess.Popen, Path]] = []
    ends: dict[int, float] = {}
    spawned = time.time()
    try:
        for index, chunk in enumerate(chunks):
            out = log_dir / f"storescu-{index}.log"
            with open(out, "wb") as fh:
                proc = spawn([str(STORESCU), "-lc", str(log_config), "-nh",
                              "-aet", BENCH_AET, "-aec", called_aet,
                              "-to", "10", "-ta", "30", "-td", "300", "-ts", "300",
                              "127.0.0.1", str(port), *map(str, chunk)],
                             env=env, stdout=fh, stderr=subprocess.STDOUT)
            procs.append((proc, out))
        deadline = time.monotonic() + timeout
        pending = {proc.pid: proc for proc, _ in procs}
        while pending:
            for pid, proc in list(pending.items()):
                if proc.poll() is not None:
                    ends[pid] = time.time()
                    del pending[pid]
            if pending and time.monotonic() > deadline:
                result.timed_out = True
                for proc in pending.values():
                    stop_process(proc, grace=2)
                    ends[proc.pid] = time.time()
                break
            time.sleep(0.002)
    finally:
        for proc, _ in procs:
            stop_process(proc, grace=2)
    first_request = None
    for proc, out in procs:
        result.return_codes.append(proc.returncode)
        for raw in out.read_text(errors="replace").splitlines():
            match = _LINE.match(raw)
            if not match:
                continue
            stamp, level, message = float(match[1]), match[2], match[3]
            if message.startswith("Requesting Association"):
                first_request = stamp if first_request is None else min(first_request, stamp)
            elif message.startswith("Received Store Response"):
                if message.startswith("Received Store Response (Success"):
                    result.success += 1
                elif message.startswith("Received Store Response (Warning"):
                    result.warning += 1
                else:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(message)
            elif level in ("ERROR", "FATAL") and len(result.errors) < 5:
                result.errors.append(message)
    last_end = max(ends.values()) if ends else time.time()
    result.ended = last_end
    result.process_seconds = last_end - spawned
    result.seconds = last_end - (first_request if first_request is not None else spawned)
    return result


# ----------------------------------------------------------------------- data generation

DATA_VERSION = 2
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
_UID_NAMESPACE = uuid.UUID("6c1f0e6e-4c1a-4a57-9d58-1f2b0a2f6f01")


def bench_uid(name: str) -> str:
    """A deterministic UID under the 2.25 root (UUID-derived), the same on every run."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _phantom(size: int, slice_index: int, stored: dict[str, int]) -> bytes:
    """A ``size`` x ``size`` 16-bit little-endian axial slice: air, an elliptical body
    whose width changes with the slice, two lungs and a bone ring."""
    air, tissue, lung, bone = stored["air"], stored["tissue"], stored["lung"], stored["bone"]
    pixels = array.array("H", [air]) * (size * size)
    centre = size / 2
    scale = 1.0 + 0.08 * ((slice_index % 50) / 50.0)
    body_a, body_b = size * 0.42 * scale / 1.08, size * 0.30
    lungs = [(size * 0.29, size * 0.47, size * 0.11, size * 0.17),
             (size * 0.71, size * 0.47, size * 0.11, size * 0.17)]

    def span(cx: float, cy: float, a: float, b: float, y: float) -> tuple[int, int] | None:
        dy = (y - cy) / b
        if abs(dy) >= 1:
            return None
        half = a * (1 - dy * dy) ** 0.5
        return max(0, int(cx - half)), min(size, int(cx + half))

    for y in range(size):
        row = y * size
        body = span(centre, centre, body_a, body_b, y)
        if body is None:
            continue
        start, end = body
        pixels[row + start:row + end] = array.array("H", [tissue]) * (end - start)
        inner = span(centre, centre, body_a * 0.93, body_b * 0.9, y)
        if inner is None:
            pixels[row + start:row + end] = array.array("H", [bone]) * (end - start)
        else:
            # The outer 7 % of the body is the bone ring.
            pixels[row + start:row + inner[0]] = array.array("H", [bone]) * (inner[0] - start)
            pixels[row + inner[1]:row + end] = array.array("H", [bone]) * (end - inner[1])
        for cx, cy, a, b in lungs:
            lung_span = span(cx, cy, a, b, y)
            if lung_span is not None:
                ls, le = lung_span
                pixels[row + ls:row + le] = array.array("H", [lung]) * (le - ls)
    if sys.byteorder != "little":
        pixels.byteswap()
    return pixels.tobytes()


CT_VALUES = {"air": 0, "tissue": 1064, "lung": 224, "bone": 2024}  # HU + 1024
MR_VALUES = {"air": 0, "tissue": 900, "lung": 120, "bone": 300}


def _base_dataset(sop_class: str, sop_uid: str, modality: str, patient: int, study: int,
                  series: int, instance: int, series_description: str,
                  study_description: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "DICOMGATE_BENCH"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20250314"
    ds.StudyTime = "101500"
    ds.SeriesTime = f"10{16 + series % 40:02d}00"
    ds.AcquisitionTime = ds.ContentTime = f"10{16 + series % 40:02d}{instance % 60:02d}.{instance:06d}"
    ds.AccessionNumber = f"ACC{study:07d}"
    ds.Modality = modality
    ds.Manufacturer = "dicomgate benchmark"
    ds.InstitutionName = "Benchmark Clinic"
    ds.ReferringPhysicianName = "REFERRING^DOCTOR"
    ds.StationName = f"{modality}ROOM1"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "SYNTHETIC"
    ds.PatientName = f"BENCH^PATIENT^{patient:03d}"
    ds.PatientID = f"BENCH{patient:05d}"
    ds.PatientBirthDate = f"19{50 + patient % 45:02d}0{1 + patient % 9}1{patient % 10}"
    ds.PatientSex = "MF"[patient % 2]
    ds.PatientAge = f"{75 - patient % 45:03d}Y"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = bench_uid(f"study-{modality}-{study}")
    ds.SeriesInstanceUID = bench_uid(f"series-{modality}-{series}")
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = series % 100 + 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance + 1
    ds.FrameOfReferenceUID = bench_uid(f"for-{modality}-{study}")
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def write_ct(path: Path, index: int, per_series: int = 125, series_per_study: int = 2) -> None:
    """CT slice ``index``: 512 x 512, 16 bits allocated, 12 stored, HU rescale, window."""
    series = index // per_series
    study = series // series_per_study
    position = index % per_series
    ds = _base_dataset(CT_IMAGE_STORAGE, bench_uid(f"ct-{index}"), "CT", patient=study,
                       study=study, series=series, instance=position,
                       series_description=f"AXIAL 1.0 {'LUNG' if series % 2 else 'STANDARD'}",
                       study_description="CT CHEST W/O CONTRAST")
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500.0"
    ds.ReconstructionDiameter = "360.0"
    ds.GantryDetectorTilt = "0.0"
    ds.TableHeight = "160.0"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "250"
    ds.Exposure = "125"
    ds.FilterType = "BODY FILTER"
    ds.ConvolutionKernel = "LUNG" if series % 2 else "STANDARD"
    z = -100.0 - position * 1.0
    ds.ImagePositionPatient = ["-180.0", "-180.0", f"{z:.1f}"]
    ds.SliceLocation = f"{z:.1f}"
    ds.Rows = ds.Columns = 512
    ds.PixelSpacing = ["0.703125", "0.703125"]
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    pixels = bytearray(_phantom(512, position, CT_VALUES))
    pixels[0:4] = index.to_bytes(4, "little")  # every image's pixels differ
    ds.PixelData = bytes(pixels)
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


_SMALL_PHANTOMS: dict[int, bytes] = {}


def write_small(path: Path, index: int, per_series: int = 100, series_per_study: int = 5) -> None:
    """Small MR image ``index``: 64 x 64, 16 bits allocated, 12 stored."""
    series = index // per_series
    study = series // series_per_study
    position = index % per_series
    ds = _base_dataset(MR_IMAGE_STORAGE, bench_uid(f"small-{index}"), "MR",
                       patient=1000 + study, study=study, series=series, instance=position,
                       series_description=f"DWI b{(series % 3) * 500}",
                       study_description="MR BRAIN")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.BodyPartExamined = "HEAD"
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "PFP"
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = "5.0"
    ds.RepetitionTime = "4000"
    ds.EchoTime = "90"
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.ImagePositionPatient = ["-115.0", "-115.0", f"{-40.0 + position * 5:.1f}"]
    ds.SliceLocation = f"{-40.0 + position * 5:.1f}"
    ds.Rows = ds.Columns = 64
    ds.PixelSpacing = ["3.59375", "3.59375"]
    ds.WindowCenter = "450"
    ds.WindowWidth = "900"
    key = position % 50
    if key not in _SMALL_PHANTOMS:
        _SMALL_PHANTOMS[key] = _phantom(64, key, MR_VALUES)
    pixels = bytearray(_SMALL_PHANTOMS[key])
    pixels[0:4] = index.to_bytes(4, "little")
    ds.PixelData = bytes(pixels)
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)


def write_huge(path: Path, frames: int = 2000, size: int = 512) -> int:
    """One multi-frame grayscale word secondary capture instance of ``frames`` frames of
    ``size`` x ``size`` 16-bit pixels, written without holding the pixel data in memory:
    pydicom writes everything but Pixel Data, then the Pixel Data element (OW, explicit
    length) is appended frame by frame. It is the last element of the data set, so the
    file stays valid DICOM. Returns the file size."""
    from pydicom.tag import Tag

    ds = _base_dataset(MULTIFRAME_WORD_SC, bench_uid(f"huge-{frames}-{size}"), "OT",
                       patient=9000, study=9000, series=9000, instance=0,
                       series_description=f"MULTIFRAME {frames} FRAMES",
                       study_description="HUGE INSTANCE")
    del ds.ImageOrientationPatient
    del ds.FrameOfReferenceUID
    del ds.PositionReferenceIndicator
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = Tag("FrameTime")
    ds.FrameTime = "40"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = ["0.703125", "0.703125"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    frame_bytes = size * size * 2
    total = frame_bytes * frames
    if total >= 0xFFFFFFFF:
        raise ValueError("pixel data too large for an explicit length")
    tmp = path.with_suffix(".partial")
    ds.save_as(tmp, enforce_file_format=True)
    base = bytearray(_phantom(size, 0, CT_VALUES))
    with open(tmp, "ab") as fh:
        # (7FE0,0010) OW, 2 reserved bytes, 4-byte length: explicit VR little endian.
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + total.to_bytes(4, "little"))
        for index in range(frames):
            base[0:4] = index.to_bytes(4, "little")
            fh.write(base)
    os.replace(tmp, path)
    return path.stat().st_size


@dataclass
class BenchData:
    """The generated files of one run."""

    large: list[Path]
    small: list[Path]
    huge: Path | None

    @staticmethod
    def size(files: Iterable[Path]) -> int:
        return sum(path.stat().st_size for path in files)


def _generate(folder: Path, prefix: str, count: int, writer, log) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{index:05d}.dcm" for index in range(count)]
    missing = [(index, path) for index, path in enumerate(paths) if not path.exists()]
    started = time.monotonic()
    for done, (index, path) in enumerate(missing, 1):
        tmp = path.with_suffix(".partial")
        writer(tmp, index)
        os.replace(tmp, path)
        if log and (done % 250 == 0 or done == len(missing)):
            log(f"  {prefix}: {done}/{len(missing)} written ({time.monotonic() - started:.1f} s)")
    return paths


def prepare_data(workdir: Path, large: int, small: int, huge: bool, log=print) -> BenchData:
    """Generate (or reuse) ``large`` CT files, ``small`` small files and, with ``huge``,
    the ~1 GB instance, under ``workdir/data``. Files are named by index and their
    content depends only on the index, so a larger run reuses a smaller run's files."""
    data = workdir / "data"
    stamp = data / "VERSION"
    if data.exists() and (not stamp.exists() or stamp.read_text().strip() != str(DATA_VERSION)):
        log(f"data in {data} is from another generator version: regenerating")
        shutil.rmtree(data)
    data.mkdir(parents=True, exist_ok=True)
    stamp.write_text(str(DATA_VERSION))
    for stale in data.rglob("*.partial"):
        stale.unlink()
    large_files = _generate(data / "ct", "ct", large, write_ct, log)
    small_files = _generate(data / "small", "small", small, write_small, log)
    huge_file = None
    if huge:
        huge_file = data / "huge" / "multiframe-2000x512x512.dcm"
        if not huge_file.exists():
            huge_file.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            size = write_huge(huge_file)
            log(f"  huge: {size / 1e6:.0f} MB written ({time.monotonic() - started:.1f} s)")
    return BenchData(large_files, small_files, huge_file)


def warm_cache(files: Iterable[Path]) -> None:
    """Read every file once so that no sender pays for cold disk reads."""
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


def drop_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def sync_disks() -> None:
    """Flush dirty pages so one receiver's writeback does not slow the next one down."""
    os.sync()


# ------------------------------------------------------------------ durability check

SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "msync")
RENAME_CALLS = ("rename", "renameat", "renameat2")
LINK_CALLS = ("link", "linkat")
STRACE_CALLS = ",".join(SYNC_CALLS + RENAME_CALLS + LINK_CALLS)

_CALL = re.compile(r"^(?:\d+\s+)?([a-z_0-9]+)\((.*)$")
_RESUMED = re.compile(r"^(?:\d+\s+)?<\.\.\. ([a-z_0-9]+) resumed>(.*)$")
_FD_PATH = re.compile(r"^\d+<([^>]*)>")


def _classify(path: str) -> str:
    """What a synced file descriptor was: the index database, a directory, or a file."""
    name = path.rsplit("/", 1)[-1]
    if (name.endswith(("-wal", "-journal", "-shm", ".sqlite", ".db", ".sqlite3"))
            or name in ("index",)):
        return "index"
    if os.path.isdir(path):
        return "directory"
    return "file"


def count_syscalls(strace_out: Path) -> dict[str, int]:
    """Successful calls in an ``strace -f -y -o`` file: ``{"fdatasync": n,
    "fdatasync:file": n, "fdatasync:index": n, "fsync:directory": n, "rename": n ...}``."""
    counts: dict[str, int] = {}
    if not strace_out.exists():
        return counts
    pending: dict[str, str] = {}
    for raw in strace_out.read_text(errors="replace").splitlines():
        line = raw.strip()
        pid = line.split(None, 1)[0] if line[:1].isdigit() else ""
        resumed = _RESUMED.match(line)
        if resumed:
            name, args = resumed[1], pending.pop(f"{pid}:{resumed[1]}", "") + resumed[2]
        else:
            match = _CALL.match(line)
            if not match:
                continue
            name, args = match[1], match[2]
            if "<unfinished ...>" in line:
                pending[f"{pid}:{name}"] = args.replace("<unfinished ...>", "")
                continue
        result = args.rsplit("=", 1)[-1].strip()
        if result.startswith("-1"):
            continue
        counts[name] = counts.get(name, 0) + 1
        if name in ("fsync", "fdatasync", "sync_file_range"):
            fd = _FD_PATH.match(args)
            kind = _classify(fd[1]) if fd else "unknown"
            counts[f"{name}:{kind}"] = counts.get(f"{name}:{kind}", 0) + 1
    return counts


def summarise_syscalls(counts: dict[str, int], instances: int) -> str:
    def per(value: int) -> str:
        return f"{value / instances:.1f}/instance" if instances else str(value)

    parts = []
    for kind in ("file", "directory", "index", "unknown"):
        value = sum(counts.get(f"{name}:{kind}", 0)
                    for name in ("fsync", "fdatasync", "sync_file_range"))
        calls = "+".join(name for name in ("fsync", "fdatasync", "sync_file_range")
                         if counts.get(f"{name}:{kind}"))
        if value:
            parts.append(f"{kind} {calls} {per(value)}")
    for name in ("syncfs", "sync", "msync"):
        if counts.get(name):
            parts.append(f"{name} {counts[name]}")
    renames = sum(counts.get(name, 0) for name in RENAME_CALLS)
    links = sum(counts.get(name, 0) for name in LINK_CALLS)
    published = []
    if renames:
        published.append(f"renames {per(renames)}")
    if links:
        published.append(f"hard links {per(links)}")
    parts.append(" and ".join(published) + " (written under a temporary name)" if published
                 else "no rename or link (written in place under the final name)")
    syncs = sum(counts.get(name, 0) for name in SYNC_CALLS)
    head = "no fsync-family call" if not syncs else f"{syncs} fsync-family calls"
    return f"{head} for {instances} stored instances: " + ", ".join(
        parts if syncs else parts[-1:])
