/* Connection: an SQLite database handle, the subset needed to make, use and
 * verify a backup.
 *
 * Every method follows src/README.md: (i) turn the arguments into C values
 * (user code may run); (ii) take the lock (locks.c), check the state, act,
 * let go; (iii) build the result or the exception.  A busy lock is refused
 * (InUseError or ReentrancyError); only close() waits.  `locking` is the
 * destination lock: SQLite does not protect a backup's destination, so
 * every use of it is refused until the Backup is finished.
 */
#include "apsw_backup.h"
#include <structmember.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_FLAGS (SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)

/* A str argument as an exact str (a subclass's __repr__/__str__ is never
 * called on it later) with no NUL; what names the argument. */
PyObject *
name_as_str(PyObject *value, const char *what)
{
    if (HOOK("name_as_str") < 0) {
        return NULL;
    }
    PyObject *exact = PyUnicode_FromObject(value);
    if (exact == NULL) {
        return NULL;
    }
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(exact, &size);
    if (utf8 == NULL) {
        Py_DECREF(exact);
        return NULL;
    }
    if ((size_t)size != strlen(utf8)) {
        Py_DECREF(exact);
        PyErr_Format(PyExc_ValueError, "%s contains a NUL character", what);
        return NULL;
    }
    return exact;
}

static PyObject *
raise_locked(ModuleState *st, const char *names)
{
    PyErr_Format(st->DestinationLockedError,
                 "This connection is the destination of an unfinished "
                 "Backup (%s); it cannot be used until the backup is "
                 "finished: call backup.finish() or backup.close(), or leave "
                 "its with-block (close(force=True) on this connection "
                 "finishes the backup, rolling the partial copy back, and "
                 "closes it)",
                 names ? names : "");
    return NULL;
}

int
connection_usable(Connection *self, int what)
{
    if (self->db == NULL) {
        PyErr_SetString(self->state->ConnectionClosedError,
                        "The connection is closed");
        return -1;
    }
    if ((what & CHECK_UNLOCKED) && self->locking != NULL) {
        raise_locked(self->state, self->locking->names);
        return -1;
    }
    return 0;
}

/* Closed (or inherited through fork) is said before anything else, even a
 * wrong argument: a benign look before the arguments are converted; the
 * lock's holder checks again. */
static int
precheck(Connection *self)
{
    if (self->db == NULL) {
        PyErr_SetString(self->state->ConnectionClosedError,
                        "The connection is closed");
        return -1;
    }
    if (FORKED(self)) {
        raise_forked(self->state, "connection");
        return -1;
    }
    return 0;
}

/* Take the lock and check: 0, or -1 with the error (lock not held). */
int
conn_enter(Connection *self, int what)
{
    if (self->db == NULL) {
        PyErr_SetString(self->state->ConnectionClosedError,
                        "The connection is closed");
        return -1;
    }
    if (FORKED(self)) {
        raise_forked(self->state, "connection");
        return -1;
    }
    if ((what & CHECK_UNLOCKED) && self->locking != NULL) {
        /* Said at once, not as "in use" while the backup steps; checked
         * again below, under the lock. */
        return raise_locked(self->state, self->locking->names), -1;
    }
    if (lock_try(self, "connection") < 0) {
        return -1;
    }
    if (connection_usable(self, what) < 0) {
        BackupCore *done = NULL;
        unlock(self, &done);
        drop_done(done);
        return -1;
    }
    return 0;
}

void
conn_leave(Connection *self)
{
    BackupCore *done = NULL;
    unlock(self, &done);
    drop_done(done);
}

/* Run SQL with no results and no bindings (savepoints), lock held.  A
 * busy handler may run Python: a fork or its exception is reported. */
