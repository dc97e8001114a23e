/* Connection: an SQLite database handle, the subset needed to make, use and
 * verify a backup.
 *
 * Threading model: SQLite is opened in serialized mode, and `inuse` is set
 * for the whole of any call that touches the handle (the GIL is released
 * around the SQLite calls inside it).  A second thread, or a callback running
 * inside that call, therefore gets ThreadingViolationError instead of racing
 * the first one.  `locked_by` is the same idea for a backup destination:
 * SQLite does not protect it, so we refuse every use until the Backup ends.
 */
#include "apsw_backup.h"
#include <structmember.h>
#include <sys/stat.h>

#define DEFAULT_FLAGS (SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)

PyObject *
connection_locked_message(Connection *self)
{
    Backup *b = self->locked_by;
    return PyUnicode_FromFormat(
        "This connection is the destination of an unfinished Backup "
        "(%U); it cannot be used until the backup is finished: "
        "call backup.finish() or backup.close(), or leave its with-block "
        "(close(force=True) on this connection finishes the backup, rolling "
        "the partial copy back, and closes it)",
        b->repr_names);
}

/* The one guard at the top of every Connection method. */
int
connection_check(Connection *self, int what)
{
    ModuleState *st = self->state;
    if (self->db == NULL) {
        PyErr_SetString(st->ConnectionClosedError, "The connection is closed");
        return -1;
    }
    if (FORKED(self)) {
        raise_forked(st, "connection");
        return -1;
    }
    if (self->inuse) {
        PyErr_SetString(in_call_here(self) ? st->ReentrancyError
                                           : st->InUseError,
                        "The connection is in use by a call that has not "
                        "returned (in another thread, or re-entrantly from a "
                        "callback); wait for that call to finish");
        return -1;
    }
    if ((what & CHECK_UNLOCKED) && self->locked_by != NULL) {
        PyObject *msg = connection_locked_message(self);
        if (msg != NULL) {
            PyErr_SetObject(st->DestinationLockedError, msg);
            Py_DECREF(msg);
        }
        return -1;
    }
    return 0;
}

#define GUARD(self, what)                           \
    do {                                            \
        if (connection_check((self), (what)) < 0) { \
            return NULL;                            \
        }                                           \
    } while (0)
#define GUARD_ALL(self) GUARD((self), CHECK_OPEN | CHECK_UNLOCKED)

/* Run SQL with no results and no bindings (savepoints). */
static int
connection_exec(Connection *self, const char *sql)
{
    int rc;
    call_enter(self, &self->inuse);
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_exec(self->db, sql, NULL, NULL, NULL);
    Py_END_ALLOW_THREADS
    if (FORKED(self)) { /* a busy handler forked: the child's way out */
        call_leave(&self->inuse);
        if (!PyErr_Occurred()) {
            raise_forked(self->state, "connection");
        }
        return -1;
    }
    /* A busy handler's exception comes out even if SQLite got on. */
    int failed = rc != SQLITE_OK || PyErr_Occurred() != NULL;
    if (failed) {
        raise_db_error(self->state, self->db, rc);
    }
    call_leave(&self->inuse);
    return failed ? -1 : 0;
}

