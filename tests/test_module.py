"""Module-level items (docs/api.md#module) and the exception classes (docs/api.md#errors)."""

import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import apsw_backup

# Values from sqlite3.h; they are part of SQLite's stable ABI.
OPEN_FLAGS = {
    "SQLITE_OPEN_READONLY": 0x00000001,
    "SQLITE_OPEN_READWRITE": 0x00000002,
    "SQLITE_OPEN_CREATE": 0x00000004,
    "SQLITE_OPEN_URI": 0x00000040,
    "SQLITE_OPEN_MEMORY": 0x00000080,
    "SQLITE_OPEN_NOMUTEX": 0x00008000,
    "SQLITE_OPEN_FULLMUTEX": 0x00010000,
    "SQLITE_OPEN_SHAREDCACHE": 0x00020000,
    "SQLITE_OPEN_PRIVATECACHE": 0x00040000,
}

RESULT_CODES = {
    "SQLITE_OK": 0,
    "SQLITE_ERROR": 1,
    "SQLITE_INTERNAL": 2,
    "SQLITE_PERM": 3,
    "SQLITE_ABORT": 4,
    "SQLITE_BUSY": 5,
    "SQLITE_LOCKED": 6,
    "SQLITE_NOMEM": 7,
    "SQLITE_READONLY": 8,
    "SQLITE_INTERRUPT": 9,
    "SQLITE_IOERR": 10,
    "SQLITE_CORRUPT": 11,
    "SQLITE_NOTFOUND": 12,
    "SQLITE_FULL": 13,
    "SQLITE_CANTOPEN": 14,
    "SQLITE_PROTOCOL": 15,
    "SQLITE_EMPTY": 16,
    "SQLITE_SCHEMA": 17,
    "SQLITE_TOOBIG": 18,
    "SQLITE_CONSTRAINT": 19,
    "SQLITE_MISMATCH": 20,
    "SQLITE_MISUSE": 21,
    "SQLITE_NOLFS": 22,
    "SQLITE_AUTH": 23,
    "SQLITE_FORMAT": 24,
    "SQLITE_RANGE": 25,
    "SQLITE_NOTADB": 26,
    "SQLITE_ROW": 100,
    "SQLITE_DONE": 101,
}

# docs/api.md#errors: one class per primary result code, in code order (1..26).
CODE_ERRORS = [
    "SQLError",
    "InternalError",
    "PermissionsError",
    "AbortError",
    "BusyError",
    "LockedError",
    "NoMemError",
    "ReadOnlyError",
    "InterruptError",
    "IOError",
    "CorruptError",
    "NotFoundError",
    "FullError",
    "CantOpenError",
    "ProtocolError",
    "EmptyError",
    "SchemaChangeError",
    "TooBigError",
    "ConstraintError",
    "MismatchError",
    "MisuseError",
    "NoLFSError",
    "AuthError",
    "FormatError",
    "RangeError",
    "NotADBError",
]

LIBRARY_ERRORS = [
    "ThreadingViolationError",
    "ConnectionClosedError",
    "CursorClosedError",
    "BindingsError",
    "ForkingViolationError",
]


def ldd_libsqlite(path):
    """The libsqlite3 path that the dynamic loader resolves for ``path``."""
    out = subprocess.run(
        ["ldd", path], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"^\s*libsqlite3\.so[.\d]*\s*=>\s*(\S+)", out, re.MULTILINE)
    assert match, f"ldd names no libsqlite3 for {path}:\n{out}"
    return match.group(1)


def test_sqlite_lib_version_is_the_stdlib_sqlite_version():
    assert apsw_backup.sqlite_lib_version() == sqlite3.sqlite_version


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ldd is Linux only")
@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd not installed")
def test_extension_links_the_same_shared_libsqlite3_as_stdlib():
    import _sqlite3

    ours = ldd_libsqlite(apsw_backup._apsw_backup.__file__)
    stdlib = ldd_libsqlite(_sqlite3.__file__)
    assert ours == stdlib


def test_sqlite_version_number_is_an_int_of_a_supported_sqlite():
    number = apsw_backup.SQLITE_VERSION_NUMBER
    assert type(number) is int
    assert 3026000 <= number < 4000000


@pytest.mark.parametrize("name, value", sorted(OPEN_FLAGS.items()))
def test_open_flag_has_the_sqlite3_h_value(name, value):
    assert getattr(apsw_backup, name) == value


@pytest.mark.parametrize(
    "name, value", sorted(RESULT_CODES.items(), key=lambda kv: kv[1])
)
def test_result_code_has_the_sqlite3_h_value(name, value):
    assert getattr(apsw_backup, name) == value


def test_version_is_a_str():
    assert isinstance(apsw_backup.__version__, str)
    assert apsw_backup.__version__


def test_version_matches_pyproject():
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    declared = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
    assert declared is not None
    assert apsw_backup.__version__ == declared.group(1)


def test_error_is_an_exception():
    assert issubclass(apsw_backup.Error, Exception)


@pytest.mark.parametrize("name", CODE_ERRORS + LIBRARY_ERRORS)
def test_every_spec_exception_exists_and_subclasses_error(name):
    cls = getattr(apsw_backup, name)
    assert isinstance(cls, type)
    assert issubclass(cls, apsw_backup.Error)
    assert cls is not apsw_backup.Error


def test_exception_classes_are_distinct():
    classes = [getattr(apsw_backup, name) for name in CODE_ERRORS + LIBRARY_ERRORS]
    assert len(set(classes)) == len(classes)


def test_nomem_error_is_also_a_memory_error():
    assert issubclass(apsw_backup.NoMemError, MemoryError)


def test_sqlite_error_carries_result_and_extendedresult(memconn):
    with pytest.raises(apsw_backup.SQLError) as excinfo:
        memconn.execute("SELECT * FROM no_such_table")
    assert excinfo.value.result == 1
    assert excinfo.value.extendedresult == 1
    assert "no_such_table" in str(excinfo.value)


def test_connection_closed_error_has_no_result_codes():
    connection = apsw_backup.Connection(":memory:")
    connection.close()
    with pytest.raises(apsw_backup.ConnectionClosedError) as excinfo:
        connection.execute("SELECT 1")
    assert excinfo.value.result is None
    assert excinfo.value.extendedresult is None


def test_bindings_error_has_no_result_codes(memconn):
    with pytest.raises(apsw_backup.BindingsError) as excinfo:
        memconn.execute("SELECT ?", (1, 2))
    assert excinfo.value.result is None
    assert excinfo.value.extendedresult is None
