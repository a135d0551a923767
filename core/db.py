"""Persistence: one peewee database for the core and every plugin, with versioned schemas.

The embedded default is SQLite in WAL mode with ``synchronous=FULL``: a committed row
survives a power cut, which is what a C-STORE acknowledgement promises. PostgreSQL
works through the same models. Connections are pooled and held per thread, because
pynetdicom runs each association in its own thread.

Each component (``core`` and every plugin with tables) declares a :class:`Schema`
with a version and the migrations that lead to it. A new database gets the current
tables; an older one is refused until ``dicomgate db upgrade`` has run its
migrations, each in its own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import attrs
import peewee
from playhouse.db_url import parse as parse_database_url
from playhouse.migrate import SchemaMigrator
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from dicomgate.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

#: Every model of the core and of plugins is bound to this proxy until a gateway opens.
database_proxy = peewee.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "synchronous": "full",
    "busy_timeout": 30_000,
    "cache_size": -16_000,
}


class Model(peewee.Model):
    """Base class of every table, the core's and the plugins'."""

    class Meta:
        database = database_proxy
        legacy_table_names = False


class SchemaVersion(Model):
    component = peewee.CharField(primary_key=True, max_length=64)
    version = peewee.IntegerField()
    updated = peewee.DateTimeField()


@attrs.frozen
class Migration:
    """What a migration function is handed: the database and peewee's schema migrator.

    Use ``playhouse.migrate.migrate(*operations)`` with ``migrator``'s operations,
    or plain queries through ``database``.
    """

    database: peewee.Database
    migrator: SchemaMigrator


@attrs.frozen
class Schema:
    """A component's tables at ``version``, and how to get there from older versions.

    ``migrations[n]`` turns a version ``n - 1`` database into version ``n``.
    """

    component: str
    version: int
    models: tuple[type[Model], ...] = attrs.field(converter=tuple)
    migrations: Mapping[int, Callable[[Migration], None]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        missing = [n for n in range(2, self.version + 1) if n not in self.migrations]
        if missing:
            raise ValueError(f"schema {self.component!r}: no migration to version {missing}")


CORE_SCHEMA = Schema("core", 1, (SchemaVersion,))


def write_transaction(database: peewee.Database) -> peewee._atomic:
    """A transaction that will write. On SQLite it takes the write lock at its start
    (BEGIN IMMEDIATE), so concurrent writers queue on the busy timeout instead of
    failing to upgrade a read lock halfway; nested, it is a savepoint."""
    if isinstance(database, peewee.SqliteDatabase) and not database.in_transaction():
        return database.atomic(lock_type="IMMEDIATE")
    return database.atomic()


class SchemaOutdated(UsageError):
    pass


def open_database(url: str, durable: bool = True) -> peewee.Database:
    """A pooled database for ``url`` (``sqlite:///path`` or ``postgresql://...``).

    ``durable``: a commit returns once it is on disk. Otherwise SQLite flushes only at
    WAL checkpoints and PostgreSQL commits asynchronously: a crash of the process loses
    nothing, a power cut loses the last commits.
    """
    parsed = urlparse(url)
    if url.startswith("sqlite:///"):
        # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy spells them.
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        pragmas = {**SQLITE_PRAGMAS, "synchronous": "full" if durable else "normal"}
        return PooledSqliteDatabase(
            str(path), pragmas=pragmas, max_connections=None, stale_timeout=None,
            check_same_thread=False, timeout=30)
    if parsed.scheme in ("postgres", "postgresql"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise ConfigError(
                "gateway.database: PostgreSQL needs the driver: pip install 'dicomgate[postgres]'"
            ) from None
        # db_url.parse keeps query parameters (sslmode, options ...) as connect arguments.
        options = parse_database_url(url)
        if not durable:
            options["options"] = (options.get("options", "") + " -csynchronous_commit=off").strip()
        return PooledPostgresqlDatabase(max_connections=None, stale_timeout=300, **options)
    raise ConfigError(
        f"gateway.database: {url!r} is neither sqlite:///PATH nor postgresql://HOST/NAME")


def bind(database: peewee.Database) -> None:
    database_proxy.initialize(database)


def _versions() -> dict[str, int]:
    if not SchemaVersion.table_exists():
        return {}
    return {row.component: row.version for row in SchemaVersion.select()}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def schema_status(schemas: Iterable[Schema]) -> dict[str, tuple[int | None, int]]:
    """``{component: (version in the database or None, version of the code)}``."""
    stored = _versions()
    return {schema.component: (stored.get(schema.component), schema.version)
            for schema in schemas}


def prepare(database: peewee.Database, schemas: Iterable[Schema], upgrade: bool) -> list[str]:
    """Create missing tables; run migrations when ``upgrade``; refuse an outdated database.

    Returns a line for each thing done, empty when the database was already current.
    """
    schemas = [CORE_SCHEMA, *[s for s in schemas if s.component != "core"]]
    done: list[str] = []
    with database.connection_context():
        stored = _versions()
        for schema in schemas:
            have = stored.get(schema.component)
            if have is None:
                with database.atomic():
                    database.create_tables(schema.models, safe=True)
                    SchemaVersion.insert(component=schema.component, version=schema.version,
                                         updated=_now()).execute()
                done.append(f"{schema.component}: created version {schema.version}")
            elif have > schema.version:
                raise SchemaOutdated(
                    f"the database has {schema.component} schema version {have}, newer than "
                    f"this dicomgate's {schema.version}: upgrade dicomgate")
            elif have < schema.version:
                if not upgrade:
                    raise SchemaOutdated(
                        f"the database has {schema.component} schema version {have}, this "
                        f"dicomgate needs {schema.version}: back it up, then run "
                        f"'dicomgate db upgrade'")
                migrator = SchemaMigrator.from_database(database)
                for target in range(have + 1, schema.version + 1):
                    with database.atomic():
                        schema.migrations[target](Migration(database, migrator))
                        SchemaVersion.update(version=target, updated=_now()).where(
                            SchemaVersion.component == schema.component).execute()
                    done.append(f"{schema.component}: migrated to version {target}")
    for line in done:
        log.info("database %s", line)
    return done
