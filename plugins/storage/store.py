"""The store: files on disk and their index, changed together or not at all.

One received instance goes through :meth:`Store.ingest`, whatever brought it (C-STORE,
``dicomgate import``, ``dicomgate verify --repair``):

1. the Part 10 file (a spool or temporary file inside the storage root) is opened
   once: hashed, its structure checked and its indexed attributes decoded (a large
   file is hashed in blocks and its large values are skipped, never read or mapped
   whole, so memory stays flat whatever the size);
2. through the same open file its data is flushed to disk, then it is hard-linked as
   ``ab/ab…(64 hex digits).dcm``, the SHA-256 of its SOP Instance UID, never a name
   from received text; a link never replaces an existing file, so a name already
   taken (a duplicate in flight, a leftover) gets a random suffix; then the folder
   is flushed;
3. the index rows are written in one database transaction, whose commit is flushed;
4. only then is success answered. If the transaction fails the new file is removed,
   so there is never a row without a file (a crash between 2 and 3 leaves an
   unindexed file, which ``dicomgate verify --repair`` indexes).

The flushes of step 2 and 3 are made only with ``[gateway] durable = true`` (the
default), and run one after the other; see :meth:`Store._ingest` for why none of
them may overlap.

A replaced duplicate's old file is removed after the transaction committed.

Retention (:meth:`Store.purge`) goes the other way round, one study at a time: the
rows are deleted in one transaction, which also writes a purge journal (``.purge/``)
naming the study's files; after the commit the files are removed, their folders
flushed and the journal deleted. A crash in between leaves files without rows, never
a row without a file; the journal tells them apart from a crashed ingest's files, so
they are removed (:meth:`Store.finish_purges`, ``dicomgate verify``), not indexed again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import peewee
from pydicom.dataset import Dataset

from dicomgate.files import fsync_dir
from dicomgate.plugins.storage.header import FileMeta, Header, Malformed, read_file, read_meta
from dicomgate.plugins.storage.models import UID_LENGTH, Instance, Patient, Series, Study
from dicomgate.plugins.storage.settings import (
    KEEP_FIRST,
    OVERWRITE,
    OVERWRITE_IF_DIFFERENT,
    StorageSettings,
)

if TYPE_CHECKING:
    from dicomgate.gateway import Gateway

log = logging.getLogger("dicomgate.storage")

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
#: Refused: out of resources (disk full, free space below the reserve, index unavailable).
OUT_OF_RESOURCES = 0xA700
#: Error: data set does not match SOP class (its SOP Class or Instance UID is not the
#: request's), as DCMTK's storescp answers.
DATA_SET_DOES_NOT_MATCH = 0xA900
#: Error: cannot understand: the data set is not complete DICOM.
CANNOT_UNDERSTAND = 0xC000
#: Error: cannot understand: an identifying attribute is missing or invalid.
MISSING_IDENTIFIER = 0xC001

#: Files up to this size are read into memory at once (one read for hash and header);
#: larger ones are hashed in blocks and their header read with seeks over the values.
READ_WHOLE_BELOW = 1 << 20
MIB = 1 << 20
SPOOL_DIR, TMP_DIR, QUARANTINE_DIR = ".spool", ".tmp", ".quarantine"
#: Journals of purges whose files may not all be removed yet.
PURGE_DIR = ".purge"
JOURNAL_SUFFIX = ".json"
#: Files live in one level of 256 folders named by the first 2 hex digits of the hash.
FANOUT_DIGITS = 2
FANOUT_NAMES = tuple(f"{n:0{FANOUT_DIGITS}x}" for n in range(16 ** FANOUT_DIGITS))
TMP_SUFFIX = ".part"


class Rejected(Exception):
    """An instance is refused with a C-STORE failure status the sender can act on."""

    def __init__(self, status: int, comment: str):
        super().__init__(f"0x{status:04X}: {comment}")
        self.status = status
        self.comment = comment

    def as_status(self) -> Dataset:
        """The status dataset for pynetdicom: Status and Error Comment (LO, 64 chars)."""
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment.encode("ascii", "replace").decode()[:64]
        return ds


@attrs.frozen
class StoredInstance:
    """One instance durably stored and indexed, as ``instance_stored`` and
    ``instances_received`` hand it to other plugins."""

    #: Row id in the ``storage_instance`` table.
    id: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    modality: str
    #: Relative to the storage root, ``/``-separated.
    path: str
    absolute_path: Path
    size: int
    sha256: str
    transfer_syntax: str
    #: Who sent it: calling AE title and IP address (empty for an import).
    calling_ae: str
    address: str
    #: When it was stored (UTC).
    received: datetime
    #: True when it replaced an instance with the same SOP Instance UID.
    replaced: bool
    #: The study's Accession Number.
    accession: str = ""
    #: Study Date, ``YYYYMMDD`` as received.
    study_date: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    #: Number of Frames as indexed: 1 for a single-frame image, 0 for no pixels.
    frames: int = 0


@attrs.frozen
class PurgeReport:
    """What :meth:`Store.purge` removed or, with ``dry_run``, would remove."""

    studies: int = 0
    instances: int = 0
    #: Sum of the removed files' sizes.
    bytes_freed: int = 0
    #: Study Instance UIDs, oldest last arrival first.
    study_uids: tuple[str, ...] = ()
    dry_run: bool = False


@attrs.frozen
class PurgeJournal:
    """A purge journal: the files of a study whose rows a purge deleted."""

    path: Path
    study_uid: str
    #: Relative paths of the study's files.
    files: tuple[str, ...]
    #: When it was written (before the commit): a file linked later is not the study's.
    written: float
    #: Written by another running process, which may still be removing the files.
    active: bool


@attrs.frozen
class Origin:
    """Who delivered an instance."""

    calling_ae: str = ""
    address: str = ""


@attrs.frozen
class Outcome:
    """What :meth:`Store.ingest` did: stored ``instance``, or kept an existing one."""

    instance: StoredInstance | None
    duplicate: bool = False


@attrs.frozen
class FileInfo:
    size: int
    sha256: str
    meta: FileMeta
    header: Header


@attrs.define
class Session:
    """What one association (or one import) delivered so far."""

    instances: list[StoredInstance] = attrs.Factory(list)
    duplicates: int = 0
    refused: int = 0
    #: Series UID -> (series id, study id) of rows this session already used.
    series_ids: dict[str, tuple[int, int]] = attrs.Factory(dict)
    generation: int = 0


def store_for(gateway: Gateway) -> Store:
    """The gateway's store (one per gateway, created on first use)."""
    return gateway.plugin_object("storage.store", Store)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _clip(value: str, length: int) -> str:
    """Text as the index keeps it: no NUL (PostgreSQL refuses it), at most ``length``."""
    if "\0" in value:
        value = value.replace("\0", "")
    return value[:length]


