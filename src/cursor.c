/* Cursor: runs a string of ';'-separated statements and yields their rows.
 *
 * The statements are prepared one at a time from `tail`; bindings given as
 * a sequence are consumed across them in order.  execute() steps to the
 * first row (so DML runs at once); iteration steps on from there.
 */
#include "apsw_backup.h"

static int
cursor_check(Cursor *self)
{
    if (self->connection == NULL) {
        ModuleState *st = state_from_type(Py_TYPE(self));
        if (st != NULL) {
            PyErr_SetString(st->CursorClosedError, "The cursor is closed");
        }
        return -1;
    }
    return connection_check(self->connection, CHECK_OPEN | CHECK_UNLOCKED);
}

#define CURSOR_GUARD(self)            \
    do {                              \
        if (cursor_check(self) < 0) { \
            return NULL;              \
        }                             \
    } while (0)

static void
finalize_statement(Cursor *self)
{
    sqlite3_stmt *stmt = self->stmt;
    self->stmt = NULL;
    if (stmt != NULL) {
        /* May wait for the connection's mutex if another thread is inside
         * SQLite on it (a backup step reading from it): not with the GIL.
         * The caller has the connection marked in use. */
        Py_BEGIN_ALLOW_THREADS
        sqlite3_finalize(stmt);
        Py_END_ALLOW_THREADS
    }
}

static void
reset_state(Cursor *self)
{
    Py_CLEAR(self->sql);
    Py_CLEAR(self->bindings);
    Py_CLEAR(self->many);
    self->tail = NULL;
    self->prepared = 0;
    self->bindings_offset = 0;
    self->status = CURSOR_DONE;
}

/* Statements of cursors let go of by a callback of ours (a busy handler,
 * a destructor run inside one of our calls) while another thread is inside
 * their connection.  Finalizing waits for that connection's SQLite mutex,
 * and the callback holds another one that the other thread may be waiting
 * for: a deadlock.  So they are finalized later, by statements_finalize_
 * pending() from call_leave(), once this thread is in no call of ours; the
 * connection is owned meanwhile, and its close() finalizes its own. */
typedef struct PendingStatement {
    sqlite3_stmt *stmt;
    Connection *connection; /* strong */
    struct PendingStatement *next;
} PendingStatement;

static PendingStatement *pending_statements;

int
statements_pending(void)
{
    return pending_statements != NULL;
}

static int
defer_finalize(sqlite3_stmt *stmt, Connection *connection)
{
    PendingStatement *p = PyMem_Malloc(sizeof(*p));
    if (p == NULL) {
        return -1; /* finalize now, as before */
    }
    p->stmt = stmt;
    p->connection = (Connection *)Py_NewRef(connection);
    p->next = pending_statements;
    pending_statements = p;
    return 0;
}

/* Finalize the pending statements of `only` (NULL: of any connection no
 * other call is inside). */
void
statements_finalize_pending(Connection *only)
{
    static int draining;
    if (draining) {
        return;
    }
    draining = 1;
    PendingStatement **link = &pending_statements;
    while (*link != NULL) {
        PendingStatement *p = *link;
        Connection *c = p->connection;
        int due = only != NULL ? c == only : !c->inuse;
        if (!due) {
            link = &p->next;
            continue;
        }
        *link = p->next;
        if (!FORKED(c) && c->db != NULL) {
            call_enter(c, &c->inuse);
            Py_BEGIN_ALLOW_THREADS
            sqlite3_finalize(p->stmt);
            Py_END_ALLOW_THREADS
            call_leave(&c->inuse);
        }
        PyMem_Free(p);
        Py_DECREF(c);
        link = &pending_statements; /* the GIL was released: read afresh */
    }
    draining = 0;
}

/* Close: called by close(), by dealloc and GC, and by the connection's
 * close through its list of (borrowed) cursors.  So the cursor is first
 * taken out of that list and its statement out of the cursor, with the GIL
 * held: once the GIL is released to finalize, no other path can reach
 * either.  The connection is owned (the cursor's reference, taken over)
 * and marked in use until the statement is finalized, so it cannot be
 * closed under it; the Python objects are let go last, as their
 * destructors may run any code. */
