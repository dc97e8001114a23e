"""Bad input (docs/api.md#connection, docs/api.md#cursor, docs/api.md#backup, docs/api.md#errors): every public callable
with wrong types, out-of-range ints, NUL in names, on closed or finished
objects.  Each case names the exact exception class it must raise (TypeError,
ValueError -- UnicodeEncodeError is one --, OverflowError, an apsw_backup.Error
subclass) with a non-empty message, or OK when the value is accepted; none
may crash or hang.

Where the docs are silent the current, sensible behaviour is pinned; the cases
that look questionable are marked "pinned:" below.  Callbacks that run
while a call converts its bindings (a sequence's __getitem__, an iterable
for executemany) and close the connection or the cursor underneath it run in
a subprocess, so a crash fails one test instead of the whole session; so do
statements with a NUL character, which must not loop forever.
"""

import textwrap

import pytest
from child_process import run_bounded

import apsw_backup

OK = "OK"
DEFAULT_FLAGS = apsw_backup.SQLITE_OPEN_READWRITE | apsw_backup.SQLITE_OPEN_CREATE

BAD = {
    "none": None,
    "object": object(),
    "list": [],
    "dict": {},
    "float": 1.5,
    "bytes": b"main",
    "huge": 2**64,
    "negative": -1,
    "nul": "ma\0in",
}


def outcomes(default, **overrides):
    """Expected outcome for each BAD value: default unless overridden."""
    unknown = set(overrides) - set(BAD)
    assert not unknown, unknown
    return {name: overrides.get(name, default) for name in BAD}


def check(expected, func, *args):
    """func(*args) must return (expected OK) or raise exactly expected with a
    non-empty message.  Returns what it returned."""
    try:
        result = func(*args)
    except Exception as exc:  # noqa: BLE001 - the class is checked exactly
        assert expected is not OK, f"expected success, got {exc!r}"
        assert type(exc) is expected, f"expected {expected.__name__}, got {exc!r}"
        assert str(exc).strip(), f"{type(exc).__name__} with an empty message"
        assert "not an error" not in str(exc)
        return None
    assert expected is OK, f"expected {expected.__name__}, got {result!r}"
    return result


class Objects:
    """Makes connections, cursors and backups in every state; closes all."""

    def __init__(self):
        self.opened = []

    def track(self, conn):
        if isinstance(conn, apsw_backup.Connection):
            self.opened.append(conn)
        return conn

    def conn(self):
        conn = self.track(apsw_backup.Connection(":memory:"))
        conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2)").fetchall()
        return conn

    def closed_conn(self):
        conn = self.conn()
        conn.close()
        return conn

    def uninitialised_conn(self):
        return apsw_backup.Connection.__new__(apsw_backup.Connection)

    def cursor(self):
        return self.conn().cursor()

    def closed_cursor(self):
        cursor = self.cursor()
        cursor.close()
        return cursor

    def cursor_of_closed_conn(self):
        conn = self.conn()
        cursor = conn.cursor()
        conn.close()
        return cursor

    def backup(self):
        dest = self.track(apsw_backup.Connection(":memory:"))
        return dest.backup("main", self.conn(), "main")

    def finished_backup(self):
        backup = self.backup()
        backup.step(-1)
        backup.finish()
        return backup

    def close_all(self):
        for conn in reversed(self.opened):
            conn.close(force=True)


@pytest.fixture
def objs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Connection(b"main") creates ./main
    made = Objects()
    yield made
    made.close_all()


# -- one argument at a time, every BAD value -----------------------------------

