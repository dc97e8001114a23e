"""Hostile actions at every point where foreign code can run (src/README.md,
"Hook points").

Needs the test build (``APSW_BACKUP_HOOKS=1``; tests/test_hooks_harness.py
and .ci/hooks make it).  For a scenario, a recording run lists the hook
points it passes, in order; then, for every point in turn and every hostile
action, the scenario runs again and the action is taken at that point:

- at an allocation, a decref of a user object or a call of user code (the
  hook's kinds 0 and 1), inline, as a finalizer or a ``__repr__`` would;
  ``raise`` there makes the allocation fail (kind 0);
- where the GIL is released (kind 2), in another thread, while the call
  pauses inside the released window.

After each run: the scenario raised nothing but the library's documented
errors; no hang (a watchdog ends the process and the parent reports the
point); every object let go of, a fresh connection can write both files
(no lock left); the destination holds its old content or the complete copy,
integrity_check ok; no apsw_backup object left alive.  A fork's child must
touch nothing of the parent's: the files are unchanged while it runs, and
it ends within its time, using its inherited objects only to be refused.

Usage (the parent loop, which restarts a batch after a crash or a hang):

    python harness.py matrix [--bounded N] [--scenarios a,b] [--actions x,y]

prints one line per (scenario, action) and a total; exits 1 on any problem.
``python harness.py batch SCENARIO ACTION N,N,... FOLDER`` is the child.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback

import apsw_backup as ab
from apsw_backup import _apsw_backup as _c

RUN_SECONDS = 20  # a run that takes longer is a hang
CHILD_SECONDS = 5  # a fork's child
PAUSE = 0.02  # the window held open at a release point
PAGE = 1024
SOURCE_ROWS = 60  # about 70 pages of 1 KiB
OLD_ROWS = 5

DOCUMENTED = (ab.Error, MemoryError)


class Run:
    """The objects of one scenario run, and what the hostile action did."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.src_path = os.path.join(folder, "src.db")
        self.dest_path = os.path.join(folder, "dest.db")
        self.objs: dict[str, object] = {}
        self.helper: threading.Thread | None = None
        self.action_error: str | None = None
        self.problems: list[str] = []
        self.child_status: int | None = None

    def make_files(self) -> None:
        src = ab.Connection(self.src_path)
        src.execute(f"PRAGMA page_size={PAGE}")
        src.execute(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
            "CREATE INDEX t_v ON t(v);"
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c "
            f"WHERE i < {SOURCE_ROWS}) INSERT INTO t(v) SELECT randomblob(700) FROM c"
        ).fetchall()
        src.close()
        dest = ab.Connection(self.dest_path)
        dest.execute(f"PRAGMA page_size={PAGE}")
        dest.execute(
            "CREATE TABLE old(n);"
            f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c "
            f"WHERE i < {OLD_ROWS}) INSERT INTO old SELECT i FROM c"
        ).fetchall()
        dest.close()

    def connect(self, name: str, path: str) -> ab.Connection:
        conn = ab.Connection(path)
        conn.set_busy_timeout(200)
        self.objs[name] = conn
        return conn


# -- scenarios: each uses only the public API --------------------------------
#
# Objects live only in run.objs (no local variable keeps one), so that the
# drop_collect action really lets go of them; `use` skips a call on an
# object let go of.  A scenario asserts what must hold whatever happened
# (an AssertionError is reported as a problem).


def use(run: Run, name: str, method: str, *args):
    obj = run.objs.get(name)
    if obj is None:
        return None
    return getattr(obj, method)(*args)


def step_all(run: Run, pages: int) -> None:
    while "b" in run.objs and not use(run, "b", "step", pages):
        pass


def sc_backup_steps(run: Run) -> None:
    run.connect("src", run.src_path)
    dest = run.connect("dest", run.dest_path)
    run.objs["b"] = dest.backup("main", run.objs["src"], "main")
    del dest
    step_all(run, 10)
    use(run, "b", "finish")


def sc_backup_with(run: Run) -> None:
    run.connect("src", run.src_path)
    run.connect("dest", run.dest_path)
    with run.objs["dest"].backup("main", run.objs["src"], "main") as b:
        b.step(-1)


