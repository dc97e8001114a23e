/* Cursor: runs a string of ';'-separated statements and yields their rows.
 *
 * The statements are prepared one at a time from `tail`; bindings given as
 * a sequence are consumed across them in order.  execute() steps to the
 * first row (so DML runs at once); iteration steps on from there.
 *
 * A cursor's call holds its connection's lock from the first prepare to
 * the last step, and that is the one place (besides SQLite's busy handler)
 * where user code runs while a lock is held: looking a name up in a
 * mapping of bindings, the next set of executemany(), a destructor run by
 * an allocation.  Such code is a callback of the call: it cannot use the
 * connection (ReentrancyError), what it lets go of is left to the lock's
 * holder (locks.c), and a fork it makes is checked for before SQLite is
 * called again (src/README.md).
 */
#include "apsw_backup.h"

/* The Python objects a cursor lets go of, dropped once its lock is let go
 * of: their destructors may run any code. */
typedef struct {
    PyObject *sql, *bindings, *many;
} Garbage;

static void
drop_garbage(Garbage *g)
{
    if (g->sql != NULL || g->bindings != NULL || g->many != NULL) {
        HOOK_VOID("cursor_drop_garbage");
    }
    Py_CLEAR(g->sql);
    Py_CLEAR(g->bindings);
    Py_CLEAR(g->many);
}

/* Forget the statements and bindings: what they held goes to *g. */
static void
reset_state(Cursor *self, Garbage *g)
{
    PyObject *old[3] = {self->sql, self->bindings, self->many};
    self->sql = self->bindings = self->many = NULL;
    for (int i = 0; i < 3; i++) {
        PyObject **slot = i == 0 ? &g->sql : i == 1 ? &g->bindings : &g->many;
        if (*slot == NULL) {
            *slot = old[i];
        }
        else {
            Py_XDECREF(old[i]); /* cannot happen: one reset per call */
        }
    }
    self->tail = NULL;
    self->prepared = 0;
    self->bindings_offset = 0;
    self->status = CURSOR_DONE;
}

static PyObject *
raise_closed(Cursor *self)
{
    ModuleState *st = state_from_type(Py_TYPE(self));
    if (st != NULL) {
        PyErr_SetString(st->CursorClosedError, "The cursor is closed");
    }
    return NULL;
}

/* The lock of a call on the cursor: its connection's, then the checks. */
static int
cursor_enter(Cursor *self)
{
    Connection *conn = self->connection;
    if (conn == NULL || !self->open) {
        raise_closed(self);
        return -1;
    }
    if (conn_enter(conn, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return -1;
    }
    if (!self->open) { /* closed by the connection's close meanwhile */
        conn_leave(conn);
        raise_closed(self);
        return -1;
    }
    return 0;
}

/* Before every SQLite call that follows user code: a fork made there
 * leaves the statement to the parent. */
static int
check_forked(Cursor *self)
{
    if (!FORKED(self->connection)) {
        return 0;
    }
    self->stmt = NULL; /* the parent's: never reset or finalized */
    self->status = CURSOR_DONE;
    if (!PyErr_Occurred()) {
        raise_forked(self->connection->state, "connection");
    }
    return -1;
}

/* Finalize the cursor's statement, lock held. */
static void
finalize_statement(Cursor *self)
{
    sqlite3_stmt *stmt = self->stmt;
    self->stmt = NULL;
    if (stmt != NULL && !FORKED(self->connection)) {
        RELEASE_GIL("cursor_finalize");
        sqlite3_finalize(stmt);
        REACQUIRE_GIL();
    }
}

static void
unlink_cursor(Cursor *self)
{
    Connection *conn = self->connection;
    if (self->prev != NULL) {
        self->prev->next = self->next;
    }
    else if (conn != NULL && conn->cursors == self) {
        conn->cursors = self->next;
    }
    if (self->next != NULL) {
        self->next->prev = self->prev;
    }
    self->prev = self->next = NULL;
}

Cursor *
cursor_alloc(Connection *connection)
{
    PyTypeObject *tp = connection->state->CursorType;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    Cursor *self = (Cursor *)alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    self->spare = PyMem_Malloc(sizeof(Orphan));
    if (self->spare == NULL) {
        Py_DECREF(self);
        PyErr_NoMemory();
        return NULL;
    }
    self->connection = (Connection *)Py_NewRef(connection);
    self->open = 1;
    self->next = connection->cursors;
    if (connection->cursors != NULL) {
        connection->cursors->prev = self;
    }
    connection->cursors = self;
    return self;
}

void
cursors_close_all(Connection *connection, int forget)
{
    /* Read afresh after every finalize: the GIL was released. */
    while (connection->cursors != NULL) {
        Cursor *c = connection->cursors;
        unlink_cursor(c);
        c->open = 0;
        c->status = CURSOR_DONE;
        if (forget) {
            c->stmt = NULL;
        }
        else {
            finalize_statement(c);
        }
    }
}

void
cursors_interrupted(Connection *connection)
{
    for (Cursor *c = connection->cursors; c != NULL; c = c->next) {
        if (c->stmt != NULL && sqlite3_stmt_busy(c->stmt)) {
            sqlite3_reset(c->stmt);
            c->status = CURSOR_DONE;
            c->interrupted = 1;
        }
    }
    /* Orphans are finalized when the lock is let go of; any other busy
     * statement cannot be ours. */
}

/* True if only white space, ';' and comments remain: no more statements. */
static int
only_trivia(const char *p, const char *end)
{
    while (p < end) {
        if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\f'
            || *p == ';') {
            p++;
        }
        else if (p + 1 < end && p[0] == '-' && p[1] == '-') {
            while (p < end && *p != '\n') {
                p++;
            }
        }
        else if (p + 1 < end && p[0] == '/' && p[1] == '*') {
            p += 2;
            while (p + 1 < end && !(p[0] == '*' && p[1] == '/')) {
                p++;
            }
            p += 2;
        }
        else {
            return 0;
        }
    }
    return 1;
}