ARGUMENTS = [
    (
        "Connection.filename",
        lambda o, v: o.track(apsw_backup.Connection(v)),
        outcomes(TypeError, bytes=OK, nul=ValueError),
    ),
    # pinned: -1 has every bit set, SQLITE_OPEN_NOMUTEX among them.
    (
        "Connection.flags",
        lambda o, v: o.track(apsw_backup.Connection(":memory:", v)),
        outcomes(TypeError, huge=OverflowError, negative=ValueError),
    ),
    (
        "Connection.vfs",
        lambda o, v: o.track(apsw_backup.Connection(":memory:", DEFAULT_FLAGS, v)),
        outcomes(TypeError, none=OK, nul=ValueError),
    ),
    # NUL in statements: see test_nul_in_statements_* below.
    (
        "Connection.execute.statements",
        lambda o, v: o.conn().execute(v),
        outcomes(TypeError, nul=None),
    ),
    (
        "Connection.execute.bindings",
        lambda o, v: o.conn().execute("SELECT ?", v),
        outcomes(
            TypeError,
            none=apsw_backup.BindingsError,
            list=apsw_backup.BindingsError,
            dict=apsw_backup.BindingsError,
        ),
    ),
    (
        "Connection.executemany.statements",
        lambda o, v: o.conn().executemany(v, [(1,)]),
        outcomes(TypeError, nul=None),
    ),
    # An iterable of bindings: [] and {} are empty; bytes and str yield ints
    # and strs, which are not bindings.
    (
        "Connection.executemany.sequenceofbindings",
        lambda o, v: o.conn().executemany("SELECT ?", v),
        outcomes(TypeError, list=OK, dict=OK),
    ),
    # force is a bool or int for every close() (docs/api.md#backup for Backup.close).
    (
        "Connection.close.force",
        lambda o, v: o.conn().close(v),
        outcomes(TypeError, huge=OK, negative=OK),
    ),
    (
        "Connection.backup.databasename",
        lambda o, v: o.conn().backup(v, o.conn(), "main"),
        outcomes(TypeError, nul=ValueError),
    ),
    (
        "Connection.backup.sourceconnection",
        lambda o, v: o.conn().backup("main", v, "main"),
        outcomes(TypeError),
    ),
    (
        "Connection.backup.sourcedatabasename",
        lambda o, v: o.conn().backup("main", o.conn(), v),
        outcomes(TypeError, nul=ValueError),
    ),
    # SQLite takes a negative timeout as "no timeout".
    (
        "Connection.set_busy_timeout",
        lambda o, v: o.conn().set_busy_timeout(v),
        outcomes(TypeError, huge=OverflowError, negative=OK),
    ),
    (
        "Connection.set_busy_handler",
        lambda o, v: o.conn().set_busy_handler(v),
        outcomes(TypeError, none=OK),
    ),
    (
        "Connection.readonly",
        lambda o, v: o.conn().readonly(v),
        outcomes(TypeError, nul=ValueError),
    ),
    (
        "Connection.txn_state",
        lambda o, v: o.conn().txn_state(v),
        outcomes(TypeError, none=OK, nul=ValueError),
    ),
    # Any etype other than None counts as "the block raised": rolled back.
    (
        "Connection.__exit__.etype",
        lambda o, v: o.conn().__enter__().__exit__(v, None, None),
        outcomes(OK),
    ),
    (
        "Cursor.execute.statements",
        lambda o, v: o.cursor().execute(v),
        outcomes(TypeError, nul=None),
    ),
    (
        "Cursor.execute.bindings",
        lambda o, v: o.cursor().execute("SELECT ?", v),
        outcomes(
            TypeError,
            none=apsw_backup.BindingsError,
            list=apsw_backup.BindingsError,
            dict=apsw_backup.BindingsError,
        ),
    ),
    (
        "Cursor.executemany.statements",
        lambda o, v: o.cursor().executemany(v, [(1,)]),
        outcomes(TypeError, nul=None),
    ),
    (
        "Cursor.executemany.sequenceofbindings",
        lambda o, v: o.cursor().executemany("SELECT ?", v),
        outcomes(TypeError, list=OK, dict=OK),
    ),
    (
        "Cursor.close.force",
        lambda o, v: o.cursor().close(v),
        outcomes(TypeError, huge=OK, negative=OK),
    ),
    (
        "Backup.step.npages",
        lambda o, v: o.backup().step(v),
        outcomes(TypeError, huge=OverflowError, negative=OK),
    ),
    (
        "Backup.close.force",
        lambda o, v: o.backup().close(v),
        outcomes(TypeError, huge=OK, negative=OK),
    ),
    (
        "Backup.__exit__.etype",
        lambda o, v: o.backup().__exit__(v, None, None),
        outcomes(OK),
    ),
    # Values bound to a parameter: NUL inside a str value is data.
    (
        "binding value",
        lambda o, v: o.conn().execute("SELECT ?", (v,)).fetchall(),
        outcomes(
            TypeError,
            none=OK,
            float=OK,
            bytes=OK,
            huge=OverflowError,
            negative=OK,
            nul=OK,
        ),
    ),
    (
        "named binding value",
        lambda o, v: o.conn().execute("SELECT :a", {"a": v}).fetchall(),
        outcomes(
            TypeError,
            none=OK,
            float=OK,
            bytes=OK,
            huge=OverflowError,
            negative=OK,
            nul=OK,
        ),
    ),
]

