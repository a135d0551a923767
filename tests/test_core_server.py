"""The association server against real peers: who may call, how many at once, how long
they may idle, and what every association leaves in the log."""

from __future__ import annotations

import logging
import re
import os
import signal
import socket
import subprocess
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import VENV_BIN, echo_association, echo_status, wait_until
from dicomgate import Dimse, Service, hookimpl
from dicomgate.testing import free_port

PEERS = [
    {"ae_title": "CT1", "host": "127.0.0.1", "port": 104, "allow": ["echo"]},
    {"ae_title": "ELSEWHERE", "host": "192.0.2.7", "port": 104},
    {"ae_title": "STOREONLY", "allow": ["store"]},
]


def rejection(assoc) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def test_dcmtk_echoscu_is_answered_and_the_association_logged(dicomgate_start, dcmtk, caplog):
    caplog.set_level(logging.INFO, logger="dicomgate")
    running = dicomgate_start()
    done = subprocess.run([dcmtk("echoscu"), "-v", "-aet", "ECHOER", "-aec", "DICOMGATE",
                           "127.0.0.1", str(running.port)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Received Echo Response (Success)" in done.stderr + done.stdout
    assert wait_until(lambda: "released" in caplog.text)
    accepted = [r.message for r in caplog.records if "association 1 accepted" in r.message]
    assert accepted and "ECHOER@127.0.0.1" in accepted[0] and "-> DICOMGATE" in accepted[0]
    assert any("released: ECHOER@127.0.0.1" in r.message and "1 request(s)" in r.message
               for r in caplog.records)


def test_wrong_called_ae_title_is_rejected_with_its_reason(dicomgate_start, dcmtk, caplog):
    running = dicomgate_start()
    assoc = echo_association(running.port, called="NOT_ME")
    assert assoc.is_rejected
    assert rejection(assoc) == (0x01, 0x01, 0x07)  # permanent, service user, called AE
    done = subprocess.run([dcmtk("echoscu"), "-aec", "NOT_ME", "127.0.0.1", str(running.port)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "Called AE Title Not Recognized" in done.stderr
    assert echo_status(running.port) == 0x0000


def test_only_configured_peers_from_their_addresses_may_call(dicomgate_start, caplog):
    running = dicomgate_start(peers=PEERS)
    assert echo_status(running.port, calling="CT1") == 0x0000
    for stranger in ("UNKNOWN", "ELSEWHERE"):  # unknown title; known title, wrong address
        assoc = echo_association(running.port, calling=stranger)
        assert assoc.is_rejected, stranger
        assert rejection(assoc) == (0x01, 0x01, 0x03)  # calling AE title not recognised
    assert wait_until(lambda: "rejected: calling AE title not recognised" in caplog.text)


def test_a_peer_uses_only_the_services_it_is_allowed(dicomgate_start, caplog):
    running = dicomgate_start(peers=PEERS)
    assert echo_status(running.port, calling="STOREONLY") == 0x0124  # refused: not authorised
    assert "peer 'STOREONLY' may not use service 'echo'" in caplog.text
    assert echo_status(running.port, calling="CT1") == 0x0000


def test_too_many_associations_are_rejected_until_a_slot_frees(dicomgate_start):
    running = dicomgate_start(limits={"max_associations": 2})
    first, second = echo_association(running.port), echo_association(running.port)
    assert first.is_established and second.is_established
    third = echo_association(running.port)
    assert third.is_rejected
    assert rejection(third) == (0x02, 0x03, 0x02)  # transient, presentation, local limit
    first.release()
    deadline = time.monotonic() + 5
    status = None
    while status is None and time.monotonic() < deadline:
        status = echo_status(running.port)
    assert status == 0x0000
    second.release()


def test_an_idle_association_is_closed_after_the_network_timeout(dicomgate_start, caplog):
    running = dicomgate_start(limits={"network_timeout": 1.0})
    assoc = echo_association(running.port, timeout=30)
    assert assoc.is_established
    started = time.monotonic()
    while assoc.is_alive() and time.monotonic() - started < 10:
        time.sleep(0.05)
    assert not assoc.is_established and assoc.is_aborted
    assert 0.9 < time.monotonic() - started < 5
    assert wait_until(lambda: running.server.ae.active_associations == [])


def test_a_silent_connection_is_dropped_after_the_acse_timeout(dicomgate_start, caplog):
    caplog.set_level(logging.INFO, logger="dicomgate")
    running = dicomgate_start(limits={"acse_timeout": 0.5})
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, nothing sent
        assert time.monotonic() - started < 5
    assert wait_until(lambda: "without an association" in caplog.text)


def test_a_handler_exception_becomes_a_failure_status(dicomgate_start, caplog):
    class Exploding:
        @hookimpl
        def register_services(self, register):
            def explode(request):
                raise ValueError("cannot answer")
            register(Service(name="echo", sop_classes=["1.2.840.10008.1.1"],
                             handlers={Dimse.C_ECHO: explode}))

    running = dicomgate_start(plugins=[], extra_plugins={"exploding": Exploding()})
    assert echo_status(running.port) == 0x0110  # processing failure, never a silent success
    assert "service 'echo' failed on C-ECHO" in caplog.text
    assert "cannot answer" in caplog.text
    assert echo_status(running.port) == 0x0110  # and the server keeps serving


def test_several_associations_are_served_at_once(dicomgate_start):
    running = dicomgate_start()
    held = [echo_association(running.port, calling=f"SCU{n}") for n in range(5)]
    try:
        assert all(assoc.is_established for assoc in held)
        assert all(assoc.send_c_echo().Status == 0 for assoc in held)
    finally:
        for assoc in held:
            assoc.release()


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited early: {process.communicate()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve did not listen in time")


def test_serve_without_config_answers_echoscu_and_stops_cleanly_on_sigterm(tmp_path, dcmtk):
    """The README's promise: `dicomgate serve` with no config file, on the defaults."""
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "dicomgate"), "serve", "--port", str(port)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DICOMGATE_CONFIG": "", "DICOMGATE_BLOCK_PLUGINS": ""})
    try:
        _wait_for_port(port, process)
        done = subprocess.run([dcmtk("echoscu"), "-aec", "DICOMGATE", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "no config file: running on defaults (AE title DICOMGATE" in err
    assert "any calling AE title is accepted" in err
    assert re.search(r"association (\d+) accepted: ECHOSCU@127\.0\.0\.1", err)
    assert re.search(r"association \d+ released: ECHOSCU@127\.0\.0\.1", err)
    assert "DICOMGATE stopped" in err
    assert (tmp_path / "dicomgate-data" / "index.sqlite").is_file()
