"""Databases made with the standard library for the copy() and CLI tests,
so that a fixture never depends on the code under test."""

import sqlite3


def make_source(path, rows=300, blob=400, journal="delete"):
    """Table t(id, data) of ``rows`` random blobs, and an empty table
    w(id, at, n) for writers to append to."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute(f"PRAGMA journal_mode={journal}")
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, data BLOB)")
        db.execute("CREATE TABLE w(id INTEGER PRIMARY KEY, at REAL, n INTEGER)")
        db.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
            f"WHERE i < {rows}) INSERT INTO t(data) SELECT randomblob({blob}) FROM c"
        )
    finally:
        db.close()
    return path


def make_target(path):
    """A database holding only table old(note) = 'old content'."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("CREATE TABLE old(note TEXT)")
        db.execute("INSERT INTO old VALUES ('old content')")
    finally:
        db.close()
    return path


def query(path, sql):
    db = sqlite3.connect(str(path))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()
