"""Cursor (docs/api.md#cursor): statements, bindings, values, rows and closing."""

import pytest

import apsw_backup

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

ROUND_TRIPS = [
    (None, None, "null"),
    (0, 0, "integer"),
    (-1, -1, "integer"),
    (INT64_MAX, INT64_MAX, "integer"),
    (-INT64_MAX, -INT64_MAX, "integer"),
    (INT64_MIN, INT64_MIN, "integer"),
    (1.5, 1.5, "real"),
    (-2.25e300, -2.25e300, "real"),
    (float("inf"), float("inf"), "real"),
    ("plain", "plain", "text"),
    ("", "", "text"),
    ("h\u00e9llo \u2603 \U0001d11e", "h\u00e9llo \u2603 \U0001d11e", "text"),
    (b"\x00\x01\xfe\xff", b"\x00\x01\xfe\xff", "blob"),
    (b"", b"", "blob"),
    (bytearray(b"ab\x00c"), b"ab\x00c", "blob"),
    (memoryview(b"view\x00"), b"view\x00", "blob"),
]
ROUND_TRIP_IDS = [
    "none",
    "zero",
    "minus-one",
    "int64-max",
    "minus-int64-max",
    "int64-min",
    "float",
    "huge-float",
    "inf",
    "str",
    "empty-str",
    "unicode-str",
    "bytes",
    "empty-bytes",
    "bytearray",
    "memoryview",
]


@pytest.fixture
def table(memconn):
    memconn.execute("CREATE TABLE t(x)")
    return memconn


def column(connection, sql="SELECT x FROM t ORDER BY rowid"):
    return [row[0] for row in connection.execute(sql)]


# -- values ----------------------------------------------------------------


