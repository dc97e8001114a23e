"""The concurrency stress harness (tests/stress.py) in the ordinary suite.

A few fixed seeds, each in a subprocess with a timeout, so that a crash or a
hang fails the test with the seed instead of killing pytest.  .ci/stress runs
more seeds against the ASan build; .ci/soak runs it for a long time.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import stress  # noqa: E402

import apsw_backup

SECONDS = 3
THREADS = 4


@pytest.mark.heavy  # about 3.5 s a seed
@pytest.mark.parametrize("seed", [101, 202, 303])
def test_random_threads_on_shared_objects_keep_every_guarantee(seed):
    status, lines, summary = stress.run_seed_subprocess(
        seed, SECONDS, THREADS, timeout=90
    )
    assert status == "ok", "\n".join([f"seed {seed}: {status}", *lines])
    # The run did something: operations ran, and some were refused as expected.
    assert summary["ops"] > 100, summary
    assert summary["errors"], summary


def test_stress_reports_a_broken_invariant(tmp_path):
    """The checks can fail: a database whose meta disagrees with t."""
    import sqlite3

    path = tmp_path / "r0.db"
    s = stress.Stress(apsw_backup, 0, 0, 1, str(tmp_path))
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(stress.SCHEMA)
    db.execute(stress.FILL, (10, 10))
    db.execute("UPDATE meta SET n = n + 1")
    db.close()
    s.check_file(str(path))
    assert s.failures and "meta does not match t" in s.failures[0]


def test_stress_driver_sees_a_crash_and_names_the_signal(tmp_path, monkeypatch):
    """A child killed by a signal is a 'crash' with the signal's name.

    SIGKILL, not SIGSEGV: under the sanitizer build ASan catches SIGSEGV,
    writes a report of its own (which .ci/sanitize rightly counts as a
    failure) and aborts, so the child would die of SIGABRT instead.
    """
    script = tmp_path / "crash.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(stress, "__file__", str(script))
    status, lines, _ = stress.run_seed_subprocess(1, 1, 1, timeout=30)
    assert status == "crash"
    assert "killed by SIGKILL" in lines[0]


@pytest.mark.heavy  # waits out a 6 s watchdog
def test_stress_driver_sees_a_hang(tmp_path, monkeypatch):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(stress, "__file__", str(script))
    status, _, _ = stress.run_seed_subprocess(1, 1, 1, timeout=6)
    assert status == "hang"


def test_sanitizer_report_lines_are_picked_out():
    report = """\
==1==ERROR: AddressSanitizer: heap-use-after-free on address 0x1 at pc 0x2
READ of size 8 at 0x1 thread T1
    #0 0x7f in backup_finish_internal src/backup.c:447
    #1 0x7f in finish_unraisable src/backup.c:550
freed by thread T2 here:
    #0 0x7f in __interceptor_free
SUMMARY: AddressSanitizer: heap-use-after-free src/backup.c:447
"""
    lines = stress.sanitizer_lines(report)
    assert lines[0].startswith("==1==ERROR: AddressSanitizer: heap-use-after-free")
    assert any("backup_finish_internal src/backup.c:447" in ln for ln in lines)
    assert any(ln.startswith("freed by thread T2") for ln in lines)
    assert lines[-1].startswith("SUMMARY")
