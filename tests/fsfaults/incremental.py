"""The incremental scenarios of the harness (docs/incremental.md):
`apsw-backup --incremental SOURCE FOLDER/` (a base into an empty folder, a
delta on a chain of a rollback and of a WAL SOURCE, a delta whose --keep
merges the oldest delta into a new base, a delta turned into a base by
--rebase-share) and `apsw-backup restore FOLDER DEST` (a new DEST, an
existing DEST with --overwrite), with their invariants:

- SOURCE unchanged; the points made before the run (by successful runs)
  still there, unchanged, and each still restores byte for byte to what it
  restored before (a --keep run may delete the oldest, and only once its
  new point is in place and only down to --keep points);
- what `list` shows and `verify FOLDER` checks holds no half-made point:
  every point listed restores (the new one to SOURCE's state, byte-identical
  to a restore of the clean run's point), every chain verifies, and
  anything else in the folder is a temporary file (left by a kill) that the
  next run removes;
- exit status and the printed JSON agree with the folder or DEST: exit 0
  names a complete point (its path, its kind), the paths `deleted` and
  `merged` are gone; a failure that leaves a new point in place says so;
- restore: a new DEST is absent or complete (byte-identical), an existing
  one old or complete after a fresh open (integrity_check ok), never torn;
  the points are not touched;
- the next run (without a fault) succeeds and leaves nothing behind.

The points' restores are compared through the Python API in this process
(apsw_backup.incremental), on a copy of the files as the run left them.
"""

import hashlib
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from copy_helpers import make_source, make_target

from apsw_backup import files
from apsw_backup import incremental as inc

from . import checks


