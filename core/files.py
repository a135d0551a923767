"""Writing files that must survive a crash: whole or not at all, and on disk when it
says so. Plugins that keep files (pictures, exports) use these instead of their own."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

#: Prefix of the temporary files :func:`write_durably` makes; a sweep at start may
#: remove leftovers with :func:`sweep_temporary`.
TEMPORARY_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder, so that a file created, renamed or removed in it stays so."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one,
    never a part: a temporary file in the same folder, flushed (when ``durable``),
    renamed over ``path``, and the folder flushed. Missing folders are created."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(temporary, "xb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fdatasync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(folder)


def remove_durably(paths: list[Path], durable: bool = True) -> None:
    """Remove files (those already gone are fine) and flush their folders."""
    folders = set()
    for path in paths:
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    if durable:
        for folder in folders:
            if folder.is_dir():
                fsync_dir(folder)


def sweep_temporary(root: Path) -> int:
    """Remove what :func:`write_durably` left behind in ``root``'s sub-folders after a
    crash; returns how many files went. Call it before anything writes there."""
    removed = 0
    if not root.is_dir():
        return 0
    for path in root.glob(f"*/{TEMPORARY_PREFIX}*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