@pytest.mark.parametrize("value, expected, storage", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_value_round_trips_through_a_binding(memconn, value, expected, storage):
    got, got_storage = memconn.execute("SELECT ?1, typeof(?1)", (value,)).fetchone()
    assert got == expected
    assert type(got) is type(expected)
    assert got_storage == storage


@pytest.mark.parametrize("value, expected, storage", ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_value_round_trips_through_a_table(table, value, expected, storage):
    table.execute("INSERT INTO t VALUES(?)", (value,))
    got, got_storage = table.execute("SELECT x, typeof(x) FROM t").fetchone()
    assert got == expected
    assert type(got) is type(expected)
    assert got_storage == storage


def test_str_with_embedded_nul_round_trips(memconn):
    assert memconn.execute("SELECT ?", ("a\x00b",)).fetchone() == ("a\x00b",)


@pytest.mark.parametrize(
    "value", [2**63, INT64_MIN - 1, 2**100], ids=["2**63", "-2**63-1", "2**100"]
)
def test_out_of_range_int_is_overflow_error(memconn, value):
    with pytest.raises(OverflowError):
        memconn.execute("SELECT ?", (value,))


@pytest.mark.parametrize(
    "value",
    [object(), [1, 2], {"a": 1}, 1j, {1}],
    ids=["object", "list", "dict", "complex", "set"],
)
def test_unsupported_value_type_is_type_error(memconn, value):
    with pytest.raises(TypeError):
        memconn.execute("SELECT ?", (value,))


def test_unsupported_value_in_a_table_insert_inserts_nothing(table):
    with pytest.raises(TypeError):
        table.execute("INSERT INTO t VALUES(?)", (object(),))
    assert column(table) == []


# -- statements and bindings -----------------------------------------------


def test_semicolon_separated_statements_run_in_order(memconn):
    cursor = memconn.execute(
        "CREATE TABLE t(x); INSERT INTO t VALUES(1); UPDATE t SET x = x * 10;"
        " INSERT INTO t VALUES(2); SELECT x FROM t ORDER BY rowid"
    )
    assert list(cursor) == [(10,), (2,)]


def test_rows_of_every_statement_are_returned(memconn):
    assert list(memconn.execute("SELECT 1; SELECT 2, 3; SELECT 'four'")) == [
        (1,),
        (2, 3),
        ("four",),
    ]


def test_positional_bindings_are_consumed_in_order_across_statements(memconn):
    memconn.execute(
        "CREATE TABLE t(a, b); INSERT INTO t VALUES(?, ?); INSERT INTO t VALUES(?, ?)",
        (1, 2, 3, 4),
    )
    assert list(memconn.execute("SELECT a, b FROM t ORDER BY rowid")) == [
        (1, 2),
        (3, 4),
    ]


def test_numbered_bindings_pick_by_number(memconn):
    assert memconn.execute("SELECT ?2, ?1, ?2", ("a", "b")).fetchone() == (
        "b",
        "a",
        "b",
    )


def test_numbered_bindings_are_consumed_across_statements(memconn):
    assert list(memconn.execute("SELECT ?2, ?1; SELECT ?", ("a", "b", "c"))) == [
        ("b", "a"),
        ("c",),
    ]


def test_named_bindings_from_a_dict_with_every_prefix(memconn):
    row = memconn.execute(
        "SELECT :a, $b, @c", {"a": 1, "b": "two", "c": None}
    ).fetchone()
    assert row == (1, "two", None)


def test_named_bindings_apply_to_every_statement(memconn):
    cursor = memconn.execute(
        "CREATE TABLE t(x); INSERT INTO t VALUES(:v); SELECT x, :v + 1 FROM t", {"v": 5}
    )
    assert list(cursor) == [(5, 6)]


def test_too_few_bindings_is_bindings_error(memconn):
    with pytest.raises(apsw_backup.BindingsError):
        memconn.execute("SELECT ?, ?", (1,))


def test_too_few_bindings_for_a_later_statement_is_bindings_error(memconn):
    with pytest.raises(apsw_backup.BindingsError):
        list(memconn.execute("SELECT ?; SELECT ?", (1,)))


def test_bindings_without_parameters_is_bindings_error(memconn):
    with pytest.raises(apsw_backup.BindingsError):
        memconn.execute("SELECT 1", (1,))


def test_too_many_bindings_is_bindings_error_and_nothing_is_inserted(table):
    with pytest.raises(apsw_backup.BindingsError):
        table.execute("INSERT INTO t VALUES(?)", (1, 2))
    assert column(table) == []


def test_too_many_bindings_skips_the_last_statement(table):
    with pytest.raises(apsw_backup.BindingsError):
        list(
            table.execute("INSERT INTO t VALUES(?); INSERT INTO t VALUES(?)", (1, 2, 3))
        )
    assert 2 not in column(table)


def test_missing_name_in_dict_is_bindings_error(memconn):
    with pytest.raises(apsw_backup.BindingsError):
        memconn.execute("SELECT :a, :b", {"a": 1})


def test_dict_for_question_mark_parameters_is_bindings_error(memconn):
    with pytest.raises(apsw_backup.BindingsError):
        memconn.execute("SELECT ?", {"a": 1})


def test_str_as_bindings_is_type_error(memconn):
    with pytest.raises(TypeError):
        memconn.execute("SELECT ?", "a")


def test_syntax_error_is_sql_error_naming_the_problem(memconn):
    with pytest.raises(apsw_backup.SQLError) as excinfo:
        memconn.execute("SELEC 1")
    message = str(excinfo.value)
    assert "syntax error" in message
    assert "SELEC" in message


def test_statements_before_a_failing_one_have_run(table):
    with pytest.raises(apsw_backup.SQLError):
        list(table.execute("INSERT INTO t VALUES(1); SELECT * FROM no_such_table"))
    assert column(table) == [1]


# -- rows ------------------------------------------------------------------


@pytest.fixture
def three_rows(table):
    table.execute("INSERT INTO t VALUES(1), (2), (3)")
    return table


def test_iteration_yields_tuples(three_rows):
    got = list(three_rows.execute("SELECT x, x * 2 FROM t ORDER BY x"))
    assert got == [(1, 2), (2, 4), (3, 6)]
    assert all(type(row) is tuple for row in got)


def test_cursor_is_its_own_iterator(three_rows):
    cursor = three_rows.execute("SELECT x FROM t ORDER BY x")
    assert iter(cursor) is cursor
    assert next(cursor) == (1,)


def test_fetchone_returns_none_when_exhausted(three_rows):
    cursor = three_rows.execute("SELECT x FROM t ORDER BY x")
    assert [cursor.fetchone() for _ in range(3)] == [(1,), (2,), (3,)]
    assert cursor.fetchone() is None
    assert cursor.fetchone() is None


def test_fetchone_of_a_statement_without_rows_is_none(memconn):
    assert memconn.execute("CREATE TABLE t(x)").fetchone() is None


def test_fetchall_returns_the_remaining_rows(three_rows):
    cursor = three_rows.execute("SELECT x FROM t ORDER BY x")
    assert cursor.fetchone() == (1,)
    assert cursor.fetchall() == [(2,), (3,)]
    assert cursor.fetchall() == []


def test_description_gives_name_and_declared_type(table):
    table.execute(
        "CREATE TABLE d(a INTEGER, b TEXT, c); INSERT INTO d VALUES(1, 'x', 2.5)"
    )
    cursor = table.execute("SELECT a, b AS bee, c, a + 1 AS expr FROM d")
    rest = (None,) * 5
    assert cursor.description == (
        ("a", "INTEGER") + rest,
        ("bee", "TEXT") + rest,
        ("c", None) + rest,
        ("expr", None) + rest,
    )


def test_description_is_none_without_a_statement(memconn):
    assert memconn.cursor().description is None


def test_cursor_execute_returns_the_cursor(memconn):
    cursor = memconn.cursor()
    assert isinstance(cursor, apsw_backup.Cursor)
    assert cursor.execute("SELECT 1") is cursor
    assert cursor.fetchall() == [(1,)]


def test_cursor_can_be_reused_for_a_new_execute(memconn):
    cursor = memconn.execute("SELECT 1 UNION ALL SELECT 2")
    assert cursor.fetchone() == (1,)
    cursor.execute("SELECT 'again'")
    assert cursor.fetchall() == [("again",)]


def test_connection_attribute_is_the_connection(memconn):
    assert memconn.cursor().connection is memconn
    assert memconn.execute("SELECT 1").connection is memconn


# -- closing ---------------------------------------------------------------

CLOSED_CURSOR_CALLS = {
    "execute": lambda c: c.execute("SELECT 1"),
    "fetchone": lambda c: c.fetchone(),
    "fetchall": lambda c: c.fetchall(),
    "next": lambda c: next(c),
    "description": lambda c: c.description,
}


@pytest.mark.parametrize(
    "call", CLOSED_CURSOR_CALLS.values(), ids=CLOSED_CURSOR_CALLS.keys()
)
def test_closed_cursor_raises_cursor_closed(three_rows, call):
    cursor = three_rows.execute("SELECT x FROM t")
    cursor.close()
    with pytest.raises(apsw_backup.CursorClosedError):
        call(cursor)


def test_cursor_close_is_idempotent_and_leaves_the_connection_usable(three_rows):
    cursor = three_rows.execute("SELECT x FROM t")
    cursor.close()
    cursor.close()
    assert three_rows.execute("SELECT count(*) FROM t").fetchone() == (3,)


# -- executemany -----------------------------------------------------------


def test_executemany_inserts_rows_from_sequences(memconn):
    memconn.execute("CREATE TABLE t(a, b)")
    data = [(i, str(i)) for i in range(200)]
    memconn.executemany("INSERT INTO t VALUES(?, ?)", data)
    assert list(memconn.execute("SELECT a, b FROM t ORDER BY a")) == data


def test_executemany_inserts_rows_from_dicts(memconn):
    memconn.execute("CREATE TABLE t(a, b)")
    data = [{"a": i, "b": -i} for i in range(50)]
    memconn.executemany("INSERT INTO t VALUES(:a, $b)", data)
    assert list(memconn.execute("SELECT a, b FROM t ORDER BY a")) == [
        (i, -i) for i in range(50)
    ]


def test_executemany_accepts_a_generator(memconn):
    memconn.execute("CREATE TABLE t(x)")
    memconn.executemany("INSERT INTO t VALUES(?)", ((i,) for i in range(10)))
    assert column(memconn) == list(range(10))


def test_executemany_over_select_yields_rows_of_every_execution(memconn):
    cursor = memconn.executemany("SELECT ?1, ?1 * 2", [(1,), (2,), (3,)])
    assert isinstance(cursor, apsw_backup.Cursor)
    assert list(cursor) == [(1, 2), (2, 4), (3, 6)]


def test_executemany_with_no_bindings_does_nothing(table):
    assert list(table.executemany("INSERT INTO t VALUES(?)", [])) == []
    assert column(table) == []