def sc_backup_abandoned(run: Run) -> None:
    """A backup let go of half-way: the partial copy is rolled back and the
    destination is usable again once nothing holds its lock."""
    run.connect("src", run.src_path)
    run.connect("dest", run.dest_path)
    run.objs["b"] = run.objs["dest"].backup("main", run.objs["src"], "main")
    use(run, "b", "step", 10)
    run.objs.pop("b", None)
    gc.collect()
    use(run, "dest", "execute", "SELECT count(*) FROM old")


def sc_orphans(run: Run) -> None:
    """Let go of while a lock is held (by this thread's query on the source):
    the backup and a half-read cursor become orphans, settled by the query
    when it lets go of the lock -- the destination is then usable, and no
    read transaction of the dropped cursor is left to block a writer."""
    run.connect("src", run.src_path)
    run.connect("dest", run.dest_path)
    run.objs["b"] = run.objs["dest"].backup("main", run.objs["src"], "main")
    use(run, "b", "step", 10)
    run.objs["cursor"] = run.objs["src"].execute("SELECT id FROM t")
    use(run, "cursor", "fetchone")
    run.objs["cursor2"] = run.objs["src"].execute("SELECT id, v FROM t")
    while "cursor2" in run.objs and use(run, "cursor2", "fetchone") is not None:
        pass
    if "b" not in run.objs and "dest" in run.objs:
        try:
            got = use(run, "dest", "execute", "SELECT count(*) FROM old")
        except ab.DestinationLockedError as exc:
            raise AssertionError(f"a backup let go of still locks: {exc}") from None
        assert got.fetchall() == [(OLD_ROWS,)]
    if "cursor" not in run.objs and "src" in run.objs:
        writer = ab.Connection(run.src_path)
        try:
            writer.execute("INSERT INTO t(v) VALUES (x'00')").fetchall()
        except ab.BusyError as exc:
            raise AssertionError(f"a cursor let go of still reads: {exc}") from None
        finally:
            writer.close(True)
    use(run, "b", "finish")


def sc_close_with_backups(run: Run) -> None:
    run.connect("src", run.src_path)
    run.connect("dest", run.dest_path)
    run.objs["b"] = run.objs["dest"].backup("main", run.objs["src"], "main")
    use(run, "b", "step", 10)
    # Two half-read cursors: close() finalizes them, and one let go of
    # meanwhile is an orphan that close() finalizes too.
    for name in ("cursor", "cursor2"):
        run.objs[name] = run.objs["src"].execute("SELECT id FROM t")
        use(run, name, "fetchone")
    use(run, "src", "close")
    use(run, "dest", "close", True)
    assert not run.objs.get("b"), "closing a connection finishes its backups"


def sc_busy_step(run: Run) -> None:
    """A step that meets a lock held by another connection: the busy
    handler runs Python inside the step."""
    run.connect("src", run.src_path)
    run.connect("dest", run.dest_path)
    run.connect("locker", run.src_path)
    use(run, "locker", "execute", "BEGIN EXCLUSIVE")
    objs = run.objs

    def handler(count: int) -> bool:
        if count == 2:
            use(run, "locker", "execute", "ROLLBACK")
        return count < 50

    objs["src"].set_busy_handler(handler)
    objs["b"] = objs["dest"].backup("main", objs["src"], "main")
    step_all(run, 20)
    use(run, "b", "finish")


def sc_shared_cache_busy(run: Run) -> None:
    """Two connections of one shared cache: the writer's commit waits, in
    its busy handler (holding the cache's mutex), for a reader of another
    process-level connection.  The handler lets go of the other's cursor
    and backup (released once the call has returned) and tries to use it
    (refused); hostile actions run there too.  Afterwards the destination
    is usable and nothing reads the source."""
    flags = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_SHAREDCACHE
    objs = run.objs
    objs["src"] = ab.Connection(run.src_path, flags)
    objs["src2"] = ab.Connection(run.src_path, flags)
    run.connect("dest", run.dest_path)
    use(run, "src", "execute", "CREATE TABLE IF NOT EXISTS u(x)")
    objs["b"] = objs["dest"].backup("main", objs["src2"], "main")
    use(run, "b", "step", 10)
    if "src2" in objs:
        objs["cursor"] = objs["src2"].execute("SELECT id FROM t")
    use(run, "cursor", "fetchone")
    reader = sqlite3.connect(run.src_path, isolation_level=None)
    seen: dict[str, str] = {}
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()

        def handler(count: int) -> bool:
            if count == 0:
                for name in ("cursor", "b"):
                    objs.pop(name, None)
                gc.collect()
                try:
                    use(run, "src2", "execute", "SELECT 1")
                    seen["src2"] = "used"
                except ab.ReentrancyError:
                    seen["src2"] = "refused"
                except ab.Error:
                    seen["src2"] = "closed"
            return count < 2

        use(run, "src", "set_busy_handler", handler)
        try:
            use(run, "src", "execute", "INSERT INTO u VALUES (1)")
        except ab.BusyError:
            pass
    finally:
        reader.close()
    assert seen.get("src2") != "used", "a shared-cache connection was used"
    if run.helper is not None:  # a hostile thread may still be finishing b
        run.helper.join(RUN_SECONDS)
    if "dest" in objs and "b" not in objs:
        try:
            use(run, "dest", "execute", "SELECT count(*) FROM old")
        except ab.DestinationLockedError as exc:
            raise AssertionError(f"a backup let go of still locks: {exc}") from None


