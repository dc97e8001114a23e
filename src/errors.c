/* SQLite result code -> Python exception.
 *
 * Every SQLite failure in the extension is raised through one of the
 * raise_* helpers here, so the class, the message and the result /
 * extendedresult attributes are always filled in the same way.
 */
#include "apsw_backup.h"
#include <stdarg.h>
#include <string.h>

static const struct {
    int code;
    const char *name;
} code_classes[] = {
    {SQLITE_ERROR, "SQLError"},
    {SQLITE_INTERNAL, "InternalError"},
    {SQLITE_PERM, "PermissionsError"},
    {SQLITE_ABORT, "AbortError"},
    {SQLITE_BUSY, "BusyError"},
    {SQLITE_LOCKED, "LockedError"},
    {SQLITE_NOMEM, "NoMemError"},
    {SQLITE_READONLY, "ReadOnlyError"},
    {SQLITE_INTERRUPT, "InterruptError"},
    {SQLITE_IOERR, "IOError"},
    {SQLITE_CORRUPT, "CorruptError"},
    {SQLITE_NOTFOUND, "NotFoundError"},
    {SQLITE_FULL, "FullError"},
    {SQLITE_CANTOPEN, "CantOpenError"},
    {SQLITE_PROTOCOL, "ProtocolError"},
    {SQLITE_EMPTY, "EmptyError"},
    {SQLITE_SCHEMA, "SchemaChangeError"},
    {SQLITE_TOOBIG, "TooBigError"},
    {SQLITE_CONSTRAINT, "ConstraintError"},
    {SQLITE_MISMATCH, "MismatchError"},
    {SQLITE_MISUSE, "MisuseError"},
    {SQLITE_NOLFS, "NoLFSError"},
    {SQLITE_AUTH, "AuthError"},
    {SQLITE_FORMAT, "FormatError"},
    {SQLITE_RANGE, "RangeError"},
    {SQLITE_NOTADB, "NotADBError"},
};

static const struct {
    const char *name;
    const char *doc;
} library_errors[] = {
    {"ThreadingViolationError",
     "An object was used while it is busy in another thread, re-entrantly "
     "from a callback, or while an unfinished Backup locks it."},
    {"ConnectionClosedError",
     "The connection (or the backup) is closed or finished."},
    {"CursorClosedError", "The cursor is closed."},
    {"BindingsError",
     "The bindings do not match the parameters of the statement."},
    {"ForkingViolationError",
     "An object made before os.fork() was used in the child process: its "
     "SQLite state belongs to the parent. Open new connections in the "
     "child."},
};

/* ThreadingViolationError's three meanings, each its own subclass, so that
 * a caller can tell the one worth waiting for from the two that waiting
 * cannot clear. */
static const struct {
    const char *name;
    const char *doc;
} threading_errors[] = {
    {"InUseError",
     "Another thread is inside a call on this object (a step, a query): "
     "retry once that call has returned."},
    {"ReentrancyError",
     "A callback (a busy handler, a progress function, a destructor) called "
     "back into an object that the call it runs inside is still using: do "
     "it after that call returns."},
    {"DestinationLockedError",
     "The connection is the destination of an unfinished Backup: finish the "
     "backup (finish(), close() or the end of its with-block) first."},
};

static PyObject *
new_exception(PyObject *module, const char *name, PyObject *base,
              const char *doc)
{
    char qualname[128];
    PyOS_snprintf(qualname, sizeof(qualname), "apsw_backup.%s", name);
    PyObject *cls = PyErr_NewExceptionWithDoc(qualname, doc, base, NULL);
    if (cls == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, name, cls) < 0) {
        Py_DECREF(cls);
        return NULL;
    }
    return cls;
}

