"""Verification levels (apsw_backup.verify): the full level splits
PRAGMA integrity_check over threads without losing any of its checks; the
result says ok / problems / could not verify, within a deadline, with
progress."""

import os
import sqlite3
import struct
import threading
import time

import pytest
from verify_helpers import (
    build,
    disagreeing_index,
    leaf_pages,
    page_size_of,
    root_page,
    write_page,
)

import apsw_backup
from apsw_backup import verify

needs_table_check = pytest.mark.skipif(
    verify._runtime_version() < verify.TABLE_CHECK_VERSION,
    reason="PRAGMA integrity_check(TABLE) needs SQLite 3.33",
)


def plain_integrity_check(path):
    """What one plain PRAGMA integrity_check reports: its lines, and the
    error that stopped it (or None)."""
    db = apsw_backup.Connection(str(path), apsw_backup.SQLITE_OPEN_READONLY)
    rows, stopped = [], None
    try:
        for row in db.execute("PRAGMA integrity_check"):
            rows.append(row)
    except (apsw_backup.CorruptError, apsw_backup.NotADBError) as exc:
        stopped = exc  # what it said before it stopped still counts
    finally:
        db.close()
    return (verify.problem_lines(rows) if rows else []), stopped


# -- damaged databases -------------------------------------------------------


def damage_table_leaf(path):
    build(path, rows=600)
    write_page(path, leaf_pages(path, "events")[2])


def damage_index_leaf(path):
    build(path, rows=600)
    write_page(path, leaf_pages(path, "events_kind")[1])


def damage_index_content(path):
    disagreeing_index(path)


def damage_freelist(path):
    build(path, rows=600)
    db = sqlite3.connect(str(path))
    db.execute("DELETE FROM events WHERE id % 3 = 0")  # free pages
    db.commit()
    db.close()
    # Point the freelist's trunk at a page the users table uses.
    blob = bytearray(path.read_bytes())
    assert struct.unpack(">I", blob[36:40])[0] > 0, "no free pages"
    blob[32:36] = struct.pack(">I", root_page(path, "users"))
    path.write_bytes(bytes(blob))


def damage_unused_pages(path):
    build(path, rows=600)
    # Two pages no b-tree uses: the file and the header's page count grow.
    size = page_size_of(path)
    blob = bytearray(path.read_bytes()) + bytes(2 * size)
    count = struct.unpack(">I", blob[28:32])[0]
    blob[28:32] = struct.pack(">I", count + 2)
    path.write_bytes(bytes(blob))


def damage_shared_root(path):
    # The index's b-tree is replaced, in the schema, by the users table's:
    # the index's own pages are used by nothing (only a whole-file pass can
    # tell) and one root page belongs to two b-trees.
    build(path, rows=600)
    users = root_page(path, "users")
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA writable_schema=ON")
    db.execute("UPDATE sqlite_master SET rootpage=? WHERE name='events_kind'", (users,))
    db.commit()
    db.close()


DAMAGES = {
    "table leaf zeroed": damage_table_leaf,
    "index leaf zeroed": damage_index_leaf,
    "index disagrees with its table": damage_index_content,
    "freelist points into a table": damage_freelist,
    "pages never used": damage_unused_pages,
    "one page in two b-trees": damage_shared_root,
}


@needs_table_check
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_the_split_check_finds_everything_plain_integrity_check_finds(tmp_path, damage):
    path = tmp_path / "damaged.db"
    DAMAGES[damage](path)
    plain, stopped = plain_integrity_check(path)
    assert plain or stopped, f"{damage}: the damage is not one integrity_check sees"
    assert len(plain) < 100, "past integrity_check's error limit"
    for threads in (1, 2, 4):
        outcome = verify.verify(path, "full", threads=threads)
        assert outcome.status == verify.PROBLEMS, (damage, threads, outcome)
        found = {p.message for p in outcome.problems}
        missing = [line for line in plain if line not in found]
        assert missing == [], (damage, threads, missing)


@needs_table_check
def test_the_split_is_by_table_with_one_whole_quick_check(tmp_path):
    path = build(tmp_path / "db.db")
    outcome = verify.verify(path, "full", threads=1)
    assert outcome.ok and outcome.exit_code == 0
    names = {c.name: c.outcome for c in outcome.checks}
    assert names == {
        "read_back": "skipped",
        "quick_check": "ok",
        "integrity_check(sqlite_master)": "ok",
        "integrity_check(users)": "ok",
        "integrity_check(events)": "ok",
    }