static int
exec_locked(Connection *self, const char *sql, DbError *error)
{
    int rc;
    RELEASE_GIL("exec_locked");
    rc = sqlite3_exec(self->db, sql, NULL, NULL, NULL);
    /* A busy handler may have forked: then this is the child, and every
     * SQLite call would wait for ever on a mutex the parent's thread held
     * (its owner is another thread id here) -- and change the parent's
     * state.  So nothing of SQLite after a fork. */
    if (rc != SQLITE_OK && !FORKED(self)) {
        capture_db_error(self->db, rc, error);
    }
    REACQUIRE_GIL();
    if (rc == SQLITE_OK && PyErr_Occurred()) {
        return -1; /* a busy handler raised, though SQLite got on */
    }
    return rc == SQLITE_OK ? 0 : -1;
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
    self->fork_generation = fork_generation;
    if (pthread_mutex_init(&self->mutex, NULL) != 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
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
raise_already_open(ModuleState *st)
{
    PyErr_SetString(st->Error, "The connection is already open; make a new "
                               "Connection to open another database");
    return -1;
}

/* Open db (lock held): the handle, or NULL with the error captured. */
_Thread_local int attach_refused;

/* The authorizer of a connection that reads URI filenames: an ATTACH may
 * join a shared cache (cache=shared), so the connection may share from
 * then on (lock held: the ATTACH is prepared by one of its calls). */
static int
note_attach(void *context, int action, const char *a, const char *b,
            const char *c, const char *d)
{
    (void)a, (void)b, (void)c, (void)d;
    if (action != SQLITE_ATTACH) {
        return SQLITE_OK;
    }
    if (in_busy_handler > 0) {
        /* It could join the cache whose mutex this thread holds now. */
        attach_refused = 1;
        return SQLITE_DENY;
    }
    ((Connection *)context)->may_share = 1;
    return SQLITE_OK;
}

static sqlite3 *
open_locked(Connection *self, const char *name, int flags, const char *vfs,
            DbError *error)
{
    sqlite3 *db = NULL;
    struct stat main_stat;
    int rc, known = 0;
    RELEASE_GIL("open_locked");
    if (!(flags & SQLITE_OPEN_SHAREDCACHE)) {
        flags |= SQLITE_OPEN_PRIVATECACHE; /* a URI's cache=shared wins */
    }
    rc = sqlite3_open_v2(name, &db, flags | SQLITE_OPEN_FULLMUTEX, vfs);
    if (rc == SQLITE_OK) {
        sqlite3_extended_result_codes(db, 1);
        if (self->uri && !self->may_share) {
            sqlite3_set_authorizer(db, note_attach, self);
        }
        const char *fn = sqlite3_db_filename(db, "main");
        known = fn != NULL && fn[0] && stat(fn, &main_stat) == 0;
    }
    else if (db != NULL) {
        capture_db_error(db, rc, error);
        sqlite3_close(db);
        db = NULL;
    }
    else {
        capture_db_error(NULL, SQLITE_NOMEM, error);
    }
    REACQUIRE_GIL();
    if (db != NULL) {
        self->main_known = known;
        self->main_dev = known ? (unsigned long long)main_stat.st_dev : 0;
        self->main_ino = known ? (unsigned long long)main_stat.st_ino : 0;
    }
    return db;
}

static int
connection_init(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"filename", "flags", "vfs", NULL};
    ModuleState *st = self->state;
    PyObject *filename;
    int flags = DEFAULT_FLAGS;
    const char *vfs = NULL;
    DbError error;

    /* (i) arguments */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|iz:Connection", kwlist,
                                     &filename, &flags, &vfs)) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_SetString(PyExc_OverflowError,
                            "flags is out of range: it must fit a C int "
                            "(combine the SQLITE_OPEN_* constants)");
        }
        return -1;
    }
    if (FORKED(self)) {
        PyErr_SetString(st->ForkingViolationError,
                        "This Connection was made before os.fork() and "
                        "belongs to the parent process: it cannot be opened "
                        "again in the child. Make a new Connection");
        return -1;
    }
    if (flags & SQLITE_OPEN_NOMUTEX) {
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
    if (HOOK("connection_init_args") < 0) {
        return -1;
    }
    /* The vfs name's UTF-8 belongs to the argument tuple; copy it. */
    char *vfs_copy = vfs ? sqlite3_mprintf("%s", vfs) : NULL;
    if (vfs != NULL && vfs_copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *name = filename_bytes(filename);
    if (name == NULL) {
        sqlite3_free(vfs_copy);
        return -1;
    }
    if (self->db != NULL) {
        Py_DECREF(name);
        sqlite3_free(vfs_copy);
        return raise_already_open(st);
    }
    /* A shared cache: asked for, or through a URI filename (ATTACH's are
     * noted as they come: note_attach).  Otherwise the cache is private,
     * whatever the process-wide sqlite3_enable_shared_cache() says. */
    int uri = (flags & SQLITE_OPEN_URI) || uri_by_default;
    const char *cname = PyBytes_AsString(name);
    int may_share = (flags & SQLITE_OPEN_SHAREDCACHE)
                    || (uri && strncmp(cname, "file:", 5) == 0);
    /* (ii) open, under our lock */
    if (lock_try(self, "connection") < 0) {
        Py_DECREF(name);
        sqlite3_free(vfs_copy);
        return -1;
    }
    int already = self->db != NULL;
    sqlite3 *db = NULL;
    if (!already && may_share && in_busy_handler > 0) {
        self->owner = 0; /* as lock_try_quiet: nothing to settle */
        locks_held--;
        pthread_mutex_unlock(&self->mutex);
        Py_DECREF(name);
        sqlite3_free(vfs_copy);
        return shared_cache_error(self, "new connection");
    }
    if (!already) {
        self->may_share = may_share;
        self->uri = uri;
        db =
            open_locked(self, PyBytes_AsString(name), flags, vfs_copy, &error);
        if (db != NULL) {
            self->db = db;
            self->open_flags = flags;
            self->savepoint_level = 0;
        }
    }
    const char *fn = db ? sqlite3_db_filename(db, "main") : NULL;
    char *fn_copy = fn ? sqlite3_mprintf("%s", fn) : NULL;
    sqlite3_vfs *v = db ? sqlite3_vfs_find(vfs_copy) : NULL;
    conn_leave(self);
    /* (iii) the attributes, or the error */
    HOOK_VOID("connection_init_decref");
    Py_DECREF(name);
    if (already) {
        sqlite3_free(vfs_copy);
        return raise_already_open(st);
    }
    if (db == NULL) {
        sqlite3_free(vfs_copy);
        raise_captured(st, &error);
        return -1;
    }
    if (HOOK("connection_init_attributes") < 0) {
        sqlite3_free(vfs_copy);
        sqlite3_free(fn_copy);
        return -1;
    }
    PyObject *fname = PyUnicode_DecodeFSDefault(fn_copy ? fn_copy : "");
    PyObject *vname =
        PyUnicode_FromString(v ? v->zName : (vfs_copy ? vfs_copy : ""));
    sqlite3_free(vfs_copy);
    sqlite3_free(fn_copy);
    if (fname == NULL || vname == NULL) {
        Py_XDECREF(fname);
        Py_XDECREF(vname);
        return -1; /* open, with an empty filename: close() still works */
    }
    REPLACE_REF(self->filename, fname);
    REPLACE_REF(self->open_vfs, vname);
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

/* In a forked child: let go of everything the parent's handle had, without
 * calling SQLite or taking a lock (both belong to the parent). */
static void
forget_forked(Connection *self, BackupCore **done)
{
    if (self->locking != NULL) {
        core_forget(self->locking, done);
    }
    while (self->sources != NULL) {
        core_forget(self->sources, done);
    }
    cursors_close_all(self, 1);
    while (self->orphans != NULL) {
        Orphan *o = self->orphans;
        self->orphans = o->next;
        PyMem_Free(o);
    }
    self->db = NULL;
}

/* Finalize every statement left (cursors, orphans, and any other) and
 * close the handle; lock held.  -1 with the error captured (force: never). */
static int
close_handle(Connection *self, int force, DbError *error)
{
    int rc;
    cursors_close_all(self, 0);
    /* unlock() would finalize the orphans, but the handle goes first. */
    while (self->orphans != NULL) {
        Orphan *o = self->orphans;
        self->orphans = o->next;
        sqlite3_stmt *stmt = o->stmt;
        PyMem_Free(o);
        RELEASE_GIL("close_finalize_orphan");
        sqlite3_finalize(stmt);
        REACQUIRE_GIL();
    }
    /* Taken out first: interrupt() from another thread (allowed without
     * the lock) must never reach a handle being freed. */
    sqlite3 *db = self->db;
    self->db = NULL;
    RELEASE_GIL("close_handle");
    /* Nothing of ours holds a statement now; any other (none should be
     * left) would make sqlite3_close() fail. */
    sqlite3_stmt *stmt;
    while ((stmt = sqlite3_next_stmt(db, NULL)) != NULL) {
        sqlite3_finalize(stmt);
    }
    rc = sqlite3_close(db);
    if (rc != SQLITE_OK) {
        capture_db_error(db, rc, error);
        if (force) {
            sqlite3_close_v2(db);
        }
    }
    REACQUIRE_GIL();
    if (rc != SQLITE_OK && !force) {
        self->db = db; /* still open */
        return -1;
    }
    self->savepoint_level = 0;
    return 0;
}

/* The other connection close() must hold to finish the next backup of
 * ours, and that backup (NULL: none left).  Force finishes the one
 * writing into us too. */
static BackupCore *
next_backup(Connection *self, int force, Connection **other)
{
    if (force && self->locking != NULL) {
        *other = self->locking->source;
        return self->locking;
    }
    if (self->sources != NULL) {
        *other = self->sources->dest;
        return self->sources;
    }
    *other = NULL;
    return NULL;
}

static PyObject *
connection_close(Connection *self, PyObject *args, PyObject *kwds)
{
    int force;
    DbError error;
    int failed = 0, finish_rc = SQLITE_OK;
    char *finish_names = NULL;

    /* (i) */
    if (parse_force(args, kwds, &force) < 0) {
        return NULL;
    }
    if (self->db == NULL) {
        Py_RETURN_NONE;
    }
    if (FORKED(self)) {
        if (!force) {
            return raise_forked(self->state, "connection");
        }
        BackupCore *done = NULL;
        forget_forked(self, &done);
        drop_done(done);
        Py_RETURN_NONE;
    }
    if (!force && self->locking != NULL) {
        return raise_locked(self->state, self->locking->names);
    }
    /* A call another thread is making on this connection is refused, as
     * for every method; only the other connection of a backup is waited
     * for, below, as finish() waits. */
    if (lock_try(self, "connection") < 0) {
        return NULL;
    }
    conn_leave(self);
    /* (ii) one backup at a time, each with both its locks, waited for;
     * then the handle.  The state is read afresh after every wait. */
    for (;;) {
        Connection *other = NULL;
        BackupCore *core = next_backup(self, force, &other);
        Py_INCREF(self);
        Py_XINCREF(other);
        if (lock_wait(self, other, "connection") < 0) {
            Py_DECREF(self);
            Py_XDECREF(other);
            sqlite3_free(finish_names);
            return NULL;
        }
        BackupCore *done = NULL;
        Connection *now_other = NULL;
        BackupCore *now = next_backup(self, force, &now_other);
        int closed = self->db == NULL;
        if (!closed && !force && self->locking != NULL) {
            const char *names = self->locking->names;
            char *copy = sqlite3_mprintf("%s", names ? names : "");
            unlock(self, &done);
            if (other != NULL) {
                unlock(other, &done);
            }
            drop_done(done);
            Py_DECREF(self);
            Py_XDECREF(other);
            sqlite3_free(finish_names);
            raise_locked(self->state, copy);
            sqlite3_free(copy);
            return NULL;
        }
        int progress = 0;
        if (!closed && now != NULL && now == core && now_other == other) {
            int from_dest = now == self->locking;
            core_finish(now, &done);
            int rc = now->finish_rc;
            if (!from_dest && rc != SQLITE_OK && rc != SQLITE_DONE
                && finish_rc == SQLITE_OK) {
                finish_rc = rc; /* the first failure, reported below */
                finish_names = sqlite3_mprintf("%s", now->names);
            }
            progress = 1;
        }
        else if (!closed && now == NULL && other == NULL) {
            if (finish_rc != SQLITE_OK && !force) {
                /* The backups are finished; the source stays open. */
            }
            else if (close_handle(self, force, &error) < 0) {
                failed = 1;
            }
            closed = 1;
        }
        unlock(self, &done);
        if (other != NULL) {
            unlock(other, &done);
        }
        drop_done(done);
        Py_DECREF(self);
        Py_XDECREF(other);
        if (closed) {
            break;
        }
        (void)progress; /* else the backups changed meanwhile: look again */
    }
    /* (iii) */
    if (failed) {
        sqlite3_free(finish_names);
        return raise_captured(self->state, &error);
    }
    if (finish_rc != SQLITE_OK && !force) {
        raise_error_format(self->state, finish_rc,
                           "finishing the backup %s failed: %s; the "
                           "destination was rolled back, and this connection "
                           "was left open",
                           finish_names ? finish_names : "",
                           sqlite3_errstr(finish_rc));
        sqlite3_free(finish_names);
        return NULL;
    }
    sqlite3_free(finish_names);
    if (self->db == NULL) {
        HOOK_VOID("connection_close_decref");
        Py_CLEAR(self->busy_handler);
    }
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

/* The end of a dealloc: the handle closed (unless inherited through
 * fork(): the handle and the mutex are then the parent's, left alone), the
 * memory freed.  Called by the dealloc, or once this thread's call has
 * returned when the dealloc ran inside a busy handler (locks.c). */
void
connection_close_dead(Connection *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    int forked = FORKED(self);
    while (self->orphans != NULL) {
        Orphan *o = self->orphans;
        self->orphans = o->next;
        if (!forked && self->db != NULL) {
            sqlite3_finalize(o->stmt);
        }
        PyMem_Free(o);
    }
    if (self->db != NULL && !forked) {
        sqlite3 *db = self->db;
        self->db = NULL;
        RELEASE_GIL("connection_dealloc");
        sqlite3_close_v2(db);
        REACQUIRE_GIL();
    }
    if (!forked) {
        pthread_mutex_destroy(&self->mutex);
    }
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static void
connection_dealloc(Connection *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    /* Nobody can reach us: cursors, backups and whoever holds our lock
     * hold a reference. */
    connection_clear(self);
    Py_CLEAR(self->filename);
    Py_CLEAR(self->open_vfs);
    if (in_busy_handler > 0 && self->may_share && !FORKED(self)
        && (self->db != NULL || self->orphans != NULL)) {
        /* SQLite is in the middle of a call on this thread: closing now
         * could wait for ever on a mutex it holds (a shared cache's). */
        close_later(self);
        return;
    }
    connection_close_dead(self);
}

static PyObject *
connection_cursor(Connection *self, PyObject *Py_UNUSED(ignored))
{
    /* Checked first; a cursor made while the connection is then closed by
     * a destructor (the allocation may run one) finds it closed. */
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    conn_leave(self);
    if (HOOK("connection_cursor_alloc") < 0) {
        return NULL;
    }
    return (PyObject *)cursor_alloc(self);
}

static PyObject *
execute_on_new_cursor(Connection *self, PyObject *statements,
                      PyObject *bindings, PyObject *many)
{
    if (HOOK("connection_execute_alloc") < 0) {
        return NULL;
    }
    Cursor *cursor = cursor_alloc(self);
    if (cursor == NULL) {
        return NULL;
    }
    if (cursor_execute(cursor, statements, bindings, many) < 0) {
        Py_DECREF(cursor);
        if (self->db == NULL
            && PyErr_ExceptionMatches(self->state->CursorClosedError)) {
            /* Code run while converting the bindings closed us: the cursor
             * is this call's own; the user knows the connection. */
            PyErr_Clear();
            precheck(self);
        }
        return NULL;
    }
    return (PyObject *)cursor;
}

static PyObject *
connection_execute(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "bindings", NULL};
    PyObject *statements, *bindings = Py_None;

    if (precheck(self) < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:execute", kwlist,
                                     &statements, &bindings)) {
        return NULL;
    }
    return execute_on_new_cursor(self, statements, bindings, NULL);
}

static PyObject *
connection_executemany(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"statements", "sequenceofbindings", NULL};
    PyObject *statements, *seq;

    if (precheck(self) < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:executemany", kwlist,
                                     &statements, &seq)) {
        return NULL;
    }
    return execute_on_new_cursor(self, statements, NULL, seq);
}