def search_text(*values: str) -> str:
    """The case-folded form names and IDs are searched in (``^``/``=`` as spaces, ё as е)."""
    text = " ".join(value for value in values if value)
    for separator in "^=":
        text = text.replace(separator, " ")
    return " ".join(text.casefold().replace("ё", "е").split())


def patient_identity(header: Header) -> str:
    """Key of the patient an instance belongs to: (Patient ID, Issuer), or, without
    an ID, the study (two people without an ID are never merged)."""
    if header.patient_id.strip():
        key = "id\0" + header.patient_id.strip() + "\0" + header.issuer.strip()
    else:
        key = "study\0" + header.study_uid
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_uid(value: str, what: str) -> None:
    if not value:
        raise Rejected(MISSING_IDENTIFIER, f"no {what}")
    if len(value) > UID_LENGTH:
        raise Rejected(MISSING_IDENTIFIER, f"{what} longer than 64 characters")
    if not (value.isascii() and value.isprintable()) or " " in value or "\\" in value:
        raise Rejected(MISSING_IDENTIFIER, f"{what} has characters a UID cannot have")


def inspect_file(path: Path, fsync: bool = False, scratch_dir: str | None = None) -> FileInfo:
    """Hash, check and decode a Part 10 file; flush its data to disk when ``fsync``."""
    with open(path, "rb") as fh:
        info = inspect_open(fh, scratch_dir)
        if fsync:
            os.fdatasync(fh.fileno())
    return info