@needs_table_check
def test_a_table_too_large_for_one_thread_is_checked_in_pieces(tmp_path):
    """events holds most of the work: on 2 threads its rows are looked up
    in its indexes (as integrity_check(events) would), one index and one
    range of rows a piece, plus one piece for the index entry counts;
    users stays one check."""
    path = build(tmp_path / "db.db")
    outcome = verify.verify(path, "full", threads=2)
    assert outcome.ok
    names = {c.name for c in outcome.checks}
    pieces = sorted(n for n in names if n.startswith("integrity_check(events rows"))
    assert len(pieces) >= 2 and "integrity_check(events)" not in names
    assert {"integrity_check(events index counts)", "integrity_check(users)"} <= names
    spans: dict[str, list[list[int]]] = {}
    for c in outcome.checks:
        if "rowids" in c.detail:
            spans.setdefault(c.detail["index"], []).append(c.detail["rowids"])
    assert sorted(spans) == ["events_kind", "events_user"]  # every index
    for index, ranges in spans.items():
        assert min(a for a, _ in ranges) == 1 and max(b for _, b in ranges) == 3000
        assert sum(b - a + 1 for a, b in ranges) == 3000, index  # every row, once


def damage_index_content_with_gaps(path):
    """Rows deleted first: integrity_check numbers a missing row by its
    place in the table, not by its rowid; the pieces must too (85 rows
    left: under integrity_check's limit of 100 problems)."""
    build(path, rows=600)
    db = sqlite3.connect(str(path))
    db.execute("DELETE FROM events WHERE id % 7 != 0")
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX events_kind ON events(user_id)' "
        "WHERE name='events_kind'"
    )
    db.commit()
    db.close()


def damage_extra_index_entries(path):
    """An index with two entries more than its table has rows: events_user
    is given the b-tree of an index of a copy of events with two rows more."""
    build(path, rows=600)
    db = sqlite3.connect(str(path))
    db.executescript(
        """
        CREATE TABLE shadow(id INTEGER PRIMARY KEY, user_id, kind, at, body);
        INSERT INTO shadow SELECT * FROM events;
        INSERT INTO shadow(user_id, kind, at) VALUES (1, 'x', 1), (2, 'y', 2);
        CREATE INDEX shadow_user ON shadow(user_id, at);
        PRAGMA writable_schema=ON;
        UPDATE sqlite_master SET rootpage=(
            SELECT rootpage FROM sqlite_master WHERE name='shadow_user')
        WHERE name='events_user';
        DELETE FROM sqlite_master WHERE name='shadow_user';
        """
    )
    db.commit()
    db.close()


def damage_duplicate_in_unique_index(path):
    """Two equal entries in a UNIQUE index (its table rows made equal while
    the index was not UNIQUE in the schema)."""
    build(path, rows=600)
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX events_kind ON events(kind)' "
        "WHERE name='events_kind'"
    )
    db.commit()
    db.close()
    db = sqlite3.connect(str(path))
    db.execute("UPDATE events SET kind='same' WHERE id IN (5, 6)")
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET "
        "sql='CREATE UNIQUE INDEX events_kind ON events(kind)' "
        "WHERE name='events_kind'"
    )
    db.commit()
    db.close()


SPLIT_DAMAGES = {
    "index disagrees, rowids with gaps": damage_index_content_with_gaps,
    "index entries of deleted rows": damage_extra_index_entries,
    "duplicates in a UNIQUE index": damage_duplicate_in_unique_index,
}


@needs_table_check
@pytest.mark.parametrize("damage", list(SPLIT_DAMAGES))
def test_the_pieces_report_what_integrity_check_reports(tmp_path, damage):
    path = tmp_path / "damaged.db"
    SPLIT_DAMAGES[damage](path)
    plain, stopped = plain_integrity_check(path)
    assert plain and stopped is None, f"{damage}: not seen by integrity_check"
    outcome = verify.verify(path, "full", threads=4)
    assert any("events rows" in c.name for c in outcome.checks), "not split"
    found = {p.message for p in outcome.problems}
    assert [line for line in plain if line not in found] == []
    # and nothing integrity_check itself does not say
    assert found <= set(plain) | {
        p.message for p in outcome.problems if p.check == "quick_check"
    }


