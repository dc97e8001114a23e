/* Declarations shared by the C files of apsw_backup._apsw_backup.
 *
 * One file per Python type (connection.c, cursor.c, backup.c), errors.c for
 * result code -> exception, module.c for init and module state.
 */
#ifndef APSW_BACKUP_H
#define APSW_BACKUP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>
#include <pthread.h>

#if SQLITE_VERSION_NUMBER < 3026000
#error "apsw_backup needs the headers of SQLite 3.26 or newer"
#endif

/* SQLite functions newer than the 3.26 minimum.  Built against older
 * headers (a manylinux_2_28 image has 3.26) they are declared here as weak
 * references to the library loaded at run time -- NULL where it lacks them
 * -- so such a build still uses them on a newer system SQLite. */
#if SQLITE_VERSION_NUMBER < 3034000
#define SQLITE_TXN_NONE 0
#define SQLITE_TXN_READ 1
#define SQLITE_TXN_WRITE 2
#if defined(__GNUC__)
extern int sqlite3_txn_state(sqlite3 *, const char *) __attribute__((weak));
#define HAVE_TXN_STATE (sqlite3_txn_state != NULL)
#else
#define HAVE_TXN_STATE 0
#define sqlite3_txn_state(db, schema) (-1)
#endif
#else
#define HAVE_TXN_STATE 1
#endif

#if SQLITE_VERSION_NUMBER < 3039000
#if defined(__GNUC__)
extern const char *sqlite3_db_name(sqlite3 *, int) __attribute__((weak));
#define HAVE_DB_NAME (sqlite3_db_name != NULL)
#else
#define HAVE_DB_NAME 0
#define sqlite3_db_name(db, i) ((const char *)NULL)
#endif
#else
#define HAVE_DB_NAME 1
#endif

#if SQLITE_VERSION_NUMBER < 3037000
#if defined(__GNUC__)
extern sqlite3_int64 sqlite3_changes64(sqlite3 *) __attribute__((weak));
extern sqlite3_int64 sqlite3_total_changes64(sqlite3 *) __attribute__((weak));
#define HAVE_CHANGES64 (sqlite3_changes64 != NULL)
#else
#define HAVE_CHANGES64 0
#define sqlite3_changes64(db) 0
#define sqlite3_total_changes64(db) 0
#endif
#else
#define HAVE_CHANGES64 1
#endif

/* The transaction open on schema (None: all) of db; -1 for an unknown
 * schema.  Where SQLite cannot tell (before 3.34) an open transaction is
 * taken to be a write transaction. */
static inline int
db_txn_state(sqlite3 *db, const char *schema)
{
    if (!HAVE_TXN_STATE) {
        if (schema != NULL && sqlite3_db_filename(db, schema) == NULL) {
            return -1; /* no such schema */
        }
        return sqlite3_get_autocommit(db) ? SQLITE_TXN_NONE : SQLITE_TXN_WRITE;
    }
    return sqlite3_txn_state(db, schema);
}

/* Whether db has a schema of that name (main and temp always exist). */
static inline int
db_has_schema(sqlite3 *db, const char *schema)
{
    if (sqlite3_stricmp(schema, "main") == 0
        || sqlite3_stricmp(schema, "temp") == 0) {
        return 1;
    }
    if (HAVE_DB_NAME) {
        for (int i = 0; sqlite3_db_name(db, i) != NULL; i++) {
            if (sqlite3_stricmp(sqlite3_db_name(db, i), schema) == 0) {
                return 1;
            }
        }
        return 0;
    }
    if (HAVE_TXN_STATE) {
        return sqlite3_txn_state(db, schema) >= 0;
    }
    return sqlite3_db_filename(db, schema) != NULL;
}

#define APSW_BACKUP_VERSION "0.1.0"

/* CPython 3.12 and 3.13.0 headers return None, True and False without a new
 * reference even under the Limited API (immortal objects there); an abi3
 * build made with them would then lose a reference per call on 3.10 and
 * 3.11, which it also serves, until Python aborts.  Always take one. */