ARGUMENT_CASES = [
    pytest.param(func, BAD[value], expected, id=f"{name}-{value}")
    for name, func, table in ARGUMENTS
    for value, expected in table.items()
    if expected is not None
]


@pytest.mark.parametrize("func, value, expected", ARGUMENT_CASES)
def test_bad_argument_raises_documented_error(objs, func, value, expected):
    check(expected, func, objs, value)


# -- int edges -------------------------------------------------------------------

INT_EDGES = [
    ("step-2**31", lambda o: o.backup().step(2**31), OverflowError),
    ("step-(-2**31-1)", lambda o: o.backup().step(-(2**31) - 1), OverflowError),
    ("step-(-2**31)", lambda o: o.backup().step(-(2**31)), OK),
    ("step-2**31-1", lambda o: o.backup().step(2**31 - 1), OK),
    ("step-True", lambda o: o.backup().step(True), OK),
    (
        "flags-2**31",
        lambda o: o.track(apsw_backup.Connection(":memory:", 2**31)),
        OverflowError,
    ),
    # pinned: SQLite's own answer to flags without READONLY/READWRITE.
    (
        "flags-0",
        lambda o: o.track(apsw_backup.Connection(":memory:", 0)),
        apsw_backup.MisuseError,
    ),
    ("busy_timeout-2**31", lambda o: o.conn().set_busy_timeout(2**31), OverflowError),
    ("binding-2**63", lambda o: o.conn().execute("SELECT ?", (2**63,)), OverflowError),
    (
        "binding-(-2**63-1)",
        lambda o: o.conn().execute("SELECT ?", (-(2**63) - 1,)),
        OverflowError,
    ),
    (
        "binding-(-2**63)",
        lambda o: o.conn().execute("SELECT ?", (-(2**63),)).fetchall(),
        OK,
    ),
    (
        "binding-2**63-1",
        lambda o: o.conn().execute("SELECT ?", (2**63 - 1,)).fetchall(),
        OK,
    ),
    ("binding-complex", lambda o: o.conn().execute("SELECT ?", (1j,)), TypeError),
    (
        "binding-surrogate",
        lambda o: o.conn().execute("SELECT ?", ("\udcff",)),
        UnicodeEncodeError,
    ),
    (
        "statements-surrogate",
        lambda o: o.conn().execute("SELECT '\udcff'"),
        UnicodeEncodeError,
    ),
    # str filenames are encoded as os.fsencode() does (surrogateescape on
    # POSIX), so an undecodable name from os.listdir() opens.
    (
        "filename-surrogate",
        lambda o: o.track(apsw_backup.Connection("\udcff.db")),
        OK,
    ),
    (
        "vfs-unknown",
        lambda o: o.track(apsw_backup.Connection(":memory:", DEFAULT_FLAGS, "nosuch")),
        apsw_backup.SQLError,
    ),
    ("readonly-unknown", lambda o: o.conn().readonly("nosuch"), apsw_backup.SQLError),
    ("txn_state-unknown", lambda o: o.conn().txn_state("nosuch"), apsw_backup.SQLError),
    (
        "backup-unknown-dest",
        lambda o: o.conn().backup("nosuch", o.conn(), "main"),
        apsw_backup.SQLError,
    ),
    (
        "backup-unknown-source",
        lambda o: o.conn().backup("main", o.conn(), "nosuch"),
        apsw_backup.SQLError,
    ),
    (
        "bindings-missing-name",
        lambda o: o.conn().execute("SELECT :a", {"b": 1}),
        apsw_backup.BindingsError,
    ),
    (
        "bindings-too-many",
        lambda o: o.conn().execute("SELECT ?", (1, 2)),
        apsw_backup.BindingsError,
    ),
]


@pytest.mark.parametrize(
    "func, expected", [pytest.param(f, e, id=i) for i, f, e in INT_EDGES]
)
def test_edge_value_raises_documented_error(objs, func, expected):
    check(expected, func, objs)


# -- argument counts and keywords ---------------------------------------------------

