"""Defects the file-system fault harness's incremental scenarios found
(tests/fsfaults/incremental.py; bounded pass in tests/test_fs_faults.py,
full matrix in .ci/fsfaults), each as a small case of its own; each
checked to fail before its fix.  The heavy ones (strace) run with the
bounded pass: .ci/fsfaults --bounded."""

import errno
import json
import os
import subprocess
import sys

import pytest
from cli_helpers import TIMEOUT
from copy_helpers import make_source
from fsfaults import checks, runner, strace
from fsfaults.incremental import SCENARIOS, _touch

from apsw_backup import incremental as inc

STRACE = strace.available()
needs_strace = pytest.mark.skipif(STRACE is not None, reason=f"needs strace: {STRACE}")


@needs_strace
@pytest.mark.heavy
@pytest.mark.parametrize("name", ["inc-base", "restore-existing"])
def test_an_error_resolving_the_shims_path_is_not_out_of_memory(tmp_path, name):
    # The delta shim (--incremental) and the overlay (restore into an
    # existing DEST) resolve their path with the VFS's xFullPathname, which
    # lstat()s each component: an ENOSPC or EIO there came out as
    # MemoryError, a traceback and no JSON.  Found by the harness
    # ('inc-keep', ENOSPC at a newfstatat of the folder).  Now exit 1
    # naming the folder and the cause.
    harness = runner.Harness(SCENARIOS[name], tmp_path)
    calls = harness.record()
    folder = "ROOT/data/backups)"
    stats = [c for c in calls if c.name == "newfstatat" and c.key.endswith(folder)]
    assert stats
    seen = []
    for call in stats:
        harness.reset()
        argv = strace.command(
            harness.scenario.argv(harness.root),
            tmp_path / "trace",
            ("error=ENOSPC", call.when),
            call.name,
        )
        code, out, err = harness.run(argv)
        assert "MemoryError" not in err and "Traceback" not in err, (call, err)
        result = checks.printed(out)
        assert isinstance(result, dict) and result["exit_code"] == code, (call, out)
        seen.append(code)
        problems, _landed = harness.inject(call, "error=ENOSPC")
        assert problems == [], call
    assert 1 in seen  # at least one of them failed the run


FAIL_REMOVE = """\
import errno, sys
from apsw_backup import incremental as inc
from apsw_backup.cli import main
def _remove(path):
    raise OSError(errno.EIO, "Input/output error", path)
inc._remove = _remove
sys.exit(main(sys.argv[1:]))
"""


def chain(tmp_path, points=1):
    source = make_source(tmp_path / "src.db", rows=200)
    folder = tmp_path / "backups"
    folder.mkdir()
    for n in range(points):
        inc.incremental(source, folder)
        _touch(source, n + 1)
    return source, folder