#undef Py_RETURN_NONE
#undef Py_RETURN_TRUE
#undef Py_RETURN_FALSE
#define Py_RETURN_NONE return Py_NewRef(Py_None)
#define Py_RETURN_TRUE return Py_NewRef(Py_True)
#define Py_RETURN_FALSE return Py_NewRef(Py_False)

/* Py_XSETREF is not in the Limited API: store value in dst, then drop the
 * old reference (after, so a destructor never sees a half-updated object). */
#define REPLACE_REF(dst, value)             \
    do {                                    \
        PyObject *old_ = (PyObject *)(dst); \
        (dst) = (value);                    \
        Py_XDECREF(old_);                   \
    } while (0)

/* Primary result codes run from 1 (SQLITE_ERROR) to 26 (SQLITE_NOTADB). */
#define N_CODE_ERRORS 27

typedef struct Connection Connection;
typedef struct Cursor Cursor;
typedef struct Backup Backup;
typedef struct BackupCore BackupCore;
typedef struct Orphan Orphan;

typedef struct {
    PyTypeObject *ConnectionType;
    PyTypeObject *CursorType;
    PyTypeObject *BackupType;
    PyTypeObject *PageRecorderType;
    PyObject *Error;
    PyObject *ThreadingViolationError;
    PyObject *InUseError; /* subclasses of ThreadingViolationError */
    PyObject *ReentrancyError;
    PyObject *DestinationLockedError;
    PyObject *ConnectionClosedError;
    PyObject *CursorClosedError;
    PyObject *BindingsError;
    PyObject *ForkingViolationError;
    PyObject *code_errors[N_CODE_ERRORS]; /* by primary code; [0] unused */
} ModuleState;

/* The ownership rules these structures serve are in src/README.md. */
struct Connection {
    PyObject_HEAD
    ModuleState *state;
    /* The connection's lock (locks.c): held by every call that touches the
     * handle or the lists below.  owner is the holding thread (0: none). */
    pthread_mutex_t mutex;
    unsigned long owner;
    unsigned long fork_generation; /* fork_generation when made */
    sqlite3 *db;                   /* NULL before __init__ and once closed */
    /* Device and inode of the main database file, taken when it was
     * opened: the file the handle uses, whatever later becomes of its
     * name (renamed, replaced).  main_known is 0 for memory databases. */
    int main_known;
    unsigned long long main_dev, main_ino;
    BackupCore *locking; /* the unfinished backup writing into us */
    BackupCore *sources; /* unfinished backups reading from us */
    Cursor *cursors;     /* open cursors (borrowed: a cursor unlinks itself) */
    Orphan *orphans;     /* statements let go of while the lock was busy */
    PyObject *busy_handler;
    PyObject *filename;
    PyObject *open_vfs;
    int open_flags;
    /* Opened for a shared cache, or through a URI filename, or has run an
     * ATTACH while reading URI filenames: it may share a cache, and is
     * never used inside a busy handler, where SQLite holds the cache's
     * mutex (locks.c, lock_try).  Set under the lock. */
    int may_share;
    int uri; /* it reads URI filenames (its name's, an ATTACH's) */
    long savepoint_level;
    /* Who opened the outermost open with-block: its thread and asyncio
     * task (an identity, never dereferenced; NULL: none). */
    unsigned long with_thread;
    const void *with_task;
    PyObject *weakreflist;
    /* On a thread's list of what waits for the end of a busy handler's
     * call (locks.c, "later"): a live connection to settle (the list holds
     * a reference; later_queued says it is on one) or a dead one to close. */
    Connection *later_next;
    int later_queued;
};

/* A statement whose cursor was let go of while its connection's lock was
 * busy: finalized by the lock's holder when it leaves (locks.c).  Each
 * cursor allocates its node when it is made, so letting go never fails. */
struct Orphan {
    sqlite3_stmt *stmt;
    Orphan *next;
};

