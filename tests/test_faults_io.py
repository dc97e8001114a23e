"""Every I/O call of a backup failing in turn (docs/testing.md).

tests/faults/faultshim.c wraps the default VFS of the one libsqlite3 the
extension uses; tests/faults/iofaults.py makes, for each case (new, existing,
WAL and in-memory destination; WAL source) and route (Backup.step(),
copy() to a path and to a Connection, the command line), a counting run and
then one run per fault point: the Nth call of each VFS method failing once
and from then on.  What each run must show is in iofaults.py's docstring.

The in-process routes run every fault point here (about ten seconds); the
command line, a subprocess per run, runs the first and the last point of
each method here and every point in .ci/faults, which prints the figures.
APSW_BACKUP_FAULTS=full runs every point here too.
"""

import os

import pytest
from faults import iofaults, shim

import apsw_backup

pytestmark = pytest.mark.heavy  # a few thousand backups: not for valgrind

FULL = os.environ.get("APSW_BACKUP_FAULTS") == "full"
CLI_SAMPLE = 2


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faultshim")
    path = shim.build(folder)
    loaded = shim.load(folder)
    loaded.register_vfs()
    loaded.check_same_sqlite()
    yield iofaults.Harness(loaded, path, folder / "work")
    loaded.disarm()


def chooser_for(route):
    if route == "cli" and not FULL:
        return iofaults.sample(CLI_SAMPLE)
    return iofaults.every


def test_the_shim_is_in_the_extensions_sqlite(harness):
    """One libsqlite3 in the process, and the shim's VFS is its default."""
    assert harness.shim.check_same_sqlite() == apsw_backup.sqlite_lib_version()
    conn = apsw_backup.Connection(":memory:")
    try:
        assert conn.open_vfs == "faultvfs"
    finally:
        conn.close()


@pytest.mark.parametrize(("case", "route"), iofaults.combinations())
def test_every_io_fault_leaves_the_destination_old_or_complete(harness, case, route):
    chooser = chooser_for(route)
    report = harness.sweep(case, route, list(shim.FAULTS), chooser)
    print("\n" + iofaults.figures(report))
    # Every case reads, writes (but an in-memory destination) and locks.
    assert report.points["read"] > 0 and report.points["lock"] > 0
    if case != "memory":
        assert report.points["write"] > 0 and report.points["sync"] > 0
    assert report.runs == iofaults.chosen(report, chooser) > 0
    assert report.problems == []


def _one(harness, case, route, fault, nth, persistent=True):
    return harness.one(case, route, fault, nth, persistent)


def test_a_failed_step_names_the_os_error(harness):
    # The tenth write of the copy into an existing file fails with EIO.
    _, injected, problems, failed, gap = _one(harness, "existing", "step", "write", 10)
    assert injected and failed and problems == []
    assert gap is None, gap


def test_a_failed_open_names_the_os_error(harness):
    _, injected, problems, failed, gap = _one(harness, "existing", "step", "open", 1)
    assert injected and failed and problems == []
    assert gap is None, gap  # it would name os.strerror(errno.EACCES)


def _last_read_of_cli(harness, case):
    calls, _, problems, failed, _ = harness.one(case, "cli")
    assert not failed and problems == []
    return calls["read"]


def test_cli_read_error_while_verifying_is_reported_as_an_io_error(harness):
    # The last read of the run is the verification's.
    last = _last_read_of_cli(harness, "existing")
    _, injected, problems, _, _ = harness.one("existing", "cli", "read", last, False)
    assert injected
    assert problems == []


def test_a_successful_copy_leaves_no_wal_beside_dest_when_its_delete_fails(harness):
    # A WAL source into an existing DEST.  The second xDelete of the run was
    # DEST-wal's, when copy() switched DEST back to rollback mode; now the
    # copy is committed in rollback mode and no DEST-wal is made
    # (docs/journal-mode.md).  Each xDelete the run makes
    # now fails in turn (the commit's delete of DEST-journal fails the copy,
    # which leaves DEST to roll back): DEST old or complete, nothing stale
    # beside it.
    calls, _, problems, failed, _ = harness.one("wal-source", "copy-path")
    assert not failed and problems == []
    assert calls["delete"] > 0
    for nth in range(1, calls["delete"] + 1):
        _, injected, problems, _, _ = harness.one(
            "wal-source", "copy-path", "delete", nth, False
        )
        assert injected
        assert problems == [], nth


def test_a_failed_statement_names_the_os_error(harness):
    # copy() into an existing file runs statements of its own (the target's
    # pragmas, the journal-mode switch, the check); an I/O error from one of
    # them carries the OS error SQLite kept (sqlite3_system_errno), not a
    # bare "disk I/O error".  Failed steps name it through their own file.
    report = harness.sweep("existing", "copy-path", ["read", "write"], iofaults.every)
    assert report.problems == []
    bare = [g for g in report.message_gaps if g.rstrip().endswith("disk I/O error")]
    assert bare == []
