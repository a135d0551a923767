"""The ``[storage]`` config section."""

from __future__ import annotations

from pathlib import Path

import attrs

KEEP_FIRST = "keep-first"
OVERWRITE = "overwrite"
OVERWRITE_IF_DIFFERENT = "overwrite-if-different"
DUPLICATE_POLICIES = (KEEP_FIRST, OVERWRITE, OVERWRITE_IF_DIFFERENT)


@attrs.frozen
class StorageSettings:
    """Where received instances are kept and what happens to a second copy."""

    #: Folder of the stored files; a relative path is inside ``gateway.data_dir``.
    root: Path = Path("files")
    #: What a second instance with an already stored SOP Instance UID does.
    duplicates: str = attrs.field(default=KEEP_FIRST,
                                  validator=attrs.validators.in_(DUPLICATE_POLICIES))
    #: Free space (MiB) the storage filesystem keeps: below it C-STORE answers 0xA700.
    reserve_mb: int = attrs.field(default=500, validator=attrs.validators.ge(0))
    #: Days a study is kept after its last instance arrived; 0 keeps every study forever.
    keep_days: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    # Flushing files, folders and the index to disk before answering success is the
    # gateway-wide [gateway] durable setting, not one of this section's.


EXAMPLE = """\
[storage]
# Storage SCP: receives images from modalities, PACS and workstations, keeps each as
# it arrived (DICOM Part 10 file) and indexes it by patient, study and series.
# Folder of the stored files; a relative path is inside gateway.data_dir. Keep it on
# one filesystem (temporary files live in its hidden sub-folders).
root = "files"
# A second instance with an already stored SOP Instance UID:
#   "keep-first"             keep the stored one, answer success (default)
#   "overwrite"              replace it (the old file stays until the new one is safe)
#   "overwrite-if-different" replace it only when the data set differs
duplicates = "keep-first"
# Free space (MiB) to keep on the storage filesystem; below it senders get 0xA700
# (out of resources) and can retry later.
reserve_mb = 500
# Retention: a study is deleted (its files and index rows, never part of a study)
# once its last instance arrived more than this many days ago. Checked when the
# gateway starts and then every hour; `dicomgate studies purge --dry-run` shows what
# would go. 0 keeps every study forever (default).
keep_days = 0
# Each file, its folder and the index are flushed to disk before success is
# answered, unless [gateway] durable = false (benchmarks only).
"""
