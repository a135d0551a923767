"""Retention of the storage plugin: `[storage] keep_days`, `Store.purge`, its worker,
`dicomgate studies purge`, and what `dicomgate verify` makes of an interrupted purge."""

from __future__ import annotations

import json
import logging
import threading
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomgate.cli import main
from dicomgate.config import parse_config
from dicomgate.errors import ConfigError
from dicomgate.gateway import configure
from dicomgate.manager import Plugins
from dicomgate.plugins.storage import PurgeReport, retention, store
from dicomgate.plugins.storage.models import Instance, Patient, Series, Study
from dicomgate.plugins.storage.settings import EXAMPLE
from dicomgate.plugins.storage.store import Store, store_for
from test_storage import (
    PLUGINS,
    assert_consistent,
    image,
    root_of,
    rows,
    run,
    send,
    stored_files,
    wait_until,
    write_config,
)

DAY = timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str:
    """The gateway's database URL: SQLite in the data directory, or a fresh PostgreSQL
    schema (skipped without DICOMGATE_TEST_POSTGRES)."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("postgres_database")


def start(dicomgate_start: Any, database: str = "", data_dir: Path | None = None,
          **storage: Any) -> Any:
    options: dict[str, Any] = {"data_dir": data_dir} if data_dir else {}
    return dicomgate_start(plugins=PLUGINS, database=database,
                           settings={"storage": {"reserve_mb": 0, **storage}}, **options)


def age(gw: Any, study_uid: str, days: float) -> None:
    """Make a study look as if its last instance arrived ``days`` days ago."""
    then = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=days)
    with gw.gateway.database.connection_context():
        study = Study.get(Study.study_uid == study_uid)
        Study.update(created=then, updated=then).where(Study.id == study.id).execute()
        Series.update(created=then, updated=then).where(Series.study == study.id).execute()
        Instance.update(received=then).where(Instance.study == study.id).execute()


def purge(gw: Any, older_than: timedelta, **options: Any) -> PurgeReport:
    with gw.gateway.database.connection_context():
        return store_for(gw.gateway).purge(older_than, **options)


def files_of(gw: Any, study_uid: str) -> list[Path]:
    with gw.gateway.database.connection_context():
        return [root_of(gw) / row.path for row in
                Instance.select(Instance.path).join(Study, on=(Instance.study == Study.id))
                .where(Study.study_uid == study_uid)]


def snapshot(gw: Any) -> tuple[Any, ...]:
    """Everything a purge could change: rows and their counts, and the files."""
    return (sorted((p.patient_id, p.num_studies) for p in rows(gw, Patient)),
            sorted((s.study_uid, s.num_series, s.num_instances, s.size)
                   for s in rows(gw, Study)),
            sorted((s.series_uid, s.num_instances) for s in rows(gw, Series)),
            sorted(i.path for i in rows(gw, Instance)), stored_files(gw))


def clinic(gw: Any) -> dict[str, Any]:
    """Three patients: P1 with an old study (2 series, 3 instances) and a young one,
    P2 with only an old study, P3 with only a young one."""
    uids = {name: generate_uid() for name in ("old1", "young1", "old2", "young3")}
    series = generate_uid()
    datasets = [
        image(study=uids["old1"], series=series, patient_id="P1", patient="Old^One", number=1),
        image(study=uids["old1"], series=series, patient_id="P1", patient="Old^One", number=2),
        image(study=uids["old1"], patient_id="P1", patient="Old^One", number=3, Modality="SR"),
        image(study=uids["young1"], patient_id="P1", patient="Old^One", number=1),
        image(study=uids["old2"], patient_id="P2", patient="Gone^Patient", number=1),
        image(study=uids["young3"], patient_id="P3", patient="Young^Three", number=1),
    ]
    assert send(gw, datasets) == [0] * len(datasets)
    age(gw, uids["old1"], 10)
    age(gw, uids["old2"], 8.5)
    age(gw, uids["young1"], 6)
    return uids


def config_for(tmp_path: Path, data_dir: Path, database: str = "", **storage: Any) -> str:
    """A config file for the command line, with the test's database."""
    path = write_config(tmp_path, data_dir, **storage)
    if database:
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("port = 11112\n", f"port = 11112\ndatabase = "
                                     f"{json.dumps(database)}\n", 1), encoding="utf-8")
    return str(path)