static PyObject *
connection_backup(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"databasename", "sourceconnection",
                             "sourcedatabasename", NULL};
    ModuleState *st = self->state;
    PyObject *dest_name, *source_name, *source_obj;

    /* The order of the checks (docs/api.md#backup): destination closed,
     * argument types, source closed, the same connection, then the locks
     * and SQLite's own refusals. */
    if (self->db == NULL) {
        PyErr_SetString(st->ConnectionClosedError, "The connection is closed");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "UOU:backup", kwlist,
                                     &dest_name, &source_obj, &source_name)) {
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
    if (source == self) {
        PyErr_SetString(PyExc_ValueError,
                        "The source and destination of a backup must be "
                        "different connections; open the database again to "
                        "get a second connection");
        return NULL;
    }
    return backup_create(self, dest_name, source, source_name);
}

static PyObject *
connection_set_busy_timeout(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"milliseconds", NULL};
    int ms;

    if (precheck(self) < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:set_busy_timeout", kwlist,
                                     &ms)) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_SetString(PyExc_OverflowError,
                            "milliseconds is out of range: it must fit a C "
                            "int (0 or a negative value turns the busy "
                            "timeout off)");
        }
        return NULL;
    }
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    sqlite3_busy_timeout(self->db, ms); /* cannot fail on an open handle */
    /* SQLite replaced any busy handler we had installed. */
    PyObject *old = self->busy_handler;
    self->busy_handler = NULL;
    conn_leave(self);
    HOOK_VOID("set_busy_timeout_decref");
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* A process forked inside a busy handler, and its handler has returned:
 * this is the child, in the middle of the parent's SQLite call.  Any way
 * back to Python goes through SQLite, which would carry on or undo the
 * parent's call on the parent's files (a rollback deletes the parent's
 * journal, may write pages back).  So the child ends here, after flushing
 * Python's standard streams and saying why on stderr: status 0 when the
 * handler returned, n for sys.exit(n), 1 for any other exception (printed).
 * GIL held. */