struct Cursor {
    PyObject_HEAD
    Connection *connection; /* strong, for the cursor's whole life */
    int open;               /* 0 once closed (by us or the connection) */
    int interrupted;        /* reset by an interrupted with-block's end */
    Cursor *prev, *next;    /* links in connection->cursors while open */
    Orphan *spare;          /* the node this cursor's statement orphans in */
    sqlite3_stmt *stmt;     /* current statement, kept after it ends */
    PyObject *sql;          /* UTF-8 bytes of all the statements */
    const char *tail;       /* next statement inside sql */
    PyObject *bindings;     /* tuple or mapping, or NULL */
    Py_ssize_t bindings_offset;
    int prepared;   /* statements prepared since tail was reset */
    PyObject *many; /* executemany: iterator of bindings */
    int status;     /* CURSOR_* below */
};

enum { CURSOR_DONE = 0, CURSOR_NEED_STEP, CURSOR_ROW };

/* What an unfinished backup is, apart from the Python object: the
 * sqlite3_backup, both connections (strong references) and the
 * destination's lock.  Owned by its Backup; when the Backup is let go of
 * while a lock it needs is busy, the core becomes an orphan, still linked
 * (the destination stays locked), and the lock's holder finishes and frees
 * it (locks.c).  Plain memory, no Python object: nothing can resurrect it. */
struct BackupCore {
    sqlite3_backup *handle; /* NULL once finished */
    Connection *source;     /* strong until finished; then NULL */
    Connection *dest;
    BackupCore *src_prev, *src_next; /* links in source->sources */
    BackupCore *done_next;           /* finished, references to drop */
    int orphan;                      /* its Backup is gone */
    int stepped;                     /* a step has run (holds dest's write) */
    int finish_rc;                   /* sqlite3_backup_finish's answer */
    char *dname, *sname;             /* schema names, UTF-8 (PyMem_Malloc) */
    char *names; /* "'main' of 'a.db' -> 'main' of 'b.db'" (PyMem_Malloc) */
};

struct Backup {
    PyObject_HEAD
    ModuleState *state;
    BackupCore *core; /* NULL only if backup() failed */
    PyObject *dest_name;
    PyObject *source_name;
    PyObject *repr_names; /* core->names as a str */
    int done;
    int remaining;
    int page_count;
    long restarts;
    int sticky_rc;  /* a failed step's code, reported again */
    int last_errno; /* the OS error of a failed step's file, or 0 */
    /* What the page-size message needs, read before sqlite3_backup_init:
     * afterwards no SQL may run on the destination (it could commit the
     * backup's write transaction: a partial copy). */
    int dest_in_memory; /* in-memory or temp */
    int dest_wal;       /* the file's header says WAL */
    int dest_page_size; /* 0 when unknown */
    PyObject *sticky_msg;
};

/* module.c */
ModuleState *state_from_type(PyTypeObject *type);

/* locks.c: the connections' locks, fork, and the test hooks.
 *
 * lock_try_quiet() takes a connection's lock without waiting (GIL held):
 * 0; -1 when another holds it; -2, inside a busy handler, for a connection
 * that may share a cache (refused: settle_later() then settles it).
 * lock_try() does the same with the error set, naming `what`: InUseError
 * (another thread holds it), ReentrancyError (this thread does: a callback
 * of a call on it; or -2).
 * lock_wait() takes up to two locks for finish() and close(): with the GIL
 * released and in address order when this thread holds no lock; as
 * lock_try() when it does (a callback never waits).  It owns a reference
 * to each connection while it waits.
 * unlock() lets go of a lock with the GIL held, after finalizing the
 * connection's orphan statements and finishing the orphan backups it can
 * now lock; the cores it finished are put on *done, whose references
 * drop_done() drops once no lock is held (they may run any code). */
extern _Thread_local int locks_held;
/* Inside a busy handler: SQLite is in the middle of a call on this thread
 * and holds its mutexes (a shared cache's is not recursive).  Until that
 * call has returned nothing of ours calls SQLite on this thread on a
 * connection that may share a cache (may_share): lock_try_quiet() refuses
 * it, and what is let go of on it waits ("later", src/README.md). */
