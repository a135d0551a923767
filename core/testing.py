"""A pytest plugin for testing dicomgate and its plugins against a real gateway.

Installed with dicomgate (entry point ``pytest11``), so any test suite gets:

* ``dicomgate_start``: a factory that starts a real gateway on a free loopback port,
  with the plugins you choose and a temporary data directory, and stops it after the
  test: ``gw = dicomgate_start(plugins=["verification"], peers=[...], settings={...})``;
* ``dcmtk``: the path of a DCMTK tool (``dcmtk("echoscu")``); the test is skipped
  when DCMTK is missing, or fails when the environment variable ``CI`` is true;
* ``postgres_url``: the URL in ``DICOMGATE_TEST_POSTGRES``, with the same rule.

Only one gateway runs at a time in a process: peewee models are bound to one
database.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from dicomgate.config import Config, Limits, PluginSelection, parse_config
from dicomgate.gateway import Gateway, configure
from dicomgate.manager import Plugins

POSTGRES_ENV = "DICOMGATE_TEST_POSTGRES"
DCMTK_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip a test for want of something, or fail it in CI, where nothing may be missing."""
    if in_ci():
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_dcmtk(tool: str) -> str | None:
    """The DCMTK binary ``tool``, never pynetdicom's console script of the same name
    that a virtual environment puts first on PATH."""
    for folder in DCMTK_DIRS:
        candidate = Path(folder, tool)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(tool)
    if found and "dcmtk" in Path(found).resolve().as_posix().lower():
        return found
    return None


@attrs.define
class RunningGateway:
    """A gateway started by ``dicomgate_start``."""

    gateway: Gateway
    server: Any
    host: str
    port: int

    @property
    def ae_title(self) -> str:
        return self.gateway.ae_title

    @property
    def data_dir(self) -> Path:
        return self.gateway.data_dir

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.gateway.close()


def build_config(data_dir: Path, port: int, plugins: Sequence[str] | None,
                 settings: Mapping[str, Any] | None = None,
                 peers: Sequence[Mapping[str, Any]] | None = None,
                 limits: Mapping[str, Any] | None = None, ae_title: str = "DICOMGATE",
                 database: str = "", accept_unknown_peers: bool | None = None) -> Config:
    """A config as a clinic would write it, for a gateway on 127.0.0.1:``port``."""
    raw: dict[str, Any] = {
        "gateway": {"ae_title": ae_title, "host": "127.0.0.1", "port": port,
                    "data_dir": str(data_dir), "database": database,
                    "accept_unknown_peers": peers is None if accept_unknown_peers is None
                    else accept_unknown_peers},
        "limits": {"shutdown_grace": 2.0, **(limits or {})},
        "plugins": {} if plugins is None else {"enabled": list(plugins)},
        "peers": [dict(peer) for peer in peers or ()],
        **{name: dict(section) for name, section in (settings or {}).items()},
    }
    return parse_config(raw, source="test config")


@pytest.fixture
def dicomgate_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningGateway]]:
    """Start a real gateway; every gateway started is stopped after the test.

    Keyword arguments: ``plugins`` (names of installed plugins; ``None``: all),
    ``extra_plugins`` (``{name: module_or_object}`` registered without an entry
    point), ``settings`` (``{plugin: {key: value}}``), ``peers`` (list of
    ``[[peers]]`` tables; ``None`` accepts any peer), ``limits``, ``ae_title``,
    ``database`` (URL; default SQLite in the data directory), ``data_dir``.
    """
    from dicomgate.server import Server

    started: list[RunningGateway] = []

    def start(plugins: Sequence[str] | None = ("verification",),
              extra_plugins: Mapping[str, Any] | None = None, **options: Any) -> RunningGateway:
        if any(running.server is not None for running in started):
            raise RuntimeError("stop the running gateway first: one at a time per process")
        data_dir = options.pop("data_dir", None) or tmp_path_factory.mktemp("dicomgate")
        port = options.pop("port", None) or free_port()
        config = build_config(Path(data_dir), port, plugins, **options)
        loaded = Plugins()
        loaded.load(config.plugins if extra_plugins is None or plugins is None else
                    PluginSelection(enabled=tuple(plugins)))
        for name, plugin in (extra_plugins or {}).items():
            loaded.register(plugin, name, package="test")
        loaded.check()
        gateway = Gateway.open(configure(config, loaded), loaded)
        server = Server(gateway)
        try:
            host, bound = server.start()
        except BaseException:
            gateway.close()
            raise
        running = RunningGateway(gateway, server, host, bound)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()


@pytest.fixture(scope="session")
def dcmtk() -> Callable[[str], str]:
    """``dcmtk("storescu")``: the DCMTK tool's path; skip (fail in CI) when missing."""

    def lookup(tool: str) -> str:
        path = find_dcmtk(tool)
        if path is None:
            missing(f"DCMTK's {tool} is not installed (Debian: apt-get install dcmtk)")
        return path

    return lookup


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL URL from DICOMGATE_TEST_POSTGRES; skip (fail in CI) without one."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        missing(f"no PostgreSQL to test against: set {POSTGRES_ENV}=postgresql://...")
    return url


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh, empty schema on the test PostgreSQL, dropped afterwards; yields its URL."""
    import psycopg2

    schema = f"dg_{uuid.uuid4().hex[:12]}"
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{separator}options=-csearch_path%3D{schema}"
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {schema} CASCADE")
