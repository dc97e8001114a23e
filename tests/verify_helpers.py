"""Databases for the verification tests: built with the standard library's
sqlite3 (the same system libsqlite3), damaged on purpose where asked."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import apsw_backup


def build(
    path: Path, rows: int = 3000, page_size: int = 4096, wal: bool = False
) -> Path:
    """Two tables, three indexes (like the issue's database, small)."""
    rnd = random.Random(rows)
    db = sqlite3.connect(str(path))
    try:
        db.execute(f"PRAGMA page_size={page_size}")
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        db.executescript(
            """
            CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT NOT NULL,
                               email TEXT UNIQUE, joined INTEGER);
            CREATE TABLE events(id INTEGER PRIMARY KEY, user_id INTEGER,
                                kind TEXT, at INTEGER, body BLOB);
            CREATE INDEX events_user ON events(user_id, at);
            CREATE INDEX events_kind ON events(kind);
            """
        )
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?, ?)",
            [
                (i, f"user {i}", f"u{i}@example.org", rnd.randrange(10**9))
                for i in range(rows // 3)
            ],
        )
        db.executemany(
            "INSERT INTO events(user_id, kind, at, body) VALUES (?, ?, ?, ?)",
            [
                (
                    rnd.randrange(rows // 3),
                    rnd.choice("abcdefgh") * 3,
                    rnd.randrange(10**9),
                    rnd.randbytes(rnd.randrange(20, 200)),
                )
                for _ in range(rows)
            ],
        )
        db.commit()
    finally:
        db.close()
    return path


def page_size_of(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(100)
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def root_page(path: Path, name: str) -> int:
    db = sqlite3.connect(str(path))
    try:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name=?", (name,)
        ).fetchone()
    finally:
        db.close()
    return int(root)


def leaf_pages(path: Path, name: str) -> list[int]:
    """Pages of the b-tree `name` (needs the dbstat table), else [root]."""
    db = sqlite3.connect(str(path))
    try:
        try:
            rows = db.execute(
                "SELECT pageno FROM dbstat WHERE name=? AND pagetype='leaf'", (name,)
            ).fetchall()
            return [int(r[0]) for r in rows]
        except sqlite3.OperationalError:
            return [root_page(path, name)]
    finally:
        db.close()


def write_page(path: Path, pgno: int, data: bytes | None = None) -> None:
    """Overwrite page pgno (1-based) with data (zeros by default).  Only for
    files no connection of this process has open."""
    size = page_size_of(path)
    with open(path, "r+b") as f:
        f.seek((pgno - 1) * size)
        f.write(data if data is not None else bytes(size))


def read_pages(path: Path) -> list[bytes]:
    size = page_size_of(path)
    blob = Path(path).read_bytes()
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def backup_recorded(
    source: Path, dest: Path, recorder: apsw_backup.PageRecorder, pages: int = -1
) -> None:
    """Back source up into dest through the recorder's VFS, then close."""
    src = apsw_backup.Connection(str(source), apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(str(dest), vfs=recorder.vfs)
    try:
        with dst.backup("main", src, "main") as b:
            while not b.step(pages):
                pass
    finally:
        dst.close()
        src.close()


def disagreeing_index(path: Path, rows: int = 60) -> Path:
    """A database whose index events_kind holds the `kind` column while the
    schema says it indexes `user_id`: every row is missing from the index
    as SQLite reads it, yet every b-tree is sound (quick_check: ok)."""
    build(path, rows=rows)
    db = sqlite3.connect(str(path))
    try:
        db.execute("PRAGMA writable_schema=ON")
        db.execute(
            "UPDATE sqlite_master SET sql='CREATE INDEX events_kind ON events(user_id)' "
            "WHERE name='events_kind'"
        )
        db.commit()
    finally:
        db.close()
    return path


def cpu_count() -> int:
    return (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1)
    )
