"""The file-system fault harness (tests/fsfaults/, docs/testing.md "File-system
fault harness"): the bounded pass (.ci/fsfaults --bounded runs this file, a
step of .ci/run; .ci/fsfaults the full matrix), the harness's own checks
shown to catch what they look for, and the defects it found, each as a
small case of its own."""

import errno
import os
import subprocess
import sys
import time

import pytest
from cli_helpers import TIMEOUT, run
from copy_helpers import make_source
from fsfaults import checks, incremental, runner, strace
from fsfaults.scenarios import SCENARIOS

# Calls sampled per scenario in the bounded pass, each killed and failed
# once (about 2 minutes for the six scenarios on 2 cores).
BOUNDED = int(os.environ.get("FSFAULTS_BOUNDED", "30"))
# The same for the incremental scenarios (--incremental, restore): each
# scenario's own count, about 50 s for the seven; FSFAULTS_INC_BOUNDED
# sets one count for all.
INC_BOUNDED = os.environ.get("FSFAULTS_INC_BOUNDED")

STRACE = strace.available()
needs_strace = pytest.mark.skipif(
    STRACE is not None, reason=f"the harness needs strace: {STRACE}"
)

TRACE = """\
100 execve("/venv/bin/python", ["python"], 0x0 /* 1 vars */) = 0
100 getcwd("/r/cwd", 4096) = 8
100 newfstatat(AT_FDCWD</r/cwd>, "/usr/lib/x.py", 0x1, 0) = -1 ENOENT (No such file)
100 newfstatat(AT_FDCWD</r/cwd>, "/r/data/src.db", {st_mode=S_IFREG|0644}, 0) = 0
100 openat(AT_FDCWD</r/cwd>, "/r/data/d.db.apsw-backup-100-0a1b2c3d.partial", O_RDWR|O_CREAT|O_EXCL, 0666) = 4</r/data/d.db.apsw-backup-100-0a1b2c3d.partial>
101 newfstatat(AT_FDCWD</r/cwd>, "/r/data/src.db", {st_mode=S_IFREG|0644}, 0) = 0
100 pwrite64(4</r/data/d.db.apsw-backup-100-0a1b2c3d.partial>, "SQLite", 4096, 0) = 4096
100 write(1<pipe:[5]>, "{}", 2) = 2
"""


def test_the_trace_parser_counts_per_thread_and_keeps_the_scenario_files():
    calls = strace.parse(TRACE, "/r", "/r/data")
    assert [c.key for c in calls] == [
        "newfstatat(ROOT/data/src.db)",
        "openat(ROOT/data/d.db.apsw-backup-P.partial)",
        "newfstatat(ROOT/data/src.db)",
        "pwrite64(ROOT/data/d.db.apsw-backup-P.partial)",
    ]
    # strace's `when` counts each syscall per thread: the start-up stat is
    # the main thread's first newfstatat, the thread's own stat its first.
    assert [(c.name, c.when, c.thread) for c in calls] == [
        ("newfstatat", 2, False),
        ("openat", 1, False),
        ("newfstatat", 1, True),
        ("pwrite64", 1, False),
    ]


def test_a_nameless_file_is_the_same_call_whatever_its_inode():
    # Two runs of a restore make their scratch files (O_TMPFILE) with
    # different inode numbers: the same call, or every fault aimed at one
    # would count as landing elsewhere.
    keys = {
        strace.call_key("ftruncate", f"5</r/data/#{n}>, 4096) = 0", "/r")
        for n in (2146707, 2146675)
    }
    assert keys == {"ftruncate(ROOT/data/#INODE)"}
    assert strace.normalise("/r/data/#12.db", "/r") == "ROOT/data/#12.db"


def test_the_bounded_sample_takes_the_first_and_last_call_and_alternates_errors():
    calls = [
        strace.Call(i, "openat" if i % 2 else "fsync", 1, "k", "", False)
        for i in range(50)
    ]
    plan = runner.sample(calls, 10)
    assert plan[0][0].index == 0 and plan[-1][0].index == 49
    assert all(faults[0] == runner.KILL for _call, faults in plan)
    assert {faults[1] for _call, faults in plan} >= {"error=ENOSPC", "error=EIO"}


@pytest.fixture
def existing(tmp_path):
    """The 'existing' scenario's files under tmp_path/run, and its Expected."""
    scenario = SCENARIOS["existing"]
    scenario.build(tmp_path / "run")
    return scenario, checks.Expected(scenario, tmp_path / "run"), tmp_path / "run"


def test_the_checks_catch_a_dest_state_that_does_not_match_dest(existing):
    scenario, expected, root = existing
    out = '{"exit_code": 0, "dest_state": "verified"}'
    # DEST still holds the old content, yet the run said "verified".
    found = checks.check_run(scenario, expected, root, 0, out, "", False)
    assert any("dest_state 'verified' but DEST is" in p for p in found), found
    assert any("exit 0 but DEST is not complete" in p for p in found), found


