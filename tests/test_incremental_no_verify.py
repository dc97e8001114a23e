"""incremental(verify=False) / --no-verify (docs/incremental.md,
"Verification"): the new point is not read back from the disk; everything
else -- the fsync, the point's hashes, the check of the chain it extends --
is as at the default."""

from __future__ import annotations

import json
import os

import pytest
from incremental_helpers import change_blobs, make_blobs

import apsw_backup
from apsw_backup import incremental as inc
from apsw_backup.cli import main


def make(path):
    make_blobs(path, 2000)


def change(path):
    change_blobs(path, 97)


@pytest.fixture
def lost_write(monkeypatch):
    """A disk that loses what was written: every read-back of a new point
    finds a page altered (as _read_back says it then)."""
    calls = []

    def lying(point_fd, geometry, path, opts=None):
        calls.append(path)
        raise inc.IncrementalError(
            f"the restore point {path!r} did not read back as written (page 2)"
        )

    monkeypatch.setattr(inc, "_read_back", lying)
    return calls


def test_the_default_reads_the_new_point_back(tmp_path, lost_write):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    with pytest.raises(inc.IncrementalError, match="did not read back"):
        inc.incremental(src, bk)
    assert lost_write and os.listdir(bk) == []


def test_verify_false_does_not_read_the_new_point_back(tmp_path, monkeypatch):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    base = inc.incremental(src, bk)
    assert base.verified
    change(src)
    calls = []
    monkeypatch.setattr(inc, "_read_back", lambda *a, **k: calls.append(a))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    made = inc.incremental(src, bk, verify=False)
    assert made.kind == "delta" and not made.verified
    assert calls == []
    assert synced  # still fsynced before it was put in place
    monkeypatch.undo()
    # the point is a sound one: it verifies and restores as a full copy
    assert all(r.ok for r in inc.verify_folder(bk))
    full = tmp_path / "full.db"
    apsw_backup.copy(src, full)
    inc.restore(bk, tmp_path / "r.db")
    assert (tmp_path / "r.db").read_bytes() == full.read_bytes()


def test_verify_false_still_checks_the_chain_it_extends(tmp_path):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    base = inc.incremental(src, bk)
    point = inc._read_point(base.path)
    with open(base.path, "r+b") as f:  # a stored page of the base damaged
        f.seek(point.offset_of(3) + 200)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    change(src)
    made = inc.incremental(src, bk, verify=False)
    assert made.kind == "base" and "damaged" in made.reason
    assert base.path in made.reason


def test_verify_false_with_quick_check_is_a_contradiction(tmp_path):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    with pytest.raises(ValueError, match="quick_check=True.*verify=False"):
        inc.incremental(src, bk, verify=False, quick_check=True)
    with pytest.raises(TypeError, match="verify must be True or False"):
        inc.incremental(src, bk, verify="none")  # type: ignore[arg-type]
    assert os.listdir(bk) == []


def test_the_command_line_no_verify(tmp_path, capsys, lost_write):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    code = main(["--incremental", str(src), str(bk) + "/", "--no-verify"])
    assert code == 0 and not lost_write
    assert "not read back (--no-verify)" in capsys.readouterr().err
    change(src)
    code = main(["--incremental", str(src), str(bk) + "/", "--no-verify", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["kind"] == "delta" and out["verified"] is False
    change(src)
    code = main(["--incremental", str(src), str(bk) + "/", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and "did not read back" in out["error"]["message"]
    assert len(os.listdir(bk)) == 2  # the failed run kept nothing


def test_the_command_line_refuses_no_verify_with_quick_check(tmp_path, capsys):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    code = main(
        ["--incremental", str(src), str(bk) + "/", "--no-verify", "--quick-check"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--no-verify contradicts --quick-check" in err
    assert os.listdir(bk) == []