def test_an_index_that_disagrees_with_its_table_is_found_at_the_full_level_only(
    tmp_path,
):
    path = disagreeing_index(tmp_path / "db.db")
    default = verify.verify(path)
    assert default.ok, "quick_check does not compare indexes with tables"
    full = verify.verify(path, "full")
    assert full.status == verify.PROBLEMS and full.exit_code == 3
    assert any("missing from index events_kind" in p.message for p in full.problems)


def test_sqlite_without_table_checks_runs_the_whole_check_on_one_connection(
    tmp_path, monkeypatch
):
    path = disagreeing_index(tmp_path / "db.db")
    monkeypatch.setattr(verify, "_runtime_version", lambda: 3032000)
    outcome = verify.verify(path, "full")
    assert [c.name for c in outcome.checks] == ["read_back", "integrity_check"]
    assert outcome.status == verify.PROBLEMS
    assert any("missing from index events_kind" in p.message for p in outcome.problems)


@needs_table_check
def test_a_table_named_like_a_number_gets_the_whole_check(tmp_path):
    # integrity_check(5) would read 5 as its error limit, not a table.
    path = tmp_path / "db.db"
    db = sqlite3.connect(str(path))
    db.execute('CREATE TABLE "5"(x)')
    db.execute('INSERT INTO "5" VALUES (1)')
    db.commit()
    db.close()
    outcome = verify.verify(path, "full")
    assert outcome.ok
    assert [c.name for c in outcome.checks] == ["read_back", "integrity_check"]


def test_a_file_that_is_no_database_is_a_problem_and_a_missing_one_unverified(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 300)
    outcome = verify.verify(junk, "full")
    assert outcome.status == verify.PROBLEMS and outcome.exit_code == 3
    missing = verify.verify(tmp_path / "missing.db")
    assert missing.status == verify.UNVERIFIED and missing.exit_code == 1
    assert isinstance(missing.error, OSError)


def test_bad_arguments_are_refused(tmp_path):
    path = build(tmp_path / "db.db", rows=30)
    with pytest.raises(ValueError, match="unknown verification level 'fast'"):
        verify.verify(path, "fast")
    with pytest.raises(ValueError, match="timeout"):
        verify.verify(path, timeout=-1)


