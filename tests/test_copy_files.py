"""The file a copy() produces (docs/api.md#copy-and-acopy,
docs/command-line.md): refusals of the source's own files, the atomic new target and
its temporary files, a single self-contained result with nothing left
beside it, standard-library connections, OS causes, and arguments checked
before anything is created.
"""

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from copy_helpers import make_source, make_target, query

import apsw_backup
from apsw_backup import copy, files

BOUND = 20


def listing(folder):
    return sorted(os.listdir(folder))


def header_mode(path):
    with open(path, "rb") as file:
        header = file.read(20)
    return {1: "rollback", 2: "wal"}[header[18]]


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


@pytest.fixture
def wal_source(tmp_path):
    return make_source(tmp_path / "wal.db", journal="wal")


# 1. The target is the source itself or one of its side files.


def same_file_targets(tmp_path, source):
    link = tmp_path / "link.db"
    link.symlink_to(source)
    hard = tmp_path / "hard.db"
    os.link(source, hard)
    other_name = tmp_path / "sub" / ".." / source.name
    (tmp_path / "sub").mkdir()
    return {"same path": source, "symlink": link, "hard link": hard, "dots": other_name}


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "dots"])
@pytest.mark.parametrize("source_kind", ["path", "connection"])
@pytest.mark.parametrize("target_kind", ["path", "connection"])
def test_target_that_is_the_source_file_is_refused_at_once_naming_both(
    tmp_path, source, how, source_kind, target_kind
):
    target = same_file_targets(tmp_path, source)[how]
    before = listing(tmp_path)
    opened = []
    if source_kind == "connection":
        opened.append(apsw_backup.Connection(str(source)))
    if target_kind == "connection":
        opened.append(apsw_backup.Connection(str(target)))
    src = opened[0] if source_kind == "connection" else source
    dst = opened[-1] if target_kind == "connection" else target
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="is the source database") as excinfo:
            copy(src, dst, timeout=None)
    finally:
        for conn in opened:
            conn.close()
    assert time.monotonic() - start < 1
    message = str(excinfo.value)
    assert str(source) in message
    named = opened[-1].filename if target_kind == "connection" else str(target)
    named = os.path.abspath(named)
    assert named in message
    assert listing(tmp_path) == before
    assert query(source, "SELECT count(*) FROM t") == [(300,)]


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("via", ["name", "symlinked folder", "link to side file"])
def test_target_that_is_a_side_file_of_the_source_is_refused(
    tmp_path, wal_source, suffix, exists, via
):
    side = str(wal_source) + suffix
    if exists:
        with open(side, "wb"):
            pass
    if via == "name":
        target = side
    elif via == "symlinked folder":
        (tmp_path / "alias").symlink_to(tmp_path)
        target = str(tmp_path / "alias" / (wal_source.name + suffix))
    else:
        target = str(tmp_path / "pointer")
        os.symlink(side, target)
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=f"source's {suffix[1:]} file") as excinfo:
        copy(wal_source, target)
    assert str(wal_source) in str(excinfo.value)
    assert target in str(excinfo.value)
    assert listing(tmp_path) == before


def test_check_distinct_is_silent_for_distinct_files_and_memory(tmp_path, source):
    files.check_distinct(str(source), str(tmp_path / "other.db"))
    files.check_distinct(str(source), str(tmp_path / "source.db-wal.bak"))
    files.check_distinct("", str(source))


def test_open_source_connection_and_its_path_as_target_is_refused(tmp_path):
    # The livelock: it used to retry for ever.
    path = tmp_path / "p.db"
    conn = apsw_backup.Connection(str(path))
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    try:
        with pytest.raises(ValueError, match="itself"):
            copy(conn, path)
        with pytest.raises(ValueError, match="itself"):
            copy(path, conn)
    finally:
        conn.close()


# 2. A new target appears complete or not at all.


def test_new_target_is_written_under_a_temporary_name_then_renamed(tmp_path, source):
    dest = tmp_path / "new.db"
    seen = []

    def progress(status, remaining, total):
        names = listing(tmp_path)
        seen.append(names)
        assert "new.db" not in names

    result = copy(source, dest, pages=20, progress=progress)
    temporary = {n for names in seen for n in names if files.is_temporary_name(n)}
    assert len({n for n in temporary if n.endswith(".partial")}) == 1
    assert all(n.startswith("new.db.apsw-backup-") for n in temporary)
    assert listing(tmp_path) == ["new.db", "source.db"]
    assert result.path == str(dest)
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]


