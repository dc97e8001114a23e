"""Verification as users meet it (docs/verification.md): copy(verify=...)
and the command line's --verify levels, `apsw-backup verify`, exit 3 with
the page numbers, the checks and their times in --json.

Each damage is made the way it happens: a page changed on the disk after
SQLite wrote it (the test hook), a write the disk dropped (the fault shim),
a b-tree page zeroed in SOURCE, an index that disagrees with its table."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import run
from verify_helpers import build, disagreeing_index, leaf_pages, write_page

import apsw_backup
from apsw_backup import verify

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def source(tmp_path):
    return build(tmp_path / "source.db")


def zeroed_btree_page(path: Path) -> Path:
    build(path)
    write_page(path, leaf_pages(path, "events")[3])
    return path


def checks_of(report):
    return {c["name"]: c for c in report["verification"]["checks"]}


# -- copy() ------------------------------------------------------------------


def test_copy_verify_default_hashes_rereads_and_quick_checks(tmp_path, source):
    seen = []
    result = apsw_backup.copy(
        source, tmp_path / "dest.db", verify="default", verify_progress=seen.append
    )
    v = result.verification
    assert v is not None and v.ok and v.level == "default"
    ran = {c.name: c for c in v.checks}
    assert set(ran) == {"read_back", "quick_check"}
    assert ran["read_back"].outcome == "ok" and ran["read_back"].detail["checked"] > 0
    assert ran["read_back"].detail["cache_dropped"] is True
    assert all(c.seconds >= 0 for c in v.checks)
    assert seen[0].fraction == 0.0 and seen[-1].fraction == 1.0
    assert seen[-1].phase == "verifying (default)"


def test_copy_verify_full_finds_an_index_that_disagrees_and_default_does_not(
    tmp_path,
):
    bad = disagreeing_index(tmp_path / "bad.db")
    quick = apsw_backup.copy(bad, tmp_path / "a.db", verify="default")
    assert quick.verification.ok  # what the default level misses (documented)
    dest = tmp_path / "b.db"
    with pytest.raises(verify.VerificationFailed) as info:
        apsw_backup.copy(bad, dest, verify="full")
    failed = info.value
    assert failed.check == "integrity_check"
    assert any("missing from index events_kind" in p for p in failed.problems)
    assert failed.verification.exit_code == 3
    assert not dest.exists()


def test_copy_verify_reports_a_page_changed_on_disk_with_its_number(
    tmp_path, source, monkeypatch
):
    monkeypatch.setenv(verify.TAMPER_ENV, "5")
    dest = tmp_path / "dest.db"
    with pytest.raises(verify.VerificationFailed) as info:
        apsw_backup.copy(source, dest, verify="default")
    assert info.value.pages == [5] and info.value.check == "pages"
    assert "(page 5)" in str(info.value)
    assert not dest.exists()


def test_copy_verify_into_an_existing_file_and_a_connection(tmp_path, source):
    existing = tmp_path / "existing.db"
    build(existing, rows=9000)  # larger: the copy truncates it
    result = apsw_backup.copy(source, existing, verify="default")
    assert {c.name: c.outcome for c in result.verification.checks} == {
        "read_back": "ok",
        "quick_check": "ok",
    }
    target = apsw_backup.Connection(str(tmp_path / "conn.db"))
    try:
        result = apsw_backup.copy(source, target, verify="full")
    finally:
        target.close()
    first = result.verification.checks[0]
    # A connection of the caller's was not opened through the recorder.
    assert (first.name, first.outcome) == ("read_back", "skipped")
    assert result.verification.ok


def test_copy_verify_refuses_bad_values(tmp_path, source):
    with pytest.raises(ValueError, match="'default', 'full', a callable or None"):
        apsw_backup.copy(source, tmp_path / "d.db", verify="quick")
    with pytest.raises(TypeError, match="verify must be"):
        apsw_backup.copy(source, tmp_path / "d.db", verify=3)
    with pytest.raises(TypeError, match="verify_progress must be callable"):
        apsw_backup.copy(source, tmp_path / "d.db", verify="full", verify_progress=1)
    memory = apsw_backup.Connection(":memory:")
    try:
        with pytest.raises(ValueError, match="in memory"):
            apsw_backup.copy(source, memory, verify="default")
    finally:
        memory.close()
    assert not (tmp_path / "d.db").exists()


def test_a_progress_callback_that_raises_stops_verification(tmp_path, source):
    def stop(progress):
        raise KeyboardInterrupt

    dest = tmp_path / "dest.db"
    with pytest.raises(KeyboardInterrupt):
        apsw_backup.copy(source, dest, verify="full", verify_progress=stop)
    assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == ["source.db"]


# -- the command line ----------------------------------------------------------


def test_cli_default_level_runs_the_byte_check_and_quick_check(tmp_path, source):
    proc = run("--json", source, tmp_path / "dest.db")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    checks = checks_of(report)
    assert report["verification"]["level"] == "default"
    assert set(checks) == {"read_back", "quick_check"}
    assert all(c["outcome"] == "ok" and c["seconds"] >= 0 for c in checks.values())


def test_cli_full_level_runs_integrity_check_by_table(tmp_path, source):
    proc = run("--json", "--verify", "full", source, tmp_path / "dest.db")
    assert proc.returncode == 0, proc.stderr
    checks = checks_of(json.loads(proc.stdout))
    assert "read_back" in checks and "quick_check" in checks
    if verify._runtime_version() >= verify.TABLE_CHECK_VERSION:
        for table in ("users", "events"):  # whole, or in pieces
            assert any(n.startswith(f"integrity_check({table}") for n in checks)


def test_cli_a_page_changed_on_disk_exits_3_naming_the_page(tmp_path, source):
    dest = tmp_path / "dest.db"
    env = {**os.environ, verify.TAMPER_ENV: "7"}
    proc = run("--json", source, dest, env=env)
    assert proc.returncode == 3, proc.stderr
    assert "page 7" in proc.stderr and "SOURCE is not in question" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["verification"]["pages"] == [7]
    assert checks_of(report)["read_back"]["outcome"] == "problems"
    assert report["dest_state"] == "not created" and not dest.exists()


def test_cli_a_zeroed_btree_page_exits_3_at_the_default_level(tmp_path):
    source = zeroed_btree_page(tmp_path / "source.db")
    proc = run("--json", source, tmp_path / "dest.db")
    assert proc.returncode == 3, proc.stderr
    assert "PRAGMA quick_check of the copy reported" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["verification"]["pages"]  # the damaged pages are named
    assert checks_of(report)["read_back"]["outcome"] == "ok"  # faithfully copied


def test_cli_an_index_that_disagrees_exits_3_at_full_only(tmp_path):
    bad = disagreeing_index(tmp_path / "bad.db")
    proc = run(bad, tmp_path / "a.db")
    assert proc.returncode == 0, proc.stderr  # quick_check cannot see it
    proc = run("--verify", "full", bad, tmp_path / "b.db")
    assert proc.returncode == 3, proc.stderr
    assert "missing from index events_kind" in proc.stderr
    assert not (tmp_path / "b.db").exists()


DROPPING_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from faults import shim
    folder, work, nth = sys.argv[2], sys.argv[3], int(sys.argv[4])
    loaded = shim.load(folder)
    loaded.register_vfs(default=True)
    loaded.reset(work)
    loaded.arm_dropped_write(nth)
    from apsw_backup.cli import main
    code = main(sys.argv[5:])
    print(f"injected {loaded.injected()}", file=sys.stderr)
    raise SystemExit(code)
    """
)


