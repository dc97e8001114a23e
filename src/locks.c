/* The connections' locks, orphans, fork, and the test hooks: the whole of
 * the ownership design of src/README.md.
 *
 * Each Connection has one lock (a mutex) and records the thread holding it.
 * Every call that touches a connection's handle, or the lists hanging off
 * it, holds its lock, and checks the connection's state only once it holds
 * it.  Two rules keep that free of deadlocks:
 *   1. a thread that holds a lock never waits for another: it try-locks,
 *      and a busy lock is refused (a method) or left to its holder (a
 *      destructor: the orphans below);
 *   2. the only waits -- finish() and close() -- release the GIL first and
 *      take their locks in address order.
 * Locks are let go of with the GIL held, so whatever another thread left
 * to the holder (under the GIL) is seen by it before the lock is free.
 */
#include "apsw_backup.h"

#include <stdint.h>
#include <time.h>

_Thread_local int locks_held;
_Thread_local int in_busy_handler;
int uri_by_default;

/* What was let go of inside a busy handler (release_later): live
 * connections whose orphans are to be settled, and dead ones whose handle
 * is to be closed.  One list for the process, under the GIL: drained by
 * whichever thread next ends a call holding no lock and outside a busy
 * handler -- not only the thread that queued it, whose call may last (a
 * connection on another thread's list was left unsettled for as long). */
static Connection *later_settle;
static Connection *later_close;
static int releasing_later;

static unsigned long
this_thread(void)
{
    return (unsigned long)pthread_self();
}

int
busy_error(Connection *c, const char *what)
{
    ModuleState *st = c->state;
    HOOK_VOID("busy_error");
    if (c->owner == this_thread()) {
        PyErr_Format(st->ReentrancyError,
                     "The %s is in use by the call that this callback (a "
                     "busy handler, a binding's conversion, a destructor) "
                     "runs inside: use it once that call has returned",
                     what);
    }
    else {
        PyErr_Format(st->InUseError,
                     "The %s is in use by a call in another thread that has "
                     "not returned; try again once it has (one thread at a "
                     "time may use a connection)",
                     what);
    }
    return -1;
}

int
lock_try_quiet(Connection *c)
{
    if (pthread_mutex_trylock(&c->mutex) != 0) {
        return -1;
    }
    if (in_busy_handler > 0 && c->may_share) {
        /* may_share is read under the lock (an ATTACH sets it, lock held).
         * Let go of without settling (that would call SQLite); nothing was
         * left to us in this moment, the GIL held throughout.  What waits
         * on c is settled once this thread's call has returned. */
        pthread_mutex_unlock(&c->mutex);
        settle_later(c);
        return -2;
    }
    c->owner = this_thread();
    locks_held++;
    return 0;
}

int
lock_try(Connection *c, const char *what)
{
    int rc = lock_try_quiet(c);
    if (rc == -2) {
        return shared_cache_error(c, what);
    }
    return rc < 0 ? busy_error(c, what) : 0;
}

int
shared_cache_error(Connection *c, const char *what)
{
    HOOK_VOID("shared_cache_error");
    PyErr_Format(c->state->ReentrancyError,
                 "The %s may share a cache with other connections (opened "
                 "with SQLITE_OPEN_SHAREDCACHE, or through a URI filename or "
                 "an ATTACH, which can ask for one): it cannot be used "
                 "inside a busy handler, where SQLite holds that cache's "
                 "lock and the call would wait on it for ever. Use it once "
                 "the call the handler runs inside has returned",
                 what);
    return -1;
}