static void
child_stops_in_the_parents_call(void)
{
    /* The handler's way out says the child's status: sys.exit(n) is n (a
     * message: printed, 1), any other exception is printed and 1. */
    int status = 0;
    if (PyErr_Occurred()) {
        status = 1;
        if (PyErr_ExceptionMatches(PyExc_SystemExit)) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            PyObject *code =
                ev ? PyObject_GetAttrString(ev, "code") : Py_NewRef(Py_None);
            if (code == NULL || code == Py_None) {
                status = 0;
            }
            else if (PyLong_Check(code)) {
                status = (int)PyLong_AsLong(code) & 0xff;
            }
            else {
                /* as the interpreter prints sys.exit("message") */
                PyObject *text = PyObject_Str(code);
                const char *utf8 =
                    text ? PyUnicode_AsUTF8AndSize(text, NULL) : NULL;
                if (utf8 != NULL) {
                    fputs(utf8, stderr);
                    fputc('\n', stderr);
                }
                Py_XDECREF(text);
            }
            PyErr_Clear();
            Py_XDECREF(code);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
        }
        else {
            PyErr_Print();
        }
    }
    static const char *names[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *stream = PySys_GetObject(names[i]); /* borrowed */
        if (stream != NULL && stream != Py_None) {
            PyObject *r = PyObject_CallMethod(stream, "flush", NULL);
            Py_XDECREF(r);
        }
        PyErr_Clear();
    }
    static const char msg[] =
        "apsw_backup: this process was forked inside a busy handler and "
        "returned from it into the parent's SQLite call; it ends here "
        "(going on would change the parent's database). End the child "
        "inside the handler (os._exit) or fork outside it.\n";
    fflush(stderr);
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(status);
}