extern _Thread_local int in_busy_handler;
/* An ATTACH refused by the authorizer inside a busy handler (connection.c):
 * the prepare's SQLITE_AUTH is then said as a ReentrancyError. */
extern _Thread_local int attach_refused;
/* SQLite reads URI filenames without SQLITE_OPEN_URI (built so). */
extern int uri_by_default;
/* settle_later(): settle c's orphans (a statement, a backup core left
 * there) once this thread's call has let go of its locks (the list holds a
 * reference to c); close_later(): a dead connection let go of inside a busy
 * handler, its memory kept until then, when connection_close_dead()
 * (connection.c) closes and frees it. */
void settle_later(Connection *c);
void close_later(Connection *c);
void connection_close_dead(Connection *c);
int lock_try(Connection *c, const char *what);
int lock_try_quiet(Connection *c);
/* The error of a busy lock (InUseError or ReentrancyError); -1. */
int busy_error(Connection *c, const char *what);
/* The ReentrancyError of a connection that may share a cache, used inside
 * a busy handler; -1. */
int shared_cache_error(Connection *c, const char *what);
int lock_wait(Connection *a, Connection *b, const char *what);
void unlock(Connection *c, BackupCore **done);
void drop_done(BackupCore *done);
/* Finish core (both its locks held): sqlite3_backup_finish with the GIL
 * released, unlink it, unlock the destination; the core goes on *done. */
void core_finish(BackupCore *core, BackupCore **done);
/* Forget core without calling SQLite (a forked child). */
void core_forget(BackupCore *core, BackupCore **done);
void core_free(BackupCore *core);

/* Bumped in a forked child: objects made before the fork belong to the
 * parent's SQLite state and must not call into it. */
extern volatile unsigned long fork_generation;
int install_fork_handler(void);
PyObject *raise_forked(ModuleState *st, const char *what);
#define FORKED(conn) ((conn)->fork_generation != fork_generation)

/* Test hooks (built with APSW_BACKUP_HOOKS; src/README.md, "Hook points"):
 * HOOK(name) marks a point where foreign Python code may run (a GC-capable
 * allocation, the decref of a user object, a call to user code): it calls
 * the hook the tests installed, and gives -1 (exception set) if that
 * raised.  HOOK_VOID(name) is the same where no failure can be reported.
 * RELEASE_GIL(name) / REACQUIRE_GIL() wrap every Py_BEGIN/END_ALLOW_THREADS.
 * Without APSW_BACKUP_HOOKS they cost nothing. */
#ifdef APSW_BACKUP_HOOKS
int hook_call(const char *name, int kind);
void hook_pause(void);
int add_hook_functions(PyObject *module);
#define HOOK(name) hook_call((name), 0)
#define HOOK_VOID(name) ((void)hook_call((name), 1))
#define RELEASE_GIL(name)       \
    (void)hook_call((name), 2); \
    Py_BEGIN_ALLOW_THREADS      \
    hook_pause();
#else
#define HOOK(name) 0
#define HOOK_VOID(name) ((void)0)
#define RELEASE_GIL(name) Py_BEGIN_ALLOW_THREADS
#endif
#define REACQUIRE_GIL() Py_END_ALLOW_THREADS

/* header.c: a database file's header, read through SQLite's own handle
 * (never a descriptor of ours: closing one drops SQLite's POSIX locks).
 * read_file_header() copies up to `size` bytes of schema's file into buf:
 * the count, 0 for an empty file, -1 when the schema has no file or the read
 * failed (then *io_rc is the failed call's SQLite code, else SQLITE_OK).
 * It takes no lock: callers own db (and release the GIL). */
typedef struct {
    int is_database; /* starts with "SQLite format 3" */
    int page_size;   /* 0 unless is_database */
    int wal;         /* read and write versions 2 (WAL) */
} FileHeader;
int read_file_header(sqlite3 *db, const char *schema, unsigned char *buf,
                     int size, int *io_rc);
void parse_file_header(const unsigned char *h, int length, FileHeader *out);