static int
bind_value(Cursor *self, int i, PyObject *value)
{
    sqlite3_stmt *stmt = self->stmt;
    int rc;

    if (value == Py_None) {
        rc = sqlite3_bind_null(stmt, i);
    }
    else if (PyLong_Check(value)) {
        long long v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Format(PyExc_OverflowError,
                             "binding %d: int %R does not fit a SQLite "
                             "INTEGER (64-bit signed); bind it as str or "
                             "float",
                             i, value);
            }
            return -1;
        }
        rc = sqlite3_bind_int64(stmt, i, v);
    }
    else if (PyFloat_Check(value)) {
        rc = sqlite3_bind_double(stmt, i, PyFloat_AsDouble(value));
    }
    else if (PyUnicode_Check(value)) {
        Py_ssize_t size;
        const char *text = PyUnicode_AsUTF8AndSize(value, &size);
        if (text == NULL) {
            return -1;
        }
        rc = sqlite3_bind_text64(stmt, i, text, (sqlite3_uint64)size,
                                 SQLITE_TRANSIENT, SQLITE_UTF8);
    }
    else if (PyBytes_Check(value)) {
        rc = sqlite3_bind_blob64(stmt, i, PyBytes_AsString(value),
                                 (sqlite3_uint64)PyBytes_Size(value),
                                 SQLITE_TRANSIENT);
    }
    else if (PyByteArray_Check(value)) {
        rc = sqlite3_bind_blob64(stmt, i, PyByteArray_AsString(value),
                                 (sqlite3_uint64)PyByteArray_Size(value),
                                 SQLITE_TRANSIENT);
    }
    else {
        /* Any other bytes-like object.  The buffer API is not in the 3.10
         * Limited API, so go through memoryview and a bytes copy. */
        PyObject *view = HOOK("cursor_bind_buffer") < 0
                             ? NULL
                             : PyMemoryView_FromObject(value);
        if (view == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Format(PyExc_TypeError,
                             "binding %d: unsupported type %R; use None, "
                             "int, float, str or a bytes-like object",
                             i, (PyObject *)Py_TYPE(value));
            }
            return -1;
        }
        PyObject *copy = PyBytes_FromObject(view);
        Py_DECREF(view);
        if (copy == NULL) {
            return -1;
        }
        rc = sqlite3_bind_blob64(stmt, i, PyBytes_AsString(copy),
                                 (sqlite3_uint64)PyBytes_Size(copy),
                                 SQLITE_TRANSIENT);
        Py_DECREF(copy);
    }
    if (rc != SQLITE_OK) {
        raise_db_error(self->connection->state, self->connection->db, rc);
        return -1;
    }
    return 0;
}