/* Runs inside a SQLite call on the connection, GIL released, our lock held
 * by the thread SQLite runs in.  An exception from the handler stays set
 * and makes SQLite give up, so it comes out of the waiting call instead of
 * a BusyError.  In a forked child it answers "stop" without running
 * Python: the call it would retry is the parent's. */
static int
busy_trampoline(void *context, int count)
{
    Connection *self = (Connection *)context;
    int retry = 0;
    if (FORKED(self)) {
        return 0;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int outer = in_busy_handler;
    unsigned long generation = fork_generation;
    in_busy_handler = outer + 1;
    PyObject *handler = self->busy_handler;
    if (handler != NULL && !PyErr_Occurred()) {
        HOOK_VOID("busy_handler_call");
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
    if (fork_generation != generation) {
        child_stops_in_the_parents_call(); /* does not return */
    }
    in_busy_handler = outer;
    PyGILState_Release(gil);
    return retry;
}

static PyObject *
connection_set_busy_handler(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"callable", NULL};
    PyObject *callable;

    if (precheck(self) < 0) {
        return NULL;
    }
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
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    if (callable == Py_None) {
        sqlite3_busy_handler(self->db, NULL, NULL);
    }
    else {
        sqlite3_busy_handler(self->db, busy_trampoline, self);
    }
    PyObject *old = self->busy_handler;
    self->busy_handler = callable == Py_None ? NULL : Py_NewRef(callable);
    conn_leave(self);
    HOOK_VOID("set_busy_handler_decref");
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

enum { READ_CHANGES, READ_TOTAL_CHANGES, READ_ROWID, READ_AUTOCOMMIT };

/* The small readers: one number from the handle, under the lock. */
static PyObject *
read_number(Connection *self, int which)
{
    long long value = 0;
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    switch (which) {
    case READ_CHANGES:
        value = HAVE_CHANGES64 ? sqlite3_changes64(self->db)
                               : sqlite3_changes(self->db);
        break;
    case READ_TOTAL_CHANGES:
        value = HAVE_CHANGES64 ? sqlite3_total_changes64(self->db)
                               : sqlite3_total_changes(self->db);
        break;
    case READ_ROWID:
        value = sqlite3_last_insert_rowid(self->db);
        break;
    default:
        value = sqlite3_get_autocommit(self->db);
    }
    conn_leave(self);
    if (which == READ_AUTOCOMMIT) {
        return PyBool_FromLong((long)value);
    }
    return PyLong_FromLongLong(value);
}

static PyObject *
connection_changes(Connection *self, PyObject *Py_UNUSED(ignored))
{
    return read_number(self, READ_CHANGES);
}

static PyObject *
connection_total_changes(Connection *self, PyObject *Py_UNUSED(ignored))
{
    return read_number(self, READ_TOTAL_CHANGES);
}

static PyObject *
connection_last_insert_rowid(Connection *self, PyObject *Py_UNUSED(ignored))
{
    return read_number(self, READ_ROWID);
}

static PyObject *
connection_get_autocommit(Connection *self, PyObject *Py_UNUSED(ignored))
{
    return read_number(self, READ_AUTOCOMMIT);
}

static PyObject *
connection_in_transaction(Connection *self, void *Py_UNUSED(closure))
{
    PyObject *autocommit = read_number(self, READ_AUTOCOMMIT);
    if (autocommit == NULL) {
        return NULL;
    }
    int value = autocommit == Py_True;
    Py_DECREF(autocommit);
    return PyBool_FromLong(!value);
}

/* The schema names, NUL-separated, into a sqlite3_str (lock held).  Without
 * SQL from SQLite 3.39 (sqlite3_db_name); PRAGMA database_list before. */
static int
collect_names(sqlite3 *db, sqlite3_str *out, DbError *error)
{
    if (HAVE_DB_NAME) {
        for (int i = 0; sqlite3_db_name(db, i) != NULL; i++) {
            sqlite3_str_appendall(out, sqlite3_db_name(db, i));
            sqlite3_str_appendchar(out, 1, '\0');
        }
        return 0;
    }
    sqlite3_stmt *stmt = NULL;
    int rc = sqlite3_prepare_v2(db, "PRAGMA database_list", -1, &stmt, NULL);
    while (rc == SQLITE_OK && (rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(stmt, 1);
        sqlite3_str_appendall(out, name ? name : "");
        sqlite3_str_appendchar(out, 1, '\0');
        rc = SQLITE_OK;
    }
    if (rc != SQLITE_DONE) {
        capture_db_error(db, rc, error);
    }
    sqlite3_finalize(stmt);
    return rc == SQLITE_DONE ? 0 : -1;
}

static PyObject *
connection_db_names(Connection *self, PyObject *Py_UNUSED(ignored))
{
    DbError error;
    int res;
    sqlite3_str *out = NULL;
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    RELEASE_GIL("connection_db_names");
    out = sqlite3_str_new(self->db);
    res = collect_names(self->db, out, &error);
    REACQUIRE_GIL();
    int length = sqlite3_str_length(out);
    char *text = sqlite3_str_finish(out);
    conn_leave(self);
    if (res < 0) {
        sqlite3_free(text);
        return raise_captured(self->state, &error);
    }
    if (text == NULL && length > 0) {
        return PyErr_NoMemory();
    }
    PyObject *names = HOOK("db_names_alloc") < 0 ? NULL : PyList_New(0);
    int has_temp = 0;
    for (int at = 0; names != NULL && at < length;) {
        const char *name = text + at;
        PyObject *item =
            PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "replace");
        if (item == NULL || PyList_Append(names, item) < 0) {
            Py_CLEAR(names);
        }
        Py_XDECREF(item);
        has_temp |= strcmp(name, "temp") == 0;
        at += (int)strlen(name) + 1;
    }
    sqlite3_free(text);
    /* The pragma omits temp until it is first used; SQLite always has it
     * at index 1, and it is a valid backup source or destination. */
    if (names != NULL && !has_temp) {
        PyObject *temp = PyUnicode_FromString("temp");
        if (temp == NULL || PyList_Insert(names, 1, temp) < 0) {
            Py_CLEAR(names);
        }
        Py_XDECREF(temp);
    }
    return names;
}

static PyObject *
raise_unknown_schema(Connection *self, PyObject *name)
{
    return raise_error_format(
        self->state, SQLITE_ERROR,
        "unknown database %R: db_names() lists the attached ones", name);
}

enum { ASK_READONLY, ASK_TXN_STATE };

/* readonly(name) and txn_state(schema): one answer about a schema. */
static PyObject *
ask_schema(Connection *self, PyObject *schema, int which)
{
    PyObject *exact = NULL;
    const char *cschema = NULL;
    if (schema != NULL) {
        exact = name_as_str(schema, which == ASK_READONLY ? "name" : "schema");
        if (exact == NULL) {
            return NULL;
        }
        cschema = PyUnicode_AsUTF8AndSize(exact, NULL);
    }
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        Py_XDECREF(exact);
        return NULL;
    }
    int answer = which == ASK_READONLY ? sqlite3_db_readonly(self->db, cschema)
                                       : db_txn_state(self->db, cschema);
    conn_leave(self);
    PyObject *result = answer < 0 ? raise_unknown_schema(self, exact)
                       : which == ASK_READONLY ? PyBool_FromLong(answer)
                                               : PyLong_FromLong(answer);
    Py_XDECREF(exact);
    return result;
}

static PyObject *
connection_readonly(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", NULL};
    PyObject *name;

    if (precheck(self) < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U:readonly", kwlist,
                                     &name)) {
        return NULL;
    }
    return ask_schema(self, name, ASK_READONLY);
}