def test_the_checks_catch_unchanged_said_of_a_torn_dest(existing):
    scenario, expected, root = existing
    with open(scenario.dest(root), "r+b") as f:  # torn: not the old bytes
        f.seek(100)
        f.write(b"\xff" * 16)
    out = '{"exit_code": 1, "dest_state": "unchanged"}'
    found = checks.check_run(scenario, expected, root, 1, out, "", False)
    assert any("'unchanged' but DEST's file differs" in p for p in found), found


def test_the_checks_catch_an_exit_status_that_disagrees_and_a_missing_json(existing):
    scenario, expected, root = existing
    out = '{"exit_code": 1, "dest_state": "unchanged"}'
    found = checks.check_run(scenario, expected, root, 0, out, "", False)
    assert "exit status 0 but printed exit_code 1" in found
    found = checks.check_run(scenario, expected, root, 1, "", "Traceback ...", False)
    assert any(p.startswith("no JSON printed") for p in found), found
    assert any(p.startswith("a traceback") for p in found), found
    # A run killed by SIGKILL prints nothing: that alone is no problem.
    assert checks.check_run(scenario, expected, root, -9, "", "", True) == []


def test_the_checks_catch_leftovers_and_a_changed_source(existing):
    scenario, expected, root = existing
    data = scenario.data(root)
    (data / "dst.db.apsw-backup-1-0a1b2c3d.partial").write_bytes(b"x")
    assert checks.check_leftovers(scenario, expected, data) == [
        "left after the next run: ['dst.db.apsw-backup-1-0a1b2c3d.partial']"
    ]
    make_source(data / "other.db", rows=5)
    os.replace(data / "other.db", scenario.source(root))
    found = checks.check_run(scenario, expected, root, -9, "", "", True)
    assert "SOURCE's rows changed" in found


def test_the_checks_catch_fewer_backups_than_keep_promised(tmp_path):
    scenario = SCENARIOS["keep"]
    root = tmp_path / "run"
    scenario.build(root)
    expected = checks.Expected(scenario, root)
    os.unlink(scenario.old_backups(root)[0])
    found = checks.check_run(scenario, expected, root, -9, "", "", True)
    assert "1 good backups left, --keep 2 promised" in found


# --- the bounded pass ------------------------------------------------------------

RESULTS = []


@pytest.fixture(scope="module")
def summary():
    started = time.monotonic()
    yield RESULTS
    if RESULTS:
        print()
        for result in RESULTS:
            print(result.line())
        print(runner.summary(RESULTS, time.monotonic() - started))


@needs_strace
@pytest.mark.heavy
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bounded_pass(name, tmp_path, summary):
    result = runner.run_scenario(SCENARIOS[name], tmp_path, BOUNDED, log=lambda _: None)
    summary.append(result)
    assert result.calls > 20, "the recording found too few calls"
    assert result.drift <= result.runs // 10, "faults landed on other calls"
    assert not result.problems, "\n".join(
        f"{call!r} {fault}: {problem}" for call, fault, problem in result.problems
    )