static int
bind_mapping(Cursor *self, int count)
{
    ModuleState *st = self->connection->state;
    for (int i = 1; i <= count; i++) {
        const char *name = sqlite3_bind_parameter_name(self->stmt, i);
        if (name == NULL) {
            PyErr_Format(st->BindingsError,
                         "parameter %d has no name (it is '?'), so it cannot "
                         "be bound from a dict; use a sequence, or name it "
                         "(:name)",
                         i);
            return -1;
        }
        PyObject *value =
            HOOK("cursor_bind_lookup") < 0
                ? NULL
                : PyMapping_GetItemString(self->bindings, name + 1);
        if (value == NULL) {
            if (PyErr_ExceptionMatches(PyExc_KeyError)) {
                PyErr_Format(st->BindingsError,
                             "no binding for parameter %s: the dict has no "
                             "key '%s'",
                             name, name + 1);
            }
            return -1;
        }
        int res = bind_value(self, i, value);
        Py_DECREF(value);
        if (res < 0) {
            return -1;
        }
    }
    return 0;
}

static int
bind_sequence(Cursor *self, int count, int is_last)
{
    ModuleState *st = self->connection->state;
    Py_ssize_t have = self->bindings ? PyTuple_Size(self->bindings) : 0;
    Py_ssize_t left = have - self->bindings_offset;
    if (count > left) {
        PyErr_Format(st->BindingsError,
                     "too few bindings: the statement needs %d and only %zd "
                     "%s left of the %zd supplied",
                     count, left, left == 1 ? "is" : "are", have);
        return -1;
    }
    if (is_last && count < left) {
        PyErr_Format(st->BindingsError,
                     "too many bindings: %zd supplied, but the statements "
                     "use only %zd",
                     have, self->bindings_offset + count);
        return -1;
    }
    for (int i = 1; i <= count; i++) {
        PyObject *value =
            PyTuple_GetItem(self->bindings, self->bindings_offset + i - 1);
        if (value == NULL || bind_value(self, i, value) < 0) {
            return -1;
        }
    }
    self->bindings_offset += count;
    return 0;
}

static int
bind_statement(Cursor *self, int is_last)
{
    int count = sqlite3_bind_parameter_count(self->stmt);
    if (self->bindings != NULL && !PyTuple_Check(self->bindings)) {
        return bind_mapping(self, count);
    }
    if (count == 0 && !is_last) {
        return 0;
    }
    return bind_sequence(self, count, is_last);
}

/* Prepare and bind the next statement from tail.  1: prepared; 0: there
 * are no more statements (the last one is kept, reset, for description);
 * -1: error. */
static int
prepare_next(Cursor *self)
{
    Connection *conn = self->connection;
    const char *end = PyBytes_AsString(self->sql) + PyBytes_Size(self->sql);
    int rc;
    DbError error;

    while (self->tail < end) {
        sqlite3_stmt *stmt = NULL;
        const char *tail = self->tail;
        if (check_forked(self) < 0) {
            return -1;
        }
        RELEASE_GIL("cursor_prepare");
        rc = sqlite3_prepare_v3(conn->db, tail, (int)(end - tail), 0, &stmt,
                                &tail);
        if (rc != SQLITE_OK && !FORKED(conn)) { /* no SQLite after a fork */
            capture_db_error(conn->db, rc, &error);
        }
        REACQUIRE_GIL();
        if (check_forked(self) < 0) {
            return -1; /* a busy handler forked: the child's way out */
        }
        if (rc != SQLITE_OK || PyErr_Occurred()) {
            /* A busy handler that raised while the schema was read: its
             * exception comes out, even if SQLite got on without it. */
            if (stmt != NULL) {
                sqlite3_finalize(stmt);
            }
            if (attach_refused && !PyErr_Occurred()) {
                attach_refused = 0;
                PyErr_SetString(
                    conn->state->ReentrancyError,
                    "ATTACH cannot run inside a busy handler: the database "
                    "it names could share a cache whose lock SQLite holds "
                    "for the call the handler runs inside, and opening it "
                    "would wait on that lock for ever. Attach it once that "
                    "call has returned");
            }
            attach_refused = 0;
            if (!PyErr_Occurred()) {
                raise_captured(conn->state, &error);
            }
            return -1;
        }
        if (stmt == NULL && tail <= self->tail) {
            break; /* cannot happen without a NUL, which execute refuses */
        }
        self->tail = tail;
        if (stmt == NULL) {
            continue; /* only a comment or white space */
        }
        finalize_statement(self);
        self->stmt = stmt;
        self->prepared++;
        if (bind_statement(self, only_trivia(tail, end)) < 0) {
            return -1;
        }
        return 1;
    }
    if (self->bindings != NULL && PyTuple_Check(self->bindings)
        && self->bindings_offset < PyTuple_Size(self->bindings)) {
        PyErr_Format(conn->state->BindingsError,
                     "too many bindings: %zd supplied, but the statements "
                     "use only %zd",
                     PyTuple_Size(self->bindings), self->bindings_offset);
        return -1;
    }
    return 0;
}