static PyObject *
connection_txn_state(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"schema", NULL};
    PyObject *schema = Py_None;

    if (precheck(self) < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:txn_state", kwlist,
                                     &schema)) {
        return NULL;
    }
    if (schema != Py_None && !PyUnicode_Check(schema)) {
        PyErr_Format(PyExc_TypeError, "schema must be a str or None, not %R",
                     (PyObject *)Py_TYPE(schema));
        return NULL;
    }
    return ask_schema(self, schema == Py_None ? NULL : schema, ASK_TXN_STATE);
}

/* file_header(schema="main"): the first 100 bytes of the schema's file, read
 * through SQLite's own file handle (never a descriptor of ours:
 * docs/faq.md#why-the-system-sqlite). */
static PyObject *
connection_file_header(Connection *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"schema", NULL};
    PyObject *schema = NULL, *exact = NULL;
    unsigned char h[100];
    int length, known = 1, io_rc = SQLITE_OK, sys_errno = 0;

    if (precheck(self) < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|U:file_header", kwlist,
                                     &schema)) {
        return NULL;
    }
    if (schema != NULL && (exact = name_as_str(schema, "schema")) == NULL) {
        return NULL;
    }
    const char *cschema =
        exact ? PyUnicode_AsUTF8AndSize(exact, NULL) : "main";
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        Py_XDECREF(exact);
        return NULL;
    }
    RELEASE_GIL("connection_file_header");
    length = read_file_header(self->db, cschema, h, sizeof(h), &io_rc);
    if (length < 0 && io_rc == SQLITE_OK) {
        known = db_has_schema(self->db, cschema);
    }
    else if (io_rc != SQLITE_OK
             && sqlite3_file_control(self->db, cschema,
                                     SQLITE_FCNTL_LAST_ERRNO, &sys_errno)
                    != SQLITE_OK) {
        sys_errno = 0; /* the OS error the VFS kept for the failed read */
    }
    REACQUIRE_GIL();
    conn_leave(self);
    DbError failure = {.rc = io_rc, .sys_errno = sys_errno};
    if (io_rc != SQLITE_OK) {
        PyOS_snprintf(failure.msg, sizeof(failure.msg),
                      "cannot read the database file's header: %s",
                      sqlite3_errstr(io_rc));
    }
    PyObject *result =
        io_rc != SQLITE_OK ? raise_captured(self->state, &failure)
        : !known ? raise_unknown_schema(self, exact)
                 /* no file behind it (memory, temp not yet used): b"" */
                 : PyBytes_FromStringAndSize((const char *)h,
                                             length < 0 ? 0 : length);
    Py_XDECREF(exact);
    return result;
}

