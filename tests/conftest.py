"""Shared helpers for dicomgate's own tests. The gateway fixtures themselves come from
dicomgate.testing, the pytest plugin that dicomgate installs for plugin authors too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

VENV_BIN = Path(sys.executable).parent


def echo_association(port: int, calling: str = "TESTSCU", called: str = "DICOMGATE",
                     timeout: float = 5.0):
    """An association for C-ECHO from a pynetdicom client (the caller releases it)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae.associate("127.0.0.1", port, ae_title=called)


def echo_status(port: int, **kwargs) -> int | None:
    """The status of one C-ECHO, or None when the association was not established."""
    assoc = echo_association(port, **kwargs)
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed ``dicomgate`` command as a user would."""
    return subprocess.run([str(VENV_BIN / "dicomgate"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict:
    """Environment for CLI runs that keeps them away from the user's config."""
    return {"DICOMGATE_CONFIG": "", "DICOMGATE_BLOCK_PLUGINS": ""}


def wait_until(predicate, seconds: float = 5.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``seconds`` pass; return its last value."""
    import time

    deadline = time.monotonic() + seconds
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(step)
    return bool(result)