/* Bindings as they are kept: a tuple for a sequence, the mapping itself
 * for a dict-like object, NULL for None.  -1 with the error. */
static int
convert_bindings(PyObject *bindings, PyObject **out)
{
    *out = NULL;
    if (bindings == Py_None) {
        return 0;
    }
    if (PyDict_Check(bindings)
        || (PyMapping_Check(bindings) && !PySequence_Check(bindings))) {
        *out = Py_NewRef(bindings);
        return 0;
    }
    if (PyUnicode_Check(bindings) || PyBytes_Check(bindings)
        || PyByteArray_Check(bindings) || !PySequence_Check(bindings)) {
        PyErr_Format(PyExc_TypeError,
                     "bindings must be a sequence (tuple, list) or a dict, "
                     "not %R",
                     (PyObject *)Py_TYPE(bindings));
        return -1;
    }
    *out = PySequence_Tuple(bindings);
    return *out == NULL ? -1 : 0;
}

/* executemany: take the next bindings and start again at the first
 * statement (re-using it when it is the only one).  1: started; 0: no more
 * bindings; -1: error.  Runs the iterator's code with the lock held. */
static int
next_many(Cursor *self)
{
    HOOK_VOID("cursor_next_many");
    PyObject *item = PyIter_Next(self->many);
    if (item == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *converted;
    int res = convert_bindings(item, &converted);
    Py_DECREF(item);
    if (res < 0) {
        return -1;
    }
    /* The previous set goes now, lock held: executemany's own code runs
     * here anyway (the iterator). */
    HOOK_VOID("cursor_next_many_decref");
    REPLACE_REF(self->bindings, converted);
    self->bindings_offset = 0;
    if (check_forked(self) < 0) {
        return -1;
    }
    if (self->prepared == 1 && self->stmt != NULL) {
        sqlite3_reset(self->stmt);
        sqlite3_clear_bindings(self->stmt);
        if (bind_statement(self, 1) < 0) {
            return -1;
        }
        self->status = CURSOR_NEED_STEP;
        return 1;
    }
    self->tail = PyBytes_AsString(self->sql);
    self->prepared = 0;
    return 1;
}

/* Step until a row is ready or every statement (and, for executemany,
 * every set of bindings) is done.  Lock held. */
static int
step_until_row(Cursor *self)
{
    Connection *conn = self->connection;
    int rc;
    DbError error;

    for (;;) {
        if (self->status == CURSOR_DONE) {
            int res = prepare_next(self);
            if (res == 0 && self->many != NULL) {
                res = next_many(self);
                if (res > 0) {
                    continue;
                }
            }
            if (res <= 0) {
                return res;
            }
        }
        if (check_forked(self) < 0) {
            return -1;
        }
        sqlite3_stmt *stmt = self->stmt;
        RELEASE_GIL("cursor_step");
        rc = sqlite3_step(stmt);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE && !FORKED(conn)) {
            capture_db_error(conn->db, rc, &error);
        }
        REACQUIRE_GIL();
        if (check_forked(self) < 0) {
            return -1;
        }
        if (PyErr_Occurred()) {
            /* The busy handler raised; SQLite may still have answered a row
             * (PRAGMA wal_checkpoint reports a declined wait as busy=1). */
            self->status = CURSOR_DONE;
            sqlite3_reset(stmt);
            return -1;
        }
        if (rc == SQLITE_ROW) {
            self->status = CURSOR_ROW;
            return 0;
        }
        self->status = CURSOR_DONE;
        if (rc != SQLITE_DONE) {
            raise_captured(conn->state, &error);
            return -1;
        }
        sqlite3_reset(stmt);
    }
}

/* Advance, lock held.  On error the cursor is left with no work pending,
 * so it can be reused. */