@pytest.mark.parametrize(
    "args", [["--keep", "1"], ["--rebase-share", "0.01"]], ids=["keep", "rebase"]
)
def test_a_failure_after_the_point_is_in_place_says_it_is_kept(tmp_path, args):
    # EIO removing the old base (--keep 1) or the delta a rebase turned into
    # a base: exit 1 with only the EIO, though the new point was made, is
    # in place and restores.  Found by the harness ('inc-keep', 'inc-rebase',
    # EIO at the folder's fsync after a removal).  Now the message and
    # "kept_point" name the point kept.
    source, folder = chain(tmp_path)
    before = set(os.listdir(folder))
    proc = subprocess.run(
        [sys.executable, "-c", FAIL_REMOVE, "--incremental", "--json", *args,
         str(source), f"{folder}/"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["exit_code"] == 1 and result["error"]["errno"] == errno.EIO
    kept = result["kept_point"]
    assert os.path.basename(kept) in set(os.listdir(folder)) - before
    assert kept in result["error"]["message"] and "kept" in proc.stderr
    inc.restore(kept, tmp_path / "r.db")  # it is a sound point
    assert checks.content(tmp_path / "r.db")[1] == checks.content(source)[1]


def test_the_python_api_names_the_point_kept_after_a_later_failure(
    tmp_path, monkeypatch
):
    source, folder = chain(tmp_path)

    def fail(*_args):
        raise OSError(errno.EIO, "Input/output error", str(folder))

    monkeypatch.setattr(inc, "_rotate", fail)
    with pytest.raises(OSError) as info:
        inc.incremental(source, folder, keep=1)
    kept = info.value.kept_point
    assert os.path.exists(kept) and kept in [p.path for p in inc.list_points(folder)]


# --- the incremental checks catch what they look for ------------------------------


def built(tmp_path, name):
    scenario = SCENARIOS[name]
    root = tmp_path / "run"
    scenario.build(root)
    return scenario, checks.Expected(scenario, root), root


def test_the_checks_catch_a_half_made_point_and_a_changed_old_one(tmp_path):
    scenario, expected, root = built(tmp_path, "inc-delta")
    folder = scenario.folder(root)
    old = sorted(os.listdir(folder))
    assert checks.check_run(scenario, expected, root, -9, "", "", True) == []
    # A point's file cut short under a later point's name: list shows it.
    data = (folder / old[-1]).read_bytes()
    half = old[-1].replace("2026", "2099", 1).replace("2027", "2099", 1)
    (folder / half).write_bytes(data[: len(data) // 2])
    found = checks.check_run(scenario, expected, root, -9, "", "", True)
    assert any(p.startswith(f"new point {half} does not restore") for p in found)
    assert any(p.startswith("verify FOLDER") for p in found), found
    os.remove(folder / half)
    # A byte of an old point flipped.
    with open(folder / old[0], "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    found = checks.check_run(scenario, expected, root, -9, "", "", True)
    assert f"old point {old[0]} changed" in found, found


def test_the_checks_catch_json_that_disagrees_with_the_folder(tmp_path):
    scenario, expected, root = built(tmp_path, "inc-delta")
    folder = scenario.folder(root)
    out = json.dumps(
        {"ok": True, "exit_code": 0, "path": str(folder / "x"), "kind": "delta"}
    )
    found = checks.check_run(scenario, expected, root, 0, out, "", False)
    assert "exit 0 but no new point" in found, found
    # A failure that leaves a new point in place and says nothing of it.
    source = scenario.source(root)
    new = inc.incremental(source, folder)
    out = json.dumps({"ok": False, "exit_code": 1, "error": {"message": "EIO"}})
    found = checks.check_run(scenario, expected, root, 1, out, "", False)
    assert any("says nothing of the new point" in p for p in found), found
    assert os.path.basename(new.path) in found[-1]
    # A junk file beside the points.
    (folder / "notes.txt").write_text("x")
    found = checks.check_leftovers(scenario, expected, scenario.data(root))
    assert "left after the next run: ['backups/notes.txt']" in found, found


@pytest.mark.parametrize("name", ["restore-new", "restore-existing"])
def test_the_checks_catch_a_torn_or_wrong_dest(tmp_path, name):
    scenario, expected, root = built(tmp_path, name)
    dest = scenario.dest(root)
    ok = '{"ok": true, "exit_code": 0}'
    if name == "restore-new":
        assert checks.check_run(scenario, expected, root, -9, "", "", True) == []
        found = checks.check_run(scenario, expected, root, 0, ok, "", False)
        assert "exit 0 but DEST is not complete" in found, found
        make_source(dest, rows=3)  # a database, not the point's
        found = checks.check_run(scenario, expected, root, -9, "", "", True)
        assert any(p.startswith("DEST exists but is not the restored") for p in found)
    else:
        found = checks.check_run(scenario, expected, root, 0, ok, "", False)
        assert "exit 0 but DEST is not complete" in found, found
        with open(dest, "r+b") as f:  # torn: its second page overwritten
            f.seek(4096)
            f.write(b"\xff" * 4096)
        found = checks.check_run(scenario, expected, root, -9, "", "", True)
        assert any(p.startswith("DEST is neither old nor complete") for p in found)
