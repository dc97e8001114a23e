"""One --json schema for every outcome (docs/cli.md#json-output).

Every exit path of the command -- usage errors, refusals, failures of
SOURCE and DEST, timeouts, verification failures, signals, success -- is
run for real, and its one JSON object is held to the schema in
apsw_backup.cli.output (the keys, their types, dest_state's values) and to
the exit status.
"""

import signal
import sqlite3

import pytest
from cli_helpers import interrupt_in, json_of, run
from copy_helpers import make_source, make_target
from test_cli import make_corrupt

from apsw_backup.cli import output


def check(proc, code, verify=False):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    obj = json_of(proc)
    assert output.problems(obj, verify=verify) == []
    assert obj["exit_code"] == code
    assert obj["error"] is None or obj["error"]["message"] in proc.stderr
    return obj


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


USAGE = [
    [],
    ["a.db"],
    ["--pages", "x", "a.db", "b.db"],
    ["--pages", "99999999999", "a.db", "b.db"],
    ["--sleep", "-1", "a.db", "b.db"],
    ["--keep", "0", "a.db", "folder/"],
    ["--keep", "2", "--no-verify", "a.db", "folder/"],
    ["--demo", "a.db", "b.db"],
    ["--no-such-option", "a.db", "b.db"],
]


@pytest.mark.parametrize("args", USAGE, ids=" ".join)
def test_usage_errors(tmp_path, args):
    obj = check(run("--json", *args, cwd=tmp_path), 2)
    assert obj["dest_state"] == "not created"
    assert obj["error"]["class"] == "UsageError"
    if obj["dest"] is not None:  # the message ends saying what DEST holds
        assert obj["error"]["message"].endswith(f"DEST '{obj['dest']}' was not created")


def test_pages_too_large_names_the_limit(tmp_path):
    proc = run("--json", "--pages", "99999999999", "a.db", "b.db", cwd=tmp_path)
    obj = check(proc, 2)
    assert "2147483647" in obj["error"]["message"]
    assert obj["source"] == "a.db" and obj["dest"] == "b.db"


def test_usage_error_with_an_existing_dest_says_it_is_unchanged(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    obj = check(run("--json", "--pages", "x", source, dest), 2)
    assert obj["dest_state"] == "unchanged"


def test_refusals(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    assert check(run("--json", source, dest), 2)["dest_state"] == "unchanged"
    obj = check(run("--json", source, source), 2)
    assert obj["dest_state"] == "unchanged"
    obj = check(run("--json", source, f"{source}-wal"), 2)
    assert obj["dest_state"] == "not created"


def test_failures_before_the_copy(tmp_path, source):
    obj = check(run("--json", tmp_path / "missing.db", tmp_path / "d.db"), 1)
    assert obj["dest_state"] == "not created"
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"x" * 4096)
    check(run("--json", junk, tmp_path / "d.db"), 1)
    check(run("--json", source, tmp_path / "no" / "d.db"), 1)


def test_timeout(source, tmp_path):
    locker = sqlite3.connect(str(source), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        proc = run(
            "--json", "--sleep", "0.01", "--timeout", "0.2", source, tmp_path / "d.db"
        )
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert check(proc, 1)["error"]["class"] == "BusyError"


def test_verification_failure(tmp_path):
    corrupt = make_corrupt(tmp_path / "corrupt.db")
    # (an index that disagrees with its table: the full level finds it)
    obj = check(run("--json", "--verify", "full", corrupt, tmp_path / "d.db"), 3)
    assert obj["verified"] is False
    assert obj["integrity"]
    assert obj["verification"]["status"] == "problems"
    dest = make_target(tmp_path / "old.db")
    obj = check(run("--json", "--overwrite", "--verify", "full", corrupt, dest), 3)
    assert obj["dest_state"] == "failed verification"


@pytest.mark.parametrize(
    "options", [[], ["--no-verify"], ["--keep-wal"], ["--pages", "0"]]
)
def test_success(source, tmp_path, options):
    obj = check(run("--json", *options, source, tmp_path / "d.db"), 0)
    assert obj["dest_state"] == (
        "complete" if options == ["--no-verify"] else "verified"
    )
    assert obj["pages"] > 0


def test_success_into_a_folder_with_keep(source, tmp_path):
    folder = tmp_path / "backups"
    folder.mkdir()
    check(run("--json", "--keep", "1", source, folder), 0)
    obj = check(run("--json", "--keep", "1", source, folder), 0)
    assert obj["folder"] == str(folder)
    assert len(obj["deleted"]) == 1


@pytest.mark.parametrize(
    ("phase", "signum"),
    [("starting", signal.SIGINT), ("opening", signal.SIGTERM), ("done", signal.SIGINT)],
)
def test_interrupted(source, tmp_path, phase, signum):
    dest = tmp_path / "d.db"
    code, stdout, stderr = interrupt_in(
        phase, ["--json", source, dest], tmp_path, signum
    )

    class Proc:
        returncode = code

    Proc.stdout, Proc.stderr = stdout, stderr
    obj = check(Proc, 128 + signum)
    assert obj["dest_state"] == ("verified" if phase == "done" else "not created")


# --- verify ------------------------------------------------------------------


def test_verify_outcomes(source, tmp_path):
    check(run("verify", "--json", source), 0, verify=True)
    obj = check(
        run("verify", "--json", source, tmp_path / "missing.db"), 1, verify=True
    )
    assert [item["exit_code"] for item in obj["files"]] == [0, 1]
    corrupt = make_corrupt(tmp_path / "corrupt.db")
    check(run("verify", "--json", corrupt), 3, verify=True)
    empty = tmp_path / "empty.db"
    empty.touch()
    check(run("verify", "--json", empty), 3, verify=True)


@pytest.mark.parametrize("args", [[], ["--timeout", "x", "f.db"], ["--bad", "f.db"]])
def test_verify_usage_errors(tmp_path, args):
    obj = check(run("verify", "--json", *args, cwd=tmp_path), 2, verify=True)
    assert obj["files"] == []


def test_the_schema_check_finds_what_is_wrong():
    good = output.backup_object(ok=True, exit_code=0, dest_state="verified")
    assert output.problems(good) == []
    assert output.problems({**good, "extra": 1}) == ["extra is not in the schema"]
    bad = {k: v for k, v in good.items() if k != "dest_state"}
    assert "dest_state is missing" in output.problems(bad)
    assert output.problems({**good, "dest_state": "fine"})
    assert output.problems({**good, "exit_code": 1})  # error must be set
