"""What the incremental tests build their chains from: a table of random
blobs, a share of its rows changed, a byte of a point flipped."""

from __future__ import annotations

import os
import sqlite3


def make_blobs(path, rows=3000, wal=False):
    """A database at path with table t(id, b): rows blobs of 300 bytes."""
    db = sqlite3.connect(os.fsdecode(path))
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    db.executemany("INSERT INTO t(b) VALUES (randomblob(300))", [()] * rows)
    db.commit()
    db.close()


def change_blobs(path, every=211):
    """New blobs for the rows of t whose id is a multiple of every."""
    db = sqlite3.connect(os.fsdecode(path))
    db.execute("UPDATE t SET b = randomblob(300) WHERE id % ? = 0", (every,))
    db.commit()
    db.close()


def flip(path, offset, mask=0x40):
    """One byte of a file (a restore point, never a database) altered."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))