static PyObject *
connection_new(PyTypeObject *type, PyObject *Py_UNUSED(args),
               PyObject *Py_UNUSED(kwds))
{
    ModuleState *st = state_from_type(type);
    if (st == NULL) {
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Connection *self = (Connection *)alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->state = st;
    return (PyObject *)self;
}

/* filename as UTF-8 bytes, from str, bytes or os.PathLike. */
static PyObject *
filename_bytes(PyObject *filename)
{
    PyObject *path = PyOS_FSPath(filename);
    if (path == NULL) {
        return NULL;
    }
    PyObject *encoded = path;
    if (PyUnicode_Check(path)) {
        /* As os.fsencode(): round-trips with the filename attribute. */
        encoded = PyUnicode_EncodeFSDefault(path);
        Py_DECREF(path);
        if (encoded == NULL) {
            return NULL;
        }
    }
    if ((size_t)PyBytes_Size(encoded) != strlen(PyBytes_AsString(encoded))) {
        PyErr_SetString(PyExc_ValueError, "filename contains a NUL character");
        Py_DECREF(encoded);
        return NULL;
    }
    return encoded;
}

static int
connection_init(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"filename", "flags", "vfs", NULL};
    ModuleState *st = self->state;
    PyObject *filename;
    int flags = DEFAULT_FLAGS;
    const char *vfs = NULL;
    sqlite3 *db = NULL;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|iz:Connection", kwlist,
                                     &filename, &flags, &vfs)) {
        return -1;
    }
    if (self->db != NULL) {
        PyErr_SetString(st->Error, "The connection is already open; make a "
                                   "new Connection to open another database");
        return -1;
    }
    if (flags & SQLITE_OPEN_NOMUTEX) {
        /* Our threading guarantees (interrupt(), finishing a backup from a
         * collected object) rely on SQLite's per-connection mutex. */
        PyErr_SetString(PyExc_ValueError,
                        "SQLITE_OPEN_NOMUTEX is not supported: apsw_backup "
                        "needs SQLite's per-connection mutex; leave it out");
        return -1;
    }
    if (!(flags & (SQLITE_OPEN_READONLY | SQLITE_OPEN_READWRITE))) {
        raise_sqlite_error(st, SQLITE_MISUSE,
                           "flags must include SQLITE_OPEN_READONLY or "
                           "SQLITE_OPEN_READWRITE (usually with "
                           "SQLITE_OPEN_CREATE)");
        return -1;
    }
    PyObject *name = filename_bytes(filename);
    if (name == NULL) {
        return -1;
    }
    if (self->db != NULL) { /* __fspath__ opened us meanwhile */
        Py_DECREF(name);
        PyErr_SetString(st->Error, "The connection is already open; make a "
                                   "new Connection to open another database");
        return -1;
    }
    const char *cname = PyBytes_AsString(name);
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_open_v2(cname, &db, flags | SQLITE_OPEN_FULLMUTEX, vfs);
    if (rc == SQLITE_OK) {
        sqlite3_extended_result_codes(db, 1);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(name);
    if (rc == SQLITE_OK && self->db != NULL) {
        /* Another thread's __init__ opened us while the GIL was released. */
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close(db);
        Py_END_ALLOW_THREADS
        PyErr_SetString(st->Error, "The connection is already open; make a "
                                   "new Connection to open another database");
        return -1;
    }
    if (rc != SQLITE_OK) {
        if (db == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        /* With the OS error SQLite kept ("unable to open database file"
         * does not say why). */
        raise_db_error(st, db, rc);
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close(db);
        Py_END_ALLOW_THREADS
        return -1;
    }

    const char *fn = sqlite3_db_filename(db, "main");
    sqlite3_vfs *v = sqlite3_vfs_find(vfs);
    REPLACE_REF(self->filename, PyUnicode_DecodeFSDefault(fn ? fn : ""));
    REPLACE_REF(self->open_vfs,
                PyUnicode_FromString(v ? v->zName : (vfs ? vfs : "")));
    if (self->filename == NULL || self->open_vfs == NULL) {
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close(db);
        Py_END_ALLOW_THREADS
        return -1;
    }
    self->open_flags = flags;
    self->savepoint_level = 0;
    self->fork_generation = fork_generation;
    struct stat main_stat;
    self->main_known = fn != NULL && fn[0] && stat(fn, &main_stat) == 0;
    self->main_dev =
        self->main_known ? (unsigned long long)main_stat.st_dev : 0;
    self->main_ino =
        self->main_known ? (unsigned long long)main_stat.st_ino : 0;
    self->db = db;
    return 0;
}

/* Finish every backup reading from us.  Returns -1 with the first error set
 * if one failed (every backup is finished regardless); -2 if a callback
 * running inside one of them called us (nothing is finished then).
 *
 * The list holds borrowed pointers, and finishing releases the GIL, so the
 * list is read afresh after every wait or finish: a backup another thread
 * is finishing (or stepping) is waited for -- it unlinks itself when done --
 * and one that is free to finish is owned (a new reference) while it is. */
static int
finish_source_backups(Connection *self)
{
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    long wait_us = 50;
    while (self->sources != NULL) {
        Backup *b = self->sources;
        int allowed = 1;
        for (; b != NULL; b = b->src_next) {
            allowed = backup_finish_allowed(b, self);
            if (allowed < 0) {
                return -2; /* a refusal is never swallowed */
            }
            if (allowed == 0) {
                break;
            }
        }
        if (b == NULL) {
            wait_a_little(&wait_us);
            continue;
        }
        Py_INCREF(b);
        if (backup_finish_internal(b) < 0) {
            if (et == NULL) {
                PyErr_Fetch(&et, &ev, &tb);
            }
            else {
                PyErr_Clear();
            }
        }
        Py_DECREF(b);
    }
    if (et != NULL) {
        PyErr_Restore(et, ev, tb);
        return -1;
    }
    return 0;
}

/* Finish the backup writing into us, if any (its errors are swallowed: the
 * partial copy is rolled back whatever they say).  Waits, as above, for one
 * another thread is finishing. */
static int
finish_locking_backup(Connection *self)
{
    long wait_us = 50;
    while (self->locked_by != NULL) {
        Backup *b = self->locked_by;
        int allowed = backup_finish_allowed(b, self);
        if (allowed < 0) {
            return -1;
        }
        if (allowed > 0) {
            wait_a_little(&wait_us);
            continue;
        }
        Py_INCREF(b);
        if (backup_finish_internal(b) < 0) {
            PyErr_Clear();
        }
        Py_DECREF(b);
    }
    return 0;
}

/* close()'s force argument, for every type: a bool (or int), so that a
 * stray value such as close("no") is an error rather than a forced close. */
int
parse_force(PyObject *args, PyObject *kwds, int *force)
{
    static char *kwlist[] = {"force", NULL};
    PyObject *value = Py_False;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:close", kwlist, &value)) {
        return -1;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "force must be a bool, not %R",
                     (PyObject *)Py_TYPE(value));
        return -1;
    }
    *force = PyObject_IsTrue(value);
    return *force < 0 ? -1 : 0;
}

