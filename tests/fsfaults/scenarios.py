"""The scenarios the harness runs: the files each starts from (a template,
copied to ROOT/data before every run), the command, and what it must leave.

All paths are absolute and under ROOT/data; the command runs in ROOT/cwd, so
that the only calls naming ROOT/data are the command's work on its files.
"""

import os
import shutil
import sqlite3
import sys
from pathlib import Path

from copy_helpers import make_source, make_target

MARK = "user.apsw_backup.source"
OLD_STAMPS = ("20200101T000000.000000Z", "20200102T000000.000000Z")


class Scenario:
    """kind: 'new' (a new DEST), 'existing' (--overwrite), 'folder' (--keep
    2 with two older backups), 'verify'."""

    def __init__(self, name, kind, wal_source=False, keep=None):
        self.name = name
        self.kind = kind
        self.wal_source = wal_source
        self.keep = keep

    def __repr__(self):
        return self.name

    # Paths, for a run folder root (ROOT/data holds the files).
    def data(self, root):
        return Path(root) / "data"

    def source(self, root):
        return self.data(root) / "src.db"

    def dest(self, root):
        data = self.data(root)
        if self.kind == "folder":
            return data / "backups"
        if self.kind == "verify":
            return data / "file.db"
        return data / "dst.db"

    def argv(self, root, next_run=False):
        """The command; next_run: the run made after a faulted one (into a
        DEST that exists now, with --overwrite)."""
        command = [sys.executable, "-m", "apsw_backup"]
        if self.kind == "verify":
            return [*command, "verify", "--json", str(self.dest(root))]
        args = ["--json"]
        if self.kind == "existing" or (
            next_run and self.kind == "new" and self.dest(root).exists()
        ):
            args.append("--overwrite")
        if self.kind == "folder":
            args += ["--keep", str(self.keep)]
            return [*command, *args, str(self.source(root)), f"{self.dest(root)}/"]
        return [*command, *args, str(self.source(root)), str(self.dest(root))]

    def build(self, root):
        """Make the scenario's files in ROOT/data (the template)."""
        data = self.data(root)
        data.mkdir(parents=True)
        if self.kind == "verify":
            # A WAL backup without its -wal: verify must create none it leaves.
            make_source(self.dest(root), rows=200, journal="wal")
            return
        if self.wal_source:
            _wal_source(self.source(root), Path(root) / "scratch")
        else:
            make_source(self.source(root), rows=200)
        if self.kind == "existing":
            make_target(self.dest(root))
        if self.kind == "folder":
            folder = self.dest(root)
            folder.mkdir()
            for stamp in OLD_STAMPS:
                path = folder / f"src-{stamp}.db"
                make_target(path)
                os.setxattr(
                    path, MARK, os.fsencode(os.path.realpath(self.source(root)))
                )

    def old_backups(self, root):
        return [self.dest(root) / f"src-{stamp}.db" for stamp in OLD_STAMPS]


def _wal_source(path, scratch):
    """A WAL database whose last transactions are still in its -wal (as a
    live application leaves it): copied while the writer has it open."""
    scratch.mkdir(parents=True, exist_ok=True)
    live = scratch / "live.db"
    make_source(live, rows=150, journal="wal")
    db = sqlite3.connect(str(live), isolation_level=None)
    try:
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
            "WHERE i < 100) INSERT INTO t(data) SELECT randomblob(300) FROM c"
        )
        db.execute("INSERT INTO w(at, n) VALUES (1.5, 7)")
        assert os.path.getsize(str(live) + "-wal") > 0
        shutil.copyfile(live, path)
        shutil.copyfile(str(live) + "-wal", str(path) + "-wal")
    finally:
        db.close()
    shutil.rmtree(scratch)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("new", "new"),
        Scenario("new-wal", "new", wal_source=True),
        Scenario("existing", "existing"),
        Scenario("existing-wal", "existing", wal_source=True),
        Scenario("keep", "folder", wal_source=True, keep=2),
        Scenario("verify", "verify"),
    )
}
