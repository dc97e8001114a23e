"""Every place the C code releases the GIL, held open while another thread
does each hostile thing (issue 10 b; SPEC 3.3-3.7).

A *window* is a call parked inside SQLite with the GIL released:

====================  ==========================================  =====================
window                how it is held open                         C release point
====================  ==========================================  =====================
step_source_locked    Backup.step() on a source another           backup_step
                      connection holds EXCLUSIVE; the source's    (sqlite3_backup_step)
                      busy handler blocks on an Event
step_dest_locked      Backup.step() whose commit waits for a      backup_step
                      reader of the destination; the
                      destination's busy handler blocks
close_force_finish    dest.close(force=True) finishing the        close_everything ->
                      backup while a long query holds the         backup_finish_internal
                      source's mutex                              (sqlite3_backup_finish)
collect_finish        the Backup collected (del + gc.collect()),  backup_dealloc ->
                      finishing while the source is busy          backup_finish_internal
finish_waits          Backup.finish() from another thread while   backup_finish ->
                      the source is busy (SPEC 3.7: it waits)     backup_finish_internal
source_query          a long recursive-CTE query on the source    step_until_row
                                                                  (sqlite3_step)
prepare_schema        the first statement of a new connection,    prepare_next
                      whose schema read waits on an EXCLUSIVE     (sqlite3_prepare_v3)
                      lock; busy handler blocks
savepoint_release     ``with source:`` committing at RELEASE,     connection_exec
                      waiting for a reader; busy handler blocks   (sqlite3_exec)
cursor_finalize       a cursor collected while a long query       finalize_statement
                      holds the connection's mutex                (sqlite3_finalize)
====================  ==========================================  =====================

The other release points cannot be held open (no lock or callback inside),
so a race loop runs them thousands of times against another thread with a
tiny switch interval (``RACES``): backup_create (sqlite3_backup_init),
close_everything (sqlite3_close / sqlite3_close_v2), connection_init
(sqlite3_open_v2), cursor_close (finalize_statement), and the page-size
trap's PRAGMAs (pragma_value) on a failing step.

In each window another thread does one hostile action: close() with and
without force of the source and the destination, Backup.finish() / close()
/ close(force) / __exit__ (with and without an exception), step(),
``del`` + ``gc.collect()`` of the Backup / Cursor / Connections, cursor
close, interrupt(), a call into the busy connection.  Then the window is
released and the test asserts:

- no crash, no hang (each case runs in a subprocess with a timeout);
- Backup.finish() / close() / __exit__ from another thread *wait* for the
  call in the window and then finish (never ThreadingViolationError);
  every other action either waits or is refused with
  ThreadingViolationError -- none may act under the running call;
- afterwards the destination is unlocked, another connection can write both
  databases, every connection closes, and the destination holds its old
  content or a complete copy of the source, integrity_check ok.

Run one case by hand: ``python tests/test_gil_release_points.py WINDOW ACTION``.
"""

import gc
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest

HOLD = 0.3  # seconds the window stays open once the action has started
JOIN = 20  # seconds allowed for anything to end once the window is released
LONG_QUERY = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
    "WHERE i < 200000000) SELECT count(*) FROM n"
)

# -- the databases -------------------------------------------------------------


def build(directory):
    """src.db: 60 rows of 1000 bytes (about 20 pages); dest.db: old content."""
    src = os.path.join(directory, "src.db")
    dest = os.path.join(directory, "dest.db")
    db = sqlite3.connect(src, isolation_level=None)
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, data BLOB)")
    db.execute(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 60) "
        "INSERT INTO t(data) SELECT randomblob(1000) FROM c"
    )
    db.close()
    db = sqlite3.connect(dest, isolation_level=None)
    db.execute("CREATE TABLE old(n INTEGER)")
    db.executemany("INSERT INTO old VALUES (?)", [(1,), (2,), (3,)])
    db.close()
    return src, dest