/* Finish the backups, close the cursors, close the handle.  Called with
 * inuse held, so Python code run from here (a binding's __del__) cannot
 * re-enter the connection half-way. */
static int
close_everything(Connection *self, int force)
{
    int rc;
    /* Only force=True gets here with a backup writing into us. */
    if (finish_locking_backup(self) < 0) {
        return -1;
    }
    int res = finish_source_backups(self);
    if (res == -2 || (res < 0 && !force)) {
        return -1;
    }
    if (res < 0) {
        PyErr_Clear();
    }
    while (self->cursors != NULL) {
        cursor_close_internal(self->cursors);
    }
    statements_finalize_pending(self); /* deferred by a callback (cursor.c) */
    /* A cursor another thread let go of finalizes its statement outside
     * our call (it left the list first): wait for it, or SQLite would find
     * the statement unfinalized. */
    long wait_us = 50;
    while (self->inuse > 1) {
        wait_a_little(&wait_us);
    }
    /* Taken out first: interrupt() from another thread (allowed on a busy
     * connection) must never reach a handle being freed. */
    sqlite3 *db = self->db;
    self->db = NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_close(db);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        if (!force) {
            raise_db_error(self->state, db, rc);
            self->db = db; /* still open */
            return -1;
        }
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close_v2(db);
        Py_END_ALLOW_THREADS
    }
    return 0;
}

/* In a forked child: let go of the parent's backups and cursors (none of
 * them calls SQLite once forked), then of the handle. */
static void
forget_forked(Connection *self)
{
    while (self->locked_by != NULL) {
        backup_forget(self->locked_by);
    }
    while (self->sources != NULL) {
        backup_forget(self->sources);
    }
    while (self->cursors != NULL) {
        cursor_close_internal(self->cursors);
    }
    self->db = NULL;
}