ARITY = [
    ("Connection()", lambda o: apsw_backup.Connection()),
    (
        "Connection(4 args)",
        lambda o: apsw_backup.Connection(":memory:", DEFAULT_FLAGS, None, 1),
    ),
    ("Connection(bogus=)", lambda o: apsw_backup.Connection(":memory:", bogus=1)),
    ("execute()", lambda o: o.conn().execute()),
    ("execute(3 args)", lambda o: o.conn().execute("SELECT 1", None, None)),
    ("execute(bogus=)", lambda o: o.conn().execute("SELECT 1", bogus=1)),
    ("executemany(1 arg)", lambda o: o.conn().executemany("SELECT 1")),
    ("backup(2 args)", lambda o: o.conn().backup("main", o.conn())),
    ("backup(4 args)", lambda o: o.conn().backup("main", o.conn(), "main", "main")),
    ("close(2 args)", lambda o: o.conn().close(True, True)),
    ("set_busy_timeout()", lambda o: o.conn().set_busy_timeout()),
    ("set_busy_handler()", lambda o: o.conn().set_busy_handler()),
    ("readonly()", lambda o: o.conn().readonly()),
    ("txn_state(2 args)", lambda o: o.conn().txn_state("main", "main")),
    ("__exit__(2 args)", lambda o: o.conn().__exit__(None, None)),
    *[
        (f"{method}(1 arg)", lambda o, m=method: getattr(o.conn(), m)(1))
        for method in (
            "cursor",
            "changes",
            "total_changes",
            "last_insert_rowid",
            "get_autocommit",
            "db_names",
            "interrupt",
            "__enter__",
        )
    ],
    ("Cursor.execute()", lambda o: o.cursor().execute()),
    ("Cursor.fetchone(1 arg)", lambda o: o.cursor().fetchone(1)),
    ("Cursor.fetchall(1 arg)", lambda o: o.cursor().fetchall(1)),
    ("Cursor.close(bogus=)", lambda o: o.cursor().close(bogus=True)),
    ("step(2 args)", lambda o: o.backup().step(1, 2)),
    ("step(1, npages=)", lambda o: o.backup().step(1, npages=2)),
    ("step(pages=)", lambda o: o.backup().step(pages=1)),
    ("finish(1 arg)", lambda o: o.backup().finish(1)),
    ("Backup.close(bogus=)", lambda o: o.backup().close(bogus=True)),
    ("Backup.close(force=None)", lambda o: o.backup().close(force=None)),
    ("Backup.__enter__(1 arg)", lambda o: o.backup().__enter__(1)),
    ("Backup.__exit__()", lambda o: o.backup().__exit__()),
    ("Backup.__exit__(2 args)", lambda o: o.backup().__exit__(None, None)),
    ("sqlite_lib_version(1 arg)", lambda o: apsw_backup.sqlite_lib_version(1)),
    ("Cursor()", lambda o: apsw_backup.Cursor()),
    ("Backup()", lambda o: apsw_backup.Backup()),
    ("subclass Cursor", lambda o: type("Sub", (apsw_backup.Cursor,), {})),
    ("subclass Backup", lambda o: type("Sub", (apsw_backup.Backup,), {})),
]


@pytest.mark.parametrize("func", [pytest.param(f, id=i) for i, f in ARITY])
def test_wrong_arguments_or_construction_is_type_error(objs, func):
    check(TypeError, func, objs)


def test_exit_without_enter_is_runtime_error(objs):
    # pinned: RuntimeError is not among the classes of docs/api.md#errors; it is Python's
    # usual answer to a protocol used out of order.
    check(RuntimeError, objs.conn().__exit__, None, None, None)


def test_init_on_an_open_connection_is_error_and_leaves_it_open(objs):
    conn = objs.conn()
    check(apsw_backup.Error, conn.__init__, ":memory:")
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,), (2,)]


# -- closed connections -------------------------------------------------------------

