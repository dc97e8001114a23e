"""The apsw-backup command (docs/command-line.md), run as a real process.

Every run goes through ``sys.executable -m apsw_backup`` (the console script
is the same main()) with a timeout.  Databases are built and checked with the
standard library's sqlite3.
"""

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest
from cli_helpers import (
    TIMEOUT,
    Terminal,
    digest,
    json_of,
    leftovers,
    run,
    wait_for,
)
from copy_helpers import make_source, make_target, query

import apsw_backup
from apsw_backup import verify


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


def test_backup_prints_one_summary_line_and_copies(source, tmp_path):
    dest = tmp_path / "dest.db"
    proc = run("--pages", "20", source, dest)

    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stderr is not a terminal: no progress line
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    pages = query(source, "PRAGMA page_count")[0][0]
    assert re.fullmatch(
        rf"apsw-backup: copied .*source\.db -> .*dest\.db: {pages} pages "
        r"\(\d+\.\d MB\) in \d+\.\d\d s, 2 steps, 0 restarts; "
        r"pages re-read from the disk match, quick_check ok",
        lines[0],
    )
    sql = "SELECT * FROM t ORDER BY id"
    assert query(dest, sql) == query(source, sql)


def test_json_prints_one_object_with_the_summary_fields(source, tmp_path):
    dest = tmp_path / "dest.db"
    proc = run("--json", "--pages", "7", source, dest)

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    pages = query(source, "PRAGMA page_count")[0][0]
    page_size = query(source, "PRAGMA page_size")[0][0]
    assert summary["source"] == str(source)
    assert summary["dest"] == str(dest)
    assert summary["schema"] == "main"
    assert summary["pages"] == pages
    assert summary["page_size"] == page_size
    assert summary["bytes"] == pages * page_size
    assert summary["steps"] == -(-pages // 7)
    assert summary["restarts"] == 0
    assert summary["waits"] == 0
    assert summary["snapshot"] is False
    assert 0 < summary["elapsed"] < TIMEOUT
    assert summary["verified"] is True
    assert summary["integrity"] == ["ok"]


def test_no_verify_reports_verified_null(source, tmp_path):
    proc = run("--json", "--no-verify", source, tmp_path / "dest.db")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verified"] is None


def test_progress_flag_draws_phase_percent_pages_rate_eta_on_stderr(source, tmp_path):
    proc = run("--progress", "--pages", "5", source, tmp_path / "dest.db", text=False)

    assert proc.returncode == 0, proc.stderr
    stderr = proc.stderr.decode()
    assert stderr.startswith("\r")  # redrawn in place
    assert stderr.endswith("\n")
    assert stderr.count("\n") == 1
    states = [s.strip() for s in stderr.rstrip("\n").split("\r")[1:]]
    pages = query(source, "PRAGMA page_count")[0][0]
    assert re.fullmatch(
        rf"copying  \d+\.\d%  5/{pages} pages(  \d+\.\d MB/s)?  ETA (\d+:\d\d|--)",
        states[0],
    )
    assert re.fullmatch(
        rf"copied  100\.0%  {pages}/{pages} pages(  \d+\.\d MB/s)?",
        [s for s in states if s.startswith("copied")][-1],
    )
    # The verification phase: its level, percent and ETA, ending at 100%.
    verifying = [s for s in states if s.startswith("verifying")]
    for state in verifying:
        assert re.fullmatch(
            r"verifying( \(default\))? \d+\.\d s(  \d+%  ETA (\d+:\d\d|--)( .*)?)?",
            state,
        ), state
    assert re.match(r"verifying \(default\) \d+\.\d s  100%  ETA 0:00", verifying[-1])
    assert states[-2] == verifying[-1]
    assert re.fullmatch(
        rf"done: {pages} pages \(\d+\.\d MB\)  verified \(default\)  \d+\.\d\d s  "
        "0 restarts",
        states[-1],
    )


def run_on_terminal(*args):
    """Run the command with stderr on a pseudo-terminal; (code, stderr)."""
    return Terminal(args).read_until_exit()


@pytest.mark.parametrize(("flag", "shown"), [(None, True), ("--no-progress", False)])
def test_progress_is_on_by_default_only_when_stderr_is_a_terminal(
    source, tmp_path, flag, shown
):
    code, stderr = run_on_terminal(*filter(None, [flag, source, tmp_path / "dest.db"]))
    assert code == 0
    assert ("100.0%" in stderr) is shown


def test_refuses_non_empty_dest_without_overwrite_and_leaves_it_untouched(
    source, tmp_path
):
    dest = make_target(tmp_path / "dest.db")
    before = digest(dest)
    proc = run(source, dest)

    assert proc.returncode == 2
    assert "--overwrite" in proc.stderr
    assert str(dest) in proc.stderr
    assert digest(dest) == before
    assert proc.stdout == ""


def test_overwrite_replaces_non_empty_dest(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    proc = run("--overwrite", source, dest)

    assert proc.returncode == 0, proc.stderr
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]
    assert "old" not in [r[0] for r in query(dest, "SELECT name FROM sqlite_master")]


def test_empty_existing_dest_is_written_without_overwrite(source, tmp_path):
    dest = tmp_path / "dest.db"
    dest.touch()
    proc = run(source, dest)
    assert proc.returncode == 0, proc.stderr
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]