static PyObject *
connection_close(Connection *self, PyObject *args, PyObject *kwds)
{
    int force;

    if (parse_force(args, kwds, &force) < 0) {
        return NULL;
    }
    if (self->db == NULL) {
        Py_RETURN_NONE;
    }
    if (FORKED(self) && force) {
        /* The handle is the parent's: forget it, and everything it owns,
         * without calling SQLite -- nothing of the parent's may survive a
         * later __init__ on this object. */
        forget_forked(self);
        Py_RETURN_NONE;
    }
    GUARD(self, force ? CHECK_OPEN : CHECK_OPEN | CHECK_UNLOCKED);
    call_enter(self, &self->inuse);
    int res = close_everything(self, force);
    call_leave(&self->inuse);
    if (res < 0) {
        return NULL;
    }
    Py_CLEAR(self->busy_handler);
    Py_RETURN_NONE;
}

static int
connection_traverse(Connection *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->busy_handler);
    return 0;
}

static int
connection_clear(Connection *self)
{
    Py_CLEAR(self->busy_handler);
    return 0;
}

static void
connection_dealloc(Connection *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    /* Cursors and backups hold strong references to us, so none is left.
     * A connection inherited through fork() is the parent's: left alone. */
    if (self->db != NULL && !FORKED(self)) {
        sqlite3 *db = self->db;
        self->db = NULL;
        Py_BEGIN_ALLOW_THREADS
        sqlite3_close_v2(db);
        Py_END_ALLOW_THREADS
    }
    connection_clear(self);
    Py_CLEAR(self->filename);
    Py_CLEAR(self->open_vfs);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyObject *
connection_cursor(Connection *self, PyObject *Py_UNUSED(ignored))
{
    GUARD_ALL(self);
    return (PyObject *)cursor_new(self);
}

static PyObject *
connection_execute(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "bindings", NULL};
    PyObject *statements, *bindings = Py_None;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:execute", kwlist,
                                     &statements, &bindings)) {
        return NULL;
    }
    Cursor *cursor = cursor_new(self);
    if (cursor == NULL) {
        return NULL;
    }
    if (cursor_execute(cursor, statements, bindings, NULL) < 0) {
        Py_DECREF(cursor);
        return NULL;
    }
    return (PyObject *)cursor;
}

static PyObject *
connection_executemany(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "sequenceofbindings", NULL};
    PyObject *statements, *seq;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:executemany", kwlist,
                                     &statements, &seq)) {
        return NULL;
    }
    Cursor *cursor = cursor_new(self);
    if (cursor == NULL) {
        return NULL;
    }
    if (cursor_execute(cursor, statements, NULL, seq) < 0) {
        Py_DECREF(cursor);
        return NULL;
    }
    return (PyObject *)cursor;
}

/* A str argument as UTF-8 with no NUL; what names the argument. */
static const char *
name_argument(PyObject *value, const char *what)
{
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(value, &size);
    if (utf8 != NULL && (size_t)size != strlen(utf8)) {
        PyErr_Format(PyExc_ValueError, "%s contains a NUL character", what);
        return NULL;
    }
    return utf8;
}

static PyObject *
connection_backup(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"databasename", "sourceconnection",
                             "sourcedatabasename", NULL};
    ModuleState *st = self->state;
    PyObject *dest_name, *source_name, *source_obj;

    /* The checks run in the order SPEC 3.1 gives. */
    GUARD(self, 0);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UOU:backup", kwlist,
                                     &dest_name, &source_obj, &source_name)) {
        return NULL;
    }
    if (name_argument(dest_name, "databasename") == NULL
        || name_argument(source_name, "sourcedatabasename") == NULL) {
        return NULL;
    }
    if (!PyObject_TypeCheck(source_obj, st->ConnectionType)) {
        PyErr_Format(PyExc_TypeError,
                     "sourceconnection must be an apsw_backup.Connection, "
                     "not %R",
                     (PyObject *)Py_TYPE(source_obj));
        return NULL;
    }
    Connection *source = (Connection *)source_obj;
    if (source->db == NULL) {
        PyErr_SetString(st->ConnectionClosedError,
                        "The source connection is closed");
        return NULL;
    }
    if (source == self) {
        PyErr_SetString(PyExc_ValueError,
                        "The source and destination of a backup must be "
                        "different connections; open the database again to "
                        "get a second connection");
        return NULL;
    }
    if (self->locked_by != NULL) {
        PyErr_SetString(st->DestinationLockedError,
                        "The destination connection already has an unfinished "
                        "Backup; finish it (backup.finish() or close()) "
                        "before starting another");
        return NULL;
    }
    /* The destination's lock was checked just above, with its own message. */
    if (connection_check(self, CHECK_OPEN) < 0
        || connection_check(source, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    return backup_create(self, dest_name, source, source_name);
}

static PyObject *
connection_set_busy_timeout(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"milliseconds", NULL};
    int ms;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:set_busy_timeout", kwlist,
                                     &ms)) {
        return NULL;
    }
    /* Converting "i" ran __index__, which may have closed or locked us. */
    GUARD_ALL(self);
    int rc = sqlite3_busy_timeout(self->db, ms);
    if (rc != SQLITE_OK) {
        return raise_db_error(self->state, self->db, rc);
    }
    /* SQLite replaced any busy handler we had installed. */
    Py_CLEAR(self->busy_handler);
    Py_RETURN_NONE;
}

