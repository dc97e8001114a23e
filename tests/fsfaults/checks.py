"""The invariants checked after every faulted run (docs/cli.md: exit codes,
dest_state, folders and --keep, leftovers).

`check_run` looks at a snapshot of the run folder taken as the faulted run
left it (so that opening a database here, which rolls a hot journal back,
does not change what the next run finds) and returns the problems found, as
sentences; [] means the run kept every promise.
"""

import hashlib
import json
import os
import re
import sqlite3

BACKUP_NAME = re.compile(r"^src-\d{8}T\d{6}\.\d{6}Z\.db$")
COMPLETE_STATES = {"verified", "complete", "unverified"}


def raw_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def content(path):
    """(integrity ok, digest of the rows) of the database at path, after a
    fresh open with write access (so SQLite rolls a hot journal back and
    recovers a -wal); (False, why) if it cannot be read."""
    if not os.path.isfile(path):
        return False, "absent"
    if os.path.getsize(path) == 0:
        return False, "empty file"
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return False, f"cannot open: {exc}"
    try:
        db.execute("PRAGMA busy_timeout=5000")
        rows = db.execute("PRAGMA integrity_check").fetchall()
        if rows != [("ok",)]:
            return False, f"integrity_check: {rows[:3]}"
        digest = hashlib.sha256()
        tables = db.execute(
            "SELECT name, sql FROM sqlite_schema WHERE type='table' ORDER BY name"
        ).fetchall()
        for name, sql in tables:
            digest.update(repr((name, sql)).encode())
            for row in db.execute(f'SELECT * FROM "{name}" ORDER BY rowid'):
                digest.update(repr(row).encode())
        return True, digest.hexdigest()
    except sqlite3.Error as exc:
        return False, f"cannot read: {exc}"
    finally:
        db.close()


def printed(stdout):
    """The JSON object the run printed, None if it printed none, or the
    text if it printed something else."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    if len(lines) != 1:
        return stdout
    try:
        return json.loads(lines[0])
    except ValueError:
        return stdout


def listing(folder):
    """Every file under folder, relative, sorted."""
    found = []
    for dirpath, _dirs, filenames in os.walk(folder):
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(found)


class Expected:
    """What a scenario's files hold before any run (computed once)."""

    def __init__(self, scenario, root):
        self.scenario = scenario
        self.source = None
        if scenario.kind != "verify":
            ok, self.source = content(_scratch_copy(scenario.source(root)))
            assert ok, self.source
        # SOURCE's -wal (a live application's) stays, with the -shm SQLite
        # makes to read it: they are SOURCE's, not leftovers of a run.
        self.source_files = []
        if scenario.wal_source:
            self.source_files = ["src.db-shm", "src.db-wal"]
        dest = scenario.dest(root)
        self.dest_raw = raw_digest(dest) if dest.is_file() else None
        self.dest_content = content(_scratch_copy(dest))[1] if dest.is_file() else None
        self.old_backups = {}
        if scenario.kind == "folder":
            for path in scenario.old_backups(root):
                self.old_backups[path.name] = raw_digest(path)
        if hasattr(scenario, "expect"):  # incremental.py's scenarios
            scenario.expect(self, root)


def _scratch_copy(path):
    """A copy of a database (and its -wal) to read without changing it."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="fsfaults-")
    copy = os.path.join(folder, os.path.basename(path))
    if os.path.exists(path):
        shutil.copyfile(path, copy)
        if os.path.exists(f"{path}-wal"):
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
    return copy


def check_run(scenario, expected, snapshot, returncode, stdout, stderr, killed):
    """The problems of one faulted run, given the snapshot (a run folder as
    the run left it: snapshot/data)."""
    problems = []
    result = printed(stdout)
    if isinstance(result, str):
        problems.append(f"stdout is not one JSON object: {result[:200]!r}")
        result = None
    if "Traceback" in stderr:
        problems.append(f"a traceback on stderr: {stderr[-300:]!r}")
    if not killed:
        if result is None:
            problems.append(f"no JSON printed (exit {returncode}): {stderr[-300:]!r}")
        elif result.get("exit_code") != returncode:
            problems.append(
                f"exit status {returncode} but printed exit_code {result.get('exit_code')}"
            )
    # SOURCE: intact and unchanged.
    if scenario.kind != "verify":
        ok, digest = content(scenario.source(snapshot))
        if not ok:
            problems.append(f"SOURCE is damaged: {digest}")
        elif digest != expected.source:
            problems.append("SOURCE's rows changed")
    if hasattr(scenario, "check"):  # incremental.py's scenarios
        return problems + scenario.check(expected, snapshot, returncode, result, killed)
    check = {
        "new": _check_new,
        "existing": _check_existing,
        "folder": _check_folder,
        "verify": _check_verify,
    }[scenario.kind]
    problems += check(scenario, expected, snapshot, returncode, result, killed)
    # Last: content() above rolled any hot journal back, as the next open of
    # DEST would.
    problems += check_rollback_mode(scenario, snapshot)
    return problems


def says_wal(path):
    """Whether a database file's header says WAL (bytes 18/19 = 2)."""
    with open(path, "rb") as f:
        header = f.read(100)
    return len(header) == 100 and 2 in (header[18], header[19])