CONNECTION_CALLS = [
    ("execute", lambda c, o: c.execute("SELECT 1")),
    ("execute-bad-type", lambda c, o: c.execute(None)),  # closed is checked first
    ("executemany", lambda c, o: c.executemany("SELECT ?", [(1,)])),
    ("cursor", lambda c, o: c.cursor()),
    ("backup-as-destination", lambda c, o: c.backup("main", o.conn(), "main")),
    ("backup-bad-arguments", lambda c, o: c.backup(None, None, None)),
    ("backup-as-source", lambda c, o: o.conn().backup("main", c, "main")),
    ("set_busy_timeout", lambda c, o: c.set_busy_timeout(10)),
    ("set_busy_timeout-bad-type", lambda c, o: c.set_busy_timeout("x")),
    ("set_busy_handler", lambda c, o: c.set_busy_handler(None)),
    ("changes", lambda c, o: c.changes()),
    ("total_changes", lambda c, o: c.total_changes()),
    ("last_insert_rowid", lambda c, o: c.last_insert_rowid()),
    ("get_autocommit", lambda c, o: c.get_autocommit()),
    ("db_names", lambda c, o: c.db_names()),
    ("readonly", lambda c, o: c.readonly("main")),
    ("txn_state", lambda c, o: c.txn_state()),
    ("interrupt", lambda c, o: c.interrupt()),
    ("__enter__", lambda c, o: c.__enter__()),
    ("__exit__", lambda c, o: c.__exit__(None, None, None)),
    ("in_transaction", lambda c, o: c.in_transaction),
]


@pytest.mark.parametrize("state", ["closed_conn", "uninitialised_conn"])
@pytest.mark.parametrize("call", [pytest.param(f, id=i) for i, f in CONNECTION_CALLS])
def test_closed_connection_raises_connection_closed(objs, state, call):
    conn = getattr(objs, state)()
    check(apsw_backup.ConnectionClosedError, call, conn, objs)


def test_closed_connection_close_is_a_no_op_and_attributes_stay_readable(objs):
    conn = objs.closed_conn()
    assert check(OK, conn.close) is None
    assert check(OK, conn.close, True) is None
    assert conn.filename == ""
    assert conn.open_flags == DEFAULT_FLAGS
    assert isinstance(conn.open_vfs, str) and conn.open_vfs


# -- closed cursors -------------------------------------------------------------------

CURSOR_CALLS = [
    ("execute", lambda c: c.execute("SELECT 1")),
    ("execute-bad-type", lambda c: c.execute(None)),
    ("executemany", lambda c: c.executemany("SELECT ?", [(1,)])),
    ("fetchone", lambda c: c.fetchone()),
    ("fetchall", lambda c: c.fetchall()),
    ("next", lambda c: next(c)),
    ("list", lambda c: list(c)),
    ("description", lambda c: c.description),
    ("connection", lambda c: c.connection),
]


@pytest.mark.parametrize("state", ["closed_cursor", "cursor_of_closed_conn"])
@pytest.mark.parametrize("call", [pytest.param(f, id=i) for i, f in CURSOR_CALLS])
def test_closed_cursor_raises_cursor_closed(objs, state, call):
    check(apsw_backup.CursorClosedError, call, getattr(objs, state)())


@pytest.mark.parametrize("state", ["closed_cursor", "cursor_of_closed_conn"])
def test_closed_cursor_close_is_a_no_op(objs, state):
    cursor = getattr(objs, state)()
    assert check(OK, cursor.close) is None
    assert check(OK, cursor.close, True) is None


# -- finished backups -------------------------------------------------------------------

FINISHED_CALLS = [
    ("step()", lambda b: b.step(), apsw_backup.ConnectionClosedError),
    ("step(1)", lambda b: b.step(1), apsw_backup.ConnectionClosedError),
    # pinned: "finished" is checked before the argument.
    ("step(None)", lambda b: b.step(None), apsw_backup.ConnectionClosedError),
    ("step(2**64)", lambda b: b.step(2**64), apsw_backup.ConnectionClosedError),
    ("__enter__", lambda b: b.__enter__(), apsw_backup.ConnectionClosedError),
    ("finish", lambda b: b.finish(), OK),
    ("close()", lambda b: b.close(), OK),
    ("close(True)", lambda b: b.close(True), OK),
    ("close(None)", lambda b: b.close(None), TypeError),
    ("__exit__", lambda b: b.__exit__(None, None, None), OK),
]


@pytest.mark.parametrize(
    "call, expected", [pytest.param(f, e, id=i) for i, f, e in FINISHED_CALLS]
)
def test_finished_backup_call(objs, call, expected):
    backup = objs.finished_backup()
    check(expected, call, backup)
    assert not backup


def test_finished_backup_attributes_are_readable(objs):
    backup = objs.finished_backup()
    assert backup.done is True
    assert (backup.remaining, backup.page_count, backup.pagecount, backup.restarts) == (
        0,
        0,
        0,
        0,
    )
    assert "finished" in repr(backup)