static int
cursor_advance(Cursor *self, Garbage *g)
{
    int res = step_until_row(self);
    if (res < 0) {
        if (self->stmt != NULL && !FORKED(self->connection)) {
            sqlite3_reset(self->stmt);
        }
        reset_state(self, g);
    }
    return res;
}

int
cursor_execute(Cursor *self, PyObject *statements, PyObject *bindings,
               PyObject *many)
{
    Garbage g = {NULL, NULL, NULL};
    PyObject *sql = NULL, *converted = NULL, *iterator = NULL;

    if (self->connection == NULL || !self->open) {
        raise_closed(self); /* before any argument's fault */
        return -1;
    }
    /* (i) the arguments as the cursor keeps them */
    if (!PyUnicode_Check(statements)) {
        PyErr_Format(PyExc_TypeError, "statements must be a str, not %R",
                     (PyObject *)Py_TYPE(statements));
        return -1;
    }
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(statements, &size);
    if (utf8 == NULL) {
        return -1;
    }
    if ((size_t)size != strlen(utf8)) {
        /* SQLite stops reading at a NUL, so what follows would be lost. */
        PyErr_SetString(PyExc_ValueError,
                        "statements contain a NUL character; remove it (bind "
                        "values that contain NUL instead of writing them "
                        "into the SQL)");
        return -1;
    }
    if (HOOK("cursor_execute_alloc") < 0) {
        return -1;
    }
    sql = PyBytes_FromStringAndSize(utf8, size);
    if (sql == NULL) {
        return -1;
    }
    if (HOOK("cursor_execute_bindings") < 0
        || (many != NULL ? (iterator = PyObject_GetIter(many)) == NULL
                         : convert_bindings(bindings, &converted) < 0)) {
        Py_DECREF(sql);
        return -1;
    }
    /* (ii) */
    if (cursor_enter(self) < 0) {
        Py_DECREF(sql);
        Py_XDECREF(converted);
        Py_XDECREF(iterator);
        return -1;
    }
    Connection *conn = self->connection;
    finalize_statement(self);
    reset_state(self, &g);
    self->interrupted = 0;
    self->sql = sql;
    self->tail = PyBytes_AsString(sql);
    self->bindings = converted;
    self->many = iterator;
    int res = 0;
    if (iterator != NULL) {
        res = next_many(self);
        if (res <= 0) {
            reset_state(self, &g);
        }
    }
    if (iterator == NULL || res > 0) {
        res = cursor_advance(self, &g);
    }
    conn_leave(conn);
    /* (iii) */
    drop_garbage(&g);
    return res < 0 ? -1 : 0;
}

static PyObject *
row_tuple(Cursor *self)
{
    sqlite3_stmt *stmt = self->stmt;
    int n = sqlite3_column_count(stmt);
    PyObject *row = PyTuple_New(n);
    if (row == NULL) {
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        PyObject *item;
        switch (sqlite3_column_type(stmt, i)) {
        case SQLITE_INTEGER:
            item = PyLong_FromLongLong(sqlite3_column_int64(stmt, i));
            break;
        case SQLITE_FLOAT:
            item = PyFloat_FromDouble(sqlite3_column_double(stmt, i));
            break;
        case SQLITE_TEXT: {
            const char *text = (const char *)sqlite3_column_text(stmt, i);
            if (text == NULL) {
                item = PyErr_NoMemory();
                break;
            }
            item = PyUnicode_DecodeUTF8(text, sqlite3_column_bytes(stmt, i),
                                        NULL);
            break;
        }
        case SQLITE_BLOB: {
            const void *blob = sqlite3_column_blob(stmt, i);
            int size = sqlite3_column_bytes(stmt, i);
            if (blob == NULL && size > 0) {
                item = PyErr_NoMemory();
                break;
            }
            item = PyBytes_FromStringAndSize(blob ? blob : "", size);
            break;
        }
        default:
            item = Py_NewRef(Py_None);
        }
        if (item == NULL || PyTuple_SetItem(row, i, item) < 0) {
            Py_DECREF(row);
            return NULL;
        }
    }
    return row;
}