def test_verify_gets_the_temporary_file_complete_and_closed(tmp_path, source):
    dest = tmp_path / "new.db"
    checked = []

    def verify(path):
        assert files.is_temporary_name(path)
        assert not dest.exists()
        checked.append(query(path, "PRAGMA integrity_check"))
        assert listing(tmp_path) == sorted(["source.db", os.path.basename(path)])

    copy(source, dest, verify=verify)
    assert checked == [[("ok",)]]
    assert dest.exists()


def test_verify_raising_leaves_no_target_and_the_exception_unchanged(tmp_path, source):
    dest = tmp_path / "new.db"
    boom = RuntimeError("verification failed")

    def verify(path):
        raise boom

    with pytest.raises(RuntimeError) as excinfo:
        copy(source, dest, verify=verify)
    assert excinfo.value is boom
    assert listing(tmp_path) == ["source.db"]


def test_verify_of_existing_target_sees_the_committed_copy(tmp_path, source):
    dest = make_target(tmp_path / "old.db")
    seen = []
    copy(
        source,
        dest,
        verify=lambda p: seen.append((p, query(p, "SELECT count(*) FROM t"))),
    )
    assert seen == [(str(dest), [(300,)])]


def test_target_created_meanwhile_is_not_overwritten(tmp_path, source):
    dest = tmp_path / "new.db"

    def progress(status, remaining, total):
        if status == apsw_backup.SQLITE_DONE:
            dest.write_bytes(b"someone else's file")

    with pytest.raises(FileExistsError, match="not put in its place"):
        copy(source, dest, progress=progress)
    assert dest.read_bytes() == b"someone else's file"
    assert listing(tmp_path) == ["new.db", "source.db"]


KILLED = r"""
import sys, time, apsw_backup
def progress(status, remaining, total):
    if remaining < total // 2:
        print("half", flush=True)
        time.sleep(60)
apsw_backup.copy(sys.argv[1], sys.argv[2], pages=5, progress=progress)
"""


def test_killed_run_leaves_no_target_and_next_run_removes_its_leftovers(tmp_path):
    source = make_source(tmp_path / "source.db", rows=2000)
    dest = tmp_path / "new.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(source), str(dest)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "half"
        left = [n for n in listing(tmp_path) if files.is_temporary_name(n)]
        assert left  # the partial copy, and its journal
        proc.send_signal(signal.SIGKILL)
        proc.wait(BOUND)
    finally:
        proc.kill()
        proc.wait(BOUND)
    assert not dest.exists()
    assert sorted(left) == sorted(
        n for n in listing(tmp_path) if n not in ("source.db",)
    )
    # A copy into another file of that folder cleans up the killed run.
    copy(source, tmp_path / "other.db")
    assert listing(tmp_path) == ["other.db", "source.db"]


LIVE = r"""
import sys, time, apsw_backup
def progress(status, remaining, total):
    print("live", flush=True)
    sys.stdin.readline()
apsw_backup.copy(sys.argv[1], sys.argv[2], pages=5, progress=progress)
print("done", flush=True)
"""