def sc_cursor(run: Run) -> None:
    run.connect("src", run.src_path)
    run.objs["cursor"] = run.objs["src"].execute(
        "SELECT id, v FROM t WHERE id > :low", {"low": 3}
    )
    while "cursor" in run.objs and use(run, "cursor", "fetchone") is not None:
        pass
    run.objs["cursor2"] = run.objs["src"].executemany(
        "SELECT ?, ?", iter([(1, b"x"), (2, bytearray(b"y"))])
    )
    use(run, "cursor2", "fetchall")
    if "cursor2" in run.objs:
        assert run.objs["cursor2"].description is not None
    use(run, "src", "execute", "SELECT count(*) FROM t")


def sc_with_connection(run: Run) -> None:
    run.connect("src", run.src_path)
    run.objs["cursor"] = run.objs["src"].execute("SELECT id FROM t")
    use(run, "cursor", "fetchone")
    with run.objs["src"]:
        use(run, "src", "execute", "UPDATE t SET v = v WHERE id = 1")
    use(run, "cursor", "fetchall")
    # Whatever stopped it, the with-block ended its transaction.
    assert "src" not in run.objs or run.objs["src"].get_autocommit()


def sc_copy(run: Run) -> None:
    run.connect("src", run.src_path)
    run.connect("dest", run.dest_path)
    ab.copy(run.objs["src"], run.objs["dest"], pages=20)


def sc_misc(run: Run) -> None:
    """The rest of the surface: a cursor made and re-run, names, the
    header, a buffer binding, a failing statement, a refused re-entrant
    call, a step that finds the source locked, a connection let go of
    unclosed, a with-block whose body raises."""
    run.connect("src", run.src_path)
    run.objs["cursor"] = run.objs["src"].cursor()
    use(run, "cursor", "execute", "SELECT ?", (memoryview(b"abc"),))
    use(run, "cursor", "execute", "SELECT count(*) FROM t")
    use(run, "cursor", "fetchall")
    use(run, "src", "db_names")
    use(run, "src", "file_header")
    try:
        use(run, "src", "execute", "SELECT * FROM no_such_table")
    except ab.SQLError:
        pass
    refused = []

    def handler(count: int) -> bool:
        try:
            use(run, "src", "execute", "SELECT 1")
        except ab.ReentrancyError:
            refused.append(count)
        return False

    run.connect("dest", run.dest_path)
    run.connect("locker", run.src_path)
    use(run, "locker", "execute", "BEGIN EXCLUSIVE")
    use(run, "src", "set_busy_handler", handler)
    run.objs["b"] = run.objs["dest"].backup("main", run.objs["src"], "main")
    try:
        use(run, "b", "step", 5)
    except ab.BusyError:
        pass
    use(run, "locker", "execute", "ROLLBACK")
    try:
        use(run, "b", "finish")  # reports the failed step: rolled back
    except ab.BusyError:
        pass
    assert refused, "the busy handler's re-entrant call was not refused"
    run.objs["spare"] = ab.Connection(run.src_path)
    run.objs.pop("spare")  # let go of unclosed: dealloc closes it
    try:
        with run.objs["src"]:
            use(run, "src", "execute", "UPDATE t SET v = v WHERE id = 2")
            raise KeyError("the body's own")
    except KeyError:
        pass


