"""copy(before_publish=...): called with the copy's file once verification
at a level passed, before a new target is put in place (the command line
marks a folder backup and takes the folder's lock there;
docs/verification.md#from-python-copy-verify)."""

import asyncio
import os

import pytest
from copy_helpers import make_source, make_target, query

from apsw_backup import acopy, copy
from apsw_backup.verify import VerificationFailed


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


def test_called_after_verification_before_the_new_target_appears(source, tmp_path):
    dest = tmp_path / "dest.db"
    seen = []

    def before_publish(path):
        seen.append((path, os.path.exists(dest), os.path.exists(path)))

    result = copy(source, dest, verify="default", before_publish=before_publish)
    assert result.verification is not None and result.verification.ok
    ((path, dest_there, file_there),) = seen
    assert path != str(dest)  # the temporary file
    assert file_there and not dest_there
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]


def test_not_called_when_verification_fails(source, tmp_path, monkeypatch):
    monkeypatch.setenv("APSW_BACKUP_TEST_TAMPER_PAGE", "2")
    dest = tmp_path / "dest.db"
    seen = []
    with pytest.raises(VerificationFailed):
        copy(source, dest, verify="default", before_publish=seen.append)
    assert seen == []
    assert not dest.exists()


def test_what_it_raises_comes_out_and_the_new_target_never_appears(source, tmp_path):
    dest = tmp_path / "dest.db"

    def refuse(path):
        raise RuntimeError("the folder is locked")

    with pytest.raises(RuntimeError, match="the folder is locked"):
        copy(source, dest, verify="full", before_publish=refuse)
    assert sorted(os.listdir(tmp_path)) == ["source.db"]


def test_an_existing_target_gets_it_after_the_commit(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    seen = []
    copy(source, dest, before_publish=seen.append)
    assert seen == [str(dest)]


def test_acopy_takes_it_and_a_non_callable_is_refused(source, tmp_path):
    seen = []
    asyncio.run(acopy(source, tmp_path / "a.db", before_publish=seen.append))
    assert len(seen) == 1
    with pytest.raises(TypeError, match="before_publish must be callable"):
        copy(source, tmp_path / "b.db", before_publish="yes")