/* Runs inside a SQLite call with the GIL released.  An exception from the
 * handler stays set and makes SQLite give up, so it comes out of the call
 * that was waiting instead of a BusyError. */
static int
busy_trampoline(void *context, int count)
{
    Connection *self = (Connection *)context;
    int retry = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *handler = self->busy_handler;
    if (handler != NULL && !PyErr_Occurred()) {
        Py_INCREF(handler);
        PyObject *result = PyObject_CallFunction(handler, "i", count);
        Py_DECREF(handler);
        if (result != NULL) {
            retry = PyObject_IsTrue(result);
            Py_DECREF(result);
            if (retry < 0) {
                retry = 0;
            }
        }
    }
    PyGILState_Release(gil);
    return retry;
}

static PyObject *
connection_set_busy_handler(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"callable", NULL};
    PyObject *callable;
    int rc;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:set_busy_handler", kwlist,
                                     &callable)) {
        return NULL;
    }
    if (callable != Py_None && !PyCallable_Check(callable)) {
        PyErr_Format(PyExc_TypeError,
                     "set_busy_handler() takes a callable or None, not %R",
                     (PyObject *)Py_TYPE(callable));
        return NULL;
    }
    if (callable == Py_None) {
        rc = sqlite3_busy_handler(self->db, NULL, NULL);
    }
    else {
        rc = sqlite3_busy_handler(self->db, busy_trampoline, self);
    }
    if (rc != SQLITE_OK) {
        return raise_db_error(self->state, self->db, rc);
    }
    Py_XINCREF(callable == Py_None ? NULL : callable);
    REPLACE_REF(self->busy_handler, callable == Py_None ? NULL : callable);
    Py_RETURN_NONE;
}

static PyObject *
connection_changes(Connection *self, PyObject *Py_UNUSED(ignored))
{
    GUARD_ALL(self);
    if (HAVE_CHANGES64) {
        return PyLong_FromLongLong(sqlite3_changes64(self->db));
    }
    return PyLong_FromLong(sqlite3_changes(self->db));
}

static PyObject *
connection_total_changes(Connection *self, PyObject *Py_UNUSED(ignored))
{
    GUARD_ALL(self);
    if (HAVE_CHANGES64) {
        return PyLong_FromLongLong(sqlite3_total_changes64(self->db));
    }
    return PyLong_FromLong(sqlite3_total_changes(self->db));
}

static PyObject *
connection_last_insert_rowid(Connection *self, PyObject *Py_UNUSED(ignored))
{
    GUARD_ALL(self);
    return PyLong_FromLongLong(sqlite3_last_insert_rowid(self->db));
}

static PyObject *
connection_get_autocommit(Connection *self, PyObject *Py_UNUSED(ignored))
{
    GUARD_ALL(self);
    return PyBool_FromLong(sqlite3_get_autocommit(self->db));
}

static PyObject *
connection_in_transaction(Connection *self, void *Py_UNUSED(closure))
{
    GUARD_ALL(self);
    return PyBool_FromLong(!sqlite3_get_autocommit(self->db));
}