def sc_recorder(run: Run) -> None:
    """A copy into a new file through the page-recording shim, read back."""
    new_path = os.path.join(run.folder, "new.db")
    rec = ab.PageRecorder(new_path)
    try:
        run.connect("src", run.src_path)
        run.objs["new"] = ab.Connection(new_path, vfs=rec.vfs)
        run.objs["b"] = run.objs["new"].backup("main", run.objs["src"], "main")
        step_all(run, 25)
        complete = "b" in run.objs and run.objs["b"].done
        use(run, "b", "finish")
        use(run, "new", "close")
        if complete and "new" in run.objs:
            report = rec.read_back()
            assert not report["mismatched"], report
        ab.page_hash(bytes(1 << 16))
    finally:
        rec.close()


def sc_incremental(run: Run) -> None:
    """The incremental shims (docs/incremental.md): a base and a delta
    from the source connection through the delta shim (stepped), a restore through the overlay into the
    destination (old content: written in SQLite's transaction), a query of
    a restore point.  The library's own connections are not in run.objs:
    the actions reach the source connection and the released windows."""
    from apsw_backup import incremental as inc

    folder = os.path.join(run.folder, "points")
    os.makedirs(folder, exist_ok=True)
    parent_pid = os.getpid()
    run.connect("src", run.src_path)
    for second in (False, True):
        if "src" not in run.objs:
            return
        if second:
            use(run, "src", "execute", "UPDATE t SET v = randomblob(700) WHERE id = 3")
        if "src" not in run.objs:
            return
        inc.incremental(run.objs["src"], folder, pages=25, rebase_share=10.0)
    inc.restore(folder, run.dest_path, overwrite=True)
    # the source by its path: read directly through SQLite's file handle
    # (rollback-journal mode), and a restore into a new file -- not in an
    # inline fork's child (its own new connections are its own: it would
    # write files of its own, which the harness takes for the parent's)
    if os.getpid() != parent_pid:
        return
    own = os.path.join(run.folder, "own")
    os.makedirs(own, exist_ok=True)
    inc.incremental(run.src_path, own)
    fresh = os.path.join(run.folder, "restored.db")
    if os.path.exists(fresh):
        os.remove(fresh)
    inc.restore(own, fresh)
    conn = inc.open_restore_point(folder)
    try:
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(SOURCE_ROWS,)]
    finally:
        conn.close()
    assert all(r.ok for r in inc.verify_folder(folder))


SCENARIOS = {
    "backup_steps": sc_backup_steps,
    "backup_with": sc_backup_with,
    "backup_abandoned": sc_backup_abandoned,
    "orphans": sc_orphans,
    "close_with_backups": sc_close_with_backups,
    "busy_step": sc_busy_step,
    "shared_cache_busy": sc_shared_cache_busy,
    "cursor": sc_cursor,
    "with_connection": sc_with_connection,
    "copy": sc_copy,
    "misc": sc_misc,
    "recorder": sc_recorder,
    "incremental": sc_incremental,
}


# -- hostile actions ---------------------------------------------------------


def _get(run: Run, name: str):
    return run.objs.get(name)


def act_close(name: str, force: bool):
    def action(run: Run) -> None:
        conn = _get(run, name)
        if conn is not None:
            conn.close(force)

    return action


def act_backup_method(method: str):
    def action(run: Run) -> None:
        b = _get(run, "b")
        if b is None:
            return
        if method == "finish":
            b.finish()
        elif method == "close":
            b.close()
        elif method == "close_force":
            b.close(True)
        else:
            b.__exit__(None, None, None)

    return action


def act_drop(run: Run) -> None:
    for name in ("b", "cursor", "cursor2"):
        run.objs.pop(name, None)
    gc.collect()


def act_backup_again(which: str):
    def action(run: Run) -> None:
        other = ab.Connection(":memory:")
        try:
            conn = _get(run, which)
            if conn is None:
                return
            if which == "dest":  # another backup into the destination
                conn.backup("main", other, "main").finish()
            else:  # the source as another backup's destination
                conn.backup("main", other, "main").finish()
        finally:
            other.close(True)

    return action


def act_interrupt(name: str):
    def action(run: Run) -> None:
        conn = _get(run, name)
        if conn is not None:
            conn.interrupt()

    return action


