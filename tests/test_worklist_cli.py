"""``dicomgate worklist add | list | show | cancel | status | import`` as an integrator runs
them, and the JSON import schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dicomgate.toml"
    path.write_text(f"""
[gateway]
data_dir = "{tmp_path / 'data'}"
[plugins]
enabled = ["verification", "worklist"]
[worklist]
timezone = "Europe/Moscow"
[[peers]]
ae_title = "CT1"
""", encoding="utf-8")
    return path


def cli(config: Path, cli_env: dict, *args: str):
    return run_cli("worklist", args[0], "--config", str(config), *args[1:], env=cli_env)


def test_add_list_show_cancel(config, cli_env):
    added = cli(config, cli_env, "add", "--patient-id", "P1", "--patient-name", "Иванов^Пётр",
                "--birth-date", "1980-05-21", "--sex", "M", "--accession", "A1",
                "--description", "КТ головы", "--modality", "CT", "--station-ae", "CT1",
                "--json")
    assert added.returncode == 0, added.stderr
    order = json.loads(added.stdout)
    assert order["patient"]["name"] == "Иванов^Пётр" and order["patient"]["birth_date"] == \
        "19800521"
    assert order["study_uid"] and order["steps"][0]["status"] == "SCHEDULED"
    listed = cli(config, cli_env, "list", "--json")
    assert [step["accession"] for step in json.loads(listed.stdout)] == ["A1"]
    plain = cli(config, cli_env, "list")
    assert "Иванов^Пётр" in plain.stdout and "1 step(s)" in plain.stderr
    shown = cli(config, cli_env, "show", "A1")
    assert shown.returncode == 0 and order["study_uid"] in shown.stdout
    cancelled = cli(config, cli_env, "cancel", "A1", "--reason", "patient left")
    assert cancelled.returncode == 0 and "cancelled 1 step(s)" in cancelled.stdout
    assert json.loads(cli(config, cli_env, "list", "--json").stdout) == []
    history = json.loads(cli(config, cli_env, "show", "A1", "--json").stdout)
    assert [(h["previous"], h["status"], h["source"], h["reason"])
            for h in history["steps"][0]["history"]] == [
        ("", "SCHEDULED", "cli", "ordered"), ("SCHEDULED", "CANCELED", "cli", "patient left")]
    missing = cli(config, cli_env, "show", "NOPE")
    assert missing.returncode == 2 and "no such order" in missing.stderr


def test_import_and_status(config, cli_env, tmp_path):
    orders = {"orders": [
        {"patient": {"id": "P1", "name": "Doe^John", "issuer": "HIS",
                     "other_ids": [{"id": "123", "issuer": "OLD"}]},
         "accession": "A1", "procedure_id": "RP1", "description": "CT head",
         "codes": [{"value": "CTHEAD", "scheme": "99LOCAL", "meaning": "CT head"}],
         "priority": "ROUTINE",
         "steps": [{"id": "S1", "modality": "CT", "station_ae": "CT1",
                    "start": "2031-05-20T10:30", "location": "Room 1"},
                   {"id": "S2", "modality": "CT", "start_date": "2031-05-20",
                    "start_time": "11:00", "station_name": "CT-ROOM-1"}]},
        {"patient": {"id": "P2", "name": "Roe^Jane"}, "accession": "A2",
         "steps": [{"modality": "MR", "start": "20310521"}]},
    ]}
    path = tmp_path / "orders.json"
    path.write_text(json.dumps(orders), encoding="utf-8")
    imported = cli(config, cli_env, "import", str(path))
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 order(s), 3 step(s)" in imported.stdout
    steps = json.loads(cli(config, cli_env, "list", "--date", "all", "--json").stdout)
    assert [(s["accession"], s["step_id"], s["start_date"], s["start_time"]) for s in steps] == [
        ("A1", "S1", "20310520", "103000"), ("A1", "S2", "20310520", "110000"),
        ("A2", "A2.1", "20310521", "000000")]
    changed = cli(config, cli_env, "status", str(steps[0]["pk"]), "COMPLETED")
    assert changed.returncode == 0 and "COMPLETED" in changed.stdout
    active = json.loads(cli(config, cli_env, "list", "--date", "2031-05-20", "--json").stdout)
    assert [s["step_id"] for s in active] == ["S2"]
    # A bad file adds nothing and names the field.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"patient": {"id": "P3", "name": "X^Y"}, "accession": "A3",
                                "steps": [{"modality": "CT"}]},
                               {"patient": {"id": "P4", "name": "X^Z"},
                                "steps": [{"modality": "CT", "start": "tomorrow"}]}]),
                   encoding="utf-8")
    refused = cli(config, cli_env, "import", str(bad))
    assert refused.returncode == 2
    assert "orders[1].steps[0].start" in refused.stderr
    assert json.loads(cli(config, cli_env, "list", "--accession", "A3", "--date", "all",
                          "--status", "all", "--json").stdout) == []
