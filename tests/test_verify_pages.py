"""The page-recording VFS shim (PageRecorder) and the byte-exact check:
every page SQLite writes to the destination is hashed as it is written, and
re-read from the disk afterwards."""

import ctypes
import errno
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from verify_helpers import (
    backup_recorded,
    build,
    leaf_pages,
    page_size_of,
    read_pages,
    root_page,
    write_page,
)

import apsw_backup
from apsw_backup import verify


def assert_hashes_match_the_file(recorder, path):
    pages = read_pages(path)
    assert pages, "empty file"
    for pgno, data in enumerate(pages, start=1):
        assert recorder.page_hash(pgno) == apsw_backup.page_hash(data), pgno
    assert recorder.page_hash(len(pages) + 1) is None


@pytest.fixture
def source(tmp_path):
    return build(tmp_path / "source.db")


def test_a_backup_into_a_new_file_records_every_page(tmp_path, source):
    dest = tmp_path / "dest.db"
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        stats = rec.stats()
        assert stats["page_size"] == 4096
        assert stats["recorded"] == stats["pages"] == len(read_pages(dest))
        assert stats["hashed"] == stats["pages"] and stats["reread"] == 0
        assert_hashes_match_the_file(rec, dest)
        result = rec.read_back()
    assert result["checked"] == result["file_pages"] == stats["pages"]
    assert result["mismatched"] == result["unrecorded"] == result["missing"] == 0
    assert result["through_connection"] is False  # the connection is closed


def test_an_existing_larger_destination_is_truncated_and_recorded(tmp_path, source):
    dest = build(tmp_path / "dest.db", rows=9000)  # larger than the source
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec, pages=7)
        stats = rec.stats()
        assert stats["truncates"] >= 1
        assert_hashes_match_the_file(rec, dest)
        assert rec.read_back()["missing"] == 0
    assert verify.verify(dest).ok