@pytest.mark.parametrize("nth", [3, 5, 20])
def test_cli_a_dropped_write_exits_3_naming_the_page(tmp_path, source, nth):
    """The nth write into DEST's folder reports success but never reaches
    the disk (tests/faults shim as the default VFS, in a child process):
    the byte check names the page it lost, and the message blames the disk,
    not SOURCE.  (Write 3 loses page 1: the copy cannot even be read.)"""
    from faults import shim

    shim.build(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "dest.db"
    args = [str(TESTS), str(tmp_path), str(work), str(nth), "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", DROPPING_CHILD, *args, str(source), str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "injected 1" in proc.stderr
    assert proc.returncode == 3, proc.stderr
    report = json.loads(proc.stdout)
    (lost,) = [p for p in report["verification"]["problems"] if p["check"] == "pages"]
    assert len(lost["pages"]) == 1
    assert f"page {lost['pages'][0]}" in proc.stderr
    assert "SOURCE is not in question" in proc.stderr
    assert not dest.exists()


def test_verify_command_is_full_by_default(tmp_path):
    bad = disagreeing_index(tmp_path / "bad.db")
    proc = run("verify", "--json", bad)
    assert proc.returncode == 3
    (item,) = json.loads(proc.stdout)["files"]
    assert item["verification"]["level"] == "full"
    proc = run("verify", "--level", "default", bad)
    assert proc.returncode == 0, proc.stderr
    assert "quick_check ok (default" in proc.stdout


def test_verify_command_reports_each_check_and_its_time(tmp_path, source):
    proc = run("verify", "--json", source)
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)["files"]
    checks = {c["name"]: c for c in item["verification"]["checks"]}
    assert checks["read_back"]["outcome"] == "skipped"  # no hashes stored
    assert all(isinstance(c["seconds"], float) for c in checks.values())
    assert "integrity_check ok (full" in run("verify", source).stdout


def test_verify_level_options(tmp_path, source):
    proc = run("--verify", "none", source, tmp_path / "a.db")
    assert proc.returncode == 0 and "not verified" in proc.stdout
    proc = run("--verify", "full", "--no-verify", source, tmp_path / "b.db")
    assert proc.returncode == 2 and "contradicts" in proc.stderr
    proc = run("--verify", "quick", source, tmp_path / "b.db")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    help_text = run("--help").stdout
    for words in ("default", "full", "proves", "misses", "quick_check"):
        assert words in help_text
    assert not (tmp_path / "b.db").exists()


def test_acopy_verifies_too(tmp_path, source, monkeypatch):
    import asyncio

    result = asyncio.run(apsw_backup.acopy(source, tmp_path / "a.db", verify="full"))
    assert result.verification.ok and result.verification.level == "full"
    monkeypatch.setenv(verify.TAMPER_ENV, "2")
    with pytest.raises(verify.VerificationFailed) as info:
        asyncio.run(apsw_backup.acopy(source, tmp_path / "b.db", verify="default"))
    assert info.value.pages == [2]
    assert not (tmp_path / "b.db").exists()
