"""The database: created on first start, versioned per component, migrated by
`dicomgate db upgrade` without losing data, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee
import pytest
from playhouse.migrate import migrate

from conftest import run_cli
from dicomgate import Model, Schema, hookimpl
from dicomgate.db import SchemaOutdated, SchemaVersion
from dicomgate.gateway import Gateway, configure
from dicomgate.manager import Plugins
from dicomgate.testing import build_config

ENV = {"DICOMGATE_CONFIG": "", "DICOMGATE_BLOCK_PLUGINS": ""}


class NoteV1(Model):
    text = peewee.CharField()

    class Meta:
        table_name = "notes_note"


class NoteV2(Model):
    text = peewee.CharField()
    author = peewee.CharField(default="unknown")

    class Meta:
        table_name = "notes_note"


def add_author(step):
    migrate(step.migrator.add_column("notes_note", "author", NoteV2.author))


class NotesV1:
    @hookimpl
    def register_schema(self, register):
        register(Schema("notes", 1, [NoteV1]))


class NotesV2:
    @hookimpl
    def register_schema(self, register):
        register(Schema("notes", 2, [NoteV2], migrations={2: add_author}))


def open_gateway(data_dir: Path, plugin, database: str = "", upgrade: bool = False) -> Gateway:
    config = build_config(data_dir, 0, ["verification"], database=database)
    plugins = Plugins()
    plugins.load(config.plugins)
    plugins.register(plugin, "notes", package="test")
    plugins.check()
    return Gateway.open(configure(config, plugins), plugins, upgrade=upgrade)


def versions(gateway: Gateway) -> dict[str, int]:
    with gateway.database.connection_context():
        return {row.component: row.version for row in SchemaVersion.select()}


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def test_first_start_creates_the_database_with_sqlite_wal(tmp_path):
    gateway = open_gateway(tmp_path, NotesV1())
    try:
        assert versions(gateway) == {"core": 1, "notes": 1}
        with gateway.database.connection_context():
            assert gateway.database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert gateway.database.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
            assert gateway.database.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        gateway.close()
    assert (tmp_path / "index.sqlite").is_file()


def test_db_upgrade_on_a_current_database_changes_nothing(tmp_path):
    config = tmp_path / "clinic.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n')
    first = run_cli("db", "upgrade", "--config", str(config), env=ENV, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    database = tmp_path / "data" / "index.sqlite"
    before = dump(database)
    again = run_cli("db", "upgrade", "--config", str(config), env=ENV, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "database is current" in again.stdout
    assert "migrated" not in again.stderr and "created" not in again.stderr
    assert dump(database) == before
    status = run_cli("db", "status", "--config", str(config), env=ENV, cwd=tmp_path)
    assert "core" in status.stdout and "current" in status.stdout


def _migration_keeps_data(tmp_path: Path, database: str = "") -> None:
    old = open_gateway(tmp_path, NotesV1(), database)
    with old.database.connection_context():
        NoteV1.create(text="Иванов^Пётр was here")
    old.close()

    with pytest.raises(SchemaOutdated, match="notes schema version 1.*needs 2.*db upgrade"):
        open_gateway(tmp_path, NotesV2(), database)

    new = open_gateway(tmp_path, NotesV2(), database, upgrade=True)
    try:
        assert versions(new)["notes"] == 2
        with new.database.connection_context():
            rows = [(note.text, note.author) for note in NoteV2.select()]
        assert rows == [("Иванов^Пётр was here", "unknown")]
    finally:
        new.close()

    again = open_gateway(tmp_path, NotesV2(), database, upgrade=True)
    again.close()

    with pytest.raises(SchemaOutdated, match="newer than this dicomgate"):
        open_gateway(tmp_path, NotesV1(), database)


def test_an_upgrade_migrates_and_keeps_existing_data_on_sqlite(tmp_path):
    _migration_keeps_data(tmp_path)


def test_an_upgrade_migrates_and_keeps_existing_data_on_postgresql(tmp_path, postgres_database):
    _migration_keeps_data(tmp_path, postgres_database)


def test_the_gateway_serves_on_postgresql(dicomgate_start, postgres_database):
    from conftest import echo_status

    running = dicomgate_start(database=postgres_database)
    assert isinstance(running.gateway.database, peewee.PostgresqlDatabase)
    assert echo_status(running.port) == 0x0000
    assert versions(running.gateway)["core"] == 1


def test_a_gateway_that_need_not_be_durable_skips_sqlite_flushes(tmp_path):
    config = build_config(tmp_path, 0, ["verification"])
    config = config.with_overrides(durable=False)
    plugins = Plugins()
    plugins.load(config.plugins)
    gateway = Gateway.open(configure(config, plugins), plugins)
    try:
        with gateway.database.connection_context():
            assert gateway.database.execute_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        gateway.close()