static PyObject *
cursor_next(Cursor *self)
{
    Garbage g = {NULL, NULL, NULL};
    if (cursor_enter(self) < 0) {
        return NULL;
    }
    Connection *conn = self->connection;
    PyObject *row = NULL;
    if (self->interrupted) {
        self->interrupted = 0;
        conn_leave(conn);
        return raise_sqlite_error(
            conn->state, SQLITE_INTERRUPT,
            "interrupted: the statement was stopped so that a with-block of "
            "its connection could end its transaction after interrupt(); "
            "run it again");
    }
    if (self->status == CURSOR_NEED_STEP && cursor_advance(self, &g) < 0) {
        conn_leave(conn);
        drop_garbage(&g);
        return NULL;
    }
    if (self->status == CURSOR_ROW) {
        /* Built under the lock: the statement's row is only valid until
         * the next step, which another thread could make once we let go. */
        if (HOOK("cursor_row_alloc") == 0) {
            row = row_tuple(self);
        }
        if (row != NULL) {
            self->status = CURSOR_NEED_STEP;
        }
    }
    conn_leave(conn);
    drop_garbage(&g);
    return row;
}

static PyObject *
cursor_execute_method(Cursor *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "bindings", NULL};
    PyObject *statements, *bindings = Py_None;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:execute", kwlist,
                                     &statements, &bindings)
        || cursor_execute(self, statements, bindings, NULL) < 0) {
        return NULL;
    }
    return Py_NewRef(self);
}

static PyObject *
cursor_executemany(Cursor *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "sequenceofbindings", NULL};
    PyObject *statements, *seq;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:executemany", kwlist,
                                     &statements, &seq)
        || cursor_execute(self, statements, NULL, seq) < 0) {
        return NULL;
    }
    return Py_NewRef(self);
}

static PyObject *
cursor_fetchone(Cursor *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *row = cursor_next(self);
    if (row == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return row;
}

static PyObject *
cursor_fetchall(Cursor *self, PyObject *Py_UNUSED(ignored))
{
    if (self->connection == NULL || !self->open) {
        return raise_closed(self);
    }
    PyObject *rows = PyList_New(0);
    PyObject *row;
    while (rows != NULL && (row = cursor_next(self)) != NULL) {
        if (PyList_Append(rows, row) < 0) {
            Py_CLEAR(rows);
        }
        Py_DECREF(row);
    }
    if (PyErr_Occurred()) {
        Py_CLEAR(rows);
    }
    return rows;
}

/* Let go of the statement when the lock cannot be had now: it becomes an
 * orphan of the connection, finalized by the lock's holder when it lets go
 * (locks.c).  The node was allocated with the cursor: this cannot fail. */
static void
orphan_statement(Cursor *self, sqlite3_stmt *stmt)
{
    Orphan *o = self->spare;
    self->spare = NULL;
    o->stmt = stmt;
    o->next = self->connection->orphans;
    self->connection->orphans = o;
}

/* Close from dealloc or GC: never waits, never refuses. */
static void
cursor_let_go(Cursor *self)
{
    Connection *conn = self->connection;
    sqlite3_stmt *stmt = self->stmt;
    self->stmt = NULL;
    unlink_cursor(self);
    self->open = 0;
    if (stmt != NULL && conn != NULL && !FORKED(conn) && conn->db != NULL) {
        if (lock_try_quiet(conn) == 0) {
            RELEASE_GIL("cursor_let_go_finalize");
            sqlite3_finalize(stmt);
            REACQUIRE_GIL();
            conn_leave(conn);
        }
        else {
            orphan_statement(self, stmt);
        }
    }
}

static PyObject *
cursor_close(Cursor *self, PyObject *args, PyObject *kwds)
{
    int force;
    Garbage g = {NULL, NULL, NULL};

    if (parse_force(args, kwds, &force) < 0) {
        return NULL;
    }
    Connection *conn = self->connection;
    if (conn == NULL || !self->open) {
        Py_RETURN_NONE;
    }
    if (FORKED(conn)) {
        if (!force) {
            return raise_forked(conn->state, "connection");
        }
        self->stmt = NULL; /* the parent's: let go without SQLite */
        unlink_cursor(self);
        self->open = 0;
        reset_state(self, &g);
        drop_garbage(&g);
        Py_RETURN_NONE;
    }
    if (conn->db == NULL) { /* made after its connection closed */
        unlink_cursor(self);
        self->open = 0;
        reset_state(self, &g);
        drop_garbage(&g);
        Py_RETURN_NONE;
    }
    /* Finalizing a statement another thread is stepping would free it
     * under that thread: the lock is needed.  A locked destination's
     * cursor may be closed: backup() refused a running statement, and
     * finalizing one that is not running commits nothing. */
    if (conn_enter(conn, CHECK_OPEN) < 0) {
        return NULL;
    }
    if (self->open) {
        finalize_statement(self);
        unlink_cursor(self);
        self->open = 0;
        reset_state(self, &g);
    }
    conn_leave(conn);
    drop_garbage(&g);
    Py_RETURN_NONE;
}

static PyObject *
cursor_get_description(Cursor *self, void *Py_UNUSED(closure))
{
    if (cursor_enter(self) < 0) {
        return NULL;
    }
    Connection *conn = self->connection;
    int n = self->stmt ? sqlite3_column_count(self->stmt) : 0;
    if (n == 0) {
        conn_leave(conn);
        Py_RETURN_NONE;
    }
    /* Names and types are the statement's: built under the lock. */
    PyObject *description =
        HOOK("cursor_description_alloc") < 0 ? NULL : PyTuple_New(n);
    for (int i = 0; description != NULL && i < n; i++) {
        const char *name = sqlite3_column_name(self->stmt, i);
        const char *decltype = sqlite3_column_decltype(self->stmt, i);
        if (name == NULL) {
            Py_CLEAR(description);
            PyErr_NoMemory();
            break;
        }
        PyObject *item = Py_BuildValue("(szOOOOO)", name, decltype, Py_None,
                                       Py_None, Py_None, Py_None, Py_None);
        if (item == NULL || PyTuple_SetItem(description, i, item) < 0) {
            Py_CLEAR(description);
        }
    }
    conn_leave(conn);
    return description;
}

static PyObject *
cursor_get_connection(Cursor *self, void *Py_UNUSED(closure))
{
    if (self->connection == NULL || !self->open) {
        return raise_closed(self);
    }
    return Py_NewRef(self->connection);
}

static int
cursor_traverse(Cursor *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->connection);
    Py_VISIT(self->bindings);
    Py_VISIT(self->many);
    return 0;
}

