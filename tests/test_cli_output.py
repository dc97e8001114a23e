"""What the command says, and its exit code, match what DEST holds, whatever
happens around the run (docs/cli.md#exit-codes).

Each race is made deterministic with the command's test-only pause hook:
the command stops in a phase, the test changes the files, then removes the
marker file to let it go on (or signals it).
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from cli_helpers import (
    TIMEOUT,
    can_mount,
    command,
    digest,
    json_of,
    leftovers,
    marker_path,
    paused_env,
    run,
    wait_for,
    without_preload,
)
from copy_helpers import make_source, make_target, query

OLD = [("old content",)]


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


def run_paused(args, tmp_path, phase, change, stdout=subprocess.PIPE):
    """Run the command until `phase`, call change(), let it go on; the
    finished process (returncode, stdout, stderr)."""
    marker = marker_path(tmp_path, phase)
    proc = subprocess.Popen(
        command(*args),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=paused_env(phase, marker),
    )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, phase)
        assert marker.exists(), f"never reached {phase}: {proc.communicate()}"
        change(proc)
        marker.unlink()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    return proc.returncode, out, err


# --- 6: ENOSPC while overwriting an existing DEST -----------------------------

# Mount a small tmpfs on $1, put the old DEST there, run the command, then
# copy what the folder holds out to $2 for the test to look at.
FULL_DISK = r"""
set -e
mount -t tmpfs -o size=600k tmpfs "$1"
cp "$OLD" "$1/dest.db"
set +e
LD_PRELOAD=$CHILD_PRELOAD "$PYTHON" -m apsw_backup --json --overwrite "$BIG" "$1/dest.db" >"$2/stdout" 2>"$2/stderr"
echo $? >"$2/code"
cp -a "$1/." "$2/after/"
"""


def test_enospc_into_an_existing_dest_rolls_it_back_before_saying_so(tmp_path):
    if not can_mount(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    big = make_source(tmp_path / "big.db", rows=4000, blob=1000)
    old = make_target(tmp_path / "old.db")
    small, out = tmp_path / "small", tmp_path / "out"
    small.mkdir()
    (out / "after").mkdir(parents=True)
    env = {**without_preload(), "OLD": str(old), "BIG": str(big)}
    env["PYTHON"] = sys.executable
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", FULL_DISK,
         "sh", str(small), str(out)],
        env=env, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    stderr = (out / "stderr").read_text()
    assert (out / "code").read_text().strip() == "1", stderr
    assert "(ENOSPC)" in stderr
    assert f"DEST '{small / 'dest.db'}' was left as it was" in stderr
    assert json.loads((out / "stdout").read_text())["dest_state"] == "unchanged"
    # True without any help: no hot journal left to restore it, the very
    # bytes of the old DEST.
    assert sorted(os.listdir(out / "after")) == ["dest.db"]
    assert digest(out / "after" / "dest.db") == digest(old)
    assert query(out / "after" / "dest.db", "SELECT note FROM old") == OLD


# --- 7 and 8: another file appears at DEST ------------------------------------


def test_a_file_appearing_at_dest_before_the_copy_opens_it_is_not_overwritten(
    source, tmp_path
):
    dest = tmp_path / "dest.db"

    def another_run_makes_it(proc):
        make_target(dest)

    code, out, err = run_paused(
        ["--json", source, dest], tmp_path, "opening", another_run_makes_it
    )
    assert code == 1, err
    assert query(dest, "SELECT note FROM old") == OLD  # left alone
    result = json.loads(out)
    assert result["dest_state"] == "other file"
    assert "another file appeared at DEST" in err
    assert "was left alone" in err
    assert "verified copy" not in err
    assert leftovers(tmp_path, keep=["source.db", "dest.db"]) == []


def test_a_file_appearing_at_dest_while_verifying_is_not_reported_verified(
    source, tmp_path
):
    dest = tmp_path / "dest.db"

    def another_run_makes_it(proc):
        dest.write_bytes(b"not the copy")

    code, out, err = run_paused(
        ["--json", source, dest], tmp_path, "verifying", another_run_makes_it
    )
    assert code == 1, err
    assert dest.read_bytes() == b"not the copy"
    result = json.loads(out)
    assert result["dest_state"] == "other file"
    assert "holds the complete" not in err
    assert "holds another file" in err
    assert leftovers(tmp_path, keep=["source.db", "dest.db"]) == []


# --- 10: every figure read from the file it describes ---------------------------


def test_json_journal_mode_is_read_from_a_wal_dest(source, tmp_path):
    dest = tmp_path / "dest.db"
    db = sqlite3.connect(dest, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE old(note TEXT)")
    db.execute("INSERT INTO old VALUES ('old content')")
    db.close()
    proc = run("--json", "--overwrite", source, dest)
    assert proc.returncode == 0, proc.stderr
    result = json_of(proc)
    header = dest.read_bytes()[:100]
    assert header[18:20] == b"\x02\x02"  # an existing WAL DEST stays WAL
    assert result["journal_mode"] == "wal"
    assert result["page_size"] == int.from_bytes(header[16:18], "big")
    assert result["pages"] == int.from_bytes(header[28:32], "big")
    assert result["bytes"] == result["pages"] * result["page_size"]


def test_json_journal_mode_of_a_rollback_copy_is_delete(source, tmp_path):
    proc = run("--json", source, tmp_path / "dest.db")
    assert json_of(proc)["journal_mode"] == "delete"


# --- 11: signals at start-up and after the summary ---------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_start_up_still_prints_json_and_its_exit_code(
    source, tmp_path, signum
):
    dest = tmp_path / "dest.db"
    code, out, err = run_paused(
        ["--json", source, dest],
        tmp_path,
        "starting",
        lambda proc: proc.send_signal(signum),
    )
    assert code == 128 + signum, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["exit_code"] == code
    assert result["dest_state"] == "not created"
    assert not dest.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_summary_does_not_change_the_exit_code(
    source, tmp_path, signum
):
    dest = tmp_path / "dest.db"
    code, out, err = run_paused(
        ["--json", source, dest],
        tmp_path,
        "reported",
        lambda proc: proc.send_signal(signum),
    )
    result = json.loads(out)
    assert code == result["exit_code"] == 0, err
    assert "Traceback" not in err
    assert result["dest_state"] == "verified"


# --- 12: output failures -----------------------------------------------------


def closed_pipe():
    """A pipe whose reader is gone (`| head -c1` once head has exited)."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("options", [["--json"], []])