def content(path):
    """(integrity_check, {table: rows}) read by the standard library."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        ok = db.execute("PRAGMA integrity_check").fetchall()
        names = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        tables = {
            n: db.execute(f'SELECT * FROM "{n}" ORDER BY rowid').fetchall()
            for n in names
        }
        return ok, tables
    finally:
        db.close()


def writable(path):
    """Another connection can take the write lock at once (no lock is left)."""
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("COMMIT")
        return True
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        db.close()


# -- running a call in a thread ---------------------------------------------------


class Call(threading.Thread):
    """func() in a thread; .outcome is ("ok", value) or ("raised", exc)."""

    def __init__(self, func, name):
        super().__init__(name=name, daemon=True)
        self.func = func
        self.outcome = None
        self.ended_at = None

    def run(self):
        try:
            self.outcome = ("ok", self.func())
        except BaseException as exc:  # noqa: BLE001 - judged by the test
            # No traceback: its frames would keep the call's objects alive.
            self.outcome = ("raised", exc.with_traceback(None))
        finally:
            self.func = None  # drop the references the call held
            self.ended_at = time.monotonic()


def blocking_handler(inside, release):
    """A busy handler that parks the call inside SQLite until released."""

    def handler(count):
        inside.set()
        if not release.wait(JOIN):
            return False
        time.sleep(0.001)
        return count < 5000

    return handler


def wait_busy(conn, timeout=10):
    """Until a call on conn from another thread is in progress (the
    connection refuses us as "in use")."""
    import apsw_backup

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn.get_autocommit()
        except apsw_backup.ThreadingViolationError as exc:
            if "in use" in str(exc):
                return True
        except apsw_backup.ConnectionClosedError:
            return False
        time.sleep(0.002)
    return False


# -- the case: objects, window, action, checks ---------------------------------------


class Case:
    def __init__(self, directory):
        import apsw_backup

        self.ab = apsw_backup
        self.src_path, self.dest_path = build(directory)
        self.before = {
            "dest": content(self.dest_path)[1],
            "src": content(self.src_path)[1],
        }
        self.inside = threading.Event()
        self.release_event = threading.Event()
        self.raw = None  # a standard-library connection holding a lock
        self.threads = []
        self.objs = {}
        self.interrupt_on_release = []  # connections running a long query

    # objects the actions reach; a "del" action removes them from objs
    def open_pair(self, src_handler=False, dest_handler=False, first_step=True):
        ab = self.ab
        src = ab.Connection(self.src_path)
        dest = ab.Connection(self.dest_path)
        handler = blocking_handler(self.inside, self.release_event)
        if src_handler:
            src.set_busy_handler(handler)
        if dest_handler:
            dest.set_busy_handler(handler)
        b = dest.backup("main", src, "main")
        if first_step:  # a partial copy pending in dest (its EXCLUSIVE lock held)
            assert b.step(1) is False
        # A cursor keeping a (finished) statement: closing it finalizes, with
        # the GIL released; finished, it holds no lock on the file.
        cur = src.execute("SELECT count(*) FROM t")
        assert cur.fetchall() == [(60,)]
        self.objs.update(src=src, dest=dest, b=b, cur=cur)

    def start(self, func, name):
        call = Call(func, name)
        self.threads.append(call)
        call.start()
        return call

    def release(self):
        if self.raw is not None:
            self.raw.execute("ROLLBACK")
            self.raw.close()
            self.raw = None
        self.release_event.set()
        # An interrupt() that lands before the query's first step is lost
        # (SQLite clears it when a statement starts): repeat until it ends.
        deadline = time.monotonic() + JOIN
        for conn, thread in self.interrupt_on_release:
            while thread.is_alive() and time.monotonic() < deadline:
                try:
                    conn.interrupt()
                except self.ab.ConnectionClosedError:
                    pass
                thread.join(0.01)
        self.interrupt_on_release = []


def _lock_exclusive(case, path):
    case.raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    case.raw.execute("BEGIN EXCLUSIVE")


def _lock_shared(case, path):
    case.raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    case.raw.execute("BEGIN")
    case.raw.execute("SELECT count(*) FROM sqlite_master").fetchall()


# Each window: open(case) sets the objects up and parks a call in the window;
# it returns (the call, whether the Backup or its connections are busy in it,
# the names of the objects the call is using).


def window_step_source_locked(case):
    case.open_pair(src_handler=True)
    _lock_exclusive(case, case.src_path)
    b = case.objs["b"]
    call = case.start(lambda: b.step(-1), "window")
    assert case.inside.wait(10), "step() never reached the source's busy handler"
    return call, True, {"b", "src", "dest"}


def window_step_dest_locked(case):
    # The first step takes an EXCLUSIVE lock on the destination: a reader
    # that came first makes it wait.
    case.open_pair(dest_handler=True, first_step=False)
    _lock_shared(case, case.dest_path)
    b = case.objs["b"]
    call = case.start(lambda: b.step(-1), "window")
    assert case.inside.wait(10), "step() never reached the destination's busy handler"
    return call, True, {"b", "src", "dest"}


def _busy_source(case):
    """A long query on the source in its own thread (ended by interrupt())."""
    src = case.objs["src"]
    query = case.start(lambda: src.execute(LONG_QUERY).fetchall(), "long query")
    assert wait_busy(src), "the long query did not start"
    case.interrupt_on_release.append((src, query))
    time.sleep(0.05)  # past its prepare: inside sqlite3_step, holding the mutex
    return query


def window_close_force_finish(case):
    case.open_pair()
    _busy_source(case)
    dest = case.objs["dest"]
    call = case.start(lambda: dest.close(force=True), "window")
    assert wait_busy(dest), "dest.close(force=True) did not start finishing the backup"
    return call, True, {"b", "src", "dest"}


def window_collect_finish(case):
    case.open_pair()
    _busy_source(case)
    holder = [case.objs.pop("b")]

    def collect():
        holder.clear()
        gc.collect()

    call = case.start(collect, "window")
    # A Backup collected while a call is inside its source is not finished
    # under that call (src/README.md, "Who may finish a Backup"): a
    # stand-in keeps the destination locked and finishes it when the call
    # ends.  So the collection returns at once, and the window is the
    # stand-in's wait: the destination locked, nothing finishing yet.
    call.join(5)
    assert call.outcome == ("ok", None), call.outcome
    try:
        case.objs["dest"].execute("SELECT 1")
        raise AssertionError("the destination was unlocked before the finish")
    except __import__("apsw_backup").ThreadingViolationError:
        pass
    return call, False, {"src", "dest"}


def window_finish_waits(case):
    case.open_pair()
    _busy_source(case)
    b = case.objs["b"]
    call = case.start(b.finish, "window")
    deadline = time.monotonic() + 2
    while call.outcome is None and time.monotonic() < deadline:
        if wait_busy(case.objs["dest"], timeout=0.05):
            break
    assert call.outcome is None, (
        "Backup.finish() from another thread while the source is busy did not "
        f"wait (SPEC 3.7): {call.outcome}"
    )
    return call, True, {"b", "src", "dest"}


def window_source_query(case):
    case.open_pair()
    src, cur = case.objs["src"], case.objs["cur"]
    call = case.start(lambda: cur.execute(LONG_QUERY).fetchall(), "window")
    assert wait_busy(src), "the long query did not start"
    case.interrupt_on_release.append((src, call))
    time.sleep(0.05)  # past its prepare: inside sqlite3_step
    return call, True, {"b", "src", "cur"}


def window_prepare_schema(case):
    ab = case.ab
    case.open_pair()
    # A new connection has not read the schema: its first prepare must.
    extra = ab.Connection(case.src_path)
    extra.set_busy_handler(blocking_handler(case.inside, case.release_event))
    xcur = extra.cursor()
    case.objs.update(extra=extra, xcur=xcur)
    _lock_exclusive(case, case.src_path)
    call = case.start(
        lambda: xcur.execute("SELECT count(*) FROM t").fetchall(), "window"
    )
    assert case.inside.wait(10), "prepare never reached the busy handler"
    return call, False, {"extra", "xcur"}


def window_savepoint_release(case):
    case.open_pair(src_handler=True)
    case.objs.pop("cur").close()  # the RELEASE must be able to commit
    _lock_shared(case, case.src_path)
    src = case.objs["src"]

    def transaction():
        with src:
            src.execute("INSERT INTO t(data) VALUES (randomblob(1000))").fetchall()

    call = case.start(transaction, "window")
    assert case.inside.wait(10), "the RELEASE never reached the busy handler"
    return call, True, {"b", "src"}


def window_cursor_finalize(case):
    case.open_pair()
    _busy_source(case)
    holder = [case.objs.pop("cur")]

    def collect():
        holder.clear()
        gc.collect()

    call = case.start(collect, "window")
    time.sleep(0.1)  # nothing to poll: the dying cursor waits for the mutex
    return call, True, {"src"}


WINDOWS = {
    name[len("window_") :]: func
    for name, func in dict(globals()).items()
    if name.startswith("window_")
}

# -- the hostile actions -------------------------------------------------------------

FINISHING = {"backup.finish", "backup.close", "backup.close(force)", "backup.__exit__"}
FINISHING |= {"backup.__exit__(exc)"}


def _del(case, name):
    case.objs.pop(name, None)
    gc.collect()


class BodyError(Exception):
    pass


ACTIONS = {
    "source.close": lambda c: c.objs["src"].close(),
    "source.close(force)": lambda c: c.objs["src"].close(force=True),
    "dest.close": lambda c: c.objs["dest"].close(),
    "dest.close(force)": lambda c: c.objs["dest"].close(force=True),
    "backup.finish": lambda c: c.objs["b"].finish(),
    "backup.close": lambda c: c.objs["b"].close(),
    "backup.close(force)": lambda c: c.objs["b"].close(force=True),
    "backup.__exit__": lambda c: c.objs["b"].__exit__(None, None, None),
    "backup.__exit__(exc)": lambda c: c.objs["b"].__exit__(
        BodyError, BodyError("body"), None
    ),
    "backup.step": lambda c: c.objs["b"].step(1),
    "del backup": lambda c: _del(c, "b"),
    "del source": lambda c: _del(c, "src"),
    "del dest": lambda c: _del(c, "dest"),
    "del cursor": lambda c: _del(c, "cur"),
    "cursor.close": lambda c: c.objs["cur"].close(),
    "source.interrupt": lambda c: c.objs["src"].interrupt(),
    "source.execute": lambda c: c.objs["src"].execute("SELECT 1").fetchall(),
    "extra.close": lambda c: c.objs["extra"].close(),
    "extra.close(force)": lambda c: c.objs["extra"].close(force=True),
    "del extra": lambda c: _del(c, "extra"),
    "extra.cursor.close": lambda c: c.objs["xcur"].close(),
    "del extra.cursor": lambda c: _del(c, "xcur"),
    "extra.interrupt": lambda c: c.objs["extra"].interrupt(),
    "extra.execute": lambda c: c.objs["extra"].execute("SELECT 1").fetchall(),
    "backup from extra": lambda c: c.ab.Connection(":memory:").backup(
        "main", c.objs["extra"], "main"
    ),
}
# Actions that never need to wait: they drop a reference, or interrupt.
NO_WAIT = {a for a in ACTIONS if a.startswith("del ") or a.endswith("interrupt")}

PAIR_ACTIONS = [a for a in ACTIONS if "extra" not in a]
EXTRA_ACTIONS = [a for a in ACTIONS if "extra" in a]


def actions_for(window):
    if window == "prepare_schema":
        return EXTRA_ACTIONS
    names = PAIR_ACTIONS
    if window in ("collect_finish",):
        names = [a for a in names if not a.startswith(("backup.", "del backup"))]
    if window in ("savepoint_release", "cursor_finalize"):
        names = [a for a in names if "cursor" not in a]
    return names


CASES = [(w, a) for w in WINDOWS for a in actions_for(w)]


def run_case(directory, window, action):
    """Open the window, do the action in another thread, release, check."""
    ab = __import__("apsw_backup")
    case = Case(directory)
    try:
        call, busy, _ = WINDOWS[window](case)
    except BaseException:
        case.release()  # stop a long query, or the process waits for it
        raise
    act = case.start(lambda: ACTIONS[action](case), "action")
    act.join(HOLD)
    returned_early = act.outcome is not None
    case.release()
    for thread in case.threads:
        thread.join(JOIN)
    stuck = [t.name for t in case.threads if t.is_alive()]
    if stuck:
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)
        raise AssertionError(f"HANG: {stuck} did not end {JOIN} s after the release")
    problems = judge(ab, window, action, call, act, returned_early, busy)
    problems += check_end(case)
    return problems, {"window": repr(call.outcome), "action": repr(act.outcome)}


def judge(ab, window, action, call, act, returned_early, busy):
    problems = []
    kind, value = act.outcome
    refused = kind == "raised" and isinstance(value, ab.ThreadingViolationError)
    if kind == "raised" and not isinstance(value, ab.Error):
        problems.append(f"{action} raised {value!r}, not a library error")
    if action in FINISHING:
        if refused:
            problems.append(
                f"{action} from another thread was refused instead of waiting and "
                f"finishing (SPEC 3.3, 3.7): {value}"
            )
        elif busy and returned_early:
            problems.append(f"{action} returned while the call in the window ran")
    elif busy and returned_early and not refused and action not in NO_WAIT:
        if action == "dest.close" and isinstance(value, ab.ThreadingViolationError):
            pass
        elif not (kind == "raised" and isinstance(value, ab.ConnectionClosedError)):
            problems.append(
                f"{action} acted under the running call instead of waiting or "
                f"refusing: {act.outcome!r}"
            )
    wkind, wvalue = call.outcome
    if wkind == "raised" and not isinstance(wvalue, ab.Error):
        problems.append(f"the call in the window raised {wvalue!r}")
    return problems


def check_end(case):
    """Finish what is left, then: no lock, everything closes, dest old or
    complete, integrity ok."""
    ab = case.ab
    problems = []
    b = case.objs.pop("b", None)
    if b is not None:
        try:
            b.close(force=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"Backup.close(force=True) at the end raised {exc!r}")
        if bool(b):
            problems.append("the Backup is still unfinished after close(force=True)")
    b = None
    gc.collect()
    dest = case.objs.get("dest")
    if dest is not None:
        try:
            dest.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except ab.ConnectionClosedError:
            pass
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the destination is still locked or unusable: {exc!r}")
    for path in (case.src_path, case.dest_path):
        ok = writable(path)
        if ok is not True:
            problems.append(f"{os.path.basename(path)} is not writable: {ok}")
    for name in ("xcur", "cur", "extra", "src", "dest"):
        obj = case.objs.pop(name, None)
        if obj is None:
            continue
        try:
            obj.close()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name}.close() at the end raised {exc!r}")
    obj = None
    gc.collect()
    for path in (case.src_path, case.dest_path):
        ok = writable(path)
        if ok is not True:
            problems.append(f"{os.path.basename(path)}: a lock is left: {ok}")
    src_ok, src_tables = content(case.src_path)
    dest_ok, dest_tables = content(case.dest_path)
    if src_ok != [("ok",)] or dest_ok != [("ok",)]:
        problems.append(f"integrity_check: source {src_ok[:3]}, dest {dest_ok[:3]}")
    src_before = case.before["src"]
    allowed = [case.before["dest"], src_before, src_tables]
    if dest_tables not in allowed:
        problems.append(
            "the destination is neither its old content nor a complete copy: "
            f"tables {sorted(dest_tables)}, "
            f"{ {k: len(v) for k, v in dest_tables.items()} } rows"
        )
    if src_tables != src_before and (
        src_tables.keys() != src_before.keys()
        or len(src_tables["t"]) != len(src_before["t"]) + 1
    ):
        problems.append("the source lost or changed rows it should not have")
    return problems


# -- race loops: the release points that cannot be held open ----------------------------


def race(iterations, setup, first, second):
    """setup() -> state; then first(state) once and second(state) over and
    over until first is done, in two threads released together; iterations
    times, with a tiny switch interval.  check(state, results) judges each
    run: results maps "first"/"second" to the list of outcomes."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    problems = []
    try:
        for _ in range(iterations):
            state = setup()
            go = threading.Barrier(2)
            results = {"first": [], "second": []}
            first_done = threading.Event()

            def run(name, func, state=state, go=go, results=results, done=first_done):
                go.wait()
                for _ in range(1 if name == "first" else 1000):
                    try:
                        results[name].append(("ok", func(state)))
                    except BaseException as exc:  # noqa: BLE001
                        # No traceback: its frames would keep objects alive.
                        results[name].append(("raised", exc.with_traceback(None)))
                    if done.is_set():
                        break
                if name == "first":
                    done.set()

            threads = [
                threading.Thread(target=run, args=("first", first), daemon=True),
                threading.Thread(target=run, args=("second", second), daemon=True),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(JOIN)
            if any(t.is_alive() for t in threads):
                raise AssertionError("HANG in a race loop")
            problems += state.get("check", lambda s, r: [])(state, results)
            state.clear()
            gc.collect()
    finally:
        sys.setswitchinterval(old)
    return problems


def _memory_pair():
    import apsw_backup as ab

    src = ab.Connection(":memory:")
    src.execute(
        "CREATE TABLE t(x); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL "
        "SELECT i + 1 FROM c WHERE i < 50) INSERT INTO t SELECT randomblob(500) FROM c"
    ).fetchall()
    dest = ab.Connection(":memory:")
    return {"src": src, "dest": dest}


def _library_errors_only(state, results):
    import apsw_backup as ab

    return [
        f"{name} raised {value!r}"
        for name, outcomes in results.items()
        for kind, value in outcomes
        if kind == "raised" and not isinstance(value, ab.Error)
    ]


def race_backup_init(hostile):
    def setup():
        state = _memory_pair()
        state["check"] = _library_errors_only
        return state

    def start(state):
        b = state["dest"].backup("main", state["src"], "main")
        state["b"] = b
        b.step(-1)
        b.finish()

    return setup, start, hostile


def race_close(hostile):
    def setup():
        state = _memory_pair()
        state["cur"] = state["src"].execute("SELECT x FROM t")
        state["b"] = state["dest"].backup("main", state["src"], "main")
        state["check"] = _library_errors_only
        return state

    return setup, lambda s: s["src"].close(force=True), hostile


def race_open(hostile):
    import apsw_backup as ab

    path = "o.db"  # the child runs in the test's tmp_path

    def setup():
        conn = ab.Connection.__new__(ab.Connection)

        def check(state, results):
            problems = _library_errors_only(state, results)
            if (
                hostile is init_again
                and results["first"][0][0] == "ok"
                and any(kind == "ok" for kind, _ in results["second"])
            ):
                problems.append("__init__ succeeded twice on one Connection (a leak)")
            try:
                conn.close(force=True)
            except ab.Error:
                pass
            return problems

        return {"conn": conn, "check": check}

    def init(state):
        state["conn"].__init__(path)

    return setup, init, hostile


def race_cursor_close(hostile):
    import apsw_backup as ab

    sql = "SELECT length('" + "x" * 100_000 + "')"

    def setup():
        conn = ab.Connection(":memory:")
        return {"conn": conn, "cur": conn.execute(sql), "check": _library_errors_only}

    def close(state):
        state["cur"].close()

    return setup, close, hostile


def race_page_size_trap(hostile):
    """step() fails with the page-size trap (the message's PRAGMAs run with
    the GIL released) while another thread acts on the backup."""
    import apsw_backup as ab

    def setup():
        src = ab.Connection(":memory:")
        src.execute("PRAGMA page_size=1024").fetchall()
        src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)").fetchall()
        dest = ab.Connection(":memory:")
        dest.execute("PRAGMA page_size=4096").fetchall()
        dest.execute("CREATE TABLE old(n); INSERT INTO old VALUES (7)").fetchall()

        def check(state, results):
            problems = _library_errors_only(state, results)
            try:
                if state.get("b") is not None:
                    state["b"].close(force=True)
                got = dest.execute("SELECT n FROM old").fetchall()
                if got != [(7,)]:
                    problems.append(f"the destination lost its old content: {got}")
            except ab.ConnectionClosedError:
                pass
            except ab.Error as exc:
                problems.append(f"the destination after the trap: {exc!r}")
            return problems

        return {
            "src": src,
            "dest": dest,
            "b": dest.backup("main", src, "main"),
            "check": check,
        }

    return setup, lambda s: _call(s, "b", "step", -1), hostile