def check_rollback_mode(scenario, root):
    """Every DEST the command writes -- from a rollback DEST or a new one,
    whatever SOURCE's mode -- is in rollback-journal mode (docs/journal-mode.md):
    one file alone.  A DEST left in WAL mode stays so for every later run
    ('an existing WAL DEST stays WAL')."""
    if scenario.kind not in ("new", "existing", "folder"):
        return []
    dest = scenario.dest(root)
    if scenario.kind == "folder":
        names = os.listdir(dest) if dest.is_dir() else []
        paths = [dest / n for n in names if BACKUP_NAME.match(n)]
    else:
        paths = [dest]
    return [
        f"{p.name} is in WAL mode (its header says so)"
        for p in paths
        if p.is_file() and os.path.getsize(p) >= 100 and says_wal(p)
    ]


def _complete(path, expected):
    ok, digest = content(path)
    if not ok:
        return False, digest
    if digest != expected.source:
        return False, "rows differ from SOURCE's"
    return True, "complete"


def _check_new(scenario, expected, snapshot, returncode, result, killed):
    problems = []
    dest = scenario.dest(snapshot)
    exists = dest.exists()
    complete, why = _complete(dest, expected) if exists else (False, "absent")
    if exists and not complete:
        problems.append(f"DEST exists but is not the complete copy: {why}")
    if returncode == 0 and not complete:
        problems.append(f"exit 0 but DEST is not complete ({why})")
    if result is not None:
        state = result.get("dest_state")
        if state in COMPLETE_STATES and not complete:
            problems.append(f"dest_state {state!r} but DEST is {why}")
        elif state == "not created" and exists:
            problems.append(f"dest_state 'not created' but DEST exists ({why})")
        elif state not in COMPLETE_STATES | {"not created"}:
            problems.append(f"dest_state {state!r} for a new DEST")
    return problems


def _check_existing(scenario, expected, snapshot, returncode, result, killed):
    problems = []
    dest = scenario.dest(snapshot)
    raw_same = dest.is_file() and raw_digest(dest) == expected.dest_raw
    complete, why = _complete(dest, expected)
    ok, digest = content(dest)  # after complete(): the hot journal rolled back
    old = ok and digest == expected.dest_content
    if not (complete or old):
        problems.append(f"DEST is neither old nor complete: {why}")
    if returncode == 0 and not complete:
        problems.append(f"exit 0 but DEST is not complete ({why})")
    if result is not None:
        state = result.get("dest_state")
        if state in COMPLETE_STATES and not complete:
            problems.append(f"dest_state {state!r} but DEST is {why}")
        elif state == "unchanged" and not raw_same:
            problems.append(
                "dest_state 'unchanged' but DEST's file differs from before the run"
                + (" (its -journal restores it)" if old else "")
            )
        elif state == "needs recovery" and not old:
            problems.append("dest_state 'needs recovery' but DEST does not roll back")
        elif state not in COMPLETE_STATES | {"unchanged", "needs recovery"}:
            problems.append(f"dest_state {state!r} for an existing DEST")
    return problems