@needs_strace
@pytest.mark.heavy
@pytest.mark.parametrize("name", list(incremental.SCENARIOS))
def test_bounded_pass_incremental(name, tmp_path, summary):
    scenario = incremental.SCENARIOS[name]
    bounded = int(INC_BOUNDED) if INC_BOUNDED else scenario.bounded
    result = runner.run_scenario(scenario, tmp_path, bounded, log=lambda _: None)
    summary.append(result)
    assert result.calls > 20, "the recording found too few calls"
    assert result.drift <= max(1, result.runs // 10), "faults landed on other calls"
    assert not result.problems, "\n".join(
        f"{call!r} {fault}: {problem}" for call, fault, problem in result.problems
    )


# --- what the harness found -------------------------------------------------------


def test_a_killed_verify_leaves_nothing_the_next_verify_keeps(tmp_path):
    # A verify killed while reading a WAL file leaves the empty -wal and the
    # -shm its read-only connection made; the next verify kept them for ever
    # (it removed only the ones it had made itself).  Found by the harness
    # ('verify', kill at the -shm's writes); checked: failed before the fix.
    path = make_source(tmp_path / "w.db", journal="wal")
    killed_reader = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
        "db.execute('PRAGMA integrity_check').fetchall()\n"
        "os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", killed_reader, str(path)], timeout=TIMEOUT)
    assert sorted(os.listdir(tmp_path)) == ["w.db", "w.db-shm", "w.db-wal"]
    proc = run("verify", "--json", path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["w.db"]


def test_verify_keeps_a_wal_with_frames_and_a_live_connection_s_files(tmp_path):
    # The cleanup above never takes what is not empty, nor what another
    # connection has open.
    path = make_source(tmp_path / "w.db", journal="wal")
    live = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         "db = sqlite3.connect(sys.argv[1])\n"
         "db.execute('SELECT count(*) FROM t').fetchall()\n"
         "print('open', flush=True)\n"
         "sys.stdin.read()\n", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert live.stdout.readline() == "open\n"
        assert run("verify", path).returncode == 0
        assert sorted(os.listdir(tmp_path)) == ["w.db", "w.db-shm", "w.db-wal"]
    finally:
        live.stdin.close()
        live.wait(TIMEOUT)


def _after_the_commit(calls, dest_key):
    """The main thread's calls from the commit's first write into DEST on:
    before the fix, the copy was committed saying WAL and then switched."""
    first = next(i for i, c in enumerate(calls) if c.key == dest_key)
    return [c for c in calls[first:] if not c.thread]


@needs_strace
def test_a_kill_right_after_the_commit_leaves_dest_in_rollback_mode(tmp_path):
    # A WAL SOURCE into an existing rollback DEST.  Before the fix the
    # backup committed DEST saying WAL (header bytes 18/19 = 2) and copy()
    # switched it back with PRAGMA journal_mode=DELETE, a second
    # transaction: a kill between the two, or during the switch (at the
    # sync of DEST's folder for its -journal), left DEST in WAL mode -- kept
    # by every later --overwrite run -- and a -journal no later run
    # removed.  Checked: failed before the fix (both kills).  Now the commit
    # itself writes page 1 saying rollback (the rollback shim).
    harness = runner.Harness(SCENARIOS["existing-wal"], tmp_path)
    calls = harness.record()
    after = _after_the_commit(calls, "pwrite64(ROOT/data/dst.db)")
    commit = next(c for c in after if c.key == "unlink(ROOT/data/dst.db-journal)")
    last_folder_sync = [c for c in calls if c.key == "fdatasync(ROOT/data)"][-1]
    for call in (after[after.index(commit) + 1], last_folder_sync):
        problems, _landed = harness.inject(call, runner.KILL)
        assert problems == [], call


@needs_strace
@pytest.mark.heavy
def test_a_kill_at_any_call_after_the_commit_leaves_dest_in_rollback_mode(tmp_path):
    # The whole window of the old switch, call by call (about 50 runs).
    # Checked: failed before the fix at kills from the commit's writes into
    # DEST on: DEST was left, or the next run left it, in WAL mode.
    harness = runner.Harness(SCENARIOS["existing-wal"], tmp_path)
    found = {}
    for call in _after_the_commit(harness.record(), "pwrite64(ROOT/data/dst.db)"):
        problems, _landed = harness.inject(call, runner.KILL)
        if problems:
            found[repr(call)] = problems
    assert found == {}


@needs_strace
@pytest.mark.parametrize("name", ["existing-wal", "new-wal", "keep"])
def test_a_copy_of_a_wal_source_never_opens_a_wal_for_dest(tmp_path, name):
    # DEST is never in WAL mode, not even for a moment: no -wal or -shm of
    # it (or of its temporary file) is ever opened.  Before the fix the
    # switch back opened both (SQLite reads page 1, sees WAL, opens the WAL
    # to switch out of it); so would any statement run on the backup's own
    # connection after the commit (its cached page 1 still says WAL).
    # Checked: failed before the fix for all three.
    calls = runner.Harness(SCENARIOS[name], tmp_path).record()
    opened = sorted(
        {
            c.key
            for c in calls
            if c.key.startswith("openat(")
            and c.key.endswith(("-wal)", "-shm)"))
            and "/src.db-" not in c.key
        }
    )
    assert opened == []


def test_a_failed_fsync_of_the_folder_after_the_link_leaves_no_dest(
    tmp_path, monkeypatch
):
    # EIO from the fsync of DEST's folder, after the copy was linked to
    # DEST's name: the command said "DEST was not created" (exit 1) while
    # DEST was in place.  Found by the harness ('new', EIO at fsync of the
    # folder); checked: failed before the fix.  Now the name is taken back.
    from apsw_backup import copy, files

    source = make_source(tmp_path / "s.db", rows=20)
    dest = tmp_path / "d.db"

    def failing_fsync(folder):
        raise OSError(errno.EIO, os.strerror(errno.EIO), folder)

    monkeypatch.setattr(files, "fsync_folder", failing_fsync)
    with pytest.raises(OSError) as info:
        copy(str(source), str(dest))
    assert info.value.errno == errno.EIO
    assert sorted(os.listdir(tmp_path)) == ["s.db"]


def test_the_command_says_not_created_when_the_folder_fsync_fails(tmp_path):
    # The same through the command line, with the fault injected by strace.
    if STRACE is not None:
        pytest.skip(f"needs strace: {STRACE}")
    harness = runner.Harness(SCENARIOS["new"], tmp_path)
    calls = harness.record()
    call = [c for c in calls if c.key == "fsync(ROOT/data)"][-1]
    problems, landed = harness.inject(call, "error=EIO")
    assert landed and problems == []


# With --keep, what could not be read is never taken for what it is not.
# Found by the harness ('keep', EIO at each call); each checked to fail
# before its fix.

UNREADABLE_HEADER = """\
import errno, sys
from apsw_backup import files
from apsw_backup.cli import main
real = files.read_header
def read_header(path, *args):
    if path.endswith(".partial"):
        raise OSError(errno.EIO, "Input/output error", path)
    return real(path, *args)
files.read_header = read_header
sys.exit(main(sys.argv[1:]))
"""


def keep_folder(tmp_path):
    scenario = SCENARIOS["keep"]
    scenario.build(tmp_path)
    return scenario, scenario.source(tmp_path), scenario.dest(tmp_path)


def test_keep_does_not_call_a_backup_whose_header_it_cannot_read_empty(tmp_path):
    # It said "the new backup holds no table" (exit 0) when reading the new
    # backup's header failed (EIO).
    scenario, source, folder = keep_folder(tmp_path)
    args = ["--json", "--keep", "1", str(source), f"{folder}/"]
    proc = subprocess.run(
        [sys.executable, "-c", UNREADABLE_HEADER, *args],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    result = checks.printed(proc.stdout)
    assert proc.returncode == 1, proc.stderr
    assert "holds no table" not in proc.stderr
    assert "header could not be read" in proc.stderr and "EIO" in proc.stderr
    assert result["dest_state"] == "verified" and result["exit_code"] == 1
    assert "could not be read" in result["rotation_skipped"]
    assert result["deleted"] == []
    assert len(os.listdir(folder)) == 3  # nothing deleted


@needs_strace
@pytest.mark.parametrize("syscall", ["lgetxattr", "newfstatat"])
def test_keep_reports_an_old_backup_it_cannot_look_at(tmp_path, syscall):
    # An EIO reading an older backup's mark (it was taken for "no mark":
    # warned about as unmarked) or from its lstat (skipped silently):
    # exit 0 with 3 backups left for --keep 2.  Now it is not deleted and
    # said so with its cause (exit 1), as a backup that cannot be deleted.
    harness = runner.Harness(SCENARIOS["keep"], tmp_path)
    calls = harness.record()
    old = "src-20200101T000000.000000Z.db"
    marks = [c for c in calls if c.name == "lgetxattr" and f'{old}"' in c.line]
    after = [
        c
        for c in calls[marks[0].index :]
        if c.name == syscall and f'{old}"' in c.line and "SYMLINK_NOFOLLOW" in c.line
    ]
    call = (marks if syscall == "lgetxattr" else after)[0]
    harness.reset()
    argv = strace.command(
        SCENARIOS["keep"].argv(harness.root),
        tmp_path / "trace",
        ("error=EIO", call.when),
        call.name,
    )
    code, out, err = harness.run(argv)
    result = checks.printed(out)
    assert code == 1, err
    assert result["not_deleted"] == [str(harness.root / "data" / "backups" / old)]
    assert "EIO" in err and result["dest_state"] == "verified"
    assert "no mark" not in err
    problems, _landed = harness.inject(call, "error=EIO")
    assert problems == []


@needs_strace
def test_an_error_looking_at_an_existing_dest_is_not_another_file_appearing(tmp_path):
    # An EIO from the lstat() that decides "new or existing" was taken for
    # "DEST does not exist" (os.path.lexists): the copy then found DEST at
    # its name and said "another file appeared at DEST" (dest_state 'other
    # file').  Found by the full matrix ('existing', EIO and ENOSPC);
    # checked: failed before the fix.  Now exit 1 naming the cause, DEST
    # left as it was.
    harness = runner.Harness(SCENARIOS["existing"], tmp_path)
    calls = harness.record()
    lstats = [
        c
        for c in calls[:60]
        if c.key == "newfstatat(ROOT/data/dst.db)" and "SYMLINK_NOFOLLOW" in c.line
    ]
    assert lstats
    for call in lstats:
        problems, landed = harness.inject(call, "error=EIO")
        assert landed and problems == [], call
    harness.reset()
    argv = strace.command(
        SCENARIOS["existing"].argv(harness.root),
        tmp_path / "trace",
        ("error=EIO", lstats[-1].when),
        "newfstatat",
    )
    code, out, err = harness.run(argv)
    assert code == 1 and "EIO" in err and "appeared" not in err, err
    assert checks.printed(out)["dest_state"] == "unchanged"