void
cursor_close_internal(Cursor *self)
{
    Connection *connection = self->connection;
    sqlite3_stmt *stmt = self->stmt;
    self->stmt = NULL;
    if (connection == NULL) {
        reset_state(self);
        return;
    }
    if (self->prev != NULL) {
        self->prev->next = self->next;
    }
    else {
        connection->cursors = self->next;
    }
    if (self->next != NULL) {
        self->next->prev = self->prev;
    }
    self->prev = self->next = NULL;
    self->connection = NULL;
    /* Nothing of self is touched once the GIL is released: a caller that
     * reached us through the connection's list holds no reference, and
     * another thread may free the cursor meanwhile. */
    PyObject *sql = self->sql, *bindings = self->bindings, *many = self->many;
    self->sql = self->bindings = self->many = NULL;
    reset_state(self);
    if (stmt != NULL && !FORKED(connection)) {
        if (in_any_call_here()
            && connection->inuse > calls_here_count(connection)
            && defer_finalize(stmt, connection) == 0) {
            stmt = NULL; /* finalized once no call is inside it */
        }
    }
    if (stmt != NULL && !FORKED(connection)) {
        call_enter(connection, &connection->inuse);
        Py_BEGIN_ALLOW_THREADS
        sqlite3_finalize(stmt);
        Py_END_ALLOW_THREADS
        call_leave(&connection->inuse);
    }
    Py_XDECREF(sql);
    Py_XDECREF(bindings);
    Py_XDECREF(many);
    Py_DECREF(connection);
}