static PyObject *
connection_db_names(Connection *self, PyObject *Py_UNUSED(ignored))
{
    GUARD_ALL(self);
    Cursor *cursor = cursor_new(self);
    if (cursor == NULL) {
        return NULL;
    }
    PyObject *names = NULL;
    PyObject *sql = PyUnicode_FromString("PRAGMA database_list");
    if (sql == NULL || cursor_execute(cursor, sql, Py_None, NULL) < 0) {
        goto done;
    }
    names = PyList_New(0);
    PyObject *row;
    while (names != NULL && (row = PyIter_Next((PyObject *)cursor)) != NULL) {
        PyObject *name = PyTuple_GetItem(row, 1);
        if (name == NULL || PyList_Append(names, name) < 0) {
            Py_CLEAR(names);
        }
        Py_DECREF(row);
    }
    if (PyErr_Occurred()) {
        Py_CLEAR(names);
    }
    /* The pragma omits temp until it is first used; SQLite always has it
     * at index 1, and it is a valid backup source or destination. */
    if (names != NULL) {
        PyObject *temp = PyUnicode_FromString("temp");
        int has = temp ? PySequence_Contains(names, temp) : -1;
        if (has < 0 || (has == 0 && PyList_Insert(names, 1, temp) < 0)) {
            Py_CLEAR(names);
        }
        Py_XDECREF(temp);
    }
done:
    Py_XDECREF(sql);
    cursor_close_internal(cursor);
    Py_DECREF(cursor);
    return names;
}

static PyObject *
raise_unknown_schema(Connection *self, PyObject *name)
{
    return raise_error_format(
        self->state, SQLITE_ERROR,
        "unknown database %R: db_names() lists the attached ones", name);
}

static PyObject *
connection_readonly(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", NULL};
    PyObject *name;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U:readonly", kwlist,
                                     &name)) {
        return NULL;
    }
    const char *cname = name_argument(name, "name");
    if (cname == NULL) {
        return NULL;
    }
    int res = sqlite3_db_readonly(self->db, cname);
    if (res < 0) {
        return raise_unknown_schema(self, name);
    }
    return PyBool_FromLong(res);
}

static PyObject *
connection_txn_state(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"schema", NULL};
    PyObject *schema = Py_None;
    const char *cschema = NULL;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:txn_state", kwlist,
                                     &schema)) {
        return NULL;
    }
    if (schema != Py_None) {
        if (!PyUnicode_Check(schema)) {
            PyErr_Format(PyExc_TypeError,
                         "schema must be a str or None, not %R",
                         (PyObject *)Py_TYPE(schema));
            return NULL;
        }
        cschema = name_argument(schema, "schema");
        if (cschema == NULL) {
            return NULL;
        }
    }
    int state = db_txn_state(self->db, cschema);
    if (state < 0) {
        return raise_unknown_schema(self, schema);
    }
    return PyLong_FromLong(state);
}

/* file_header(schema="main"): the first 100 bytes of the schema's file, read
 * through SQLite's own file handle (README: never a descriptor of ours). */
static PyObject *
connection_file_header(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"schema", NULL};
    PyObject *schema = NULL;
    const char *cschema = "main";
    unsigned char h[100];
    int length;

    GUARD_ALL(self);
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|U:file_header", kwlist,
                                     &schema)) {
        return NULL;
    }
    if (schema != NULL) {
        cschema = name_argument(schema, "schema");
        if (cschema == NULL) {
            return NULL;
        }
    }
    GUARD_ALL(self);
    call_enter(self, &self->inuse);
    Py_BEGIN_ALLOW_THREADS
    length = read_file_header(self->db, cschema, h, sizeof(h));
    Py_END_ALLOW_THREADS
    call_leave(&self->inuse);
    if (length < 0) {
        if (!db_has_schema(self->db, cschema)) {
            return raise_unknown_schema(self, schema);
        }
        length = 0; /* no file behind it (memory, temp not yet used) */
    }
    return PyBytes_FromStringAndSize((const char *)h, length);
}

static PyObject *
connection_interrupt(Connection *self, PyObject *Py_UNUSED(ignored))
{
    /* No in-use check: stopping a call running in another thread is the
     * point.  sqlite3_interrupt() is safe from any thread. */
    if (self->db == NULL) {
        PyErr_SetString(self->state->ConnectionClosedError,
                        "The connection is closed");
        return NULL;
    }
    if (FORKED(self)) {
        return raise_forked(self->state, "connection");
    }
    sqlite3_interrupt(self->db);
    Py_RETURN_NONE;
}