def test_next_run_never_removes_a_live_runs_temporary_file(tmp_path):
    source = make_source(tmp_path / "source.db", rows=500)
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE, str(source), str(tmp_path / "slow.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "live"
        live = [n for n in listing(tmp_path) if files.is_temporary_name(n)]
        # Old enough that only its lock tells it is live.
        for name in live:
            os.utime(tmp_path / name, (time.time() - 3600,) * 2)
        copy(source, tmp_path / "fast.db")
        assert set(live) <= set(listing(tmp_path))
        proc.stdin.write("\n" * 1000)
        proc.stdin.close()
        assert proc.stdout.read().strip().endswith("done")
        proc.wait(BOUND)
    finally:
        proc.kill()
        proc.wait(BOUND)
    assert proc.returncode == 0
    assert listing(tmp_path) == ["fast.db", "slow.db", "source.db"]
    assert query(tmp_path / "slow.db", "PRAGMA integrity_check") == [("ok",)]


def test_is_temporary_name_matches_ours_and_their_side_files_only():
    name = files.temporary_path("/x/backup.db")
    assert files.is_temporary_name(name)
    for suffix in files.SIDE_FILES:
        assert files.is_temporary_name(name + suffix)
    for other in (
        "backup.db",
        "backup.db-journal",
        "backup.partial",
        "a.apsw-backup.db",
    ):
        assert not files.is_temporary_name(other)
    assert os.path.dirname(name) == "/x"
    assert not name.endswith(".db")


# 3. One file, nothing left beside DEST or SOURCE.


@pytest.mark.parametrize("pages", [-1, 3])
def test_copy_of_closed_wal_source_is_one_rollback_file_and_leaves_nothing(
    tmp_path, wal_source, pages
):
    result = copy(wal_source, tmp_path / "copy.db", pages=pages)
    assert listing(tmp_path) == ["copy.db", "wal.db"]
    assert header_mode(tmp_path / "copy.db") == "rollback"
    assert query(tmp_path / "copy.db", "PRAGMA journal_mode") == [("delete",)]
    assert query(tmp_path / "copy.db", "SELECT count(*) FROM t") == [(300,)]
    assert result.wal_growth == 0


def test_keep_wal_leaves_the_copy_of_a_wal_source_in_wal_mode(tmp_path, wal_source):
    copy(wal_source, tmp_path / "copy.db", keep_wal=True)
    assert listing(tmp_path) == ["copy.db", "wal.db"]
    assert header_mode(tmp_path / "copy.db") == "wal"


def test_existing_rollback_target_stays_rollback_existing_wal_target_stays_wal(
    tmp_path, wal_source, source
):
    old = make_target(tmp_path / "old.db")
    copy(wal_source, old)
    assert header_mode(old) == "rollback"
    live_wal = make_source(tmp_path / "livewal.db", journal="wal")
    copy(source, live_wal)
    assert header_mode(live_wal) == "wal"
    assert listing(tmp_path) == ["livewal.db", "old.db", "source.db", "wal.db"]


def test_copy_of_open_wal_source_leaves_its_side_files_to_their_owner(
    tmp_path, wal_source
):
    owner = apsw_backup.Connection(str(wal_source))
    try:
        owner.execute("INSERT INTO w(at) VALUES (1)")
        copy(wal_source, tmp_path / "copy.db")
        assert os.path.exists(str(wal_source) + "-wal")
        assert owner.execute("SELECT count(*) FROM w").fetchall() == [(1,)]
    finally:
        owner.close()
    assert listing(tmp_path) == ["copy.db", "wal.db"]
    assert query(tmp_path / "copy.db", "SELECT count(*) FROM w") == [(1,)]


# 5. Standard-library connections and OS causes.


def test_stdlib_connection_of_a_file_is_copied_from_its_file(tmp_path, source):
    std = sqlite3.connect(str(source))
    try:
        result = copy(std, tmp_path / "copy.db")
    finally:
        std.close()
    assert result.pages == query(source, "PRAGMA page_count")[0][0]
    assert query(tmp_path / "copy.db", "SELECT count(*) FROM t") == [(300,)]


def test_stdlib_connection_in_memory_is_a_type_error_saying_what_to_do(tmp_path):
    std = sqlite3.connect(":memory:")
    try:
        with pytest.raises(TypeError, match="in memory") as excinfo:
            copy(std, tmp_path / "copy.db")
    finally:
        std.close()
    assert "backup()" in str(excinfo.value)
    assert listing(tmp_path) == []


def test_other_source_types_are_a_type_error(tmp_path, source):
    with pytest.raises(TypeError, match="source must be"):
        copy(42, tmp_path / "copy.db")
    with pytest.raises(TypeError, match="target must be"):
        copy(source, 42)


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("source is a folder", "EISDIR", "give the path of a database file"),
        ("source missing", "ENOENT", "check the path"),
        ("source under a file", "ENOTDIR", "check the path"),
        ("target is a folder", "EISDIR", "give the path of a database file"),
        ("target folder missing", "ENOENT", "check the path"),
        ("target under a file", "ENOTDIR", "check the path"),
    ],
)
def test_os_causes_are_named_with_the_cure(tmp_path, source, case, code, words):
    (tmp_path / "folder").mkdir()
    paths = {
        "source is a folder": (tmp_path / "folder", tmp_path / "c.db"),
        "source missing": (tmp_path / "missing.db", tmp_path / "c.db"),
        "source under a file": (source / "x.db", tmp_path / "c.db"),
        "target is a folder": (source, tmp_path / "folder"),
        "target folder missing": (source, tmp_path / "nope" / "c.db"),
        "target under a file": (source, source / "c.db"),
    }
    src, dst = paths[case]
    before = listing(tmp_path)
    with pytest.raises(apsw_backup.CantOpenError) as excinfo:
        copy(src, dst)
    message = str(excinfo.value)
    assert f"({code})" in message
    assert words in message
    assert ("source" if case.startswith("source") else "target") in message
    assert excinfo.value.result == apsw_backup.SQLITE_CANTOPEN
    assert listing(tmp_path) == before


