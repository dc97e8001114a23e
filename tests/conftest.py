"""Shared fixtures for the apsw_backup test suite.

Every file a test touches lives under pytest's ``tmp_path``.  Databases that a
test only reads are built with the standard library's ``sqlite3`` module, so a
fixture never depends on the code under test working.
"""

import sqlite3

import pytest
from backup_helpers import Opener, build_file, make_old_content

import apsw_backup

ROWS = [(1, "one"), (2, "two"), (3, "three")]


def make_db(path, rows=ROWS):
    """Create a small database at ``path``: t(id INTEGER PRIMARY KEY, name TEXT)."""
    db = sqlite3.connect(str(path))
    try:
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany("INSERT INTO t VALUES (?, ?)", rows)
        db.commit()
    finally:
        db.close()
    return path


@pytest.fixture
def db_path(tmp_path):
    """Path of a database file that does not exist yet."""
    return tmp_path / "test.db"


@pytest.fixture
def populated_db(tmp_path):
    """Path of a small database holding table t with ROWS."""
    return make_db(tmp_path / "populated.db")


@pytest.fixture
def populated_rows():
    """The rows of table t in ``populated_db``, ordered by id."""
    return list(ROWS)


@pytest.fixture
def conn(db_path):
    """A read-write Connection on a fresh file in tmp_path, closed afterwards."""
    connection = apsw_backup.Connection(str(db_path))
    yield connection
    connection.close()


@pytest.fixture
def memconn():
    """A Connection on a private in-memory database, closed afterwards."""
    connection = apsw_backup.Connection(":memory:")
    yield connection
    connection.close()


@pytest.fixture
def open_connection():
    """Factory opening Connections that are all closed when the test ends."""
    opened = []

    def _open(*args, **kwargs):
        connection = apsw_backup.Connection(*args, **kwargs)
        opened.append(connection)
        return connection

    yield _open
    for connection in reversed(opened):
        connection.close()


# -- backups: a source file with content and a destination with old content --


@pytest.fixture
def connect(tmp_path):
    """Opener: connect("name.db") opens tmp_path/name.db; all closed at the end."""
    opener = Opener(tmp_path)
    yield opener
    opener.close_all()


@pytest.fixture
def src(connect):
    """The backup source: src.db built by backup_helpers.build_file."""
    build_file(connect.path("src.db"))
    return connect("src.db")


@pytest.fixture
def dest(connect):
    """The backup destination: dest.db holding the old content (OLD rows)."""
    conn = connect("dest.db")
    make_old_content(conn)
    return conn
