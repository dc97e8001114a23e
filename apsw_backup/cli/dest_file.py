"""What DEST holds, read from DEST itself: after a failure, and for --json.

- roll_back(): a copy into an existing DEST that failed in the middle of its
  commit (ENOSPC, EIO) leaves the DEST file torn, with the hot -journal
  beside it that restores it.  "DEST was left as it was" is only true once
  SQLite has rolled that journal back, so the command opens DEST and lets it
  do so before reporting; if it cannot, the report says DEST needs recovery.
- header_facts(): the page size, page count and journal mode of the copy,
  from DEST's own header (files.read_header: through SQLite, never a
  descriptor of ours, whose close() would drop the process's POSIX locks).
"""

from __future__ import annotations

import time
from typing import Any

from apsw_backup import files
from apsw_backup.cli.plan import Job

ROLLBACK_LIMIT = 5.0  # seconds roll_back() waits for another connection's lock


def roll_back(job: Job, seconds: float | None = None) -> None:
    """After a failed copy into an existing DEST: let SQLite roll a hot
    journal back now (files.roll_back_hot_journal; copy() already did, when
    it opened DEST itself); job.torn if that could not be done (DEST is then
    not "as it was" until it is)."""
    if not job.existed or job.committed or job.published:
        return
    limit = ROLLBACK_LIMIT if seconds is None else seconds
    job.torn = files.roll_back_hot_journal(job.dest, limit)


def header_facts(path: str) -> dict[str, Any]:
    """{"page_size", "pages", "journal_mode"} read from the header of the
    database file at path (files.read_header: through SQLite, never a
    descriptor of ours); {} when it cannot be read."""
    try:
        header = files.read_header(path)
    except OSError:
        return {}
    if len(header) < 100 or not header.startswith(files.SQLITE_HEADER):
        return {}
    facts: dict[str, Any] = {
        "page_size": files.header_page_size(header),
        "journal_mode": "wal" if files.header_is_wal(header) else "delete",
    }
    # The page count in the header is valid when the change counter (24)
    # matches "version-valid-for" (92), as every SQLite since 3.7.0 writes.
    if header[24:28] == header[92:96]:
        facts["pages"] = int.from_bytes(header[28:32], "big")
    return facts


def deadline_left(job: Job, timeout: float | None) -> float | None:
    """Seconds left of --timeout for this job (None: no limit)."""
    if timeout is None:
        return None
    return max(0.0, timeout - (time.monotonic() - job.started))