Cursor *
cursor_new(Connection *connection)
{
    PyTypeObject *tp = connection->state->CursorType;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    Cursor *self = (Cursor *)alloc(tp, 0);
    if (self == NULL) {
        return NULL;
    }
    self->connection = (Connection *)Py_NewRef(connection);
    self->next = connection->cursors;
    if (connection->cursors != NULL) {
        connection->cursors->prev = self;
    }
    connection->cursors = self;
    return self;
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
        PyObject *view = PyMemoryView_FromObject(value);
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
        PyObject *value = PyMapping_GetItemString(self->bindings, name + 1);
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

    while (self->tail < end) {
        sqlite3_stmt *stmt = NULL;
        const char *tail = self->tail;
        Py_BEGIN_ALLOW_THREADS
        rc = sqlite3_prepare_v3(conn->db, tail, (int)(end - tail), 0, &stmt,
                                &tail);
        Py_END_ALLOW_THREADS
        if (FORKED(conn)) {
            /* A busy handler forked: this is the child, and the handle,
             * its mutex held by a thread of the parent, is not ours. */
            if (!PyErr_Occurred()) { /* the callback's own, if any, first */
                raise_forked(conn->state, "connection");
            }
            return -1;
        }
        if (rc != SQLITE_OK || PyErr_Occurred()) {
            /* A busy handler that raised while the schema was read: its
             * exception comes out, even if SQLite got on without it. */
            if (stmt != NULL) {
                sqlite3_finalize(stmt);
            }
            raise_db_error(conn->state, conn->db, rc);
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

/* Take bindings for the next run: a tuple for a sequence, the mapping
 * itself for a dict-like object. */
static int
set_bindings(Cursor *self, PyObject *bindings)
{
    self->bindings_offset = 0;
    if (bindings == Py_None) {
        Py_CLEAR(self->bindings);
        return 0;
    }
    if (PyDict_Check(bindings)
        || (PyMapping_Check(bindings) && !PySequence_Check(bindings))) {
        REPLACE_REF(self->bindings, Py_NewRef(bindings));
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
    PyObject *tuple = PySequence_Tuple(bindings);
    if (tuple == NULL) {
        return -1;
    }
    REPLACE_REF(self->bindings, tuple);
    return 0;
}

/* executemany: take the next bindings and start again at the first
 * statement (re-using it when it is the only one).  1: started; 0: no more
 * bindings; -1: error. */
static int
next_many(Cursor *self)
{
    PyObject *bindings = PyIter_Next(self->many);
    if (bindings == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int res = set_bindings(self, bindings);
    Py_DECREF(bindings);
    if (res < 0) {
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
 * every set of bindings) is done.  Called with connection->inuse set. */
static int
step_until_row(Cursor *self)
{
    Connection *conn = self->connection;
    int rc;

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
        sqlite3_stmt *stmt = self->stmt;
        Py_BEGIN_ALLOW_THREADS
        rc = sqlite3_step(stmt);
        Py_END_ALLOW_THREADS
        if (FORKED(conn)) {
            self->stmt = NULL; /* the parent's: never reset or finalized */
            self->status = CURSOR_DONE;
            if (!PyErr_Occurred()) {
                raise_forked(conn->state, "connection");
            }
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
            raise_db_error(conn->state, conn->db, rc);
            return -1;
        }
        sqlite3_reset(stmt);
    }
}

/* Advance with the connection marked in use.  On error the cursor is left
 * with no work pending, so it can be reused. */
static int
cursor_advance(Cursor *self)
{
    Connection *conn = self->connection;
    call_enter(conn, &conn->inuse);
    int res = step_until_row(self);
    if (res < 0) {
        if (self->stmt != NULL && !FORKED(conn)) {
            sqlite3_reset(self->stmt);
        }
        reset_state(self);
    }
    call_leave(&conn->inuse);
    return res;
}

/* Set up the statements and bindings, then run to the first row. */
static int
start_execute(Cursor *self, PyObject *statements, PyObject *bindings,
              PyObject *many)
{
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
    finalize_statement(self);
    reset_state(self);
    self->sql = PyBytes_FromStringAndSize(utf8, size);
    if (self->sql == NULL) {
        return -1;
    }
    self->tail = PyBytes_AsString(self->sql);
    if (many != NULL) {
        self->many = PyObject_GetIter(many);
        int res = self->many ? next_many(self) : -1;
        if (res <= 0) {
            reset_state(self);
            return res;
        }
    }
    else if (set_bindings(self, bindings) < 0) {
        reset_state(self);
        return -1;
    }
    return cursor_advance(self);
}

/* The connection stays marked in use throughout: converting the bindings
 * runs Python code (__len__, __getitem__, __iter__, __fspath__...), which
 * must not be able to close or re-enter the connection under us. */
int
cursor_execute(Cursor *self, PyObject *statements, PyObject *bindings,
               PyObject *many)
{
    if (cursor_check(self) < 0) {
        return -1;
    }
    if (!PyUnicode_Check(statements)) {
        PyErr_Format(PyExc_TypeError, "statements must be a str, not %R",
                     (PyObject *)Py_TYPE(statements));
        return -1;
    }
    Connection *conn = self->connection;
    call_enter(conn, &conn->inuse);
    int res = start_execute(self, statements, bindings, many);
    call_leave(&conn->inuse);
    return res;
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
    CURSOR_GUARD(self);
    if (self->status == CURSOR_NEED_STEP && cursor_advance(self) < 0) {
        return NULL;
    }
    if (self->status != CURSOR_ROW) {
        return NULL;
    }
    Connection *conn = self->connection;
    call_enter(conn, &conn->inuse);
    PyObject *row = row_tuple(self);
    call_leave(&conn->inuse);
    if (row != NULL) {
        self->status = CURSOR_NEED_STEP;
    }
    return row;
}

static PyObject *
cursor_execute_method(Cursor *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "bindings", NULL};
    PyObject *statements, *bindings = Py_None;

    CURSOR_GUARD(self);
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

    CURSOR_GUARD(self);
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
    CURSOR_GUARD(self);
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

static PyObject *
cursor_close(Cursor *self, PyObject *args, PyObject *kwds)
{
    int force;

    if (parse_force(args, kwds, &force) < 0) {
        return NULL;
    }
    /* Finalizing a statement another thread is stepping would free it
     * under that thread.  Inherited through fork(), force lets go without
     * calling SQLite. */
    if (self->connection != NULL && !(force && FORKED(self->connection))
        && connection_check(self->connection, CHECK_OPEN) < 0) {
        return NULL;
    }
    cursor_close_internal(self);
    Py_RETURN_NONE;
}

static PyObject *
cursor_get_description(Cursor *self, void *Py_UNUSED(closure))
{
    CURSOR_GUARD(self);
    if (self->stmt == NULL) {
        Py_RETURN_NONE;
    }
    int n = sqlite3_column_count(self->stmt);
    if (n == 0) {
        Py_RETURN_NONE;
    }
    PyObject *description = PyTuple_New(n);
    if (description == NULL) {
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        const char *name = sqlite3_column_name(self->stmt, i);
        const char *decltype = sqlite3_column_decltype(self->stmt, i);
        if (name == NULL) {
            Py_DECREF(description);
            return PyErr_NoMemory();
        }
        PyObject *item = Py_BuildValue("(szOOOOO)", name, decltype, Py_None,
                                       Py_None, Py_None, Py_None, Py_None);
        if (item == NULL || PyTuple_SetItem(description, i, item) < 0) {
            Py_DECREF(description);
            return NULL;
        }
    }
    return description;
}

static PyObject *
cursor_get_connection(Cursor *self, void *Py_UNUSED(closure))
{
    if (self->connection == NULL) {
        cursor_check(self);
        return NULL;
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
    cursor_close_internal(self);
    return 0;
}

static void
cursor_dealloc(Cursor *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    cursor_close_internal(self);
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