def test_backup_of_closed_destination_is_finished(objs):
    backup = objs.backup()
    backup.step(1)
    objs.opened[-2].close(force=True)  # the destination
    check(apsw_backup.ConnectionClosedError, backup.step, 1)
    check(OK, backup.finish)


# -- read-only attributes ------------------------------------------------------------------

READ_ONLY = [
    ("Connection", "conn", ("filename", "open_flags", "open_vfs", "in_transaction")),
    ("Cursor", "cursor", ("description", "connection")),
    ("Backup", "backup", ("done", "remaining", "page_count", "pagecount", "restarts")),
]


@pytest.mark.parametrize(
    "make, attribute",
    [
        pytest.param(make, attr, id=f"{kind}.{attr}")
        for kind, make, attrs in READ_ONLY
        for attr in attrs
    ],
)
def test_read_only_attribute_cannot_be_set_or_deleted(objs, make, attribute):
    # pinned: AttributeError, Python's own answer for a read-only property.
    obj = getattr(objs, make)()
    check(AttributeError, setattr, obj, attribute, 1)
    check(AttributeError, delattr, obj, attribute)


# -- in a subprocess: callbacks that pull the rug, NUL in statements -------------------------

PRELUDE = """
import apsw_backup
conn = apsw_backup.Connection(":memory:")
conn.execute("CREATE TABLE t(x)").fetchall()
cursor = conn.cursor()
"""

EPILOGUE = """
print("RAISED", type(outcome).__name__ if isinstance(outcome, BaseException) else "nothing")
try:
    print("USABLE", conn.execute("SELECT 1").fetchall() == [(1,)])
except apsw_backup.Error as exc:
    print("USABLE", type(exc).__name__)
"""