def test_stdout_closed_after_a_verified_backup_keeps_exit_0(source, tmp_path, options):
    dest = tmp_path / "dest.db"
    write = closed_pipe()
    try:
        proc = subprocess.run(
            command(*options, source, dest),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]


def test_stdout_closed_on_a_failure_keeps_its_exit_code(tmp_path):
    write = closed_pipe()
    try:
        proc = subprocess.run(
            command("--json", tmp_path / "missing.db", tmp_path / "dest.db"),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_dest_name_that_is_not_utf8(source, tmp_path):
    # stdout strict UTF-8, as in a user's en_US.UTF-8 locale (in the C
    # locale, or UTF-8 mode, Python escapes such bytes by itself).
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    dest = os.fsencode(tmp_path) + b"/d\xff\xfe.db"
    proc = subprocess.run(
        [*command(source), dest],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert dest in proc.stdout  # the name's own bytes
    assert os.path.exists(dest)
    proc = subprocess.run(
        [*command("--json", source), dest + b"2"],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert os.fsencode(result["dest"]) == dest + b"2"


def test_epipe_on_the_progress_line_does_not_stop_the_copy(source, tmp_path):
    dest = tmp_path / "dest.db"
    write = closed_pipe()
    try:
        proc = subprocess.run(
            command("--json", "--progress", "--pages", "1", source, dest),
            stdout=subprocess.PIPE,
            stderr=write,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.returncode == 0
    result = json.loads(proc.stdout)
    assert result["exit_code"] == 0
    assert result["dest_state"] == "verified"
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]


def test_a_closed_stderr_never_lands_in_the_backup(source, tmp_path):
    # With descriptor 2 closed, the copy's temporary file would get it: the
    # command opens /dev/null there first.
    dest = tmp_path / "dest.db"
    proc = subprocess.run(
        [*command("--progress", "--pages", "1", source, dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=TIMEOUT,
        check=False,
        preexec_fn=lambda: os.close(2),
    )
    assert proc.returncode == 0
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]


def test_signals_while_the_process_exits_do_not_change_the_exit_code(source, tmp_path):
    # SIGTERM again and again from the moment the outcome is printed until
    # the process is gone: Python's shutdown puts the default handlers back,
    # which would kill it with the signal after it printed exit_code 0.
    proc = subprocess.Popen(
        command("--json", source, tmp_path / "dest.db"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert json.loads(line)["exit_code"] == 0
    assert proc.returncode == 0


def test_a_character_the_stream_cannot_encode_does_not_silence_it():
    import io

    from apsw_backup.cli import output

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    assert output.write_to(stream, "caf\u00e9 \udcff\n")
    assert output.write_to(stream, "next line\n")
    assert raw.getvalue() == b"caf\\xe9 \\udcff\nnext line\n"