def _call(state, name, method, *args):
    """state[name].method(*args), unless another thread dropped it first."""
    obj = state.get(name)
    return None if obj is None else getattr(obj, method)(*args)


def init_again(state):
    state["conn"].__init__("o2.db")


def _pop_gc(name):
    def drop(state):
        state.pop(name, None)
        gc.collect()

    return drop


RACES = {
    "backup_init": (
        race_backup_init,
        {
            "source.close(force)": lambda s: s["src"].close(force=True),
            "dest.close(force)": lambda s: s["dest"].close(force=True),
            "source.interrupt": lambda s: s["src"].interrupt(),
            "backup.finish": lambda s: _call(s, "b", "finish"),
            "del backup": _pop_gc("b"),
        },
    ),
    "close": (
        race_close,
        {
            "interrupt": lambda s: s["src"].interrupt(),
            "cursor.close": lambda s: _call(s, "cur", "close"),
            "del cursor": _pop_gc("cur"),
            "backup.finish": lambda s: _call(s, "b", "finish"),
            "backup.step": lambda s: _call(s, "b", "step", 1),
            "del backup": _pop_gc("b"),
            "execute": lambda s: s["src"].execute("SELECT 1").fetchall(),
        },
    ),
    "open": (
        race_open,
        {
            "init again": init_again,
            "close": lambda s: s["conn"].close(),
            "interrupt": lambda s: s["conn"].interrupt(),
            "execute": lambda s: s["conn"].execute("SELECT 1").fetchall(),
        },
    ),
    "cursor_close": (
        race_cursor_close,
        {
            "execute": lambda s: s["cur"].execute("SELECT 1, 2"),
            "fetch": lambda s: s["cur"].fetchall(),
            "close": lambda s: s["cur"].close(),
            "connection.close": lambda s: s["conn"].close(),
        },
    ),
    "page_size_trap": (
        race_page_size_trap,
        {
            "backup.finish": lambda s: _call(s, "b", "finish"),
            "dest.close(force)": lambda s: s["dest"].close(force=True),
            "source.close": lambda s: s["src"].close(),
            "del backup": _pop_gc("b"),
        },
    ),
}
RACE_CASES = [(r, a) for r, (_, acts) in RACES.items() for a in acts]
RACE_ITERATIONS = 300