static PyObject *
connection_enter(Connection *self, PyObject *Py_UNUSED(ignored))
{
    char sql[96];
    GUARD_ALL(self);
    PyOS_snprintf(sql, sizeof(sql), "SAVEPOINT \"apsw_backup-%ld\"",
                  self->savepoint_level);
    if (connection_exec(self, sql) < 0) {
        return NULL;
    }
    self->savepoint_level++;
    return Py_NewRef(self);
}

static PyObject *
connection_exit(Connection *self, PyObject *args)
{
    PyObject *etype, *evalue, *etb;
    char release[96], rollback[128];

    if (!PyArg_ParseTuple(args, "OOO:__exit__", &etype, &evalue, &etb)) {
        return NULL;
    }
    GUARD_ALL(self);
    if (self->savepoint_level == 0) {
        PyErr_SetString(PyExc_RuntimeError,
                        "__exit__ called without a matching __enter__");
        return NULL;
    }
    long level = --self->savepoint_level;
    PyOS_snprintf(release, sizeof(release),
                  "RELEASE SAVEPOINT \"apsw_backup-%ld\"", level);
    PyOS_snprintf(rollback, sizeof(rollback),
                  "ROLLBACK TO SAVEPOINT \"apsw_backup-%ld\"; "
                  "RELEASE SAVEPOINT \"apsw_backup-%ld\"",
                  level, level);
    if (etype == Py_None) {
        if (connection_exec(self, release) == 0) {
            Py_RETURN_FALSE;
        }
        /* The release failed (e.g. a deferred constraint): roll back so
         * the transaction is not left open, and report the failure. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (connection_exec(self, rollback) < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    if (connection_exec(self, rollback) < 0) {
        /* The body's exception is the one the user needs to see. */
        PyErr_WriteUnraisable((PyObject *)self);
    }
    Py_RETURN_FALSE;
}

static PyObject *
connection_get_filename(Connection *self, void *Py_UNUSED(closure))
{
    if (self->filename == NULL) {
        return PyUnicode_FromString("");
    }
    return Py_NewRef(self->filename);
}

static PyObject *
connection_get_open_flags(Connection *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->open_flags);
}

static PyObject *
connection_get_open_vfs(Connection *self, void *Py_UNUSED(closure))
{
    if (self->open_vfs == NULL) {
        return PyUnicode_FromString("");
    }
    return Py_NewRef(self->open_vfs);
}

