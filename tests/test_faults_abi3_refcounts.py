"""The extension returns new references to None, True and False on the
CPython it runs on.

The extension is one abi3 build (`_apsw_backup.abi3.so`, Limited API 3.10)
for every CPython from 3.10 on.  Built with the headers of CPython 3.12 or
newer, `Py_RETURN_NONE` / `Py_RETURN_TRUE` / `Py_RETURN_FALSE` return the
(immortal there) singletons without a new reference; loaded by 3.10 or
3.11, where they are not immortal, every such return takes a reference
away and the process dies with "Fatal Python error: none_dealloc" after
enough calls.  (Seen here when a checkout's in-place abi3 build was made
by CPython 3.13 and then imported by 3.11: 1000 close() calls, -1000
references to None.)  On 3.12+ the singletons are immortal and there is
nothing to lose, so the test runs on 3.10 and 3.11 only -- which is where
.ci/run tests the abi3 wheel.
"""

import sys

import pytest

import apsw_backup

pytestmark = pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="None, True and False are immortal from CPython 3.12 on",
)

CALLS = 1000


def references_taken(func):
    """How many references to None, True and False CALLS calls took away."""
    singletons = (None, True, False)
    before = [sys.getrefcount(obj) for obj in singletons]
    for _ in range(CALLS):
        func()
    after = [sys.getrefcount(obj) for obj in singletons]
    return {
        repr(obj): b - a
        for obj, b, a in zip(singletons, before, after, strict=True)
        if b - a > 5
    }


@pytest.fixture
def finished_backup(memconn, open_connection):
    source = open_connection(":memory:")
    source.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)").fetchall()
    backup = memconn.backup("main", source, "main")
    assert backup.step(-1) is True
    backup.finish()
    return backup, source


def test_methods_returning_none_keep_its_references(memconn, finished_backup):
    backup, source = finished_backup
    closed = apsw_backup.Connection(":memory:")
    closed.close()
    assert references_taken(closed.close) == {}
    assert references_taken(backup.finish) == {}
    assert references_taken(backup.close) == {}
    assert references_taken(lambda: source.set_busy_handler(None)) == {}
    assert references_taken(lambda: source.set_busy_timeout(0)) == {}
    assert references_taken(memconn.interrupt) == {}


def test_methods_returning_bools_keep_their_references(memconn, finished_backup):
    backup, source = finished_backup
    assert references_taken(lambda: backup.__exit__(None, None, None)) == {}
    assert references_taken(lambda: backup.done) == {}
    assert references_taken(lambda: source.in_transaction) == {}
    assert references_taken(source.get_autocommit) == {}
    fresh = apsw_backup.Connection(":memory:")
    try:

        def step_all():
            with fresh.backup("main", source, "main") as b:
                b.step(-1)

        assert references_taken(step_all) == {}
    finally:
        fresh.close()
