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

import os
import time
from typing import Any

from apsw_backup import _apsw_backup as _c
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
    if facts["journal_mode"] == "wal" and _wal_size(path) > 0:
        # The file's header is the last checkpoint's: the copy's own page 1
        # may still be in the -wal (a reader kept the checkpoint from
        # finishing).  Ask SQLite, which reads through the -wal.
        facts.pop("pages", None)
        facts.update(_through_sqlite(path))
    return facts


def _wal_size(path: str) -> int:
    """The size of path's -wal (0 when there is none): with none, the
    header is the database's, and no connection (which would make a -wal
    and a -shm beside DEST) is opened."""
    try:
        return os.stat(path + "-wal").st_size
    except OSError:
        return 0


def _through_sqlite(path: str) -> dict[str, Any]:
    """{"page_size", "pages"} of the database at path as SQLite reads it
    (a read-only connection of its own: its close drops no lock of the
    process's other connections, SQLite's unix VFS keeps the descriptor);
    {} when it cannot be read (the caller then says what the copy wrote,
    never the stale header's figure)."""
    try:
        conn = _c.Connection(os.path.abspath(path), _c.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(1000)
            pages = conn.execute("PRAGMA main.page_count").fetchall()[0][0]
            size = conn.execute("PRAGMA main.page_size").fetchall()[0][0]
        finally:
            conn.close()
    except _c.Error:
        return {}
    if not isinstance(pages, int) or not isinstance(size, int):
        return {}
    return {"pages": pages, "page_size": size}


def deadline_left(job: Job, timeout: float | None) -> float | None:
    """Seconds left of --timeout for this job (None: no limit)."""
    if timeout is None:
        return None
    return max(0.0, timeout - (time.monotonic() - job.started))