def hold_exclusive_lock(path, started, release, held):
    """Holds an exclusive lock on path from `started` until the test sets
    `release` (at most 30 s); held["until_released"] says whether the lock
    was held all that time, i.e. all through what the test did meanwhile."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    db.execute("UPDATE users SET name = name")
    started.set()
    held["until_released"] = release.wait(30)
    db.execute("ROLLBACK")
    db.close()


def test_a_deadline_ends_verification_as_unverified(tmp_path):
    path = build(tmp_path / "db.db", rows=300)
    started, release, held = threading.Event(), threading.Event(), {}
    holder = threading.Thread(
        target=hold_exclusive_lock, args=(path, started, release, held)
    )
    holder.start()
    try:
        assert started.wait(30)
        begun = time.monotonic()
        outcome = verify.verify(path, "full", timeout=0.3)
        elapsed = time.monotonic() - begun
    finally:
        release.set()
        holder.join(30)
    assert held["until_released"], "the lock was let go of during verify()"
    assert outcome.status == verify.UNVERIFIED and outcome.exit_code == 1
    assert "did not finish within 0.3 s" in outcome.reason
    assert elapsed < 2.5, "the checks waited past the deadline"


def wal_file_with_frames(folder):
    """A WAL database whose last commit is only in its -wal."""
    live = folder / "live.db"
    db = sqlite3.connect(str(live), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t(x)")
    db.execute("INSERT INTO t VALUES (1)")
    copied = folder / "copied.db"
    copied.write_bytes(live.read_bytes())
    (folder / "copied.db-wal").write_bytes((folder / "live.db-wal").read_bytes())
    db.close()
    return copied


@pytest.mark.parametrize("level", ["default", "full"])
def test_verify_never_checkpoints_nor_deletes_a_wal_with_frames(tmp_path, level):
    path = wal_file_with_frames(tmp_path)
    wal = tmp_path / "copied.db-wal"
    before = path.read_bytes(), wal.read_bytes()
    outcome = verify.verify(path, level)
    assert outcome.ok, outcome
    assert (path.read_bytes(), wal.read_bytes()) == before


def test_a_deadline_interrupts_a_running_check(tmp_path):
    path = build(tmp_path / "db.db", rows=40000)
    begun = time.monotonic()
    whole = verify.verify(path, "full", threads=1)
    took = time.monotonic() - begun
    assert whole.ok
    begun = time.monotonic()
    cut = verify.verify(path, "full", threads=1, timeout=took / 10)
    elapsed = time.monotonic() - begun
    assert cut.status == verify.UNVERIFIED, cut
    assert elapsed < took * 0.8 + 0.3


def test_progress_reports_a_fraction_and_an_eta(tmp_path):
    path = build(tmp_path / "db.db", rows=300)
    started, release, held = threading.Event(), threading.Event(), {}
    holder = threading.Thread(
        target=hold_exclusive_lock, args=(path, started, release, held)
    )
    holder.start()
    seen = []
    released_by_progress = []

    def progress(p):
        seen.append(p)
        if len(seen) == 3:  # reported while waiting for the lock: let it go
            released_by_progress.append(True)
            release.set()

    try:
        assert started.wait(30)
        outcome = verify.verify(path, "full", progress=progress)
    finally:
        release.set()
        holder.join(30)
    assert released_by_progress and held["until_released"], (
        "verify() did not report progress while it waited for the lock"
    )
    assert outcome.ok
    assert len(seen) >= 2
    for p in seen:
        assert p.phase == "verifying (full)"
        assert 0.0 <= p.fraction <= 1.0 and p.elapsed >= 0
        assert p.eta is None or p.eta >= 0
    assert any(p.running for p in seen)


@needs_table_check
def test_the_result_says_what_ran_for_json(tmp_path):
    path = disagreeing_index(tmp_path / "db.db")
    data = verify.verify(path, "full", threads=1).to_json()
    assert data["status"] == "problems" and data["level"] == "full"
    assert {c["name"] for c in data["checks"]} >= {
        "quick_check",
        "integrity_check(events)",
    }
    assert all(c["seconds"] >= 0 and c["outcome"] for c in data["checks"])
    assert data["problems"][0]["check"] == "integrity_check"


def test_pages_are_read_from_problem_messages():
    assert verify.pages_named("Tree 4 page 27 cell 3: invalid page number 99") == (27,)
    assert verify.pages_named("Page 5 is never used") == (5,)
    assert verify.pages_named("row 3 missing from index i") == ()
    assert verify.problem_lines(
        [("*** in database main ***\nPage 2: x\nPage 3: y",)]
    ) == [
        "Page 2: x",
        "Page 3: y",
    ]
    assert verify.problem_lines([("ok",)]) == []


def test_an_unreadable_page_is_a_failure_to_verify(tmp_path, monkeypatch):
    # integrity_check reports a page it could not read (an I/O error) as a
    # problem of the file; it says nothing about the content.
    line = "Page 3: unable to get the page. error code=266"
    with pytest.raises(verify._Unverified, match="could not read Page 3"):
        verify._raise_if_unreadable([line], "integrity_check")
    verify._raise_if_unreadable(["Page 3: unable to get the page. error code=11"], "x")


def test_interrupting_verification_stops_the_threads(tmp_path):
    path = build(tmp_path / "db.db", rows=300)
    started, release, held = threading.Event(), threading.Event(), {}
    holder = threading.Thread(
        target=hold_exclusive_lock, args=(path, started, release, held)
    )
    holder.start()

    def stop(progress):
        raise KeyboardInterrupt

    try:
        assert started.wait(30)
        before = threading.active_count()
        with pytest.raises(KeyboardInterrupt):
            verify.verify(path, "full", progress=stop)
        assert threading.active_count() <= before
    finally:
        release.set()
        holder.join(30)
    assert held["until_released"], "the lock was let go of during verify()"


def test_busy_connections_do_not_leave_threads(tmp_path):
    path = build(tmp_path / "db.db", rows=30)
    before = threading.active_count()
    for _ in range(3):
        assert verify.verify(path, "full").ok
    assert threading.active_count() == before


def test_apsw_backup_connection_can_be_checked_while_open_elsewhere(tmp_path):
    path = build(tmp_path / "db.db", rows=300)
    conn = apsw_backup.Connection(str(path))
    try:
        conn.execute("SELECT count(*) FROM users").fetchall()
        assert verify.verify(path, "full").ok
    finally:
        conn.close()


@needs_table_check
def test_virtual_and_without_rowid_tables_are_checked(tmp_path):
    path = build(tmp_path / "db.db", rows=300)
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v) WITHOUT ROWID")
    db.execute("CREATE INDEX kv_v ON kv(v)")
    db.executemany(
        "INSERT INTO kv VALUES (?, ?)", [(f"k{i}", i % 7) for i in range(500)]
    )
    try:
        db.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
        db.executemany(
            "INSERT INTO docs VALUES (?)", [(f"word {i}",) for i in range(50)]
        )
    except sqlite3.OperationalError:
        pass  # no FTS5 in this build
    db.commit()
    db.close()
    outcome = verify.verify(path, "full")
    assert outcome.ok, outcome
    assert "integrity_check(kv)" in {c.name for c in outcome.checks}
    # the index of the WITHOUT ROWID table, made to disagree, is found
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX kv_v ON kv(k)' WHERE name='kv_v'"
    )
    db.commit()
    db.close()
    plain, _ = plain_integrity_check(path)
    outcome = verify.verify(path, "full")
    assert plain and outcome.status == verify.PROBLEMS
    assert set(plain) <= {p.message for p in outcome.problems}


def test_a_locked_file_is_waited_for_lock_wait_or_the_deadline(tmp_path):
    path = build(tmp_path / "db.db", rows=300)
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        waited = verify.verify(path, "full", lock_wait=0.2)
        timed = verify.verify(path, "default", timeout=0.3)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert waited.status == verify.UNVERIFIED and waited.exit_code == 1
    assert waited.locked and not waited.timed_out
    assert "locked by another connection" in (waited.reason or "")
    assert timed.status == verify.UNVERIFIED and timed.locked and timed.timed_out
    assert (timed.reason or "").endswith("the file was locked by another connection")
    assert timed.to_json()["locked"] is True


def test_verifying_a_wal_file_writes_nothing_and_leaves_nothing(tmp_path):
    path = build(tmp_path / "db.db", rows=300, wal=True)
    before = path.read_bytes()
    for level in ("default", "full"):
        assert verify.verify(path, level).ok
    assert sorted(os.listdir(tmp_path)) == ["db.db"]
    assert path.read_bytes() == before


@needs_table_check
def test_each_thread_keeps_one_lookup_connection_for_all_its_pieces(
    tmp_path, monkeypatch
):
    """The pieces and integrity_check(T) of one thread share a connection
    (its page cache stays filled): no more lookup connections are opened
    than there are threads, and all of them are closed at the end."""
    path = build(tmp_path / "db.db")
    opened, closed = [], []
    real_open, real_close = verify._Run.open, verify._Run.close

    def counting_open(self, lookups=False):
        conn = real_open(self, lookups)
        if lookups:
            opened.append(conn)
        return conn

    def counting_close(self, conn):
        closed.append(conn)
        real_close(self, conn)

    monkeypatch.setattr(verify._Run, "open", counting_open)
    monkeypatch.setattr(verify._Run, "close", counting_close)
    outcome = verify.verify(path, "full", threads=2)
    assert outcome.ok
    lookups = [c for c in outcome.checks if c.name.startswith("integrity_check(")]
    assert len(lookups) >= 5  # pieces of events, users, sqlite_master
    assert 1 <= len(opened) <= 2
    assert all(conn in closed for conn in opened)


@needs_table_check
def test_a_piece_that_fails_does_not_leave_its_connection_to_the_next(
    tmp_path, monkeypatch
):
    """A lookup that raised closes the thread's connection; the thread's
    next piece opens a new one and still checks its rows."""
    path = damage_index_content_with_gaps_path(tmp_path)
    failures = []
    real = verify._IndexSplit._lookups

    def failing_once(self, index, first, last):
        run = real(self, index, first, last)

        def wrapped(ctx, task):
            if not failures:
                conn = ctx.lookup_connection()
                failures.append(conn)
                conn.close(force=True)  # the next execute on it raises
            return run(ctx, task)

        return wrapped

    monkeypatch.setattr(verify._IndexSplit, "_lookups", failing_once)
    outcome = verify.verify(path, "full", threads=2)
    assert failures
    failed = [c.name for c in outcome.checks if c.outcome == verify.UNVERIFIED]
    assert len(failed) == 1, failed
    # every other piece ran on a connection of its own, and found its rows
    plain, _ = plain_integrity_check(path)
    found = {p.message for p in outcome.problems}
    assert found and found <= set(plain) | {
        p.message for p in outcome.problems if p.check == "quick_check"
    }


def damage_index_content_with_gaps_path(tmp_path):
    path = tmp_path / "damaged.db"
    damage_index_content_with_gaps(path)
    return path