int
lock_wait(Connection *a, Connection *b, const char *what)
{
    if (b == a) {
        b = NULL;
    }
    if (locks_held > 0) {
        /* A callback (or code run inside a call) never waits: the call it
         * runs inside holds a lock another thread may be waiting for. */
        if (lock_try(a, what) < 0) {
            return -1;
        }
        int rc = b != NULL ? lock_try_quiet(b) : 0;
        if (rc < 0) {
            BackupCore *done = NULL;
            unlock(a, &done);
            drop_done(done);
            /* built holding no lock */
            return rc == -2 ? shared_cache_error(b, what)
                            : busy_error(b, what);
        }
        return 0;
    }
    Connection *first = a, *second = b;
    if (b != NULL && (uintptr_t)b < (uintptr_t)a) {
        first = b;
        second = a;
    }
    /* The caller owns a reference to each, so neither mutex can be
     * destroyed while this thread waits for it. */
    RELEASE_GIL("lock_wait");
    pthread_mutex_lock(&first->mutex);
    if (second != NULL) {
        pthread_mutex_lock(&second->mutex);
    }
    REACQUIRE_GIL();
    first->owner = this_thread();
    locks_held++;
    if (second != NULL) {
        second->owner = this_thread();
        locks_held++;
    }
    return 0;
}

static void
unlink_core(BackupCore *core)
{
    Connection *source = core->source;
    if (core->src_prev != NULL) {
        core->src_prev->src_next = core->src_next;
    }
    else if (source->sources == core) {
        source->sources = core->src_next;
    }
    if (core->src_next != NULL) {
        core->src_next->src_prev = core->src_prev;
    }
    core->src_prev = core->src_next = NULL;
    if (core->dest->locking == core) {
        core->dest->locking = NULL;
    }
}

void
core_finish(BackupCore *core, BackupCore **done)
{
    /* The handle stays in the core until the finish has returned: until
     * then the core is unfinished to everyone else -- a dealloc of its
     * Backup orphans it (the finisher frees it), a finish() waits for the
     * locks the finisher holds. */
    sqlite3_backup *handle = core->handle;
    int rc;
    RELEASE_GIL("core_finish");
    rc = sqlite3_backup_finish(handle);
    REACQUIRE_GIL();
    core->handle = NULL;
    core->finish_rc = rc;
    unlink_core(core);
    core->done_next = *done;
    *done = core;
}

void
core_forget(BackupCore *core, BackupCore **done)
{
    core->handle = NULL;
    unlink_core(core);
    core->done_next = *done;
    *done = core;
}

/* An orphan backup of c whose other lock this thread holds or can take;
 * that lock is then held, and *took says whether this call took it. */
static BackupCore *
finishable_orphan(Connection *c, int *took)
{
    BackupCore *candidates[2] = {c->locking, c->sources};
    for (int list = 0; list < 2; list++) {
        for (BackupCore *k = candidates[list]; k != NULL;
             k = list == 0 ? NULL : k->src_next) {
            if (!k->orphan || k->handle == NULL) {
                continue;
            }
            Connection *other = k->source == c ? k->dest : k->source;
            if (in_busy_handler > 0 && other->may_share) {
                /* Held by this thread's call in the middle of SQLite, or
                 * refused below: finished once that call has returned. */
                settle_later(other);
                continue;
            }
            if (other->owner == this_thread()) {
                *took = 0;
                return k;
            }
            if (lock_try_quiet(other) == 0) {
                *took = 1;
                return k;
            }
        }
    }
    return NULL;
}

/* What the holder of c's lock does before letting go of it: finalize the
 * statements and finish the backups let go of while it held it.  Every
 * list is read afresh after each release of the GIL. */
static void
settle_orphans(Connection *c, BackupCore **done)
{
    for (;;) {
        Orphan *o = c->orphans;
        if (o != NULL) {
            c->orphans = o->next;
            sqlite3_stmt *stmt = o->stmt;
            PyMem_Free(o);
            if (c->db != NULL) {
                RELEASE_GIL("settle_orphans_finalize");
                sqlite3_finalize(stmt);
                REACQUIRE_GIL();
            }
            continue;
        }
        int took = 0;
        BackupCore *k = finishable_orphan(c, &took);
        if (k == NULL) {
            return;
        }
        Connection *other = k->source == c ? k->dest : k->source;
        core_finish(k, done);
        if (took) {
            unlock(other, done);
        }
    }
}