def test_refuses_dest_that_is_the_source(source):
    before = digest(source)
    proc = run("--overwrite", source, source)
    assert proc.returncode == 2
    assert "is SOURCE itself" in proc.stderr
    assert digest(source) == before


def test_missing_source_exits_1_naming_it_and_creates_no_file(tmp_path):
    missing, dest = tmp_path / "missing.db", tmp_path / "dest.db"
    proc = run(missing, dest)

    assert proc.returncode == 1
    assert str(missing) in proc.stderr
    assert "no such file or directory (ENOENT)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not missing.exists()
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["only-source.db"],
        ["--demo", "folder", "extra.db"],
        ["--sleep", "-1", "a.db", "b.db"],
        ["--timeout", "soon", "a.db", "b.db"],
        ["--pages", "many", "a.db", "b.db"],
    ],
)
def test_usage_errors_exit_2(tmp_path, args):
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: apsw-backup" in proc.stderr
    assert os.listdir(tmp_path) == []


def make_corrupt(path):
    """A database that opens and reads, but whose index disagrees with its
    table: the schema says DESC, the index was built ascending."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("CREATE TABLE t(x)")
    db.execute("CREATE INDEX ix ON t(x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX ix ON t(x DESC)' WHERE name='ix'"
    )
    db.close()
    assert query(path, "SELECT count(*) FROM t") == [(50,)]
    return path


def test_verification_failure_of_a_new_dest_exits_3_and_dest_never_appears(tmp_path):
    source = make_corrupt(tmp_path / "corrupt.db")
    dest = tmp_path / "dest.db"
    proc = run("--json", "--verify", "full", source, dest)

    assert proc.returncode == 3
    assert "verification failed" in proc.stderr
    assert "missing from index ix" in proc.stderr
    assert f"DEST '{dest}' was not created" in proc.stderr
    assert "apsw-backup verify" in proc.stderr  # how to check SOURCE
    summary = json_of(proc)
    assert summary["exit_code"] == 3
    assert summary["dest_state"] == "not created"
    assert any("missing from index ix" in line for line in summary["integrity"])
    assert not dest.exists()
    assert leftovers(tmp_path) == ["corrupt.db"]


def test_verification_failure_of_an_existing_dest_says_it_holds_the_failed_copy(
    tmp_path,
):
    source = make_corrupt(tmp_path / "corrupt.db")
    dest = make_target(tmp_path / "dest.db")
    proc = run("--json", "--overwrite", "--verify", "full", source, dest)

    assert proc.returncode == 3
    assert f"DEST '{dest}' holds the copy that failed verification" in proc.stderr
    assert json_of(proc)["dest_state"] == "failed verification"
    assert query(dest, "SELECT count(*) FROM t") == [(50,)]  # the copy is there


@pytest.mark.parametrize(
    "code, unreadable",
    [
        (266, True),  # SQLITE_IOERR_READ
        (10, True),
        (7, True),  # SQLITE_NOMEM
        (11, False),  # SQLITE_CORRUPT: the file's content, a real problem
        (779, False),  # SQLITE_CORRUPT_PAGE
    ],
)
@pytest.mark.parametrize(
    "page, later",
    [
        ("Page 3", "Page 13 is never used"),  # SQLite before 3.46
        ("Tree 2 page 3", "wrong # of entries in index t_name"),  # 3.46 on
    ],
)
def test_a_page_integrity_check_could_not_read_is_a_failure_to_check(
    code, unreadable, page, later
):
    """integrity_check lists a page it could not read among the file's
    problems; an I/O error or out-of-memory there is not a damaged copy
    (exit 1, not 3: the fault sweep's CLI case shows it end to end)."""
    found = verify.problem_lines(
        [
            (
                "*** in database main ***\n"
                f"{page}: unable to get the page. error code={code}\n"
                f"{later}",
            )
        ]
    )
    assert found == [f"{page}: unable to get the page. error code={code}", later]
    if not unreadable:
        verify._raise_if_unreadable(found, "integrity_check")  # left as found
        return
    with pytest.raises(verify._Unverified) as info:
        verify._raise_if_unreadable(found, "integrity_check")
    assert page in str(info.value) and f"error code {code}" in str(info.value)
    assert "says nothing about the file's content" in str(info.value)


def test_no_verify_skips_the_check_of_a_damaged_copy(tmp_path):
    source = make_corrupt(tmp_path / "corrupt.db")
    proc = run("--no-verify", source, tmp_path / "dest.db")
    assert proc.returncode == 0, proc.stderr
    assert "not verified" in proc.stdout


def test_timeout_on_a_locked_source_exits_1_and_removes_new_dest(tmp_path):
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "dest.db"
    locker = sqlite3.connect(str(source), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        proc = run("--sleep", "0.05", "--timeout", "0.3", source, dest)
    finally:
        locker.execute("COMMIT")
        locker.close()

    assert proc.returncode == 1
    assert "BusyError" in proc.stderr
    assert "gave up after" in proc.stderr
    assert "SOURCE was locked by another connection" in proc.stderr
    assert f"DEST '{dest}' was not created" in proc.stderr
    assert "copy()" not in proc.stderr and "target" not in proc.stderr
    assert not dest.exists()
    assert leftovers(tmp_path) == ["source.db"]


WRITER = r"""
import sqlite3, sys, time, pathlib
path, started, stop = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
db = sqlite3.connect(path, timeout=30, isolation_level=None)
deadline = time.monotonic() + 60
n = 0
while not stop.exists() and time.monotonic() < deadline:
    n += 1
    db.execute("INSERT INTO w(n) VALUES (?)", (n,))
    if n == 1:
        started.touch()
    time.sleep(0.002)
db.close()
print(n)
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_backup_of_a_source_another_process_is_writing_to(tmp_path, journal):
    source = make_source(tmp_path / "live.db", rows=2000, blob=1000, journal=journal)
    dest = tmp_path / "dest.db"
    started, stop = tmp_path / "started", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(source), str(started), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(started.exists, "the writer's first commit")
        proc = run("--json", "--pages", "5", "--sleep", "0.01", source, dest)
        before_stop = query(source, "SELECT count(*) FROM w")[0][0]
    finally:
        stop.touch()
        commits = int(writer.communicate(timeout=TIMEOUT)[0])

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["verified"] is True
    copied = query(dest, "SELECT count(*) FROM w")[0][0]
    assert 1 <= copied < before_stop <= commits  # it kept writing during the copy
    assert query(dest, "SELECT count(*) FROM t") == [(2000,)]


@pytest.mark.heavy  # the demo paces itself to be watched: about 3 s
def test_demo_backs_up_a_live_sample_shows_its_phases_and_keeps_its_files(tmp_path):
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    proc = run("--demo", "--progress", cwd=cwd, env=env)

    assert proc.returncode == 0, proc.stderr
    found = re.search(
        r"copied (\S+live\.db) -> (\S+live-\S+Z\.db): \d+ pages", proc.stdout
    )
    assert found, proc.stdout
    assert "pages re-read from the disk match, quick_check ok" in proc.stdout
    assert re.search(r"the writer committed [1-9]\d* times", proc.stderr)
    # (text=True reads each \r, which begins a redraw, as a line end.)
    states = [s.strip() for s in proc.stderr.splitlines()]
    assert any(s.startswith("copying (restarted ") for s in states)
    assert any(s.startswith("verifying ") for s in states)
    assert any(s.startswith("done: ") for s in states)
    # Every path it prints is there after it exits, in the folder it names,
    # which is under the system's temporary folder, not the current one.
    assert os.listdir(cwd) == []
    (folder,) = os.listdir(temp)
    assert folder.startswith("apsw-backup-demo-")
    source, backup = (cwd / found[1], cwd / found[2])
    assert source.is_file() and backup.is_file()
    assert source.parent == temp / folder
    assert f"the files are kept in {temp / folder}" in proc.stderr
    assert f"apsw-backup verify {backup}" in proc.stderr
    assert run("verify", backup).returncode == 0


def test_demo_writes_under_the_folder_it_is_given(tmp_path):
    cwd, given = tmp_path / "cwd", tmp_path / "given"
    cwd.mkdir()
    given.mkdir()
    proc = run("--demo", str(given), "--pages", "0", "--json", cwd=cwd)

    assert proc.returncode == 0, proc.stderr
    assert os.listdir(cwd) == []
    (folder,) = os.listdir(given)
    assert json.loads(proc.stdout)["source"] == str(given / folder / "live.db")
    assert f"the files are kept in {given / folder}" in proc.stderr


def test_demo_into_a_folder_that_is_not_there_exits_2_saying_so(tmp_path):
    proc = run("--demo", str(tmp_path / "missing"), cwd=tmp_path)

    assert proc.returncode == 2
    assert "--demo cannot make its folder under" in proc.stderr
    assert "missing" in proc.stderr and "--demo FOLDER" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_console_script_runs_the_same_command(source, tmp_path):
    script = shutil.which("apsw-backup") or shutil.which(
        "apsw-backup", path=os.path.dirname(sys.executable)
    )
    if script is None:
        pytest.skip("the apsw-backup console script is not installed")
    proc = subprocess.run(
        [script, "--json", source, tmp_path / "dest.db"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verified"] is True


STATES = [
    "DEST was not created",
    "DEST was left as it was",
    "DEST holds the complete copy, but it was not verified",
    "DEST holds the complete, verified copy",
]


def test_exit_codes_and_dest_states_are_documented_in_help_docstring_and_readme():
    from pathlib import Path

    import apsw_backup.cli

    help_text = run("--help").stdout
    # The exit codes' table is in the command line's reference page.
    readme = (Path(__file__).parent.parent / "docs" / "command-line.md").read_text()
    docstring = apsw_backup.cli.__doc__
    for text in (help_text, docstring):
        flat = " ".join(text.split())
        for code in ("0 ", "1 ", "2 ", "3 ", "130 ", "143"):
            assert f"\n  {code}" in text or f" {code}" in flat
        for state in STATES:
            assert state in flat, state
    for code in ("`0`", "`1`", "`2`", "`3`", "`130`", "`143`"):
        assert code in readme
    for state in (
        "was not created",
        "was left as it was",
        "not verified",
        "complete, verified copy",
    ):
        assert state in readme


def test_python_m_and_the_console_script_share_main():
    # python -m apsw_backup runs apsw_backup.cli.main, the console script's
    # entry point: the same arguments, output and exit codes.
    from pathlib import Path

    main = (Path(__file__).parent.parent / "apsw_backup" / "__main__.py").read_text()
    assert "from apsw_backup.cli import main" in main
    assert "raise SystemExit(main())" in main
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'apsw-backup = "apsw_backup.cli:main"' in pyproject


def test_one_row_answers_are_counted_a_problem_a_line(tmp_path, monkeypatch):
    # Damaged b-tree pages: SQLite can answer integrity_check with one row
    # that holds every problem, a line each, under "*** in database main ***"
    # (seen on 3.40 with 200 garbled pages: "reported 1 problem(s)" before).
    answer = "*** in database main ***\nPage 5: btreeInitPage() returns error code 11"
    answer += "\nPage 6: btreeInitPage() returns error code 11"
    real = apsw_backup.Connection

    class OneRow(real):
        def execute(self, sql, *args):
            if sql.startswith("PRAGMA quick_check"):
                return iter([(answer,)])
            return super().execute(sql, *args)

    monkeypatch.setattr(apsw_backup, "Connection", OneRow)
    path = tmp_path / "copy.db"
    sqlite3.connect(str(path)).execute("CREATE TABLE t(x)").connection.close()
    result = verify.verify(path, "default")
    found = [p.message for p in result.problems]
    assert found == [
        "Page 5: btreeInitPage() returns error code 11",
        "Page 6: btreeInitPage() returns error code 11",
    ]
    assert result.pages == [5, 6] and result.exit_code == 3
    assert verify.problems_text(found).startswith("2 problem(s): Page 5")