def test_a_wal_destination_is_recorded_through_its_checkpoint(tmp_path, source):
    dest = build(tmp_path / "dest.db", rows=30, wal=True)
    rec = apsw_backup.PageRecorder(dest)
    src = apsw_backup.Connection(str(source), apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(str(dest), vfs=rec.vfs)
    try:
        with dst.backup("main", src, "main") as b:
            b.step(-1)
        # The pages are in dest-wal until a checkpoint writes them into the
        # file (through the shim): settle() does a TRUNCATE checkpoint.
        verify.settle(dst)
        result = rec.read_back()
        assert result["through_connection"] is True
        assert result["mismatched"] == result["unrecorded"] == 0
        assert result["checked"] == result["file_pages"] > 0
        outcome = verify.verify(dest, recorder=rec)
        assert outcome.ok, outcome
    finally:
        dst.close()
        src.close()
        rec.close()
    assert_hashes_match_the_file_after_close = read_pages(dest)
    assert len(assert_hashes_match_the_file_after_close) == result["file_pages"]


def test_a_new_page_size_on_an_existing_destination_is_recorded(tmp_path):
    source = build(tmp_path / "source.db", rows=6000)  # 4096-byte pages
    dest = build(tmp_path / "dest.db", rows=300, page_size=1024)
    with apsw_backup.PageRecorder(dest) as rec:
        src = apsw_backup.Connection(str(source), apsw_backup.SQLITE_OPEN_READONLY)
        dst = apsw_backup.Connection(str(dest), vfs=rec.vfs)
        try:
            dst.execute("PRAGMA cache_size=10")  # spills before page 1 is written
            with dst.backup("main", src, "main") as b:
                b.step(-1)
        finally:
            dst.close()
            src.close()
        stats = rec.stats()
        assert stats["page_size"] == 4096 and stats["page_size_changes"] == 1
        assert_hashes_match_the_file(rec, dest)
        assert verify.verify(dest, recorder=rec).ok


def test_a_hot_journal_rolled_back_through_the_shim_is_recorded(tmp_path):
    path = build(tmp_path / "hot.db", rows=3000)
    before = read_pages(path)
    # A process dies in the middle of a transaction that spilled pages into
    # the file: it leaves a hot journal.
    script = (
        "import sqlite3, os, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA cache_size=5')\n"
        "db.execute('BEGIN')\n"
        'db.execute("UPDATE events SET body=zeroblob(300)")\n'
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    assert os.path.exists(str(path) + "-journal")
    assert read_pages(path) != before
    with apsw_backup.PageRecorder(path) as rec:
        conn = apsw_backup.Connection(str(path), vfs=rec.vfs)
        try:
            conn.execute("SELECT count(*) FROM events").fetchall()  # rolls back
        finally:
            conn.close()
        assert read_pages(path) == before
        result = rec.read_back()
        # The rolled-back pages were written through the shim; the others
        # were never written while recording.
        assert result["checked"] > 0 and result["mismatched"] == 0
        assert result["checked"] + result["unrecorded"] == len(before)
        for pgno in range(1, len(before) + 1):
            h = rec.page_hash(pgno)
            assert h is None or h == apsw_backup.page_hash(before[pgno - 1])


def test_memory_databases_are_refused_clearly(tmp_path):
    for name in (":memory:", "", "file:x?mode=memory"):
        with pytest.raises(
            ValueError, match="in-memory or temporary database has no file"
        ):
            apsw_backup.PageRecorder(name)
    # A memory database opened through the VFS writes no file: nothing is
    # recorded, and read_back() says so instead of claiming success.
    with apsw_backup.PageRecorder(tmp_path / "never.db") as rec:
        conn = apsw_backup.Connection(":memory:", vfs=rec.vfs)
        conn.execute("CREATE TABLE t(x)")
        conn.close()
        with pytest.raises(ValueError, match="nothing was recorded"):
            rec.read_back()
        outcome = verify.verify(build(tmp_path / "never.db"), recorder=rec)
    assert (
        outcome.status == verify.UNVERIFIED and "nothing was recorded" in outcome.reason
    )


def test_one_recorder_per_file_and_closed_recorders_refuse(tmp_path):
    path = tmp_path / "one.db"
    rec = apsw_backup.PageRecorder(path)
    with pytest.raises(ValueError, match="another PageRecorder is recording"):
        apsw_backup.PageRecorder(str(path))
    rec.close()
    rec.close()  # idempotent
    assert rec.closed
    for call in (rec.read_back, rec.stats, lambda: rec.page_hash(1)):
        with pytest.raises(ValueError, match="closed"):
            call()
    again = apsw_backup.PageRecorder(path)  # free once the first is closed
    again.close()
    with pytest.raises(ValueError, match="no SQLite VFS is named"):
        apsw_backup.PageRecorder(path, vfs="no such vfs")
    with pytest.raises(ValueError, match="own VFS"):
        apsw_backup.PageRecorder(path, vfs=again.vfs)
    with pytest.raises(TypeError):
        apsw_backup.PageRecorder(path, vfs=3)


def test_a_page_changed_on_disk_after_the_write_is_reported_with_its_number(
    tmp_path, source, monkeypatch
):
    dest = tmp_path / "dest.db"
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        monkeypatch.setenv(verify.TAMPER_ENV, "3")
        outcome = verify.verify(dest, recorder=rec)
    assert outcome.status == verify.PROBLEMS and outcome.exit_code == 3
    assert outcome.pages == [3]
    (problem,) = [p for p in outcome.problems if p.check == "pages"]
    assert "differ from what SQLite wrote: page 3" in problem.message


def test_a_change_is_found_through_an_open_connection_too(tmp_path, source):
    dest = tmp_path / "dest.db"
    rec = apsw_backup.PageRecorder(dest)
    src = apsw_backup.Connection(str(source), apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(str(dest), vfs=rec.vfs)
    try:
        with dst.backup("main", src, "main") as b:
            b.step(-1)
        rec._tamper_on_read_back(2)
        result = rec.read_back()
        assert result["through_connection"] is True
        assert result["mismatched_pages"] == [2]
        assert rec.read_back()["mismatched_pages"] == [2]  # still on disk
    finally:
        dst.close()
        src.close()
        rec.close()


def disk_reads():
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["read_bytes"])


def device_reads_are_counted(folder):
    """Whether reading an uncached file here shows in /proc/self/io (not on
    tmpfs, nor where the kernel does not account it)."""
    scratch = folder / "scratch.bin"  # ours alone: a descriptor is fine
    scratch.write_bytes(os.urandom(4 << 20))
    fd = os.open(scratch, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = disk_reads()
        while os.read(fd, 1 << 20):
            pass
        return disk_reads() - before >= 2 << 20
    finally:
        os.close(fd)
        scratch.unlink()


def test_read_back_reads_from_the_disk_not_the_page_cache(tmp_path):
    if not os.path.exists("/proc/self/io") or not device_reads_are_counted(tmp_path):
        pytest.skip("reads from the device are not counted here")
    source = build(tmp_path / "source.db", rows=20000)
    dest = tmp_path / "dest.db"
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        size = dest.stat().st_size
        warm = disk_reads()
        rec.read_back(prepare=False)  # from the page cache
        cached = disk_reads() - warm
        cold = disk_reads()
        result = rec.read_back()  # sync, drop the cache, read
        from_disk = disk_reads() - cold
    assert result["cache_dropped"] is True
    assert cached < size // 2
    assert from_disk >= size * 9 // 10


def o_direct_works(folder):
    scratch = folder / "direct.bin"  # ours alone: a descriptor is fine
    scratch.write_bytes(bytes(1 << 16))
    try:
        fd = os.open(scratch, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        import mmap

        buf = mmap.mmap(-1, 1 << 16)
        return os.preadv(fd, [buf], 0) == 1 << 16
    except OSError:
        return False
    finally:
        os.close(fd)
        scratch.unlink()


def test_read_back_of_its_own_handle_reads_with_o_direct(tmp_path):
    """Through a handle of its own (no connection has the file open), the
    read-back reads with O_DIRECT: from the device, leaving the cached pages
    where they are for the quick_check that runs beside it (dropping them,
    range by range, made that check wait for the disk)."""
    if not o_direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    source = build(tmp_path / "source.db", rows=20000)
    dest = tmp_path / "dest.db"
    counted = os.path.exists("/proc/self/io") and device_reads_are_counted(tmp_path)
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)  # closed: read_back uses its own
        size = dest.stat().st_size
        before = disk_reads() if counted else 0
        result = rec.read_back()
        from_disk = disk_reads() - before if counted else size
        rec._tamper_on_read_back(4)
        tampered = rec.read_back()
    assert result["direct"] is True and result["cache_dropped"] is True
    assert result["checked"] == size // page_size_of(dest) and not result["mismatched"]
    assert from_disk >= size * 9 // 10
    assert tampered["direct"] is True and tampered["mismatched_pages"] == [4]


def test_reading_back_never_drops_another_connections_lock(tmp_path, source):
    dest = tmp_path / "dest.db"
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        holder = apsw_backup.Connection(str(dest))  # not through the shim
        try:
            holder.execute("BEGIN IMMEDIATE")  # a RESERVED lock
            # No connection of the recorder's VFS is open: read_back opens a
            # handle of its own and closes it.
            result = rec.read_back()
            assert result["through_connection"] is False
            script = (
                "import sqlite3, sys\n"
                "db = sqlite3.connect(sys.argv[1], timeout=0)\n"
                "try:\n"
                "    db.execute('BEGIN IMMEDIATE')\n"
                "except sqlite3.OperationalError as e:\n"
                "    print(e)\n"
            )
            out = subprocess.run(
                [sys.executable, "-c", script, str(dest)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            assert "database is locked" in out, "our close dropped the lock"
        finally:
            holder.close(force=True)


def test_a_dropped_write_is_detected(tmp_path):
    from faults import shim

    loaded = shim.load(tmp_path)
    if not loaded.registered():  # the fault tests may have made it the default
        loaded.register_vfs(default=False)
    source = build(tmp_path / "source.db")
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "dest.db"
    with apsw_backup.PageRecorder(dest, vfs="faultvfs") as rec:
        loaded.reset(work)
        loaded.arm_dropped_write(5)  # the 5th write reports success, is lost
        try:
            backup_recorded(source, dest, rec)
        finally:
            loaded.disarm()
        assert loaded.injected() == 1
        outcome = verify.verify(dest, recorder=rec)
    assert outcome.status == verify.PROBLEMS, outcome
    (problem,) = [p for p in outcome.problems if p.check == "pages"]
    assert (
        len(problem.pages) == 1 and "differ from what SQLite wrote" in problem.message
    )


def test_writes_in_several_threads_are_all_recorded(tmp_path, source):
    dests = [tmp_path / f"dest{i}.db" for i in range(3)]
    recs = [apsw_backup.PageRecorder(d) for d in dests]
    errors = []

    def copy(i):
        try:
            backup_recorded(source, dests[i], recs[i], pages=3)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=copy, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    for rec, dest in zip(recs, dests, strict=True):
        assert_hashes_match_the_file(rec, dest)
        rec.close()


def test_a_zeroed_btree_page_is_reported_by_quick_check(tmp_path):
    source = build(tmp_path / "source.db")
    write_page(source, leaf_pages(source, "events")[3])  # damaged before the copy
    dest = tmp_path / "dest.db"
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        outcome = verify.verify(dest, recorder=rec)
    # The copy is byte-exact (the source was damaged), and quick_check says
    # what is wrong with it, naming pages.
    assert outcome.status == verify.PROBLEMS and outcome.exit_code == 3
    assert {p.check for p in outcome.problems} == {"quick_check"}
    assert outcome.pages
    checks = {c.name: c.outcome for c in outcome.checks}
    assert checks == {"read_back": "ok", "quick_check": "problems"}
    assert root_page(dest, "events") > 0


def test_read_back_racing_close_and_release(tmp_path, source):
    # read_back() releases the GIL: another thread closing the recorder or
    # dropping it meanwhile must not free what the read-back uses.
    dest = tmp_path / "dest.db"
    for _ in range(5):
        rec = apsw_backup.PageRecorder(dest)
        backup_recorded(source, dest, rec)
        outcome = {}

        def read(rec=rec, outcome=outcome):
            try:
                outcome["result"] = rec.read_back()
            except ValueError as exc:  # closed before it began
                outcome["closed"] = exc

        reader = threading.Thread(target=read)
        reader.start()
        rec.close()
        del rec
        reader.join(60)
        assert not reader.is_alive()
        assert "result" in outcome or "closed" in outcome
        if "result" in outcome:
            assert outcome["result"]["mismatched"] == 0
        dest.unlink()


def test_page_hash_racing_del():
    # page_hash() of large bytes releases the GIL; the caller's reference
    # keeps the bytes alive whatever other threads drop.
    shared = {"data": bytes(1 << 20)}
    expected = apsw_backup.page_hash(bytes(1 << 20))
    results = []

    def hash_it(data):
        results.append(apsw_backup.page_hash(data))

    threads = [
        threading.Thread(target=hash_it, args=(shared["data"],)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    del shared["data"]
    for t in threads:
        t.join(60)
    assert results == [expected] * 4


class _IoMethods(ctypes.Structure):
    _fields_ = [
        ("iVersion", ctypes.c_int),
        ("xClose", ctypes.c_void_p),
        ("xRead", ctypes.c_void_p),
        ("xWrite", ctypes.c_void_p),
        ("xTruncate", ctypes.c_void_p),
    ]


class _File(ctypes.Structure):
    _fields_ = [("pMethods", ctypes.POINTER(_IoMethods))]


def test_writes_not_aligned_to_pages_and_odd_truncations_are_recorded(tmp_path, source):
    # SQLite's pager writes whole pages; a write of part of a page (or of
    # several) is still possible through the file's methods.  Drive the
    # shim's file directly, through SQLite's own handle, from a connection
    # opened on the recorder's VFS with ctypes (the one libsqlite3 here).
    dest = tmp_path / "dest.db"
    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_open_v2.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    lib.sqlite3_file_control.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    lib.sqlite3_close.argtypes = [ctypes.c_void_p]
    write_fn = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64
    )
    truncate_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64)
    SQLITE_FCNTL_FILE_POINTER = 7
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        pages = len(read_pages(dest))
        db = ctypes.c_void_p()
        flags = apsw_backup.SQLITE_OPEN_READWRITE
        assert (
            lib.sqlite3_open_v2(
                str(dest).encode(), ctypes.byref(db), flags, rec.vfs.encode()
            )
            == 0
        )
        try:
            handle = ctypes.POINTER(_File)()
            rc = lib.sqlite3_file_control(
                db, b"main", SQLITE_FCNTL_FILE_POINTER, ctypes.byref(handle)
            )
            assert rc == 0
            methods = handle.contents.pMethods.contents
            xwrite = write_fn(methods.xWrite)
            xtruncate = truncate_fn(methods.xTruncate)
            # 100 bytes inside page 2; 6000 bytes across pages 3-5
            assert xwrite(handle, b"x" * 100, 100, 4096 + 50) == 0
            assert xwrite(handle, b"y" * 6000, 6000, 2 * 4096 + 4000) == 0
            # cut the file in the middle of its last-but-one page
            assert xtruncate(handle, (pages - 2) * 4096 + 1000) == 0
        finally:
            lib.sqlite3_close(db)
        stats = rec.stats()
        assert stats["reread"] >= 5  # pages 2, 3, 4, 5 and the cut one
        data = dest.read_bytes()
        for pgno in (2, 3, 4, 5):
            page = data[(pgno - 1) * 4096 : pgno * 4096]
            assert rec.page_hash(pgno) == apsw_backup.page_hash(page), pgno
        assert rec.page_hash(pages) is None  # past the new end
        result = rec.read_back()
        assert result["mismatched"] == 0 and result["partial_tail"] is True
        assert result["file_pages"] == pages - 2
        outcome = verify.verify(dest, recorder=rec)
    assert outcome.status == verify.PROBLEMS
    assert any("not a whole number of pages" in p.message for p in outcome.problems)


def test_a_recorder_inherited_through_fork_is_inert_and_a_new_one_works(
    tmp_path, source
):
    # The child gets a fresh registry (a mutex another thread of the parent
    # held at fork time would never be released there); the parent's
    # recorder refuses with ForkingViolationError; a new one records.
    script = textwrap.dedent(
        """
        import os, sys
        import apsw_backup as ab
        sys.path.insert(0, sys.argv[3])
        from verify_helpers import backup_recorded
        rec = ab.PageRecorder(sys.argv[1])
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                rec.stats()
                code = 10
            except ab.ForkingViolationError as exc:
                if "fork" not in str(exc):
                    code = 11
            try:
                other = ab.PageRecorder(sys.argv[2])
                backup_recorded(sys.argv[4], sys.argv[2], other)
                if other.read_back()["mismatched"] != 0:
                    code = 12
                other.close()
            except BaseException:
                code = 13
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        rec.stats()  # still the parent's
        rec.close()
        print("ok")
        """
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "a.db"),
            str(tmp_path / "b.db"),
            os.path.dirname(__file__),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_failed_read_back_names_the_os_error(tmp_path):
    """The read-back's own handle has no connection to ask for the OS error
    (sqlite3_system_errno): the message names the one the failed read left.
    Before: "reading the file back failed: <path>" alone."""
    from faults import shim

    loaded = shim.load(tmp_path)
    if not loaded.registered():
        loaded.register_vfs(default=False)
    source = build(tmp_path / "source.db")
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "dest.db"
    with apsw_backup.PageRecorder(dest, vfs="faultvfs") as rec:
        backup_recorded(source, dest, rec)
        loaded.reset(work)
        loaded.arm("read", 1, True)  # every read of the read-back fails: EIO
        try:
            with pytest.raises(apsw_backup.IOError) as info:
                rec.read_back()
        finally:
            loaded.disarm()
    assert "reading the file back failed" in str(info.value)
    assert os.strerror(errno.EIO) in str(info.value)
    assert info.value.result == apsw_backup.SQLITE_IOERR


def test_one_sync_serves_a_read_back_in_ranges_until_the_next_write(tmp_path, source):
    """verify() reads back in 32 MiB ranges; each used to sync the file first
    (a flush of the device's cache each time).  One sync serves them all,
    until a write through the shim."""
    dest = tmp_path / "dest.db"
    with apsw_backup.PageRecorder(dest) as rec:
        backup_recorded(source, dest, rec)
        pages = rec.stats()["pages"]
        for first in range(1, pages + 1, 10):
            part = rec.read_back(first, first + 9)
            assert part["mismatched"] == 0 and part["cache_dropped"] is True
        assert rec.stats()["syncs"] == 1
        conn = apsw_backup.Connection(str(dest), vfs=rec.vfs)
        try:
            conn.execute("CREATE TABLE more(x)")
        finally:
            conn.close()
        assert rec.read_back()["mismatched"] == 0
        rec.read_back()
        assert rec.stats()["syncs"] == 2
