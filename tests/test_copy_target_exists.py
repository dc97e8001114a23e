"""copy(target_exists=...): the caller's "new or existing" decision holds
to the end (O_EXCL semantics end to end; docs/cli.md#what-dest-holds-dest_state)."""

import os

import pytest
from copy_helpers import make_source, make_target, query

from apsw_backup import acopy, copy


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


def test_a_file_that_appeared_is_left_alone(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    with pytest.raises(FileExistsError, match="target_exists=False"):
        copy(source, dest, target_exists=False)
    assert query(dest, "SELECT note FROM old") == [("old content",)]
    assert sorted(os.listdir(tmp_path)) == ["dest.db", "source.db"]


def test_a_file_that_vanished_is_not_created(source, tmp_path):
    dest = tmp_path / "dest.db"
    with pytest.raises(FileNotFoundError, match="target_exists=True"):
        copy(source, dest, target_exists=True)
    assert not dest.exists()


def test_the_decision_that_holds_copies(source, tmp_path):
    assert copy(source, tmp_path / "new.db", target_exists=False).pages > 0
    old = make_target(tmp_path / "old.db")
    assert copy(source, old, target_exists=True).pages > 0
    assert query(old, "SELECT count(*) FROM t") == [(300,)]


def test_acopy_takes_it_too(source, tmp_path):
    import asyncio

    dest = make_target(tmp_path / "dest.db")
    with pytest.raises(FileExistsError):
        asyncio.run(acopy(source, dest, target_exists=False))


@pytest.mark.parametrize("value", [1, "no"])
def test_target_exists_must_be_a_bool_or_none(source, tmp_path, value):
    with pytest.raises(TypeError, match="target_exists must be None, True or False"):
        copy(source, tmp_path / "d.db", target_exists=value)
    assert not (tmp_path / "d.db").exists()