def inspect_open(fh: Any, scratch_dir: str | None = None,
                 digest: tuple[int, str] | None = None) -> FileInfo:
    """:func:`inspect_file` of an open file (read from its start).

    ``digest``: the file's (size, SHA-256 hex) when already known (computed as it was
    written); then the file is not hashed again and only its header is read (large
    values skipped with seeks). It is ignored unless the size is the file's."""
    size = os.fstat(fh.fileno()).st_size
    if size < 132:
        raise Malformed("not a DICOM Part 10 file (too short)")
    if digest is not None and digest[0] == size:
        fh.seek(0)
        if size <= READ_WHOLE_BELOW:  # one read: parsing from memory is quicker
            meta, header = read_file(io.BytesIO(fh.read()), size, scratch_dir)
        else:
            meta, header = read_file(fh, size, scratch_dir)
        return FileInfo(size=size, sha256=digest[1], meta=meta, header=header)
    if size <= READ_WHOLE_BELOW:
        data = fh.read()
        size = len(data)
        digest = hashlib.sha256(data).hexdigest()
        meta, header = read_file(io.BytesIO(data), size, scratch_dir)
    else:
        fh.seek(0)
        digest = hashlib.file_digest(fh, "sha256").hexdigest()  # in blocks
        meta, header = read_file(fh, size, scratch_dir)
    return FileInfo(size=size, sha256=digest, meta=meta, header=header)


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file."""
    with open(path, "rb") as fh:
        return read_meta(fh).dataset_offset


def same_data_set(first: Path, first_offset: int, second: Path, second_offset: int) -> bool:
    """True when the two files hold the same data set bytes (file meta aside)."""
    try:
        first_size = first.stat().st_size - first_offset
        second_size = second.stat().st_size - second_offset
    except FileNotFoundError:
        return False
    if first_size != second_size:
        return False
    with open(first, "rb") as a, open(second, "rb") as b:
        a.seek(first_offset)
        b.seek(second_offset)
        while True:
            chunk = a.read(MIB)
            if chunk != b.read(MIB):
                return False
            if not chunk:
                return True


class Store:
    """Files and index of one gateway. Thread-safe: every association uses it."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.settings: StorageSettings = gateway.settings("storage")
        #: Flush files, folders and commits before answering success ([gateway] durable).
        self.durable: bool = gateway.config.gateway.durable
        root = Path(self.settings.root)
        if not root.is_absolute():
            root = Path(gateway.data_dir) / root
        self.root = root.absolute()
        self.spool_dir = self.root / SPOOL_DIR
        self.tmp_dir = self.root / TMP_DIR
        self.quarantine_dir = self.root / QUARANTINE_DIR
        self.created = time.time()
        self.database = gateway.database
        self.is_sqlite = isinstance(self.database, peewee.SqliteDatabase)
        self.sql = _Statements(self.database, self.is_sqlite)
        self._root_text = str(self.root)
        self._spool_text = str(self.spool_dir)
        self._tmp_text = str(self.tmp_dir)
        self._root_device: int | None = None
        self._known_dirs: set[str] = set()
        self._sessions: dict[Any, Session] = {}
        self._lock = threading.Lock()
        self.purge_dir = self.root / PURGE_DIR
        #: Bumped whenever this process deletes index rows: cached row ids become stale.
        self.generation = 0

    # Folders ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the root, its working folders and the fan-out folders.

        The 256 fan-out folders are made once, up front: creating one while storing
        would cost an extra flush of the root for each of the first few hundred
        instances.
        """
        for folder in (self.root, self.spool_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(os.path.join(self._root_text, FANOUT_NAMES[-1])):
            return
        for name in FANOUT_NAMES:
            try:
                os.mkdir(os.path.join(self._root_text, name))
            except FileExistsError:
                pass
        if self.durable:
            fsync_dir(self.root)

    def sweep(self) -> int:
        """Remove what an earlier run left in the working folders: spool files older
        than this store, temporary files of processes that are gone. Returns the count."""
        removed = 0
        for entry in _scan(self.spool_dir):
            if entry.is_file(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_mtime < self.created:
                removed += _unlink(entry.path)
        for entry in _scan(self.tmp_dir):
            if not entry.is_file(follow_symlinks=False):
                continue
            pid = entry.name.partition("-")[0]
            if (pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))) or \
                    entry.stat(follow_symlinks=False).st_mtime >= self.created:
                continue
            removed += _unlink(entry.path)
        if removed:
            log.info("storage: removed %d file(s) left over from an interrupted transfer in %s",
                     removed, self.root)
        return removed

    def on_store_filesystem(self, path: Path) -> bool:
        """True when ``path`` can be linked into the store (same filesystem)."""
        if os.fspath(path).rpartition(os.sep)[0] in (self._spool_text, self._tmp_text):
            return True  # our own working folders (the root is on one filesystem)
        try:
            if self._root_device is None:
                self._root_device = os.stat(self._root_text).st_dev
            return os.stat(path).st_dev == self._root_device
        except OSError:
            return False

    def copy_in(self, path: Path) -> Path:
        """A temporary copy of ``path`` inside the store (flushed when durable)."""
        size = os.stat(path).st_size

        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as fh:
                while chunk := fh.read(MIB):
                    yield chunk

        return self.write_temporary(chunks(), size)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        return Path(os.path.join(self._root_text, *relative.split("/")))

    def temporary_path(self) -> Path:
        return self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}{TMP_SUFFIX}"

    # Space -----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        stats = os.statvfs(self._root_text)
        return stats.f_bavail * stats.f_frsize

    def check_space(self, incoming: int = 0) -> None:
        """Refuse (0xA700) when ``incoming`` more bytes would leave less than the reserve."""
        free = self.free_bytes()
        if free - incoming < self.settings.reserve_mb * MIB:
            raise Rejected(OUT_OF_RESOURCES,
                           f"storage full: {free // MIB} MiB free, reserve "
                           f"{self.settings.reserve_mb} MiB")

    def write_temporary(self, chunks: Iterable[bytes], size: int) -> Path:
        """Write ``chunks`` to a new temporary file in the store, its data flushed to
        disk when durable. Disk full is refused with 0xA700, nothing left behind."""
        self.check_space(size)
        path = self.temporary_path()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                if self.durable:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink(path)
            if _is_disk_full(exc):
                raise Rejected(OUT_OF_RESOURCES, "storage full (no space left on device)") \
                    from None
            raise
        return path

    # Reading the index -------------------------------------------------------------------

    def instances_of_study(self, study_uid: str) -> list[StoredInstance]:
        """Every instance stored for ``study_uid`` as :class:`StoredInstance` records, in
        series and instance order; an empty list when none is. (``replaced`` is false:
        it describes an arrival, not what is stored.)"""
        return self.find_instances(study_uid=study_uid)

    def find_instances(self, study_uid: str = "", series_uid: str = "",
                       sop_instance_uid: str = "") -> list[StoredInstance]:
        """The stored instances of a study, a series or one instance (give one UID), as
        :class:`StoredInstance` records in series and instance order."""
        given = [(column, value) for column, value in (
            (Study.study_uid, study_uid), (Series.series_uid, series_uid),
            (Instance.sop_instance_uid, sop_instance_uid)) if value]
        if len(given) != 1:
            raise ValueError("find_instances: give exactly one of study_uid, series_uid, "
                             "sop_instance_uid")
        column, value = given[0]
        query = (Instance.select(Instance, Series, Study, Patient)
                 .join(Series, on=(Instance.series == Series.id))
                 .switch(Instance).join(Study, on=(Instance.study == Study.id))
                 .join(Patient, on=(Study.patient == Patient.id))
                 .where(column == value)
                 .order_by(Series.number, Series.id, Instance.instance_number, Instance.id))
        with self.database.connection_context():
            return [StoredInstance(
                id=row.id, sop_class_uid=row.sop_class_uid,
                sop_instance_uid=row.sop_instance_uid, study_uid=row.study.study_uid,
                series_uid=row.series.series_uid, patient_id=row.study.patient.patient_id,
                patient_name=row.study.patient.name, modality=row.series.modality,
                path=row.path, absolute_path=self.absolute(row.path), size=row.size,
                sha256=row.sha256, transfer_syntax=row.transfer_syntax,
                calling_ae=row.calling_ae, address=row.address,
                received=row.received.replace(tzinfo=UTC), replaced=False,
                accession=row.study.accession, study_date=row.study.date,
                series_number=row.series.number, instance_number=row.instance_number,
                frames=row.frames)
                for row in query]

    # Sessions --------------------------------------------------------------------------

    def session(self, key: Any) -> Session:
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.setdefault(key, Session(generation=self.generation))
        return session

    def end_session(self, key: Any) -> Session | None:
        with self._lock:
            return self._sessions.pop(key, None)

    # Ingest ----------------------------------------------------------------------------

    def ingest(self, source: Path, *, origin: Origin = Origin(),
               expected_class: str | None = None, expected_instance: str | None = None,
               synced: bool = False, consume: bool = True,
               session: Session | None = None, duplicates: str | None = None,
               digest: tuple[int, str] | None = None) -> Outcome:
        """Store and index the Part 10 file ``source`` (inside the storage root).

        ``expected_*`` are the request's UIDs, which the data set must carry. With
        ``consume`` the source is gone afterwards whatever happened; without it, it
        is left where it was (and, when stored, also linked into the store).
        ``synced``: the source's data is already flushed to disk. ``duplicates``
        overrides the configured duplicate policy. ``digest``: the source's (size,
        SHA-256 hex) when known already (hashed as it was received), so that it is not
        read whole again. Raises :class:`Rejected` with the status to answer.
        """
        try:
            with open(source, "rb") as fh:
                return self._ingest(source, fh, origin, expected_class, expected_instance,
                                    synced, consume, session,
                                    duplicates or self.settings.duplicates, digest)
        finally:
            if consume:
                _unlink(source)

    def _ingest(self, source: Path, fh: Any, origin: Origin, expected_class: str | None,
                expected_instance: str | None, synced: bool, consume: bool,
                session: Session | None, policy: str,
                digest: tuple[int, str] | None = None) -> Outcome:
        try:
            info = inspect_open(fh, self._tmp_text, digest)
        except Malformed as exc:
            raise Rejected(CANNOT_UNDERSTAND, f"not a complete DICOM data set: {exc}") from None
        header = info.header
        check_uid(header.sop_instance_uid, "SOP Instance UID")
        check_uid(header.sop_class_uid, "SOP Class UID")
        if expected_instance is not None and header.sop_instance_uid != expected_instance:
            raise Rejected(DATA_SET_DOES_NOT_MATCH,
                           "SOP Instance UID of data set and request differ")
        if expected_class is not None and header.sop_class_uid != expected_class:
            raise Rejected(DATA_SET_DOES_NOT_MATCH, "SOP Class UID of data set and request differ")
        check_uid(header.study_uid, "Study Instance UID")
        check_uid(header.series_uid, "Series Instance UID")

        existing = self._existing(header.sop_instance_uid)
        if existing is not None and not os.path.exists(self.absolute(existing.path)):
            # Its file is gone (deleted by hand, lost disk): the copy now sent heals it
            log.warning("storage: %s is indexed but its file %s is missing: storing the "
                        "copy received", header.sop_instance_uid, existing.path)
            policy = OVERWRITE
        if existing is not None:
            if policy == KEEP_FIRST:
                return Outcome(None, duplicate=True)
            if policy == OVERWRITE_IF_DIFFERENT and self._same_as_stored(
                    existing, source, info):
                return Outcome(None, duplicate=True)

        self.check_space()
        # With durable, three flushes, strictly one after the other: the file's data,
        # then (after the link) its folder, then (the commit) the index. Each step only
        # starts once the one before is on disk, which is what makes "success means
        # file and row are on disk; a crash leaves no row pointing to a missing file"
        # hold on any filesystem:
        # * data before the link: a file under its final name is always complete, so
        #   what `verify --repair` finds after a crash can be indexed as it is;
        # * folder before the commit: running the two flushes at once would let the
        #   commit reach the disk first, and a crash then leaves a row whose file name
        #   was never written. (On ext4 the commit's flush often takes the link along,
        #   but not when the WAL's flush needs no journal commit, so it cannot be
        #   relied on.)
        try:
            if self.durable and not synced:
                os.fdatasync(fh.fileno())
            relative = self._place(source, header.sop_instance_uid, consume)
        except OSError as exc:
            if _is_disk_full(exc):
                raise Rejected(OUT_OF_RESOURCES, "storage full (no space left on device)") \
                    from None
            raise
        received = _utcnow()
        try:
            row_id, replaced = self._index(relative, info, origin, received, session, policy,
                                           known_new=existing is None)
        except Exception:
            _unlink(self.absolute(relative))
            log.exception("storage: indexing %s failed; its file was removed",
                          header.sop_instance_uid)
            raise Rejected(OUT_OF_RESOURCES, "index database unavailable") from None
        if row_id is None:  # another sender stored it meanwhile and it is kept
            _unlink(self.absolute(relative))
            return Outcome(None, duplicate=True)
        if replaced is not None and replaced != relative:
            _unlink(self.absolute(replaced))
        instance = StoredInstance(
            id=row_id, sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid, study_uid=header.study_uid,
            series_uid=header.series_uid, patient_id=header.patient_id,
            patient_name=header.patient_name, modality=header.modality, path=relative,
            absolute_path=self.absolute(relative), size=info.size, sha256=info.sha256,
            transfer_syntax=info.meta.transfer_syntax, calling_ae=origin.calling_ae,
            address=origin.address, received=received, replaced=replaced is not None,
            accession=header.accession, study_date=header.study_date,
            series_number=header.series_number, instance_number=header.instance_number,
            frames=header.frames)
        return Outcome(instance)

    def _existing(self, sop_instance_uid: str) -> _Existing | None:
        row = self.database.execute_sql(self.sql.find_instance,
                                        (sop_instance_uid,)).fetchone()
        return None if row is None else _Existing(*row)

    def _same_as_stored(self, existing: _Existing, source: Path, info: FileInfo) -> bool:
        if existing.sha256 == info.sha256:
            return True
        if existing.transfer_syntax != info.meta.transfer_syntax:
            return False
        stored = self.absolute(existing.path)
        try:
            offset = dataset_offset(stored)
        except (OSError, Malformed):
            return False
        return same_data_set(stored, offset, source, info.meta.dataset_offset)

    def _place(self, source: Path, sop_instance_uid: str, consume: bool) -> str:
        """Link ``source`` into the store under a name derived from the UID's hash;
        never replaces an existing file. Returns the relative path. (The source's own
        name is left to the caller to remove.)"""
        digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        fanout = digest[:FANOUT_DIGITS]
        folder = os.path.join(self._root_text, fanout)
        if fanout not in self._known_dirs:
            if not os.path.isdir(folder):  # removed since start: make it again
                os.makedirs(folder, exist_ok=True)
                if self.durable:
                    fsync_dir(self.root)
            self._known_dirs.add(fanout)
        name = f"{digest}.dcm"
        while True:
            target = os.path.join(folder, name)
            try:
                os.link(source, target)
                break
            except FileExistsError:
                name = f"{digest}-{secrets.token_hex(4)}.dcm"
            except OSError as exc:
                # Filesystems without hard links: rename, after looking (not atomic
                # against another writer of the same name, but names are unique).
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK) or not consume:
                    raise
                if os.path.exists(target):
                    name = f"{digest}-{secrets.token_hex(4)}.dcm"
                    continue
                os.rename(source, target)
                break
        if self.durable:
            try:
                fsync_dir(folder)
            except OSError:
                _unlink(target)  # not known to be on disk: not stored
                raise
        return f"{fanout}/{name}"

    # Index -----------------------------------------------------------------------------

    def transaction(self) -> Any:
        """One write transaction; on SQLite it takes the write lock at once, so that
        concurrent associations queue instead of failing to upgrade a read lock."""
        if self.is_sqlite:
            return self.database.atomic(lock_type="IMMEDIATE")
        return self.database.atomic()

    def _index(self, relative: str, info: FileInfo, origin: Origin, received: datetime,
               session: Session | None, policy: str, known_new: bool = False
               ) -> tuple[int | None, str | None]:
        """Write the rows of a stored file. Returns (instance row id, replaced file's
        relative path or None); (None, None) when an existing instance is kept.

        ``known_new``: a look-up just before found no instance with this UID, so the
        first attempt inserts without looking again; if another sender inserted it
        meanwhile, the unique index refuses the row and the second attempt looks."""
        for attempt in (1, 2):
            cache = self._cache(session)
            # Row ids found or created in this transaction are remembered only once
            # it committed: a rolled-back id may be given to another row later.
            found: dict[str, tuple[int, int]] = dict(cache)
            try:
                with self.transaction():
                    result = self._write_rows(relative, info, origin, received, found, policy,
                                              known_new and attempt == 1)
            except peewee.IntegrityError:
                # Another process inserted the same patient/study/series/instance
                # between our look-up and insert, or a cached row was deleted: the
                # transaction is rolled back; look again once.
                cache.clear()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                cache.clear()
                raise
            if session is not None and session.generation == self.generation:
                cache.update(found)
            return result
        raise AssertionError("unreachable")

    def _cache(self, session: Session | None) -> dict[str, tuple[int, int]]:
        if session is None:
            return {}
        if session.generation != self.generation:
            session.series_ids.clear()
            session.generation = self.generation
        return session.series_ids

    def _write_rows(self, relative: str, info: FileInfo, origin: Origin, received: datetime,
                    cache: dict[str, tuple[int, int]], policy: str, known_new: bool = False
                    ) -> tuple[int | None, str | None]:
        header = info.header
        now = received.replace(tzinfo=None)
        sql, execute = self.sql, self.database.execute_sql
        existing = None
        if not known_new:
            row = execute(sql.lock_instance, (header.sop_instance_uid,)).fetchone()
            existing = None if row is None else _Existing(*row)
        if existing is not None:
            if policy == KEEP_FIRST or (policy == OVERWRITE_IF_DIFFERENT
                                        and existing.sha256 == info.sha256):
                return None, None
        series_id, study_id = self._series_row(header, now, cache)
        stamp = Instance.received.db_value(now)
        values = (series_id, study_id, header.sop_class_uid, header.instance_number,
                  _clip(info.meta.transfer_syntax, UID_LENGTH), relative, info.size,
                  info.sha256, _clip(origin.calling_ae, 16), _clip(origin.address, 64), stamp,
                  header.frames)
        if existing is None:
            cursor = execute(sql.insert_instance, (*values, header.sop_instance_uid))
            row_id = cursor.lastrowid if self.is_sqlite else cursor.fetchone()[0]
            self._count(series_id, study_id, 1, info.size, stamp)
            return row_id, None
        execute(sql.update_instance, (*values, existing.id))
        self._count(existing.series_id, existing.study_id, -1, -existing.size, stamp)
        self._count(series_id, study_id, 1, info.size, stamp)
        if existing.series_id != series_id:
            self.prune(series_ids=[existing.series_id])
            cache.clear()
        return existing.id, existing.path

    def _count(self, series_id: int, study_id: int, instances: int, size: int,
               stamp: Any) -> None:
        execute = self.database.execute_sql
        execute(self.sql.count_series, (instances, size, stamp, series_id))
        execute(self.sql.count_study, (instances, size, stamp, study_id))

    def _series_row(self, header: Header, now: datetime,
                    cache: dict[str, tuple[int, int]]) -> tuple[int, int]:
        """(series id, study id) of the instance's series, created when new."""
        ids = cache.get(header.series_uid)
        if ids is not None:
            return ids
        row = self.database.execute_sql(self.sql.find_series, (header.series_uid,)).fetchone()
        if row is not None:
            ids = cache[header.series_uid] = (row[0], row[1])
            return ids
        study_id = self._study_row(header, now)
        series_id = Series.insert(
            study=study_id, series_uid=header.series_uid, modality=_clip(header.modality, 16),
            number=header.series_number, description=_clip(header.series_description, 1024),
            body_part=_clip(header.body_part, 64), created=now, updated=now).execute()
        self._study_series_changed(study_id, 1, now)
        ids = cache[header.series_uid] = (series_id, study_id)
        return ids

    @staticmethod
    def _study_series_changed(study_id: int, added: int, now: datetime) -> None:
        modalities = sorted({row.modality for row in Series.select(Series.modality)
                             .where(Series.study == study_id) if row.modality})
        Study.update(num_series=Study.num_series + added,
                     modalities=_clip("\\".join(modalities), 255),
                     updated=now).where(Study.id == study_id).execute()

    def _study_row(self, header: Header, now: datetime) -> int:
        row = Study.select(Study.id).where(Study.study_uid == header.study_uid).first()
        if row is not None:
            return row.id
        patient_id = self._patient_row(header, now)
        study_id = Study.insert(
            patient=patient_id, study_uid=header.study_uid, study_id=_clip(header.study_id, 16),
            date=_clip(header.study_date, 16), time=_clip(header.study_time, 16),
            accession=_clip(header.accession, 64),
            description=_clip(header.study_description, 1024),
            referring_physician=_clip(header.referring_physician, 1024),
            created=now, updated=now).execute()
        Patient.update(num_studies=Patient.num_studies + 1).where(
            Patient.id == patient_id).execute()
        return study_id

    @staticmethod
    def _patient_row(header: Header, now: datetime) -> int:
        identity = patient_identity(header)
        row = Patient.select(Patient.id).where(Patient.identity == identity).first()
        if row is not None:
            return row.id
        return Patient.insert(
            identity=identity, patient_id=_clip(header.patient_id, 64),
            issuer=_clip(header.issuer, 64), name=_clip(header.patient_name, 1024),
            search=_clip(search_text(header.patient_name, header.patient_id), 2048),
            birth_date=_clip(header.birth_date, 16), sex=_clip(header.sex, 16),
            created=now).execute()

    # Retention -------------------------------------------------------------------------

    def purge(self, older_than: timedelta, dry_run: bool = False, *,
              stop: Callable[[], bool] | None = None) -> PurgeReport:
        """Remove every study whose last instance arrived (``Study.updated``) more than
        ``older_than`` ago: whole studies only, one transaction each, the files after
        the commit. With ``dry_run`` nothing changes and the report says what would go.
        ``stop``: asked before each study; true ends the purge early.

        Call it with a database connection open (it may take long, and each study's
        transaction is short so that storing goes on meanwhile).
        """
        if older_than <= timedelta(0):
            raise ValueError(f"older_than must be positive, not {older_than}")
        cutoff = (_utcnow() - older_than).replace(tzinfo=None)
        studies = instances = freed = 0
        uids: list[str] = []
        with _purge_lock(self.root):
            if not dry_run:
                self._finish_purges()
            candidates = list(Study.select(Study.id, Study.study_uid)
                              .where(Study.updated < cutoff)
                              .order_by(Study.updated, Study.id).tuples())
            for study_id, study_uid in candidates:
                if stop is not None and stop():
                    break
                if dry_run:
                    count, size = (Instance.select(
                        peewee.fn.COUNT(Instance.id),
                        peewee.fn.COALESCE(peewee.fn.SUM(Instance.size), 0))
                        .where(Instance.study == study_id).scalar(as_tuple=True))
                else:
                    removed = self._purge_study(study_id, study_uid, cutoff)
                    if removed is None:
                        continue
                    count, size = removed
                studies += 1
                instances += count
                freed += size
                uids.append(study_uid)
        return PurgeReport(studies=studies, instances=instances, bytes_freed=freed,
                           study_uids=tuple(uids), dry_run=dry_run)

    def _purge_study(self, study_id: int, study_uid: str,
                     cutoff: datetime) -> tuple[int, int] | None:
        """Delete one study's rows, then its files. Returns (instances, bytes), or None
        when the study is gone or received an instance since it was chosen."""
        lock = not self.is_sqlite  # SQLite: BEGIN IMMEDIATE already holds the write lock
        journal: Path | None = None
        with self.transaction():
            # Looked at again inside the transaction: an instance that arrived since the
            # study was chosen keeps it (its row is committed before, or after, ours;
            # after ours it finds no study and makes a new one, with its own file).
            query = Study.select(Study.id, Study.patient, Study.updated).where(
                Study.id == study_id)
            study = (query.for_update() if lock else query).first()
            if study is None or study.updated >= cutoff:
                return None
            patient_id = study.patient_id
            if lock:  # a new study of the same patient waits for our commit
                Patient.select(Patient.id).where(Patient.id == patient_id).for_update().first()
            files = list(Instance.select(Instance.path, Instance.size)
                         .where(Instance.study == study_id).tuples())
            self.generation += 1
            Instance.delete().where(Instance.study == study_id).execute()
            Series.delete().where(Series.study == study_id).execute()
            Study.delete().where(Study.id == study_id).execute()
            studies = Study.select().where(Study.patient == patient_id).count()
            if studies:
                Patient.update(num_studies=studies).where(Patient.id == patient_id).execute()
            else:
                Patient.delete().where(Patient.id == patient_id).execute()
            # On disk before the commit: if the process dies after it, the files are
            # known to be a purged study's and are removed, not indexed again.
            journal = self._write_journal(study_uid, [path for path, _ in files])
        self.generation += 1
        log.debug("storage: purged study %s (%d instances)", study_uid, len(files))
        self._remove_files(journal, [path for path, _ in files])
        return len(files), sum(size for _, size in files)

    def _write_journal(self, study_uid: str, files: list[str]) -> Path:
        if not os.path.isdir(self.purge_dir):
            self.purge_dir.mkdir(parents=True, exist_ok=True)
            if self.durable:
                fsync_dir(self.root)
        name = f"{os.getpid()}-{secrets.token_hex(8)}"
        part = self.purge_dir / f"{name}{TMP_SUFFIX}"
        journal = self.purge_dir / f"{name}{JOURNAL_SUFFIX}"
        data = json.dumps({"study_uid": study_uid, "files": files}).encode()
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.durable:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(part, journal)
            if self.durable:
                fsync_dir(self.purge_dir)
        except BaseException:
            _unlink(part)
            _unlink(journal)
            raise
        return journal

    def _remove_files(self, journal: Path, files: Iterable[str]) -> int:
        """Remove a purged study's files, flush their folders, then drop the journal
        (kept when a file could not be removed). Returns the count removed."""
        removed = 0
        folders: set[str] = set()
        left: list[str] = []
        for relative in files:
            path = os.fspath(self.absolute(relative))
            removed += _unlink(path)
            folders.add(os.path.dirname(path))
            if os.path.lexists(path):
                left.append(relative)
        if self.durable:
            for folder in sorted(folders):
                try:
                    fsync_dir(folder)
                except FileNotFoundError:
                    pass
        if left:
            log.warning("storage: %d file(s) of a purged study could not be removed; "
                        "they are listed in %s", len(left), journal)
        else:
            _unlink(journal)
        return removed

    def purge_journals(self) -> list[PurgeJournal]:
        """The purge journals in the store: purges whose files may not all be gone."""
        journals = []
        for entry in _scan(self.purge_dir):
            if not entry.name.endswith(JOURNAL_SUFFIX) or not entry.is_file():
                continue
            try:
                written = entry.stat().st_mtime
                with open(entry.path, "rb") as fh:
                    data = json.load(fh)
                files = tuple(str(relative) for relative in data["files"])
                study_uid = str(data.get("study_uid", ""))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("storage: unreadable purge journal %s: %s", entry.path, exc)
                continue
            journals.append(PurgeJournal(path=Path(entry.path), study_uid=study_uid,
                                         files=files, written=written,
                                         active=_writer_active(entry.name)))
        return sorted(journals, key=lambda journal: journal.written)

    def purge_leftover(self, journal: PurgeJournal, relative: str) -> bool:
        """True when ``relative``, listed in ``journal``, is a file the purge left: it
        exists, no row refers to it, and it was not linked after the journal."""
        try:
            stat = os.stat(self.absolute(relative))
        except FileNotFoundError:
            return False
        if stat.st_ctime >= journal.written:
            return False
        return not Instance.select().where(Instance.path == relative).exists()

    def finish_purges(self) -> int:
        """Complete purges interrupted between their commit and the removal of their
        files (a crash): remove those files. Returns how many were removed."""
        with _purge_lock(self.root):
            return self._finish_purges()

    def _finish_purges(self) -> int:
        removed = 0
        for entry in _scan(self.purge_dir):
            if entry.name.endswith(TMP_SUFFIX) and not _writer_active(entry.name):
                _unlink(entry.path)  # a journal never finished: its transaction never was
        for journal in self.purge_journals():
            if journal.active:
                continue
            leftovers = [relative for relative in journal.files
                         if self.purge_leftover(journal, relative)]
            removed += self._remove_files(journal.path, leftovers)
        if removed:
            log.info("storage: removed %d file(s) of studies purged before an interruption",
                     removed)
        return removed

    def prune(self, series_ids: Iterable[int] = (), study_ids: Iterable[int] = ()) -> None:
        """Recount the given series and their studies and patients, deleting those left
        empty. Call inside a transaction."""
        self.generation += 1
        series_ids = set(series_ids)
        study_ids = set(study_ids)
        if series_ids:
            study_ids |= {row.study_id for row in Series.select(Series.study)
                          .where(Series.id.in_(series_ids))}
        for series_id in series_ids:
            count, size = (Instance.select(peewee.fn.COUNT(Instance.id),
                                           peewee.fn.COALESCE(peewee.fn.SUM(Instance.size), 0))
                           .where(Instance.series == series_id).scalar(as_tuple=True))
            if count:
                Series.update(num_instances=count, size=size).where(
                    Series.id == series_id).execute()
            else:
                Series.delete().where(Series.id == series_id).execute()
        patient_ids = {row.patient_id for row in Study.select(Study.patient)
                       .where(Study.id.in_(study_ids))} if study_ids else set()
        for study_id in study_ids:
            count, size = (Instance.select(peewee.fn.COUNT(Instance.id),
                                           peewee.fn.COALESCE(peewee.fn.SUM(Instance.size), 0))
                           .where(Instance.study == study_id).scalar(as_tuple=True))
            if not count:
                Series.delete().where(Series.study == study_id).execute()
                Study.delete().where(Study.id == study_id).execute()
                continue
            modalities = sorted({row.modality for row in Series.select(Series.modality)
                                 .where(Series.study == study_id) if row.modality})
            series = Series.select().where(Series.study == study_id).count()
            Study.update(num_instances=count, size=size, num_series=series,
                         modalities=_clip("\\".join(modalities), 255)).where(
                Study.id == study_id).execute()
        for patient_id in patient_ids:
            studies = Study.select().where(Study.patient == patient_id).count()
            if studies:
                Patient.update(num_studies=studies).where(Patient.id == patient_id).execute()
            else:
                Patient.delete().where(Patient.id == patient_id).execute()