def raw(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _touch(path, n):
    """Change a few rows of a rollback database (a delta of a few pages)."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("UPDATE t SET data = randomblob(400) WHERE id % 40 = ?", (n,))
        db.execute("INSERT INTO w(at, n) VALUES (?, ?)", (n + 0.5, n))
    finally:
        db.close()


class _LiveWal:
    """A WAL database kept open by a writer (as a live application keeps
    it): its last transactions stay in the -wal, and SOURCE is a copy of
    the pair taken after each change."""

    def __init__(self, scratch):
        scratch.mkdir(parents=True, exist_ok=True)
        self.path = scratch / "live.db"
        make_source(self.path, rows=150, journal="wal")
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.change(0)

    def change(self, n):
        self.db.execute(
            "UPDATE t SET data = randomblob(400) WHERE id % 40 = ?", (n % 40,)
        )
        self.db.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
            "WHERE i < 5) INSERT INTO t(data) SELECT randomblob(300) FROM c"
        )
        self.db.execute("INSERT INTO w(at, n) VALUES (?, ?)", (n + 0.5, n))

    def copy_to(self, dest):
        for side in ("-wal", "-shm"):
            if os.path.lexists(f"{dest}{side}"):
                os.remove(f"{dest}{side}")
        shutil.copyfile(self.path, dest)
        shutil.copyfile(f"{self.path}-wal", f"{dest}-wal")
        assert os.path.getsize(f"{dest}-wal") > 0

    def close(self):
        self.db.close()
        shutil.rmtree(self.path.parent)


def restored(point, scratch, at=None):
    """(raw digest, content digest) of a restore of point (a file, or a
    folder and at) into a new file; (None, why) if it does not restore."""
    dest = Path(tempfile.mkdtemp(prefix="r-", dir=scratch)) / "r.db"
    try:
        inc.restore(point, dest, at=at)
        ok, content = checks.content(dest)
        return raw(dest), content if ok else f"restored, but {content}"
    except Exception as exc:  # noqa: BLE001 -- every failure is the finding
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(dest.parent, ignore_errors=True)


def _stamp(path):
    match = inc._parse_name(str(path))
    return match["stamp"] if match else None


class IncScenario:
    """kind 'incremental': --incremental into ROOT/data/backups/ (deltas: the
    number of deltas the template's chain has after its base; None: an
    empty folder); kind 'restore': restore ROOT/data/backups/ into
    ROOT/data/dst.db (existing: an older database there, --overwrite)."""

    old_backups = None

    def __init__(self, name, kind, wal_source=False, deltas=None, keep=None,
                 rebase_share=None, existing=False, dest_wal=False,
                 bounded=None):  # fmt: skip
        self.name = name
        self.kind = kind
        self.wal_source = wal_source
        self.deltas = deltas
        self.keep = keep
        self.rebase_share = rebase_share
        self.existing = existing
        self.dest_wal = dest_wal  # an existing DEST in WAL mode
        # calls of the bounded pass (tests/test_fs_faults.py)
        self.bounded = bounded

    def __repr__(self):
        return self.name

    def data(self, root):
        return Path(root) / "data"

    def source(self, root):
        return self.data(root) / "src.db"

    def folder(self, root):
        return self.data(root) / "backups"

    def dest(self, root):
        if self.kind == "restore":
            return self.data(root) / "dst.db"
        return self.folder(root)

    def argv(self, root, next_run=False):
        command = [sys.executable, "-m", "apsw_backup"]
        if self.kind == "restore":
            args = ["restore", "--json", str(self.folder(root)), str(self.dest(root))]
            if self.existing or (next_run and self.dest(root).exists()):
                args.append("--overwrite")
            return [*command, *args]
        args = ["--incremental", "--json"]
        if self.keep is not None:
            args += ["--keep", str(self.keep)]
        if self.rebase_share is not None:
            args += ["--rebase-share", str(self.rebase_share)]
        return [*command, *args, str(self.source(root)), f"{self.folder(root)}/"]

    def build(self, root):
        """The template: SOURCE, and its chain made by successful runs."""
        data = self.data(root)
        folder = self.folder(root)
        folder.mkdir(parents=True)
        source = self.source(root)
        live = _LiveWal(Path(root) / "scratch") if self.wal_source else None
        try:

            def change(n):
                if live is not None:
                    live.change(n)
                    live.copy_to(source)
                elif n == 0:
                    make_source(source, rows=200)
                else:
                    _touch(source, n)

            change(0)
            points = 0 if self.deltas is None else 1 + self.deltas
            for n in range(1, points + 1):
                inc.incremental(source, folder)
                change(n)
        finally:
            if live is not None:
                live.close()
        if self.kind == "restore" and self.existing:
            make_target(self.dest(root))
            if self.dest_wal:
                db = sqlite3.connect(str(self.dest(root)), isolation_level=None)
                try:
                    assert db.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
                finally:
                    db.close()
        assert not [n for n in os.listdir(data) if files.is_temporary_name(n)]

    # -- what the files hold before any run ---------------------------------

    def expect(self, expected, root):
        """Fill expected (checks.Expected) with the points' files and what
        each restores to, and what a new point must restore to."""
        folder = self.folder(root)
        scratch = Path(tempfile.mkdtemp(prefix="fsfaults-expect-"))
        try:
            expected.points = {}  # name: raw digest of the file
            expected.restores = {}  # stamp: raw digest of its restore
            for name in sorted(os.listdir(folder)):
                path = folder / name
                expected.points[name] = raw(path)
                digest, why = restored(path, scratch)
                assert digest is not None, why
                expected.restores[_stamp(path)] = digest
            expected.newest = (
                expected.restores[max(expected.restores)] if expected.restores else None
            )
            expected.newest_content = None
            if expected.newest is not None:
                newest = max(expected.restores)
                _, expected.newest_content = restored(folder, scratch, at=newest)
            # What a point made of SOURCE now restores to: copy() of SOURCE
            # (docs/incremental.md: a restore is byte-identical to it).
            if self.kind == "incremental":
                copy = checks._scratch_copy(self.source(root))
                out = Path(scratch) / "full.db"
                from apsw_backup import copy as full_copy

                full_copy(copy, str(out))
                expected.new_point = raw(out)
                shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- after a faulted run ---------------------------------------------------

    def check(self, expected, snapshot, code, result, killed):
        scratch = Path(tempfile.mkdtemp(prefix="fsfaults-check-"))
        try:
            if self.kind == "restore":
                return self._check_restore(expected, snapshot, code, result, scratch)
            return self._check_incremental(expected, snapshot, code, result, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check_points(self, expected, folder, scratch):
        """Problems with the points of folder; (problems, new points' names,
        old stamps gone)."""
        problems = []
        names = sorted(os.listdir(folder))
        for name in names:
            if inc._parse_name(name) is None and not files.is_temporary_name(name):
                problems.append(f"a file that is neither a point nor temporary: {name}")
        listed = inc.list_points(folder)
        point_names = [n for n in names if inc._parse_name(n)]
        unlisted = sorted(set(point_names) - {os.path.basename(p.path) for p in listed})
        if unlisted:
            problems.append(f"point files list does not show: {unlisted}")
        new = []
        for name in point_names:
            path = folder / name
            stamp = _stamp(path)
            digest, why = restored(path, scratch)
            if name in expected.points:
                if raw(path) != expected.points[name]:
                    problems.append(f"old point {name} changed")
            if stamp in expected.restores:
                if digest != expected.restores[stamp]:
                    problems.append(
                        f"old point {name} does not restore as before: {why}"
                    )
                continue
            new.append(name)
            want = getattr(expected, "new_point", None)
            if digest is None:
                problems.append(f"new point {name} does not restore: {why}")
            elif want is not None and digest != want:
                problems.append(
                    f"new point {name} restores to other bytes than a copy of SOURCE"
                )
        for report in inc.verify_folder(folder):
            if not report.ok:
                problems.append(f"verify FOLDER: {report.problems[:2]}")
        stamps = {_stamp(folder / n) for n in point_names}
        gone = sorted(set(expected.restores) - stamps)
        return problems, new, gone

    def _check_incremental(self, expected, snapshot, code, result, scratch):
        folder = self.folder(snapshot)
        problems, new, gone = self._check_points(expected, folder, scratch)
        new_stamps = {_stamp(folder / n) for n in new}
        if len(new_stamps) > 1:
            problems.append(f"more than one new point: {new}")
        if gone:
            stamps = sorted(expected.restores)
            left = len({_stamp(folder / n) for n in os.listdir(folder) if _stamp(n)})
            if self.keep is None:
                problems.append(f"points made before are gone: {gone}")
            elif not new:
                problems.append(f"points deleted before the new one was made: {gone}")
            elif gone != stamps[: len(gone)] or left < self.keep:
                problems.append(
                    f"--keep {self.keep} deleted {gone}, leaving {left} points"
                )
        if code == 0:
            if not new:
                problems.append("exit 0 but no new point")
            if result is not None and result.get("ok") is True:
                path = result.get("path") or ""
                name = os.path.basename(path)
                if name not in new:
                    problems.append(f"exit 0 names {name!r}, not a new point {new}")
                elif inc._parse_name(name)["kind"] != result.get("kind"):
                    problems.append(f"exit 0 says kind {result.get('kind')} of {name}")
                names = set(os.listdir(folder))
                for key in ("deleted", "merged"):
                    for path in result.get(key) or []:
                        if os.path.basename(path) in names:
                            problems.append(f"{key} {path} but it is still there")
                if (
                    self.keep is not None
                    and len({_stamp(n) for n in names if _stamp(n)}) != self.keep
                ):
                    problems.append(f"exit 0 but not {self.keep} points left")
        elif result is not None and new:
            # A failure after the point was put in place: it must say so.
            text = str((result.get("error") or {}).get("message", ""))
            text += str(result.get("kept_point") or "")
            if not any(_stamp(n) in text for n in new):
                problems.append(
                    f"exit {code} says nothing of the new point {new} left in "
                    f"place: {text[:200]!r}"
                )
        if code == 3:
            problems.append("exit 3 (a broken chain) of an intact folder")
        return problems

    def _check_restore(self, expected, snapshot, code, result, scratch):
        folder = self.folder(snapshot)
        problems, new, gone = self._check_points(expected, folder, scratch)
        if new or gone:
            problems.append(f"restore changed the folder: new {new}, gone {gone}")
        dest = self.dest(snapshot)
        if self.existing:
            ok, digest = checks.content(dest)
            complete = ok and digest == expected.newest_content
            old = ok and digest == expected.dest_content
            if not (complete or old):
                problems.append(f"DEST is neither old nor complete: {digest}")
        else:
            complete = dest.exists() and raw(dest) == expected.newest
            if dest.exists() and not complete:
                ok, why = checks.content(dest)
                problems.append(f"DEST exists but is not the restored point: {why}")
        if code == 0 and not complete:
            problems.append("exit 0 but DEST is not complete")
        if code == 0 and result is not None:
            point = str(result.get("point"))
            if _stamp(point) != max(expected.restores):
                problems.append(f"exit 0 names {point!r}, not the newest point")
            if result.get("overwrote") is not self.existing:
                problems.append(f"exit 0 says overwrote={result.get('overwrote')}")
        if code == 3:
            problems.append("exit 3 (a broken chain) of an intact folder")
        if (
            code not in (0, None)
            and result is not None
            and complete
            and not self.existing
        ):
            problems.append(f"exit {code} but DEST is in place, complete")
        return problems

    # -- after the next run ----------------------------------------------------

    def leftovers(self, expected, data):
        problems = []
        left = checks.listing(data)
        want = {"src.db", *expected.source_files}
        if self.kind == "restore":
            want.add("dst.db")
        points = [n for n in left if n.startswith("backups/")]
        extra = sorted(set(left) - want - set(points))
        extra += [n for n in points if not inc._parse_name(n[len("backups/") :])]
        if extra:
            problems.append(f"left after the next run: {sorted(extra)}")
        if self.kind == "restore":
            if not (data / "dst.db").exists():
                problems.append("missing after the next run: dst.db")
            return problems
        folder = data / "backups"
        for report in inc.verify_folder(folder):
            if not report.ok:
                problems.append(
                    f"verify FOLDER after the next run: {report.problems[:2]}"
                )
        stamps = {_stamp(n) for n in os.listdir(folder) if _stamp(n)}
        named = [n for n in os.listdir(folder) if _stamp(n)]
        if len(named) != len(stamps):
            problems.append(
                f"two files of one point after the next run: {sorted(named)}"
            )
        if self.keep is not None and len(stamps) != self.keep:
            problems.append(
                f"{len(stamps)} points after the next run, --keep {self.keep}"
            )
        return problems


SCENARIOS = {
    s.name: s
    for s in (
        IncScenario("inc-base", "incremental", bounded=8),
        IncScenario("inc-delta", "incremental", deltas=1, bounded=8),
        IncScenario(
            "inc-delta-wal", "incremental", wal_source=True, deltas=1, bounded=8
        ),
        IncScenario(
            "inc-keep", "incremental", wal_source=True, deltas=1, keep=2, bounded=8
        ),
        IncScenario(
            "inc-rebase", "incremental", deltas=1, rebase_share=0.01, bounded=6
        ),
        IncScenario("restore-new", "restore", wal_source=True, deltas=2, bounded=8),
        IncScenario("restore-existing", "restore", deltas=2, existing=True, bounded=8),
        IncScenario("restore-new-rollback", "restore", deltas=2, bounded=5),
        IncScenario(
            "restore-existing-wal",
            "restore",
            wal_source=True,
            deltas=2,
            existing=True,
            dest_wal=True,
            bounded=5,
        ),
    )
}