/* errors.c */
/* A failure of a call on db, captured while its lock is held (no Python
 * API), raised once it is let go of. */
typedef struct {
    int rc;        /* extended code */
    int sys_errno; /* the OS error SQLite kept, or 0 */
    char msg[512];
} DbError;
void capture_db_error(sqlite3 *db, int rc, DbError *e);
PyObject *raise_captured(ModuleState *st, const DbError *e);
PyObject *raise_sqlite_error(ModuleState *st, int rc, const char *msg);
PyObject *raise_db_error(ModuleState *st, sqlite3 *db, int rc);
PyObject *raise_error_object(ModuleState *st, int rc, PyObject *msg);
PyObject *raise_error_format(ModuleState *st, int rc, const char *format, ...);
int add_exceptions(PyObject *module, ModuleState *st);

/* connection.c */
extern PyType_Spec connection_spec;
int parse_force(PyObject *args, PyObject *kwds, int *force);
/* Checks made once a connection's lock is held (-1 with the error). */
enum { CHECK_OPEN = 1, CHECK_UNLOCKED = 2 };
int connection_usable(Connection *self, int what);
/* The lock of a method on self, then connection_usable(): 0, or -1 with the
 * error and no lock held.  conn_leave() lets go (and drops what the orphans
 * it settled held: it may run any code). */
int conn_enter(Connection *self, int what);
void conn_leave(Connection *self);
PyObject *name_as_str(PyObject *value, const char *what);

/* cursor.c */
extern PyType_Spec cursor_spec;
/* A new cursor, linked into the connection's list (GIL-protected: made and
 * let go of without the lock; every walk of it is made under the lock and
 * reads it afresh after each release of the GIL). */
Cursor *cursor_alloc(Connection *connection);
int cursor_execute(Cursor *self, PyObject *statements, PyObject *bindings,
                   PyObject *many);
/* With the connection's lock held: finalize every cursor's statement (or,
 * forget: let go of it without calling SQLite, in a forked child) and mark
 * the cursor closed (the connection is closing). */
void cursors_close_all(Connection *connection, int forget);
void cursors_interrupted(Connection *connection);

/* backup.c */
extern PyType_Spec backup_spec;
PyObject *backup_create(Connection *dest, PyObject *dest_name,
                        Connection *source, PyObject *source_name);

/* recorder.c: PageRecorder (over pageshim.c) and the page hash */
extern PyType_Spec recorder_spec;
PyObject *module_page_hash(PyObject *module, PyObject *data);
PyObject *module_page_hash_parts(PyObject *module, PyObject *parts);
PyObject *module_rollback_vfs(PyObject *module, PyObject *ignored);
PyObject *module_page_hash_variants(PyObject *module, PyObject *data);

/* incremental.c: private functions over deltashim.c (docs/incremental.md) */
PyObject *incremental_vfs_names(PyObject *module, PyObject *arg);
PyObject *incremental_delta_open(PyObject *module, PyObject *args);
PyObject *incremental_delta_close(PyObject *module, PyObject *capsule);
PyObject *incremental_delta_result(PyObject *module, PyObject *capsule);
PyObject *incremental_overlay_open(PyObject *module, PyObject *args);
PyObject *incremental_overlay_close(PyObject *module, PyObject *capsule);
PyObject *incremental_check_pages(PyObject *module, PyObject *args);
PyObject *incremental_delta_read_source(PyObject *module, PyObject *args);
PyObject *incremental_delta_manifest(PyObject *module, PyObject *args);
PyObject *incremental_delta_slots(PyObject *module, PyObject *args);
PyObject *incremental_chain_open(PyObject *module, PyObject *args);
PyObject *incremental_chain_close(PyObject *module, PyObject *capsule);
PyObject *incremental_chain_gather(PyObject *module, PyObject *args);
PyObject *incremental_chain_file_of(PyObject *module, PyObject *args);
PyObject *incremental_check_stored(PyObject *module, PyObject *args);
PyObject *incremental_check_inherited(PyObject *module, PyObject *args);

#endif /* APSW_BACKUP_H */