static int
cursor_clear(Cursor *self)
{
    Garbage g = {NULL, NULL, NULL};
    cursor_let_go(self);
    reset_state(self, &g);
    drop_garbage(&g);
    Py_CLEAR(self->connection);
    return 0;
}

static void
cursor_dealloc(Cursor *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    cursor_clear(self);
    PyMem_Free(self->spare);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef cursor_methods[] = {
    {"execute", (PyCFunction)(void (*)(void))cursor_execute_method,
     METH_VARARGS | METH_KEYWORDS,
     "execute(statements, bindings=None) -> Cursor\n\nRun the ';'-separated "
     "statements; sequence bindings are used in order across them, dict "
     "bindings by name.  Returns the cursor, to iterate for rows."},
    {"executemany", (PyCFunction)(void (*)(void))cursor_executemany,
     METH_VARARGS | METH_KEYWORDS,
     "executemany(statements, sequenceofbindings) -> Cursor"},
    {"fetchone", (PyCFunction)cursor_fetchone, METH_NOARGS,
     "fetchone() -> tuple | None"},
    {"fetchall", (PyCFunction)cursor_fetchall, METH_NOARGS,
     "fetchall() -> list[tuple]"},
    {"close", (PyCFunction)(void (*)(void))cursor_close,
     METH_VARARGS | METH_KEYWORDS,
     "close(force=False) -> None\n\nFinalize the statements.  Calling it "
     "again does nothing."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef cursor_getset[] = {
    {"description", (getter)cursor_get_description, NULL,
     "DB-API description of the current statement's columns: (name, "
     "declared type, None, None, None, None, None) each; None when there "
     "is no statement.",
     NULL},
    {"connection", (getter)cursor_get_connection, NULL,
     "The Connection this cursor belongs to.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot cursor_slots[] = {
    {Py_tp_doc, "A cursor: made by Connection.cursor() or execute()."},
    {Py_tp_dealloc, cursor_dealloc},
    {Py_tp_traverse, cursor_traverse},
    {Py_tp_clear, cursor_clear},
    {Py_tp_iter, PyObject_SelfIter},
    {Py_tp_iternext, cursor_next},
    {Py_tp_methods, cursor_methods},
    {Py_tp_getset, cursor_getset},
    {0, NULL},
};

PyType_Spec cursor_spec = {
    .name = "apsw_backup.Cursor",
    .basicsize = sizeof(Cursor),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC
             | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = cursor_slots,
};