def run_isolated(body, timeout=5):
    """Run PRELUDE + body + EPILOGUE in a fresh interpreter.  body sets
    ``outcome``.  Returns {"RAISED": ..., "USABLE": ...}; fails on a crash
    or a hang."""
    code = PRELUDE + textwrap.dedent(body) + EPILOGUE
    proc = run_bounded(code, timeout=timeout)  # a hang: "HANG: no end within"
    assert proc.returncode == 0, (
        f"the interpreter died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    )
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def calling(expr):
    return f"""
try:
    outcome = {expr}
    outcome = outcome.fetchall()
except Exception as exc:
    outcome = exc
"""


NUL_STATEMENTS = {
    "after-a-statement": "SELECT 1\\0SELECT 2",
    "after-a-semicolon": "SELECT 1;\\0",
    "alone": "\\0",
    "in-a-word": "SEL\\0ECT 1",
}
NUL_CALLS = {
    "Connection.execute": "conn.execute({sql!r})",
    "Connection.executemany": "conn.executemany({sql!r}, [()])",
    "Cursor.execute": "cursor.execute({sql!r})",
}


@pytest.mark.parametrize(
    "sql", [pytest.param(v, id=k) for k, v in NUL_STATEMENTS.items()]
)
@pytest.mark.parametrize("call", [pytest.param(v, id=k) for k, v in NUL_CALLS.items()])
def test_nul_in_statements_is_value_error(call, sql):
    """SQL text with a NUL character is refused like a name with one (docs/api.md#backup; the standard library refuses it too), instead of the NUL ending
    the text early -- or the call spinning on it forever."""
    sql = sql.encode().decode("unicode_escape")
    result = run_isolated(calling(call.format(sql=sql)))
    assert result == {"RAISED": "ValueError", "USABLE": "True"}


RUG_PULLS = {
    # A sequence of bindings whose item, or length, closes the connection.
    "sequence-item-closes-connection": """
        class Bindings:
            def __len__(self): return 1
            def __getitem__(self, i):
                if i: raise IndexError
                conn.close()
                return 1
        {call}
    """,
    "sequence-len-closes-connection": """
        class Bindings:
            def __len__(self):
                conn.close()
                return 1
            def __getitem__(self, i):
                if i: raise IndexError
                return 1
        {call}
    """,
    "sequence-item-closes-cursor": """
        class Bindings:
            def __len__(self): return 1
            def __getitem__(self, i):
                if i: raise IndexError
                cursor.close()
                return 1
        {call}
    """,
    "sequence-item-reuses-cursor": """
        class Bindings:
            def __len__(self): return 1
            def __getitem__(self, i):
                if i: raise IndexError
                cursor.execute("SELECT 2").fetchall()
                return 1
        {call}
    """,
}
RUG_CALLS = {
    "Connection.execute": "conn.execute('SELECT ?', Bindings())",
    "Cursor.execute": "cursor.execute('SELECT ?', Bindings())",
    "Connection.executemany": "conn.executemany('SELECT ?', [Bindings()])",
    "Cursor.executemany": "cursor.executemany('SELECT ?', [Bindings()])",
}
MANY_RUG_PULLS = {
    "generator-closes-connection": """
        def bindings():
            conn.close()
            yield (1,)
    """,
    "iter-closes-connection": """
        class Iterable:
            def __iter__(self):
                conn.close()
                return iter([(1,)])
        bindings = Iterable
    """,
    "generator-closes-cursor": """
        def bindings():
            cursor.close()
            yield (1,)
    """,
    "generator-reuses-cursor": """
        def bindings():
            cursor.execute("SELECT 2").fetchall()
            yield (1,)
    """,
}


# What each rug pull gets.  Bindings given to execute() are turned into C
# values before the call takes the connection (src/README.md, "Three phases
# per method"): code run there may use, or close, the connection, and the
# call then reports what it finds.  executemany()'s items are converted one
# by one while its call holds the connection: code run there is a callback
# of the call, and using the connection is a ReentrancyError.
CLOSED_BEFORE = {
    "sequence-item-closes-connection": (
        "ConnectionClosedError",
        "ConnectionClosedError",
    ),
    "sequence-len-closes-connection": (
        "ConnectionClosedError",
        "ConnectionClosedError",
    ),
    "sequence-item-closes-cursor": ("CursorClosedError", "True"),
    "sequence-item-reuses-cursor": ("nothing", "True"),
    "iter-closes-connection": ("ConnectionClosedError", "ConnectionClosedError"),
}


def rug_cases():
    for name, body in RUG_PULLS.items():
        for call_name, call in RUG_CALLS.items():
            if "cursor" in name and call_name.startswith("Connection."):
                continue  # conn.execute's cursor is not reachable
            if call_name.endswith(".execute"):
                raised, usable = CLOSED_BEFORE[name]
                if call_name == "Cursor.execute" and usable != "True":
                    raised = "CursorClosedError"  # closed with its connection
            else:
                raised, usable = "ReentrancyError", "True"
            yield pytest.param(
                textwrap.dedent(body).format(call=calling(call)),
                {"RAISED": raised, "USABLE": usable},
                id=f"{name}-{call_name}",
            )
    for name, body in MANY_RUG_PULLS.items():
        for call_name in ("Connection.executemany", "Cursor.executemany"):
            if "cursor" in name and call_name.startswith("Connection."):
                continue
            target = "conn" if call_name.startswith("Connection.") else "cursor"
            call = calling(f"{target}.executemany('SELECT ?', bindings())")
            if name in CLOSED_BEFORE:  # __iter__ runs before the call
                raised, usable = CLOSED_BEFORE[name]
                if target == "cursor":
                    raised = "CursorClosedError"  # closed with its connection
            else:  # a generator's body runs while the call holds the lock
                raised, usable = "ReentrancyError", "True"
            yield pytest.param(
                textwrap.dedent(body) + call,
                {"RAISED": raised, "USABLE": usable},
                id=f"{name}-{call_name}",
            )


@pytest.mark.parametrize("body, expected", list(rug_cases()))
def test_bindings_callback_that_pulls_the_rug_gets_a_clear_answer(body, expected):
    """Python code run while a call converts its bindings either runs before
    the call takes the connection (execute's bindings: the call then finds
    what that code did) or inside the call (executemany's items: using the
    connection there is a ReentrancyError, and it stays usable).  Never a
    crash, a hang, or a statement run on a closed connection."""
    result = run_isolated(body)
    assert result == expected


def test_out_of_range_numbers_name_their_argument_and_range(tmp_path):
    """They said only "signed integer is greater than maximum"."""
    c = apsw_backup.Connection(":memory:")
    try:
        with pytest.raises(OverflowError, match="milliseconds is out of range"):
            c.set_busy_timeout(2**40)
    finally:
        c.close()
    with pytest.raises(OverflowError, match="flags is out of range"):
        apsw_backup.Connection(":memory:", 2**40)