def run_race(directory, name, action):
    make, actions = RACES[name]
    setup, first, second = make(actions[action])
    problems = race(RACE_ITERATIONS, setup, first, second)
    counts = {p: problems.count(p) for p in problems}
    return [f"{p} ({n} of {RACE_ITERATIONS} runs)" for p, n in counts.items()], {}


# -- pytest: one subprocess per case --------------------------------------------------


def run_in_subprocess(directory, kind, name, action, timeout=90):
    cmd = [sys.executable, os.path.abspath(__file__), kind, name, action]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=directory
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if exc.stderr else ""
        pytest.fail(
            f"HANG: {name} / {action} did not end in {timeout} s\n{err[-3000:]}"
        )
    if proc.returncode != 0 or "GIL-CASE-OK" not in proc.stdout:
        how = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit {proc.returncode}"
        )
        pytest.fail(
            f"{name} / {action}: {how}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )


@pytest.mark.parametrize(
    ("window", "action"), CASES, ids=[f"{w}-{a}" for w, a in CASES]
)
def test_hostile_action_in_gil_release_window(tmp_path, window, action):
    run_in_subprocess(tmp_path, "window", window, action)


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("race_name", "action"), RACE_CASES, ids=[f"{r}-{a}" for r, a in RACE_CASES]
)
def test_hostile_action_racing_short_gil_release(tmp_path, race_name, action):
    run_in_subprocess(tmp_path, "race", race_name, action, timeout=180)