@attrs.frozen
class _Existing:
    id: int
    path: str
    size: int
    sha256: str
    transfer_syntax: str
    series_id: int
    study_id: int


class _Statements:
    """The statements of the C-STORE path, as SQL: building them with peewee for every
    instance would cost more than running them."""

    def __init__(self, database: peewee.Database, is_sqlite: bool):
        p = database.param
        instance, series, study = (Instance._meta.table_name, Series._meta.table_name,
                                   Study._meta.table_name)
        found = (f"SELECT id, path, size, sha256, transfer_syntax, series_id, study_id "
                 f"FROM {instance} WHERE sop_instance_uid = {p}")
        self.find_instance = found
        self.lock_instance = found if is_sqlite else found + " FOR UPDATE"
        self.find_series = f"SELECT id, study_id FROM {series} WHERE series_uid = {p}"
        columns = ("series_id", "study_id", "sop_class_uid", "instance_number",
                   "transfer_syntax", "path", "size", "sha256", "calling_ae", "address",
                   "received", "frames")
        self.insert_instance = (
            f"INSERT INTO {instance} ({', '.join(columns)}, sop_instance_uid) "
            f"VALUES ({', '.join([p] * (len(columns) + 1))})"
            + ("" if is_sqlite else " RETURNING id"))
        self.update_instance = (f"UPDATE {instance} SET "
                                + ", ".join(f"{column} = {p}" for column in columns)
                                + f" WHERE id = {p}")
        self.count_series = (f"UPDATE {series} SET num_instances = num_instances + {p}, "
                             f"size = size + {p}, updated = {p} WHERE id = {p}")
        self.count_study = (f"UPDATE {study} SET num_instances = num_instances + {p}, "
                            f"size = size + {p}, updated = {p} WHERE id = {p}")


def _unlink(path: str | Path) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("storage: cannot remove %s: %s", path, exc)
        return 0


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


_PURGE_LOCKS: dict[str, threading.Lock] = {}
_PURGE_LOCKS_LOCK = threading.Lock()


def _purge_lock(root: Path) -> threading.Lock:
    """One purge at a time per storage root in this process (worker and command)."""
    with _PURGE_LOCKS_LOCK:
        return _PURGE_LOCKS.setdefault(os.fspath(root), threading.Lock())


def _writer_active(name: str) -> bool:
    """True when the journal file ``name`` (``<pid>-...``) belongs to another running
    process, which may still be at work on it."""
    pid = name.partition("-")[0]
    return pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
