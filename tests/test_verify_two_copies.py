"""Two verified copies into one existing target in one process (blind
attack on the core, round 3): a file has one recording at a time, and the
shim records every connection of the process that opens the file, so the
first copy's byte check saw the second copy's writes and "passed" on them.
Now: the second copy's byte check is skipped (said why), and the first's
is unverified -- never "ok" on bytes it did not write, never a disk blamed.
"""

import sqlite3
import threading

import pytest

import apsw_backup as ab
from apsw_backup.verify import VerificationFailed, VerificationIncomplete


def make(path, rows):
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(2000))", [()] * rows)
    c.commit()
    c.close()


def rows_of(path):
    c = sqlite3.connect(path)
    try:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return c.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        c.close()


def outcome(result, name="read_back"):
    check = next(c for c in result.verification.checks if c.name == name)
    return check.outcome, check.detail


@pytest.fixture
def files(tmp_path):
    s1, s2, target = tmp_path / "s1.db", tmp_path / "s2.db", tmp_path / "t.db"
    make(s1, 100)
    make(s2, 150)
    c = sqlite3.connect(target)
    c.execute("CREATE TABLE old(y)")
    c.commit()
    c.close()
    return s1, s2, target


def test_a_copy_started_from_anothers_verification_is_refused(files):
    """From a callback of the copy writing the file (same thread): refused
    at once (ReentrancyError), and the first copy verifies its own bytes."""
    s1, s2, target = files
    inner = {}

    def progress(_):
        if not inner:
            try:
                ab.copy(s2, target, verify="default", timeout=20)
                inner["said"] = "made"
            except ab.ReentrancyError as exc:
                inner["said"] = str(exc)

    result = ab.copy(s1, target, verify="default", verify_progress=progress, timeout=20)
    assert "called from a callback of the copy" in inner["said"]
    state, detail = outcome(result)
    assert state == "ok" and detail["checked"] == result.pages
    assert rows_of(target) == 100


def test_a_second_recording_connection_makes_the_check_unverified(files):
    """Where the refusal cannot see it (another thread opened the file
    through the recorder's shim while the copy recorded it), the check
    proves nothing about the copy's own bytes: unverified, not "ok"."""
    s1, s2, target = files
    inner = {}

    def progress(_):
        if not inner:

            def other():
                inner["result"] = ab.copy(s2, target, verify="default", timeout=20)

            t = threading.Thread(target=other)
            t.start()
            t.join(60)

    with pytest.raises(VerificationIncomplete, match="other connection"):
        ab.copy(s1, target, verify="default", verify_progress=progress, timeout=20)
    state, detail = outcome(inner["result"])
    assert state == "skipped" and "recording" in detail["why"]
    assert rows_of(target) == 150  # the second copy's, complete


CHILD_NESTED = """
    import apsw_backup as ab
    import sqlite3
    d = sys.argv[1]
    for n, rows in (("s1.db", 100), ("s2.db", 100), ("t.db", 1)):
        c = sqlite3.connect(os.path.join(d, n))
        c.execute("CREATE TABLE t(x)")
        c.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * rows)
        c.commit()
        c.close()
    s1, s2, t = (os.path.join(d, n) for n in ("s1.db", "s2.db", "t.db"))
    inner = {}

    def call(args):
        try:
            ab.copy(*args)
            return "made"
        except ab.ReentrancyError as exc:
            return type(exc).__name__

    def cb(*_):
        if not inner:
            inner["into"] = call((s2, t))
            inner["from"] = call((t, os.path.join(d, "x.db")))
            inner["other"] = call((s2, os.path.join(d, "y.db")))

    if sys.argv[2] == "copy":
        ab.copy(s1, t, pages=10, progress=cb)
    else:
        import asyncio
        asyncio.run(ab.acopy(s1, t, pages=10, progress=cb))
    report("inner", inner)
"""


@pytest.mark.parametrize("how", ["copy", "acopy"])
def test_a_copy_into_or_from_the_file_its_caller_writes_does_not_wait_for_ever(
    tmp_path, how
):
    """It waited for ever for the lock its caller held until the callback
    returned (timeout=None)."""
    from child_process import run_child

    report = run_child(CHILD_NESTED, tmp_path, how, timeout=60)
    assert report["inner"] == {
        "into": "ReentrancyError",
        "from": "ReentrancyError",
        "other": "made",
    }


def test_one_copy_alone_still_checks_its_bytes(files):
    s1, _, target = files
    result = ab.copy(s1, target, verify="default", timeout=20)
    state, detail = outcome(result)
    assert state == "ok" and detail["checked"] == result.pages


def test_two_threads_never_check_anothers_bytes(files):
    s1, s2, target = files
    for _ in range(5):
        results, errors = {}, []

        def run(source, key, results=results, errors=errors):
            try:
                results[key] = ab.copy(source, target, verify="default", timeout=30)
            except (VerificationIncomplete, ab.BusyError) as exc:
                errors.append(exc)
            except VerificationFailed as exc:  # would blame the disk: a lie here
                errors.append(AssertionError(f"VerificationFailed: {exc}"))

        threads = [
            threading.Thread(target=run, args=(s, k)) for s, k in ((s1, 1), (s2, 2))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert not [e for e in errors if isinstance(e, AssertionError)], errors
        for key, result in results.items():
            state, detail = outcome(result)
            if state == "ok":  # then it checked its own pages
                assert detail["checked"] == result.pages, (key, detail)
        assert rows_of(target) in (100, 150)


# -- the same round's other findings -------------------------------------


@pytest.mark.parametrize("hook", ["verify", "before_publish"])
def test_a_child_forked_in_a_callback_gets_forking_violation_error(tmp_path, hook):
    """docs/locking.md: a child forked during copy() raises
    ForkingViolationError before it would touch a file (it was a
    RuntimeError from the new file's publish)."""
    import os

    src = tmp_path / "src.db"
    make(src, 20)
    read, write = os.pipe()
    forked = {}

    def callback(path):
        if not forked:
            forked["pid"] = os.fork()

    kwargs = {hook: callback}
    if hook == "before_publish":
        kwargs["verify"] = "default"
    try:
        ab.copy(src, tmp_path / "new.db", **kwargs)
        said = "ok"
    except BaseException as exc:
        said = type(exc).__name__
    if forked.get("pid") == 0:
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(forked["pid"], 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert said == "ok"
    assert child == "ForkingViolationError"
    assert rows_of(tmp_path / "new.db") == 20


def test_verify_of_a_fifo_is_not_called_a_folder(tmp_path):
    import errno
    import json
    import os
    import subprocess
    import sys

    fifo = tmp_path / "backup.db"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        proc = subprocess.run(
            [sys.executable, "-m", "apsw_backup", "verify", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        error = json.loads(proc.stdout)["error"]
        assert proc.returncode == 1
        assert (error["class"], error["errno"]) == ("OSError", errno.EINVAL)
        assert "not a regular file" in error["message"]