# Store.purge ---------------------------------------------------------------------------


def test_purge_removes_whole_old_studies_and_keeps_young_ones(
        dicomgate_start: Any, database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = start(dicomgate_start, database)
    uids = clinic(gw)
    old_files = files_of(gw, uids["old1"]) + files_of(gw, uids["old2"])
    young_files = files_of(gw, uids["young1"]) + files_of(gw, uids["young3"])
    old_bytes = sum(path.stat().st_size for path in old_files)
    assert len(old_files) == 4 and len(young_files) == 2

    before = snapshot(gw)
    dry = purge(gw, 7 * DAY, dry_run=True)
    assert dry == PurgeReport(studies=2, instances=4, bytes_freed=old_bytes,
                              study_uids=(uids["old1"], uids["old2"]), dry_run=True)
    assert snapshot(gw) == before  # a dry run changes nothing

    flushed: list[Path] = []
    real_fsync_dir = store.fsync_dir
    monkeypatch.setattr(store, "fsync_dir",
                        lambda path: (flushed.append(Path(path)), real_fsync_dir(path))[1])
    report = purge(gw, 7 * DAY)
    assert report == PurgeReport(studies=2, instances=4, bytes_freed=old_bytes,
                                 study_uids=(uids["old1"], uids["old2"]))
    assert not any(path.exists() for path in old_files)
    assert all(path.exists() for path in young_files)
    assert {path.parent for path in old_files} <= set(flushed)  # folders flushed

    assert sorted((p.patient_id, p.num_studies) for p in rows(gw, Patient)) == [
        ("P1", 1), ("P3", 1)]  # P2 had no other study
    assert sorted(s.study_uid for s in rows(gw, Study)) == sorted(
        [uids["young1"], uids["young3"]])
    assert len(rows(gw, Series)) == 2 and len(rows(gw, Instance)) == 2
    assert_consistent(gw)
    assert list((root_of(gw) / ".purge").iterdir()) == []  # every journal done

    # nothing older than 7 days is left; 5 days takes the young P1 study too
    assert purge(gw, 7 * DAY) == PurgeReport()
    assert purge(gw, 5 * DAY).study_uids == (uids["young1"],)
    assert [(p.patient_id, p.num_studies) for p in rows(gw, Patient)] == [("P3", 1)]
    assert_consistent(gw)
    # the store still takes instances, also for a purged study
    assert send(gw, [image(study=uids["old1"], patient_id="P1")]) == [0]
    assert len(rows(gw, Study)) == 2
    assert_consistent(gw)
    with pytest.raises(ValueError):
        purge(gw, timedelta(0))


def test_an_instance_arriving_during_the_purge(dicomgate_start: Any, database: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance stored after the study was chosen keeps it; one stored between the
    purge's commit and its removal of the files gets a new study and its own file."""
    gw = start(dicomgate_start, database)
    kept, purged = generate_uid(), generate_uid()
    first = image(study=purged, number=1)
    assert send(gw, [image(study=kept), first, image(study=purged, number=2)]) == [0] * 3
    age(gw, kept, 30)
    age(gw, purged, 30)
    late = image(study=purged, number=3)

    real_purge_study, real_remove = Store._purge_study, Store._remove_files

    def purge_study(self: Store, study_id: int, study_uid: str, cutoff: datetime) -> Any:
        if study_uid == kept:  # chosen, then an instance arrives before its transaction
            assert send(gw, [image(study=kept, number=2)]) == [0]
        return real_purge_study(self, study_id, study_uid, cutoff)

    def remove_files(self: Store, journal: Path, files: Any) -> int:
        # committed, files not yet removed: the same instance again, and a new one
        assert send(gw, [first, late]) == [0, 0]
        return real_remove(self, journal, files)

    monkeypatch.setattr(Store, "_purge_study", purge_study)
    monkeypatch.setattr(Store, "_remove_files", remove_files)
    report = purge(gw, 7 * DAY)
    assert report.study_uids == (purged,) and report.instances == 2
    monkeypatch.undo()

    studies = {s.study_uid: s for s in rows(gw, Study)}
    assert studies[kept].num_instances == 2
    assert studies[purged].num_instances == 2  # a new row, with the two late arrivals
    instances = {i.sop_instance_uid for i in rows(gw, Instance)}
    assert {first.SOPInstanceUID, late.SOPInstanceUID} <= instances
    assert_consistent(gw)  # every row has its file, every file its row


def test_storing_goes_on_during_a_big_purge(dicomgate_start: Any, database: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One transaction per study: senders are not held up, also when they add to the
    studies and patients being purged."""
    gw = start(dicomgate_start, database)
    old = [generate_uid() for _ in range(40)]
    assert send(gw, [image(study=uid, patient_id=f"P{n % 4}", number=n)
                     for n, uid in enumerate(old)]) == [0] * len(old)
    for uid in old:
        age(gw, uid, 20)
    real_remove = Store._remove_files

    def slow_remove(self: Store, journal: Path, files: Any) -> int:
        time.sleep(0.03)  # a purge long enough for the sender to store meanwhile
        return real_remove(self, journal, files)

    monkeypatch.setattr(Store, "_remove_files", slow_remove)
    statuses: list[Any] = []
    purging = threading.Event()
    stored_while_purging = []

    def sender() -> None:
        purging.wait(10)
        for n in range(10):
            statuses.extend(send(gw, [image(patient_id=f"P{n % 4}"),
                                      image(study=old[n * 4], patient_id=f"P{n % 4}")]))
            stored_while_purging.append(purging.is_set())

    thread = threading.Thread(target=sender)
    thread.start()
    purging.set()
    report = purge(gw, 7 * DAY)
    purging.clear()
    thread.join(60)
    assert statuses == [0] * 20
    assert all(stored_while_purging)  # every association ended before the purge did
    assert 30 <= report.studies < 40  # studies that got an instance first were kept
    assert_consistent(gw)
    assert len(rows(gw, Instance)) == 40 - report.instances + 20


def test_purge_stops_between_studies_when_asked(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start)
    uids = [generate_uid() for _ in range(3)]
    assert send(gw, [image(study=uid) for uid in uids]) == [0] * 3
    for uid in uids:
        age(gw, uid, 3)
    asked: list[int] = []
    report = purge(gw, DAY, stop=lambda: (asked.append(1), len(asked) > 1)[1])
    assert report.studies == 1 and len(rows(gw, Study)) == 2
    assert_consistent(gw)


# The worker ----------------------------------------------------------------------------


def test_worker_purges_at_start_and_stops_promptly(dicomgate_start: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    gw = start(dicomgate_start)
    uids = clinic(gw)
    old_files = files_of(gw, uids["old1"]) + files_of(gw, uids["old2"])
    data_dir = gw.data_dir
    gw.stop()
    assert not any(t.name == "dicomgate-retention" for t in threading.enumerate())

    caplog.set_level(logging.INFO, logger="dicomgate.storage")
    gw = start(dicomgate_start, data_dir=data_dir, keep_days=7)
    wait_until(lambda: len(rows(gw, Study)) == 2)
    assert not any(path.exists() for path in old_files)
    assert_consistent(gw)
    wait_until(lambda: "retention removed" in caplog.text)
    [line] = [r.getMessage() for r in caplog.records if "retention removed" in r.getMessage()]
    assert "2 study(ies), 4 instance(s)" in line
    for name in ("Old^One", "Gone^Patient", "P1", "P2", uids["old1"]):
        assert name not in caplog.text  # counts only, never who

    worker = retention.retention_for(gw.gateway)
    assert worker.running
    begun = time.monotonic()
    gw.stop()  # the worker waits an hour for its next round: stop must not
    assert time.monotonic() - begun < 3.0
    assert not worker.running
    assert not any(t.name == "dicomgate-retention" for t in threading.enumerate())


def test_worker_logs_a_failed_round_and_goes_on(dicomgate_start: Any,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(retention, "INTERVAL", 0.05)
    calls: list[int] = []
    real_purge = Store.purge

    def failing_once(self: Store, *args: Any, **kwargs: Any) -> PurgeReport:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database gone")
        return real_purge(self, *args, **kwargs)

    monkeypatch.setattr(Store, "purge", failing_once)
    gw = start(dicomgate_start, keep_days=1)
    wait_until(lambda: len(calls) >= 3)
    assert "retention purge failed" in caplog.text and "database gone" in caplog.text
    gw.stop()


def test_no_worker_without_keep_days(dicomgate_start: Any) -> None:
    gw = start(dicomgate_start)
    assert not retention.retention_for(gw.gateway).running


# Interrupted purges and verify -----------------------------------------------------------


class Crash(Exception):
    """The process dying between the purge's commit and the removal of its files."""


def _crash_after_commit(gw: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any],
                                                                           list[Path]]:
    uids = clinic(gw)
    old_files = files_of(gw, uids["old1"]) + files_of(gw, uids["old2"])
    time.sleep(0.05)  # the files' last change is before the journal (timestamp granularity)

    def crash(self: Store, journal: Path, files: Any) -> int:
        raise Crash()

    with monkeypatch.context() as patched:
        patched.setattr(Store, "_remove_files", crash)
        with pytest.raises(Crash):
            purge(gw, 7 * DAY)
    # the first study's rows are committed, its files still there; nothing else done
    assert uids["old1"] not in {s.study_uid for s in rows(gw, Study)}
    assert all(path.exists() for path in old_files)
    assert len(list((root_of(gw) / ".purge").glob("*.json"))) == 1
    return uids, old_files


def test_verify_reports_and_removes_files_of_an_interrupted_purge(
        dicomgate_start: Any, database: str, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    gw = start(dicomgate_start, database)
    uids, old_files = _crash_after_commit(gw, monkeypatch)
    indexed = {root_of(gw) / row.path for row in rows(gw, Instance)}
    leftovers = [path for path in old_files if path not in indexed]
    assert len(leftovers) == 3  # the first study's files: rows gone, files not
    data_dir = gw.data_dir
    gw.stop()
    config = config_for(tmp_path, data_dir, database)

    found = run("verify", "--config", config, "--grace", "0")
    assert found.exit_code == 1, found.output
    for path in leftovers:
        relative = path.relative_to(data_dir / "files").as_posix()
        assert f"unindexed file: {relative} (of a purged study" in found.output
    assert "3 unindexed file(s), 3 problem(s) left" in found.output
    assert all(path.exists() for path in leftovers)  # reporting changes nothing

    repaired = run("verify", "--config", config, "--grace", "0", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "removed 3 file(s) of purged studies" in repaired.output
    assert "indexed as" not in repaired.output  # never brought back
    assert not any(path.exists() for path in leftovers)
    assert list((data_dir / "files" / ".purge").iterdir()) == []
    clean = run("verify", "--config", config, "--grace", "0", "--checksums")
    assert clean.exit_code == 0, clean.output

    gw = start(dicomgate_start, database, data_dir=data_dir)
    assert uids["old1"] not in {s.study_uid for s in rows(gw, Study)}
    assert len(rows(gw, Study)) == 3  # old2 was not reached before the crash
    assert_consistent(gw)


def test_an_interrupted_purge_is_finished_at_start(dicomgate_start: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gw = start(dicomgate_start)
    _, old_files = _crash_after_commit(gw, monkeypatch)
    data_dir = gw.data_dir
    gw.stop()
    gw = start(dicomgate_start, data_dir=data_dir)  # keep_days 0: no worker, still finished
    assert_consistent(gw)
    assert list((root_of(gw) / ".purge").iterdir()) == []
    assert len([path for path in old_files if path.exists()]) == 1  # old2's, still indexed


def test_a_journal_never_removes_an_indexed_or_newer_file(dicomgate_start: Any,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A journal of a transaction that did not commit lists files that still have rows;
    a file linked under a listed name after the journal is someone else's."""
    gw = start(dicomgate_start)
    uids, old_files = _crash_after_commit(gw, monkeypatch)
    the_store = store_for(gw.gateway)
    [journal] = the_store.purge_journals()
    assert journal.study_uid == uids["old1"] and not journal.active
    reused = root_of(gw) / journal.files[0]
    reused.unlink()
    time.sleep(0.05)
    reused.write_bytes(b"a transfer in progress")
    with gw.gateway.database.connection_context():
        assert not the_store.purge_leftover(journal, journal.files[0])
        assert the_store.purge_leftover(journal, journal.files[1])
        assert the_store.finish_purges() == 2
    assert reused.exists()
    reused.unlink()
    assert_consistent(gw)


# Command line and config ---------------------------------------------------------------


def _aged_store(dicomgate_start: Any, tmp_path: Path,
                **storage: Any) -> tuple[dict[str, Any], str, Path]:
    gw = start(dicomgate_start)
    uids = clinic(gw)
    data_dir = gw.data_dir
    gw.stop()
    return uids, str(write_config(tmp_path, data_dir, **storage)), data_dir


def test_purge_command(dicomgate_start: Any, tmp_path: Path) -> None:
    uids, config, _ = _aged_store(dicomgate_start, tmp_path, keep_days=9)

    dry = run("studies", "purge", "--config", config, "--older-than", "7", "--dry-run",
              "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output) == {
        "dry_run": True, "older_than_days": 7, "studies": 2, "instances": 4,
        "bytes": json.loads(dry.output)["bytes"], "study_uids": [uids["old1"], uids["old2"]]}
    assert json.loads(dry.output)["bytes"] > 0
    text = run("studies", "purge", "--config", config, "--older-than", "7", "--dry-run")
    assert f"would remove study {uids['old1']}" in text.output
    assert "would remove 2 study(ies), 4 instance(s)" in text.output

    # without --older-than: [storage] keep_days = 9 takes the 10 days old study only
    done = run("studies", "purge", "--config", config, "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert (result["dry_run"], result["older_than_days"], result["study_uids"]) == (
        False, 9, [uids["old1"]])
    listed = json.loads(run("studies", "--config", config, "--json").output)
    assert sorted(r["study_uid"] for r in listed) == sorted(
        [uids["young1"], uids["old2"], uids["young3"]])

    # the config may also be given to the group; the plain listing still works
    grouped = run("studies", "--config", config, "purge", "--older-than", "7")
    assert grouped.exit_code == 0 and f"removed study {uids['old2']}" in grouped.output
    assert "removed 1 study(ies), 1 instance(s)" in grouped.output
    assert run("verify", "--config", config, "--grace", "0").exit_code == 0


def test_purge_command_needs_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_config(tmp_path, tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_info:
        main(["studies", "purge", "--config", config])
    assert exit_info.value.code == 2
    assert "--older-than" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before opening the database
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main(["studies", "purge", "--config", config, "--older-than", bad])
        assert exit_info.value.code == 2


def _configure(raw: dict[str, Any]) -> Any:
    plugins = Plugins()
    plugins.load(parse_config({"plugins": {"enabled": ["storage"]}}).plugins)
    return configure(parse_config({"plugins": {"enabled": ["storage"]}, **raw}), plugins)


def test_keep_days_config() -> None:
    assert _configure({}).plugin_settings["storage"].keep_days == 0
    assert _configure({"storage": {"keep_days": 30}}).plugin_settings["storage"].keep_days == 30
    with pytest.raises(ConfigError, match="keep_days"):
        _configure({"storage": {"keep_days": -1}})
    example = _configure(tomllib.loads(EXAMPLE)).plugin_settings["storage"]
    assert example.keep_days == 0
    assert "keep_days = 0" in run("config", "example").output