void
unlock(Connection *c, BackupCore **done)
{
    if (!FORKED(c)) {
        settle_orphans(c, done);
        /* A lock taken before a fork is not counted in the child (the
         * count started again there at 0). */
        locks_held--;
    }
    c->owner = 0;
    pthread_mutex_unlock(&c->mutex);
}

/* The references finished backups held, dropped once no lock of the call
 * is held: a connection's destructor may run any code.  An orphan is freed
 * here, and the error of its finish, which nobody can be told of any more,
 * goes to sys.unraisablehook. */
void
settle_later(Connection *c)
{
    if (c->later_queued) {
        return; /* on the list already */
    }
    c->later_queued = 1;
    Py_INCREF(c); /* the list's, dropped once settled */
    c->later_next = later_settle;
    later_settle = c;
}

void
close_later(Connection *c)
{
    c->later_next = later_close;
    later_close = c;
}

/* Once this thread's call has let go of its last lock (GIL held): close
 * the dead connections, and settle the live ones -- the lock's holder does
 * it if the lock is busy.  Each list is read afresh after every step (a
 * step may run any code); a nested call leaves the work to the outer one. */
static void
release_later(void)
{
    if (releasing_later) {
        return;
    }
    releasing_later = 1;
    for (;;) {
        Connection *c = later_close;
        if (c != NULL) {
            later_close = c->later_next;
            c->later_next = NULL;
            connection_close_dead(c);
            continue;
        }
        c = later_settle;
        if (c == NULL) {
            break;
        }
        later_settle = c->later_next;
        c->later_next = NULL;
        c->later_queued = 0;
        if (!FORKED(c) && lock_try_quiet(c) == 0) {
            BackupCore *done = NULL;
            unlock(c, &done); /* settles its orphans */
            drop_done(done);
        }
        HOOK_VOID("release_later_decref");
        Py_DECREF(c);
    }
    releasing_later = 0;
}

void
drop_done(BackupCore *done)
{
    if (done == NULL
        && (locks_held > 0 || in_busy_handler > 0
            || (later_settle == NULL && later_close == NULL))) {
        return;
    }
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    while (done != NULL) {
        BackupCore *core = done;
        done = core->done_next;
        core->done_next = NULL;
        Connection *source = core->source, *dest = core->dest;
        core->source = core->dest = NULL;
        if (core->orphan) {
            int rc = core->finish_rc;
            if (rc != SQLITE_OK && rc != SQLITE_DONE) {
                HOOK_VOID("drop_done_unraisable");
                PyObject *msg = PyUnicode_FromFormat(
                    "finishing the backup %s that was let go of failed: %s; "
                    "the destination was rolled back",
                    core->names ? core->names : "", sqlite3_errstr(rc));
                if (msg != NULL) {
                    raise_error_object(source->state, rc, msg);
                    Py_DECREF(msg);
                }
                /* Said as "Exception ignored in: <what>", not as a bare
                 * traceback that looks like an uncaught exception. */
                PyObject *t, *v, *b;
                PyErr_Fetch(&t, &v, &b);
                PyObject *what = PyUnicode_FromString(
                    "the finish of a Backup let go of unfinished");
                if (what == NULL) {
                    PyErr_Clear();
                }
                PyErr_Restore(t, v, b);
                PyErr_WriteUnraisable(what);
                Py_XDECREF(what);
            }
            core_free(core);
        }
        HOOK_VOID("drop_done_decref");
        Py_XDECREF(source);
        Py_XDECREF(dest);
    }
    if (locks_held == 0 && in_busy_handler == 0) {
        release_later();
    }
    PyErr_Restore(et, ev, tb);
}

void
core_free(BackupCore *core)
{
    PyMem_Free(core->dname);
    PyMem_Free(core->sname);
    PyMem_Free(core->names);
    PyMem_Free(core);
}

