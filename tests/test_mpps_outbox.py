"""The outbox and its notifiers: dead letters that hold their order back and come back
with ``dicomgate outbox retry``, a prompt stop while the HIS hangs, notifiers of other
plugins, signatures, settings and the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from dicomgate import ConfigError, hookimpl
from dicomgate.plugins.mpps.models import DEAD, DELIVERED, PENDING, Delivery, OutboxEvent
from dicomgate.plugins.mpps.webhook import SIGNATURE_HEADER, WebhookNotifier, signature, verify
from dicomgate.plugins.worklist import api as worklist
from test_mpps import PLUGINS, add_order, config_file, create_for, rows, start
from test_mpps_support import SECRET, His, Modality, mpps_final, wait_for, webhook_settings
from pydicom.uid import generate_uid


def perform(gw: Any, order: Any) -> str:
    uid = generate_uid()
    with Modality(gw.port) as modality:
        assert modality.create(create_for(order), uid)[0] == 0x0000
        assert modality.set(uid, mpps_final()).Status == 0x0000
    return uid


def test_a_dead_letter_holds_its_order_back_until_retried(dicomgate_start, tmp_path, cli_env):
    his = His().start()
    refused = {"X1"}
    his.answer = lambda r: 500 if (r.json.get("order") or {}).get("accession") in refused \
        else 200
    gw = start(dicomgate_start, his, {"dead_letter_after": 0.3})
    stuck, flowing = add_order(gw, "X1"), add_order(gw, "Y1", patient_id="P2")
    perform(gw, stuck)
    perform(gw, flowing)
    assert wait_for(lambda: len(his.events()) == 4)  # Y1's events
    assert {e["order"]["accession"] for e in his.events()} == {"Y1"}
    assert wait_for(lambda: rows(gw, Delivery, Delivery.state == DEAD))
    (dead,) = rows(gw, Delivery, Delivery.state == DEAD)
    assert dead.sequence == 1 and dead.attempts >= 2 and "HTTP 500" in dead.last_error
    waiting = rows(gw, Delivery, Delivery.stream == dead.stream, Delivery.sequence > 1)
    assert [(d.state, d.attempts) for d in waiting] == [(PENDING, 0)] * 3

    config = config_file(tmp_path, gw.data_dir)
    listed = run_cli("outbox", "list", "--dead", "--json", "--config", config, env=cli_env)
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["state"] == "dead" and entry["type"] == "mpps.in_progress"
    text = run_cli("outbox", "list", "--config", config, env=cli_env).stdout
    assert text.count("pending") == 3 and "HTTP 500" in text

    refused.clear()  # the HIS is fixed
    retried = run_cli("outbox", "retry", "--config", config, env=cli_env)
    assert retried.returncode == 0 and "1 delivery" in retried.stdout
    assert wait_for(lambda: len(his.events()) == 8)
    late = [e for e in his.events() if e["order"]["accession"] == "X1"]
    assert [e["sequence"] for e in late] == [1, 2, 3, 4]
    assert all(d.state == DELIVERED for d in rows(gw, Delivery))
    assert "nothing waiting" in run_cli("outbox", "list", "--config", config,
                                        env=cli_env).stderr


def test_stop_is_prompt_while_the_his_hangs(dicomgate_start):
    his = His().start()
    his.delay = 5.0
    gw = start(dicomgate_start, his, {"webhook_timeout": 10.0})
    data_dir = gw.data_dir
    add_order(gw, "Z1")
    worklist.cancel(gw.gateway, accession="Z1", source="api")
    assert wait_for(lambda: his.attempts)
    began = time.monotonic()
    gw.stop()
    assert time.monotonic() - began < 2.0
    (delivery,) = rows_after_stop(data_dir)
    assert delivery["state"] == PENDING  # cut off: sent again after the restart
    his.delay = 0
    gw = start(dicomgate_start, his, data_dir=data_dir)
    assert wait_for(lambda: his.received)
    assert {json.loads(r.body)["id"] for r in his.attempts} == {his.received[0].json["id"]}
    assert wait_for(lambda: rows(gw, Delivery, Delivery.state == DELIVERED))


def rows_after_stop(data_dir: Path) -> list[dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(data_dir / "index.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM mpps_delivery")]


class Collector:
    """A notifier another plugin registers: fails its first two attempts."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.failures = 2

    def deliver(self, event: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("not yet")
        self.events.append(event)


class NotifierPlugin:
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    @hookimpl
    def register_notifiers(self, register):
        register("collector", self.collector)


def test_notifiers_of_other_plugins(dicomgate_start):
    his = His().start()
    collector = Collector()
    settings = {"worklist": {"timezone": "UTC"}, "storage": {"reserve_mb": 0},
                "mpps": webhook_settings(his)}
    gw = dicomgate_start(plugins=PLUGINS, settings=settings,
                         extra_plugins={"collector": NotifierPlugin(collector)})
    order = add_order(gw, "N1")
    perform(gw, order)
    assert wait_for(lambda: len(collector.events) == 4 and len(his.events()) == 4)
    assert [e.sequence for e in collector.events] == [1, 2, 3, 4]
    assert [e.id for e in collector.events] == [e["id"] for e in his.events()]
    assert collector.events[0].attempt == 3  # after two failures
    assert collector.events[0].payload["type"] == "mpps.in_progress"
    assert {d.notifier for d in rows(gw, Delivery)} == {"webhook", "collector"}


def test_without_a_notifier_events_are_kept(dicomgate_start, tmp_path, cli_env):
    gw = start(dicomgate_start)
    perform(gw, add_order(gw, "K1"))
    assert len(rows(gw, OutboxEvent)) == 4 and rows(gw, Delivery) == []
    gw.stop()
    listed = run_cli("outbox", "list", "--config", config_file(tmp_path, gw.data_dir),
                     env=cli_env)
    assert "4 event(s) were written while no notifier was configured" in listed.stderr


def test_the_signature_is_what_the_his_recomputes():
    body = json.dumps({"id": "x", "type": "t"}).encode()
    header = signature(SECRET, body)
    assert header.startswith("sha256=") and verify(SECRET, body, header)
    assert not verify(SECRET, body + b" ", header)
    assert not verify("other", body, header)
    notifier = WebhookNotifier("https://his.example/events?x=1", SECRET,
                               headers={"Authorization": "Bearer t"})
    assert notifier.path == "/events?x=1" and notifier.https

    from dicomgate.plugins.mpps.outbox import Event
    from datetime import datetime

    event = Event(id="id-1", type="t", stream="s", sequence=1, body=body, attempt=2,
                  created=datetime(2025, 1, 1))
    headers = notifier.request_headers(event)
    assert headers[SIGNATURE_HEADER] == header and headers["Idempotency-Key"] == "id-1"
    assert headers["Authorization"] == "Bearer t" and headers["X-Dicomgate-Attempt"] == "2"


@pytest.mark.parametrize("section, message", [
    ({"webhook_url": "http://his/events"}, "webhook_secret is required"),
    ({"webhook_url": "ftp://his/x", "webhook_secret": "s"}, "not an http:// or https:// URL"),
    ({"retry_initial": 0}, "greater than 0"),
    ({"webhook_headers": {"Bad Header": "x"}}, "not a valid HTTP header"),
])
def test_settings_mistakes_are_named(dicomgate_start, section, message):
    with pytest.raises(ConfigError, match=message):
        dicomgate_start(plugins=["mpps"], settings={"mpps": section})


def test_the_config_example_has_the_section():
    result = run_cli("config", "example", env={"DICOMGATE_CONFIG": ""})
    assert "[mpps]" in result.stdout and "webhook_secret" in result.stdout