def _check_folder(scenario, expected, snapshot, returncode, result, killed):
    problems = []
    folder = scenario.dest(snapshot)
    names = os.listdir(folder)
    backups = sorted(n for n in names if BACKUP_NAME.match(n))
    new = [n for n in backups if n not in expected.old_backups]
    good = []
    for name in backups:
        ok, why = content(folder / name)
        if name in expected.old_backups:
            if ok:
                good.append(name)
            else:
                problems.append(f"old backup {name} damaged: {why}")
        else:
            complete, why = _complete(folder / name, expected)
            if complete:
                good.append(name)
            else:
                problems.append(f"new backup {name} is not complete: {why}")
    if len(new) > 1:
        problems.append(f"more than one new backup: {new}")
    if len(good) < scenario.keep:
        problems.append(
            f"{len(good)} good backups left, --keep {scenario.keep} promised"
        )
    if returncode == 0:
        if len(new) != 1:
            problems.append(f"exit 0 but {len(new)} new backups")
        if len(backups) != scenario.keep:
            problems.append(f"exit 0 but {len(backups)} backups left: {backups}")
    if result is not None:
        state = result.get("dest_state")
        dest = result.get("dest")
        name = os.path.basename(dest) if dest else None
        if state in COMPLETE_STATES and name not in good:
            problems.append(f"dest_state {state!r} but {name} is not a good backup")
        elif state == "not created" and name in names:
            problems.append(f"dest_state 'not created' but {name} is there")
        elif state == "unchanged" and (
            new or os.path.basename(os.path.normpath(dest)) != folder.name
        ):
            # A refusal before the backup was named says the folder was
            # left as it was: true only if no new backup is in it.
            problems.append(f"dest_state 'unchanged' of {dest} with new backups {new}")
        elif state == "unchanged":
            pass
        elif state not in COMPLETE_STATES | {"not created"}:
            problems.append(f"dest_state {state!r} for a folder backup")
        for path in result.get("deleted") or []:
            if os.path.basename(path) in names:
                problems.append(f"reported deleted but still there: {path}")
    return problems


def _check_verify(scenario, expected, snapshot, returncode, result, killed):
    problems = []
    path = scenario.dest(snapshot)
    if not path.is_file() or raw_digest(path) != expected.dest_raw:
        problems.append("verify changed FILE")
    if returncode == 3:
        problems.append("exit 3 (FILE failed verification) for an intact FILE")
    if result is not None and returncode == 0:
        files = result.get("files") or []
        if not files or files[0].get("verified") is not True:
            problems.append(f"exit 0 but the file was not verified: {files}")
    return problems


def expected_after_next_run(scenario, expected):
    """The files the run folder holds after a successful next run."""
    if scenario.kind == "verify":
        return ["file.db"]
    if scenario.kind == "folder":
        return None  # src.db and exactly `keep` backups, checked by pattern
    return ["dst.db", "src.db", *expected.source_files]


def _marked(path):
    try:
        return bool(os.getxattr(path, "user.apsw_backup.source"))
    except OSError:
        return False


def _unmarked_backup(data, name):
    return (
        name.startswith("backups/")
        and BACKUP_NAME.match(name[8:]) is not None
        and not _marked(os.path.join(data, name))
    )


def check_leftovers(scenario, expected, data):
    """Problems with what is left in data after the next run."""
    if hasattr(scenario, "leftovers"):  # incremental.py's scenarios
        return scenario.leftovers(expected, data)
    left = listing(data)
    want = expected_after_next_run(scenario, expected)
    if want is not None:
        extra = sorted(set(left) - set(want))
        missing = sorted(set(want) - set(left) - set(expected.source_files))
    else:
        backups = [
            n
            for n in left
            if n.startswith("backups/")
            and BACKUP_NAME.match(n[8:])
            and _marked(os.path.join(data, n))
        ]
        # A backup that could not be marked (its run said so, exit 1) is
        # never deleted, and reported by every --keep run: by design.
        left = [n for n in left if n in backups or not _unmarked_backup(data, n)]
        extra = sorted(set(left) - {"src.db", *expected.source_files, *backups})
        missing = [] if len(backups) == scenario.keep else [f"{scenario.keep} backups"]
        if len(backups) > scenario.keep:
            extra += backups
    problems = []
    if extra:
        problems.append(f"left after the next run: {extra}")
    if missing:
        problems.append(f"missing after the next run: {missing}")
    return problems
