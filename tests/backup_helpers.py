"""Helpers shared by the ``tests/test_backup_*.py`` files.

Databases are filled by running the same list of SQL statements through
either an ``apsw_backup.Connection`` or a standard library ``sqlite3``
connection (opened in autocommit mode), so a source can be built without the
code under test where that is possible.  Copies are compared by ``dump()``:
the schema rows of ``sqlite_master`` plus every row of every table.
"""

import contextlib
import sqlite3
import threading

import apsw_backup

# Words every message of the destination lock (docs/locking.md) must contain.
LOCK_WORDS = ("unfinished backup", "finish")


def populate_statements(schema="main", rows=400, blob=1500, page_size=None, wal=False):
    """SQL that gives ``schema`` a table with an index, a view, a trigger and
    ``rows`` rows of ``blob`` random bytes (about two rows a 4 KiB page)."""
    q = f'"{schema}".'
    statements = []
    if page_size is not None:
        statements.append(f"PRAGMA {q}page_size={page_size}")
    if wal:
        statements.append(f"PRAGMA {q}journal_mode=wal")
    statements += [
        f"CREATE TABLE {q}t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, data BLOB)",
        f"CREATE INDEX {q}t_name ON t(name)",
        f"CREATE TABLE {q}log(id INTEGER PRIMARY KEY, note TEXT)",
        f"CREATE VIEW {q}even AS SELECT id, name FROM t WHERE id % 2 = 0",
        (
            f"CREATE TRIGGER {q}t_log AFTER INSERT ON t "
            "BEGIN INSERT INTO log(note) VALUES ('added ' || new.name); END"
        ),
        (
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
            f"WHERE i < {rows}) INSERT INTO {q}t(name, data) "
            f"SELECT 'row' || i, randomblob({blob}) FROM c"
        ),
    ]
    return statements


def populate(conn, **kwargs):
    """Fill a connection (apsw_backup or sqlite3) with populate_statements()."""
    for sql in populate_statements(**kwargs):
        conn.execute(sql).fetchall()
    return conn


def build_file(path, **kwargs):
    """Create a populated database file with the standard library's sqlite3."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=off")  # a fixture need not survive a crash
        populate(db, **kwargs)
    finally:
        db.close()
    return path


def make_old_content(conn, schema="main", rows=3):
    """The content a destination had before a backup: table old(n)."""
    conn.execute(f'CREATE TABLE "{schema}".old(n INTEGER)').fetchall()
    conn.executemany(
        f'INSERT INTO "{schema}".old VALUES (?)', [(n,) for n in range(rows)]
    ).fetchall()


def dump(conn, schema="main"):
    """(schema rows, {table: rows}) of one schema of an apsw_backup.Connection."""
    master = conn.execute(
        f'SELECT type, name, tbl_name, sql FROM "{schema}".sqlite_master '
        "ORDER BY type, name"
    ).fetchall()
    tables = {
        name: conn.execute(
            f'SELECT * FROM "{schema}"."{name}" ORDER BY rowid'
        ).fetchall()
        for kind, name, _, _ in master
        if kind == "table" and not name.startswith("sqlite_")
    }
    return master, tables


def integrity(conn, schema="main"):
    return conn.execute(f'PRAGMA "{schema}".integrity_check').fetchall()


def dump_path(path):
    """dump() and integrity_check of a database file, read by a fresh Connection."""
    conn = apsw_backup.Connection(str(path), apsw_backup.SQLITE_OPEN_READONLY)
    try:
        return dump(conn), integrity(conn)
    finally:
        conn.close()


def page_size(conn, schema="main"):
    return conn.execute(f'PRAGMA "{schema}".page_size').fetchall()[0][0]


def user_loop(dest, dest_name, source, source_name, npages=100):
    """The user's loop of docs/api.md#backup; returns the (remaining, page_count) seen."""
    seen = []
    with dest.backup(dest_name, source, source_name) as b:
        while not b.done:
            b.step(npages)
            seen.append((b.remaining, b.page_count))
    return seen


@contextlib.contextmanager
def exclusive_lock(path):
    """Another connection holding BEGIN EXCLUSIVE on the database at path."""
    other = apsw_backup.Connection(str(path))
    other.execute("BEGIN EXCLUSIVE").fetchall()
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("COMMIT").fetchall()
        other.close()


def in_thread(func, timeout=10):
    """Run func() in another thread; return the exception it raised (or None)."""
    outcome = {}

    def run():
        try:
            func()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call in the other thread did not return"
    return outcome.get("exc")


class Opener:
    """Opens Connections on files under tmp_path (or ":memory:") and closes
    them all, with force, when the test ends."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.opened = []

    def path(self, name):
        return self.tmp_path / name

    def __call__(self, name, *args, **kwargs):
        filename = name if name in (":memory:", "") else str(self.path(name))
        conn = apsw_backup.Connection(filename, *args, **kwargs)
        self.opened.append(conn)
        return conn

    def close_all(self):
        for conn in reversed(self.opened):
            conn.close(force=True)