AS_UNPRIVILEGED = r"""
import sys, apsw_backup
try:
    apsw_backup.copy(sys.argv[1], sys.argv[2])
except apsw_backup.CantOpenError as exc:
    print(exc)
"""


def run_unprivileged(source, dest):
    """copy() in a process the permissions apply to: root's capabilities to
    override them are dropped (setpriv), a normal user has none."""
    cmd = [sys.executable, "-c", AS_UNPRIVILEGED, str(source), str(dest)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv(1) to drop CAP_DAC_OVERRIDE")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=BOUND).stdout


@pytest.mark.parametrize("what", ["new in locked folder", "existing read-only"])
def test_target_without_write_permission_names_eacces(tmp_path, source, what):
    locked = tmp_path / "locked"
    locked.mkdir()
    if what == "existing read-only":
        dest = make_target(locked / "c.db")
        os.chmod(dest, 0o444)
    else:
        dest = locked / "c.db"
        os.chmod(locked, 0o555)
    before = listing(locked)
    try:
        out = run_unprivileged(source, dest)
    finally:
        os.chmod(locked, 0o755)
    assert "(EACCES)" in out
    assert "target" in out
    assert "check its permissions" in out
    assert listing(locked) == before


def test_os_cause_words_for_each_errno():
    for code, words in [
        (errno.EROFS, "read-only file system"),
        (errno.ENOSPC, "free some space"),
        (errno.EACCES, "permission denied"),
    ]:
        text = files.os_cause(OSError(code, os.strerror(code)))
        assert words in text
        assert errno.errorcode[code] in text


# 9. Arguments are checked before anything is created.


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"pages": 2**40}, OverflowError, "pages must be at most"),
        ({"pages": True}, TypeError, "pages"),
        ({"name": 5}, TypeError, "name"),
        ({"name": "ma\0in"}, ValueError, "NUL"),
        ({"name": "nosuch"}, apsw_backup.SQLError, "no database named"),
        ({"target_name": "aux"}, ValueError, "target_name must be 'main'"),
        ({"sleep": float("inf")}, ValueError, "sleep"),
        ({"keep_wal": 1}, TypeError, "keep_wal"),
        ({"verify": "yes"}, ValueError, "verify"),
        ({"verify": 1}, TypeError, "verify"),
    ],
)
def test_bad_arguments_create_nothing(tmp_path, source, kwargs, error, words):
    with pytest.raises(error, match=words):
        copy(source, tmp_path / "new.db", **kwargs)
    assert listing(tmp_path) == ["source.db"]


def test_failure_of_a_copy_into_a_path_it_created_removes_everything(tmp_path, source):
    def progress(status, remaining, total):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        copy(source, tmp_path / "new.db", pages=1, progress=progress)
    assert listing(tmp_path) == ["source.db"]


def test_timeout_zero_with_nothing_locked_says_the_deadline_passed(tmp_path, source):
    with pytest.raises(apsw_backup.BusyError) as excinfo:
        copy(source, tmp_path / "new.db", pages=1, timeout=0)
    message = str(excinfo.value)
    assert "deadline passed" in message
    assert "nothing was locked" in message
    assert "locked by another connection" not in message
    assert "new target was not created" in message
    assert listing(tmp_path) == ["source.db"]


# The source's WAL growth during the copy.


def test_wal_growth_reports_bytes_the_source_wal_grew_during_the_copy(tmp_path):
    source = make_source(tmp_path / "live.db", rows=600, journal="wal")
    writer = apsw_backup.Connection(str(source))
    writer.execute("PRAGMA wal_autocheckpoint=0").fetchall()
    writer.execute("INSERT INTO w(at) VALUES (0)")
    before = os.path.getsize(str(source) + "-wal")

    def progress(status, remaining, total):
        if status == apsw_backup.SQLITE_OK:
            writer.execute("INSERT INTO w(at, n) VALUES (1, ?)", (remaining,))

    try:
        result = copy(source, tmp_path / "copy.db", pages=20, progress=progress)
        after = os.path.getsize(str(source) + "-wal")
    finally:
        writer.close()
    assert after > before
    assert result.wal_growth == after - before


def test_wal_growth_is_zero_for_a_rollback_journal_source(tmp_path, source):
    assert copy(source, tmp_path / "copy.db").wal_growth == 0