static PyObject *
connection_interrupt(Connection *self, PyObject *Py_UNUSED(ignored))
{
    /* No lock: stopping a call running in another thread is the point.
     * sqlite3_interrupt() is safe from any thread, and the handle cannot
     * be freed under it: close() takes it out (GIL held) before closing. */
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

/* The asyncio task running now, as an identity to compare (never
 * dereferenced), or NULL: none, or asyncio not imported.  May run code. */
static const void *
current_task(void)
{
    PyObject *name = PyUnicode_FromString("asyncio");
    if (name == NULL) {
        return NULL;
    }
    PyObject *asyncio = PyImport_GetModule(name); /* not imported: NULL */
    Py_DECREF(name);
    if (asyncio == NULL) {
        return NULL; /* an error set here is the caller's to raise */
    }
    PyObject *task = PyObject_CallMethod(asyncio, "current_task", NULL);
    Py_DECREF(asyncio);
    if (task == NULL) {
        if (PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            PyErr_Clear(); /* no running event loop in this thread */
        }
        return NULL;
    }
    const void *identity = task == Py_None ? NULL : (const void *)task;
    Py_DECREF(task); /* its loop keeps a running task alive */
    return identity;
}

static PyObject *
connection_enter(Connection *self, PyObject *Py_UNUSED(ignored))
{
    char sql[96];
    DbError error;
    /* (i) who opens it: with-blocks of a connection nest within one thread
     * and one asyncio task; interleaved, each __exit__ would end the other's
     * savepoint (a failed block's rows committed, a good one's lost). */
    const void *task = current_task();
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    if (self->savepoint_level > 0
        && (self->with_thread != (unsigned long)pthread_self()
            || self->with_task != task)) {
        conn_leave(self);
        PyErr_SetString(
            self->state->ThreadingViolationError,
            "Another thread's or asyncio task's with-block is open on this "
            "connection: with-blocks of one connection nest only within one "
            "thread and task, or each would end the other's transaction. "
            "Wait for that block to end, or give this thread or task a "
            "connection of its own");
        return NULL;
    }
    if (self->savepoint_level == 0) {
        self->with_thread = (unsigned long)pthread_self();
        self->with_task = task;
    }
    PyOS_snprintf(sql, sizeof(sql), "SAVEPOINT \"apsw_backup-%ld\"",
                  self->savepoint_level);
    int res = exec_locked(self, sql, &error);
    int forked = FORKED(self);
    if (res == 0 && !forked) {
        self->savepoint_level++;
    }
    conn_leave(self); /* forked (a busy handler forked): touches no SQLite */
    if (forked) {
        return PyErr_Occurred() ? NULL
                                : raise_forked(self->state, "connection");
    }
    if (res < 0) {
        return PyErr_Occurred() ? NULL : raise_captured(self->state, &error);
    }
    return Py_NewRef(self);
}

/* End savepoint `level` of a with-block: release it (commit == 1) or roll
 * it back.  Whatever stops it -- an interrupt() that landed while a cursor
 * was unfinished keeps failing every new statement until no statement of
 * the connection runs -- the savepoint is ended: the running statements
 * are reset (their cursors then say so) and the rollback tried again.
 * Returns 0, or -1 with the first failure captured in *error. */
static int
end_savepoint(Connection *self, long level, int commit, DbError *error)
{
    char release[96], rollback[128];
    DbError again;
    PyOS_snprintf(release, sizeof(release),
                  "RELEASE SAVEPOINT \"apsw_backup-%ld\"", level);
    PyOS_snprintf(rollback, sizeof(rollback),
                  "ROLLBACK TO SAVEPOINT \"apsw_backup-%ld\"; "
                  "RELEASE SAVEPOINT \"apsw_backup-%ld\"",
                  level, level);
    if (commit && exec_locked(self, release, error) == 0) {
        return 0;
    }
    int failed = commit; /* a failed release is reported */
    DbError *first = commit ? &again : error;
    if (FORKED(self)) {
        return -1;
    }
    if (exec_locked(self, rollback, first) == 0) {
        return failed ? -1 : 0;
    }
    if (FORKED(self)) {
        return -1;
    }
    /* Stop every running statement, then roll back again; as a last
     * resort end the whole transaction. */
    cursors_interrupted(self);
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    int ended = exec_locked(self, rollback, &again) == 0;
    if (!ended && !FORKED(self) && !sqlite3_get_autocommit(self->db)) {
        PyErr_Clear();
        exec_locked(self, "ROLLBACK", &again);
        self->savepoint_level = 0;
    }
    PyErr_Clear();
    if (ended && !commit) {
        /* Rolled back, as asked: what stopped the first try is not news
         * (the body's own exception is on its way out). */
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return 0;
    }
    PyErr_Restore(et, ev, tb);
    return -1;
}

static PyObject *
connection_exit(Connection *self, PyObject *args)
{
    PyObject *etype, *evalue, *etb;
    DbError error;

    if (!PyArg_ParseTuple(args, "OOO:__exit__", &etype, &evalue, &etb)) {
        return NULL;
    }
    if (conn_enter(self, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        return NULL;
    }
    if (self->savepoint_level == 0) {
        conn_leave(self);
        PyErr_SetString(PyExc_RuntimeError,
                        "__exit__ called without a matching __enter__");
        return NULL;
    }
    long level = --self->savepoint_level;
    int commit = etype == Py_None;
    int res = end_savepoint(self, level, commit, &error);
    conn_leave(self); /* forked: touches no SQLite */
    if (FORKED(self)) {
        return PyErr_Occurred() ? NULL
                                : raise_forked(self->state, "connection");
    }
    if (res == 0) {
        Py_RETURN_FALSE;
    }
    if (!PyErr_Occurred()) {
        raise_captured(self->state, &error);
    }
    if (!commit) {
        /* The body's exception is the one the user needs to see. */
        HOOK_VOID("connection_exit_unraisable");
        PyErr_WriteUnraisable((PyObject *)self);
        Py_RETURN_FALSE;
    }
    return NULL;
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
     "raised and the connection stays open.  It waits for a call another "
     "thread is making on the connections involved."},
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
     "Release the SAVEPOINT, or roll it back if the block raised; either "
     "way the savepoint ends."},
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