/* Fork.  The child gets a copy of every object, and of every lock as it
 * was, held by threads that do not exist there.  The objects belong to the
 * parent's SQLite state: calling SQLite on them (a finish, a rollback, a
 * close) would change the parent's files.  So an object made before the
 * fork is inert in the child for ever (FORKED): methods raise, and dealloc
 * and close(force=True) let go of memory without calling SQLite or taking
 * a lock.  Nothing else is global: orphans live on their connections. */
volatile unsigned long fork_generation;

static void
after_fork_in_child(void)
{
    /* Runs in the forking thread, the only one of the child.  The locks it
     * held are the parent's objects' (never taken again here): the count of
     * locks this thread holds starts again at 0, so that a callback that
     * forked and carries on in the child is not taken for a callback. */
    fork_generation++;
    locks_held = 0;
    /* What waited for the parent's call is the parent's: left alone. */
    in_busy_handler = 0;
    later_settle = later_close = NULL;
    releasing_later = 0;
}

int
install_fork_handler(void)
{
    static int installed;
    if (installed) {
        return 0;
    }
    int err = pthread_atfork(NULL, NULL, after_fork_in_child);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

PyObject *
raise_forked(ModuleState *st, const char *what)
{
    PyErr_Format(
        st->ForkingViolationError,
        "This %s was made before os.fork() and belongs to the parent "
        "process: using its SQLite state in the child would corrupt the "
        "parent's databases. Open a new Connection in the child (objects "
        "inherited this way are left alone, never closed or finished, and "
        "cannot be opened again)",
        what);
    return NULL;
}

#ifdef APSW_BACKUP_HOOKS
/* Test hooks: see src/README.md, "Hook points".  One hook callable,
 * process-wide (tests are single-interpreter); hook(name, kind) is called
 * with the GIL held, kind 0 where a raise simulates a failure, 1 where it
 * cannot be reported (written as unraisable), 2 just before the GIL is
 * released -- its number result is a pause in seconds made with the GIL
 * released, so that another thread can act inside the window. */
static PyObject *hook;
static _Thread_local int in_hook;
static _Thread_local long pause_us;

int
hook_call(const char *name, int kind)
{
    if (hook == NULL || in_hook) {
        return 0;
    }
    in_hook = 1;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *h = Py_NewRef(hook);
    PyObject *result = PyObject_CallFunction(h, "si", name, kind);
    Py_DECREF(h);
    int res = 0;
    if (result == NULL) {
        if (kind == 0 && et == NULL) {
            in_hook = 0;
            return -1; /* the failure the point simulates */
        }
        PyErr_WriteUnraisable(NULL);
        res = 0;
    }
    else {
        if (kind == 2 && PyFloat_Check(result)) {
            pause_us = (long)(PyFloat_AsDouble(result) * 1e6);
        }
        Py_DECREF(result);
    }
    PyErr_Restore(et, ev, tb);
    in_hook = 0;
    return res;
}

void
hook_pause(void)
{
    if (pause_us > 0) {
        struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
        pause_us = 0;
        nanosleep(&ts, NULL);
    }
}

static PyObject *
set_hook(PyObject *Py_UNUSED(module), PyObject *callable)
{
    if (callable != Py_None && !PyCallable_Check(callable)) {
        PyErr_SetString(PyExc_TypeError, "_set_hook takes a callable or None");
        return NULL;
    }
    PyObject *old = hook;
    hook = callable == Py_None ? NULL : Py_NewRef(callable);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyMethodDef hook_methods[] = {
    {"_set_hook", set_hook, METH_O,
     "_set_hook(callable | None): test builds only; see src/README.md."},
    {NULL, NULL, 0, NULL},
};

int
add_hook_functions(PyObject *module)
{
    return PyModule_AddFunctions(module, hook_methods);
}
#endif