static PyMethodDef connection_methods[] = {
    {"cursor", (PyCFunction)connection_cursor, METH_NOARGS,
     "cursor() -> Cursor\n\nA new cursor on this connection."},
    {"execute", (PyCFunction)(void (*)(void))connection_execute,
     METH_VARARGS | METH_KEYWORDS,
     "execute(statements, bindings=None) -> Cursor\n\nRun the statements "
     "on a new cursor; rows are read by iterating it."},
    {"executemany", (PyCFunction)(void (*)(void))connection_executemany,
     METH_VARARGS | METH_KEYWORDS,
     "executemany(statements, sequenceofbindings) -> Cursor\n\nRun the "
     "statements once for each item of sequenceofbindings."},
    {"close", (PyCFunction)(void (*)(void))connection_close,
     METH_VARARGS | METH_KEYWORDS,
     "close(force=False) -> None\n\nClose the connection, its cursors and "
     "the backups it takes part in.  Calling it again does nothing.  A "
     "backup writing into this connection blocks close() unless force is "
     "true, which rolls the partial copy back.  A backup reading from it "
     "is finished first; if that fails and force is false the error is "
     "raised and the connection stays open."},
    {"backup", (PyCFunction)(void (*)(void))connection_backup,
     METH_VARARGS | METH_KEYWORDS,
     "backup(databasename, sourceconnection, sourcedatabasename) -> Backup"
     "\n\nStart copying sourcedatabasename of sourceconnection into "
     "databasename of this connection.  This connection is locked until the "
     "Backup is finished."},
    {"set_busy_timeout",
     (PyCFunction)(void (*)(void))connection_set_busy_timeout,
     METH_VARARGS | METH_KEYWORDS,
     "set_busy_timeout(milliseconds) -> None\n\nRetry for up to this long "
     "when the database is locked (replaces any busy handler)."},
    {"set_busy_handler",
     (PyCFunction)(void (*)(void))connection_set_busy_handler,
     METH_VARARGS | METH_KEYWORDS,
     "set_busy_handler(callable) -> None\n\ncallable(retries) is called "
     "when the database is locked; return true to retry.  None removes it."},
    {"changes", (PyCFunction)connection_changes, METH_NOARGS,
     "changes() -> int\n\nRows changed by the last INSERT/UPDATE/DELETE."},
    {"total_changes", (PyCFunction)connection_total_changes, METH_NOARGS,
     "total_changes() -> int\n\nRows changed since the connection opened."},
    {"last_insert_rowid", (PyCFunction)connection_last_insert_rowid,
     METH_NOARGS, "last_insert_rowid() -> int"},
    {"get_autocommit", (PyCFunction)connection_get_autocommit, METH_NOARGS,
     "get_autocommit() -> bool\n\nTrue when no transaction is open."},
    {"db_names", (PyCFunction)connection_db_names, METH_NOARGS,
     "db_names() -> list[str]\n\nThe schema names: main, temp, attached."},
    {"readonly", (PyCFunction)(void (*)(void))connection_readonly,
     METH_VARARGS | METH_KEYWORDS,
     "readonly(name) -> bool\n\nWhether schema name is read-only."},
    {"txn_state", (PyCFunction)(void (*)(void))connection_txn_state,
     METH_VARARGS | METH_KEYWORDS,
     "txn_state(schema=None) -> int\n\nSQLITE_TXN_NONE, SQLITE_TXN_READ or "
     "SQLITE_TXN_WRITE: the transaction open on schema (None: the highest "
     "over all schemas)."},
    {"file_header", (PyCFunction)(void (*)(void))connection_file_header,
     METH_VARARGS | METH_KEYWORDS,
     "file_header(schema=\"main\") -> bytes\n\nThe first 100 bytes of the "
     "schema's database file (fewer if it is shorter; b\"\" when no file "
     "backs it), read through SQLite's own file handle, so that no lock "
     "SQLite holds is ever dropped."},
    {"interrupt", (PyCFunction)connection_interrupt, METH_NOARGS,
     "interrupt() -> None\n\nMake the statement running on this connection "
     "(in any thread) stop with InterruptError."},
    {"__enter__", (PyCFunction)connection_enter, METH_NOARGS,
     "Start a transaction (a SAVEPOINT)."},
    {"__exit__", (PyCFunction)connection_exit, METH_VARARGS,
     "Release the SAVEPOINT, or roll it back if the block raised."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef connection_getset[] = {
    {"filename", (getter)connection_get_filename, NULL,
     "Full path of the main database as SQLite reports it (\"\" when in "
     "memory).",
     NULL},
    {"open_flags", (getter)connection_get_open_flags, NULL,
     "The flags passed when opening.", NULL},
    {"open_vfs", (getter)connection_get_open_vfs, NULL,
     "Name of the VFS used.", NULL},
    {"in_transaction", (getter)connection_in_transaction, NULL,
     "True while a transaction is open.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef connection_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Connection, weakreflist),
     READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot connection_slots[] = {
    {Py_tp_doc,
     "Connection(filename, flags=SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, "
     "vfs=None)\n\nA connection to an SQLite database."},
    {Py_tp_new, connection_new},
    {Py_tp_init, connection_init},
    {Py_tp_dealloc, connection_dealloc},
    {Py_tp_traverse, connection_traverse},
    {Py_tp_clear, connection_clear},
    {Py_tp_methods, connection_methods},
    {Py_tp_getset, connection_getset},
    {Py_tp_members, connection_members},
    {0, NULL},
};

PyType_Spec connection_spec = {
    .name = "apsw_backup.Connection",
    .basicsize = sizeof(Connection),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = connection_slots,
};