def act_raise(run: Run) -> None:
    raise MemoryError("hostile action: raise")


ACTIONS = {
    "close_src": act_close("src", False),
    "close_src_force": act_close("src", True),
    "close_dest": act_close("dest", False),
    "close_dest_force": act_close("dest", True),
    "finish": act_backup_method("finish"),
    "close_backup": act_backup_method("close"),
    "close_backup_force": act_backup_method("close_force"),
    "exit_backup": act_backup_method("exit"),
    "drop_collect": act_drop,
    "backup_into_dest": act_backup_again("dest"),
    "backup_into_src": act_backup_again("src"),
    "interrupt_src": act_interrupt("src"),
    "interrupt_dest": act_interrupt("dest"),
    "raise": act_raise,
    "fork": None,  # below
}


# -- one run -----------------------------------------------------------------


def file_digest(run: Run) -> str:
    """A digest of both databases and their side files, read by another
    process: a descriptor of ours, once closed, would drop the POSIX locks
    this process's connections hold on them."""
    paths = [
        p + s for p in (run.src_path, run.dest_path) for s in ("", "-journal", "-wal")
    ]
    proc = subprocess.run(
        ["sha256sum", *[p for p in paths if os.path.exists(p)]],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout


def fork_child_body(run: Run) -> int:
    """In the child: its inherited objects must be inert.  Returns the exit
    status (0: as promised)."""
    bad = 0
    for obj in list(run.objs.values()):
        for call in ("finish", "step", "execute", "close"):
            method = getattr(obj, call, None)
            if method is None:
                continue
            try:
                if call == "execute":
                    method("SELECT 1")
                elif call == "step":
                    method(1)
                else:
                    method()
            except ab.ForkingViolationError:
                pass
            except ab.Error:
                pass  # closed, finished: nothing of SQLite either way
            except BaseException:  # noqa: BLE001
                bad = 1
    for obj in list(run.objs.values()):
        close = getattr(obj, "close", None)
        if close is not None:
            try:
                close(True)
            except BaseException:  # noqa: BLE001
                bad = 1
    run.objs.clear()
    gc.collect()
    return bad


def do_fork(run: Run, inline: bool) -> bool:
    """Fork; the child checks its objects are inert.  True in an inline
    fork's child, which goes back into the call: the C code must see the
    fork and touch nothing, and what the scenario does next is refused.
    Inline (the forking thread is the one inside the call), the parent waits
    for the child with the files as they are, and checks the child left them
    unchanged."""
    before = file_digest(run) if inline else None
    pid = os.fork()
    if pid == 0:
        signal.alarm(CHILD_SECONDS)  # the default action ends a hung child
        if inline:
            return True
        status = 1
        try:
            status = fork_child_body(run)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        os._exit(status)
    deadline = time.monotonic() + CHILD_SECONDS + 2
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            run.child_status = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            run.child_status = -999
            break
        time.sleep(0.005)
    if inline and file_digest(run) != before:
        run.problems.append("the fork's child changed the parent's files")
    return False


def run_one(scenario: str, action: str, target: int, folder: str) -> dict:
    """The scenario with the action at hook hit number `target` (-1: none,
    recording).  Returns what happened."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    run = Run(folder)
    run.make_files()
    hits: list[tuple[str, int]] = []
    state = {"n": 0, "acted": None}
    in_child = {"yes": False}

    seen: set[str] = set()

    def hook(name: str, kind: int):
        n = state["n"]
        state["n"] += 1
        seen.add(name)
        if target < 0:
            hits.append((name, kind))
            return None
        if n != target:
            return None
        state["acted"] = name
        if action == "fork":
            if kind == 2:
                run.helper = threading.Thread(target=do_fork, args=(run, False))
                run.helper.start()
                return PAUSE
            if do_fork(run, True):
                in_child["yes"] = True
            return None
        func = ACTIONS[action]
        if kind == 2:

            def in_thread() -> None:
                try:
                    func(run)
                except BaseException as exc:  # noqa: BLE001
                    run.action_error = repr(exc)  # not the traceback's frames

            run.helper = threading.Thread(target=in_thread)
            run.helper.start()
            return PAUSE
        try:
            func(run)
        except ab.Error as exc:
            run.action_error = repr(exc)  # refused: that is allowed
        except MemoryError:
            if action == "raise":
                raise
        return None

    outcome = "ok"
    faulthandler.dump_traceback_later(RUN_SECONDS, exit=True)
    _c._set_hook(hook)
    try:
        SCENARIOS[scenario](run)
    except DOCUMENTED as exc:
        outcome = type(exc).__name__
    except BaseException as exc:  # noqa: BLE001
        if in_child["yes"]:
            outcome = "child"
        else:
            outcome = "undocumented"
            run.problems.append(
                f"the scenario raised {type(exc).__name__}: {exc}"
                + "".join(traceback.format_exception(exc))[-800:]
            )
    finally:
        _c._set_hook(None)
    if in_child["yes"]:
        # The inline fork's child, back from the call: what it inherited
        # must be refused, and it must not block.
        os._exit(fork_child_body(run))
    if run.helper is not None:
        run.helper.join(RUN_SECONDS)
        if run.helper.is_alive():
            run.problems.append("the hostile thread hung")
    if action == "fork" and state["acted"] and run.child_status not in (0, None):
        run.problems.append(f"the fork's child ended with {run.child_status}")
    check_after(run)
    faulthandler.cancel_dump_traceback_later()
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "point": state["acted"],
        "hits": state["n"],
        "outcome": outcome,
        "problems": run.problems,
        "seen": sorted(seen),
        "recorded": hits,
    }


def check_after(run: Run) -> None:
    """Let go of everything, then: no lock left, destination old or complete,
    nothing of ours alive."""
    for name in list(run.objs):
        obj = run.objs.pop(name)
        close = getattr(obj, "close", None)
        if close is not None:
            try:
                close(True)
            except ab.Error as exc:
                run.problems.append(f"close(True) of {name} raised {exc!r}")
        del obj, close
    gc.collect()
    for path in (run.src_path, run.dest_path):
        conn = ab.Connection(path)
        try:
            conn.execute("BEGIN IMMEDIATE; COMMIT").fetchall()
        except ab.Error as exc:
            run.problems.append(f"a lock was left on {os.path.basename(path)}: {exc}")
        finally:
            conn.close(True)
        del conn
    dest = ab.Connection(run.dest_path)
    src = ab.Connection(run.src_path)
    try:
        check = dest.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            run.problems.append(f"destination integrity_check: {check[:3]}")
        tables = {r[0] for r in dest.execute("SELECT name FROM sqlite_master")}
        if "old" in tables:
            if dest.execute("SELECT count(*) FROM old").fetchall() != [(OLD_ROWS,)]:
                run.problems.append("the destination's old content changed")
        elif "t" in tables:
            mine = dest.execute("SELECT id, v FROM t ORDER BY id").fetchall()
            theirs = src.execute("SELECT id, v FROM t ORDER BY id").fetchall()
            if mine != theirs:
                run.problems.append("the destination holds a partial copy")
        else:
            run.problems.append(f"the destination holds neither: {tables}")
    finally:
        dest.close(True)
        src.close(True)
    del dest, src
    gc.collect()
    alive = [
        type(o).__name__
        for o in gc.get_objects()
        if isinstance(o, (ab.Connection, ab.Cursor, ab.Backup))
    ]
    if alive:
        run.problems.append(f"objects left alive: {alive}")


# -- coverage ------------------------------------------------------------------

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")

# Points the matrix cannot reach, and where they are tested instead.
NOT_REACHED = {
    "restart_backup": "needs SQLite to answer an extended BUSY code (a WAL "
    "being recovered by another process): tests/test_extended_busy_codes.py",
    "drop_done_unraisable": "an orphan backup whose finish fails (an I/O "
    "error while a lock is held): tests/faults (I/O fault sweep)",
    "connection_exit_unraisable": "a with-block whose body raised and whose "
    "rollback fails too: tests/test_with_block.py",
}


def all_points() -> set[str]:
    """Every hook and release point named in the C code."""
    import re

    names = set()
    for name in os.listdir(SRC):
        if name.endswith(".c"):
            with open(os.path.join(SRC, name)) as f:
                names.update(
                    re.findall(r'(?:HOOK|HOOK_VOID|RELEASE_GIL)\("(\w+)"\)', f.read())
                )
    return names


# -- the batch child and the parent loop -------------------------------------


def batch(scenario: str, action: str, targets: list[int], folder: str) -> None:
    for target in targets:
        result = run_one(scenario, action, target, os.path.join(folder, str(target)))
        result.pop("recorded")
        print(json.dumps({"target": target, **result}), flush=True)


def record(scenario: str, folder: str) -> list[tuple[str, int]]:
    return run_one(scenario, "raise", -1, folder)["recorded"]


def run_batches(
    python: str,
    scenario: str,
    action: str,
    targets: list[int],
    folder: str,
    seen: set[str],
) -> tuple[int, list[str]]:
    """Run the targets in child processes, a new one after a crash or a
    hang.  Returns (runs, problems); adds the points passed to seen."""
    problems: list[str] = []
    runs = 0
    pending = list(targets)
    while pending:
        span = pending[:400]
        proc = subprocess.run(
            [
                python,
                __file__,
                "batch",
                scenario,
                action,
                ",".join(map(str, span)),
                folder,
            ],
            capture_output=True,
            text=True,
            timeout=RUN_SECONDS * (len(span) + 2),
        )
        done = set()
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            result = json.loads(line)
            done.add(result["target"])
            seen.update(result["seen"])
            runs += 1
            for problem in result["problems"]:
                problems.append(
                    f"{scenario}/{action} at #{result['target']} "
                    f"({result['point']}): {problem}"
                )
        missing = [t for t in span if t not in done]
        if missing:
            crashed = missing[0]
            runs += 1
            why = "hang" if "Timeout" in proc.stderr else f"exit {proc.returncode}"
            problems.append(
                f"{scenario}/{action} at #{crashed}: the process died ({why}): "
                f"{proc.stderr[-1500:]}"
            )
            pending = [t for t in pending if t > crashed]
        else:
            pending = pending[len(span) :]
    return runs, problems


def matrix(argv: list[str]) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="harness.py matrix")
    parser.add_argument(
        "--bounded", type=int, default=0, help="points per pair (0: all)"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--actions", default=",".join(ACTIONS))
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    total_runs = 0
    all_problems: list[str] = []
    points_seen: set[str] = set()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        for scenario in args.scenarios.split(","):
            proc = subprocess.run(
                [
                    args.python,
                    __file__,
                    "record",
                    scenario,
                    os.path.join(folder, "rec"),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                all_problems.append(
                    f"{scenario}: the recording run failed: {proc.stderr[-1500:]}"
                )
                continue
            hits = json.loads(proc.stdout)
            points_seen.update(name for name, _ in hits)
            targets = list(range(len(hits)))
            if args.bounded and len(targets) > args.bounded:
                step = len(targets) / args.bounded
                targets = sorted(
                    {int(i * step) for i in range(args.bounded)} | {len(hits) - 1}
                )
            for action in args.actions.split(","):
                runs, problems = run_batches(
                    args.python,
                    scenario,
                    action,
                    targets,
                    os.path.join(folder, scenario, action),
                    points_seen,
                )
                total_runs += runs
                all_problems.extend(problems)
                print(
                    f"{scenario:20} {action:20} points {len(targets):4} of {len(hits):4} "
                    f"runs {runs:5} problems {len(problems)}",
                    flush=True,
                )
    print(
        f"hooks: {len(args.scenarios.split(','))} scenarios, {len(points_seen)} distinct "
        f"points, {len(args.actions.split(','))} actions, {total_runs} runs, "
        f"{len(all_problems)} problems ({time.monotonic() - started:.0f} s)"
    )
    print("points seen: " + " ".join(sorted(points_seen)))
    missing = sorted(all_points() - points_seen - NOT_REACHED.keys())
    if missing and not args.bounded and args.scenarios == ",".join(SCENARIOS):
        all_problems.append(f"points no run passed: {missing}")
    for problem in all_problems[:40]:
        print("PROBLEM " + problem)
    return 1 if all_problems else 0


def main(argv: list[str]) -> int:
    if not hasattr(_c, "_set_hook"):
        print("not a hook build: build with APSW_BACKUP_HOOKS=1", file=sys.stderr)
        return 2
    command = argv[0]
    if command == "record":
        print(json.dumps(record(argv[1], argv[2])))
        return 0
    if command == "batch":
        batch(argv[1], argv[2], [int(t) for t in argv[3].split(",")], argv[4])
        return 0
    if command == "matrix":
        return matrix(argv[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