int
add_exceptions(PyObject *module, ModuleState *st)
{
    PyObject *dict = Py_BuildValue("{s:O,s:O}", "result", Py_None,
                                   "extendedresult", Py_None);
    if (dict == NULL) {
        return -1;
    }
    st->Error = PyErr_NewExceptionWithDoc(
        "apsw_backup.Error",
        "Base class of every apsw_backup error. SQLite failures carry the "
        "primary code in result and the extended code in extendedresult.",
        NULL, dict);
    Py_DECREF(dict);
    if (st->Error == NULL
        || PyModule_AddObjectRef(module, "Error", st->Error) < 0) {
        return -1;
    }
    PyObject **lib_slots[] = {&st->ThreadingViolationError,
                              &st->ConnectionClosedError,
                              &st->CursorClosedError, &st->BindingsError,
                              &st->ForkingViolationError};
    for (size_t i = 0; i < sizeof(library_errors) / sizeof(library_errors[0]);
         i++) {
        *lib_slots[i] = new_exception(module, library_errors[i].name,
                                      st->Error, library_errors[i].doc);
        if (*lib_slots[i] == NULL) {
            return -1;
        }
    }
    PyObject **threading_slots[] = {&st->InUseError, &st->ReentrancyError,
                                    &st->DestinationLockedError};
    for (size_t i = 0;
         i < sizeof(threading_errors) / sizeof(threading_errors[0]); i++) {
        *threading_slots[i] = new_exception(module, threading_errors[i].name,
                                            st->ThreadingViolationError,
                                            threading_errors[i].doc);
        if (*threading_slots[i] == NULL) {
            return -1;
        }
    }
    for (size_t i = 0; i < sizeof(code_classes) / sizeof(code_classes[0]);
         i++) {
        int code = code_classes[i].code;
        PyObject *base = st->Error;
        PyObject *bases = NULL;
        if (code == SQLITE_NOMEM) {
            /* So `except MemoryError` also catches SQLite running out. */
            bases = PyTuple_Pack(2, st->Error, PyExc_MemoryError);
            if (bases == NULL) {
                return -1;
            }
            base = bases;
        }
        st->code_errors[code] = new_exception(
            module, code_classes[i].name, base, "SQLite result code error.");
        Py_XDECREF(bases);
        if (st->code_errors[code] == NULL) {
            return -1;
        }
    }
    return 0;
}

/* Raise the class mapped from rc, with message msg (a str). */
PyObject *
raise_error_object(ModuleState *st, int rc, PyObject *msg)
{
    if (PyErr_Occurred()) {
        /* A callback raised inside the SQLite call: that exception is the
         * one the user needs, not SQLite's consequence of it. */
        return NULL;
    }
    HOOK_VOID("raise_error");
    int primary = rc & 0xff;
    PyObject *cls = (primary > 0 && primary < N_CODE_ERRORS)
                        ? st->code_errors[primary]
                        : st->Error;
    PyObject *exc = PyObject_CallFunctionObjArgs(cls, msg, NULL);
    if (exc == NULL) {
        return NULL;
    }
    PyObject *result = PyLong_FromLong(primary);
    PyObject *extended = PyLong_FromLong(rc);
    if (result == NULL || extended == NULL
        || PyObject_SetAttrString(exc, "result", result) < 0
        || PyObject_SetAttrString(exc, "extendedresult", extended) < 0) {
        Py_XDECREF(result);
        Py_XDECREF(extended);
        Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(result);
    Py_DECREF(extended);
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

/* raise_error_object with a PyUnicode_FromFormat message. */
PyObject *
raise_error_format(ModuleState *st, int rc, const char *format, ...)
{
    va_list vargs;
    va_start(vargs, format);
    PyObject *msg = PyUnicode_FromFormatV(format, vargs);
    va_end(vargs);
    if (msg != NULL) {
        raise_error_object(st, rc, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

PyObject *
raise_sqlite_error(ModuleState *st, int rc, const char *msg)
{
    if (msg == NULL) {
        msg = sqlite3_errstr(rc);
    }
    PyObject *text =
        PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
    if (text == NULL) {
        return NULL;
    }
    raise_error_object(st, rc, text);
    Py_DECREF(text);
    return NULL;
}

void
capture_db_error(sqlite3 *db, int rc, DbError *e)
{
    if (db != NULL && (rc & 0xff) == rc
        && (sqlite3_extended_errcode(db) & 0xff) == rc) {
        rc = sqlite3_extended_errcode(db);
    }
    e->rc = rc;
    e->sys_errno = db ? sqlite3_system_errno(db) : 0;
    const char *msg = db ? sqlite3_errmsg(db) : NULL;
    PyOS_snprintf(e->msg, sizeof(e->msg), "%s",
                  msg != NULL ? msg : sqlite3_errstr(rc));
}

PyObject *
raise_captured(ModuleState *st, const DbError *e)
{
    int primary = e->rc & 0xff;
    /* SQLite's "disk I/O error" and "unable to open database file" do not
     * say why; the OS error it kept for this failure does. */
    if (e->sys_errno != 0
        && (primary == SQLITE_IOERR || primary == SQLITE_CANTOPEN)
        && strstr(e->msg, "OS error") == NULL) {
        char text[700];
        PyOS_snprintf(text, sizeof(text), "%s (OS error: %s)", e->msg,
                      strerror(e->sys_errno));
        return raise_sqlite_error(st, e->rc, text);
    }
    return raise_sqlite_error(st, e->rc, e->msg);
}

/* The failure rc just returned by a call on db; the message is db's own.
 * Callers hold db's lock, so nothing else can have replaced the message. */
PyObject *
raise_db_error(ModuleState *st, sqlite3 *db, int rc)
{
    DbError e;
    capture_db_error(db, rc, &e);
    return raise_captured(st, &e);
}