def test_every_gil_release_point_in_the_c_code_is_covered():
    """A new Py_BEGIN_ALLOW_THREADS must get a window or a race here."""
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    covered = {
        "backup.c": {
            "pragma_value",  # race page_size_trap (its PRAGMAs, before the fix)
            "page_size_trap_message",  # race page_size_trap
            "backup_create",  # race backup_init
            "backup_step",  # windows step_source_locked, step_dest_locked
            "backup_finish_internal",  # windows *_finish, finish_waits
        },
        "calls.c": {"wait_a_little"},  # every finish-type action that waits
        "connection.c": {"connection_exec", "connection_init", "close_everything"},
        "cursor.c": {
            "finalize_statement",
            "cursor_close_internal",  # window cursor_finalize, race cursor_close
            "prepare_next",
            "step_until_row",
        },
    }
    # Not held open here (say why, and where it is tested instead):
    # restart_backup runs only after a step answered an extended BUSY/LOCKED
    # code (SQLITE_BUSY_RECOVERY ...), which no test here can produce on
    # demand; tests/test_backup_sticky_lock.py covers it without a hostile
    # thread.
    covered["backup.c"].add("restart_backup")
    # statements_finalize_pending finalizes the statements a callback let go
    # of while another thread was inside their connection (deferred so the
    # callback cannot deadlock); tests/test_attack_reentrancy.py
    # (test_cursor_dropped_in_busy_handler_cannot_deadlock) holds that case.
    covered["cursor.c"].add("statements_finalize_pending")
    # The page recorder's read-back and page_hash() of large bytes: raced by
    # close()/del in tests/test_verify_pages.py
    # (test_read_back_racing_close_and_release, test_page_hash_racing_del).
    covered["recorder.c"] = {"recorder_read_back", "module_page_hash"}
    found = {}
    for name in sorted(os.listdir(src)):
        if not name.endswith(".c"):
            continue
        with open(os.path.join(src, name)) as f:
            function = None
            for line in f:
                if (
                    line
                    and not line[0].isspace()
                    and "(" in line
                    and not line.startswith("#")
                ):
                    function = line.split("(")[0].split()[-1].lstrip("*")
                if "Py_BEGIN_ALLOW_THREADS" in line:
                    found.setdefault(name, set()).add(function)
    # connection_dealloc closes a handle nobody else can reach any more.
    # connection_file_header reads 100 bytes through SQLite's own handle
    # (test_connection.py): short, and the connection is marked in use.
    covered["connection.c"].add("connection_file_header")
    covered["connection.c"].add("connection_dealloc")
    missing = {
        f: sorted(fns - covered.get(f, set()))
        for f, fns in found.items()
        if fns - covered.get(f, set())
    }
    assert missing == {}, f"GIL release points with no test here: {missing}"


def main(argv):
    kind, name, action = argv
    runner = run_case if kind == "window" else run_race
    try:
        with tempfile.TemporaryDirectory(prefix="gil-", dir=os.getcwd()) as directory:
            os.chdir(directory)  # the race loops open relative paths
            problems, info = runner(directory, name, action)
            os.chdir("..")
    except AssertionError as exc:
        print(f"FAILED {name} / {action}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    if problems:
        for p in problems:
            print(f"FAILED {name} / {action}: {p}", file=sys.stderr)
        print(json.dumps(info), file=sys.stderr)
        return 1
    print("GIL-CASE-OK " + json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
