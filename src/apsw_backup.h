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

struct Connection {
    PyObject_HEAD
    ModuleState *state;
    sqlite3 *db;                   /* NULL before __init__ and once closed */
    int inuse;                     /* calls inside SQLite now (GIL released); a
                                    * count, as a collected Backup may finish
                                    * while another thread uses the source */
    unsigned long fork_generation; /* fork_generation when opened */
    /* Device and inode of the main database file, taken when it was
     * opened: the file the handle uses, whatever later becomes of its
     * name (renamed, replaced).  main_known is 0 for memory databases. */
    int main_known;
    unsigned long long main_dev, main_ino;
    Backup *locked_by; /* unfinished backup writing into us */
    Cursor *cursors;   /* open cursors (borrowed, intrusive list) */
    Backup *sources;   /* unfinished backups reading from us */
    PyObject *busy_handler;
    PyObject *filename;
    PyObject *open_vfs;
    int open_flags;
    long savepoint_level;
    PyObject *weakreflist;
};

struct Cursor {
    PyObject_HEAD
    Connection *connection; /* strong; NULL once closed */
    Cursor *prev, *next;    /* links in connection->cursors */
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

struct Backup {
    PyObject_HEAD
    ModuleState *state;
    sqlite3_backup *backup;      /* NULL once finished */
    Connection *dest;            /* strong; NULL once finished */
    Connection *source;          /* strong; NULL once finished */
    Backup *src_prev, *src_next; /* links in source->sources */
    Backup *pending_next;        /* in the list of deferred finishes */
    PyObject *dest_name;
    PyObject *source_name;
    /* Their UTF-8, kept by the str objects above (owned): read once, not
     * on every step. */
    const char *dname, *sname;
    PyObject *repr_names; /* "source -> dest" text kept for repr */
    int inuse;
    int finishing; /* claimed by a finisher that has released the GIL */
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

/* calls.c: who is inside a call, and fork.
 *
 * call_enter()/call_leave() bracket every call that releases the GIL or runs
 * Python code on behalf of a Connection or Backup: they count the object's
 * `inuse` (what other threads see) and record it for this thread, so a
 * callback can be told from another thread (in_call_here()).  They nest. */
#define MAX_CALL_DEPTH 16
typedef struct CallStack {
    const void *objects[MAX_CALL_DEPTH];
    int depth;
} CallStack;
/* Inline, with one thread-local block: a step enters and leaves three
 * objects, and each call out to a function looking up thread-local
 * storage cost more than a tenth of what a step(1) adds to SQLite's own. */
extern _Thread_local CallStack call_stack;
void calls_at_rest(void);

static inline void
call_enter(void *object, int *inuse)
{
    CallStack *here = &call_stack;
    (*inuse)++;
    if (here->depth < MAX_CALL_DEPTH) {
        here->objects[here->depth] = object;
    }
    here->depth++;
}

static inline void
call_leave(int *inuse)
{
    CallStack *here = &call_stack;
    (*inuse)--;
    if (--here->depth == 0) {
        calls_at_rest();
    }
}
int in_call_here(const void *object);
int in_any_call_here(void);
int call_depth_here(void);
int calls_here_count(const void *object);
/* Sleep about `*wait_us` microseconds with the GIL released, then double
 * it (capped at 5 ms): the wait for another thread's call to end. */
void wait_a_little(long *wait_us);
/* Bumped in a forked child: objects opened before the fork belong to the
 * parent's SQLite state and must not call into it. */
extern volatile unsigned long fork_generation;
int install_fork_handler(void);
PyObject *raise_forked(ModuleState *st, const char *what);
#define FORKED(conn) ((conn)->fork_generation != fork_generation)

/* header.c: a database file's header, read through SQLite's own handle
 * (never a descriptor of ours: closing one drops SQLite's POSIX locks).
 * read_file_header() copies up to `size` bytes of schema's file into buf:
 * the count, 0 for an empty file, -1 when the schema has no file or the read
 * failed.  It takes no lock: callers own db (and release the GIL). */
typedef struct {
    int is_database; /* starts with "SQLite format 3" */
    int page_size;   /* 0 unless is_database */
    int wal;         /* read and write versions 2 (WAL) */
} FileHeader;
int read_file_header(sqlite3 *db, const char *schema, unsigned char *buf,
                     int size);
void parse_file_header(const unsigned char *h, int length, FileHeader *out);

/* errors.c */
PyObject *raise_sqlite_error(ModuleState *st, int rc, const char *msg);
PyObject *raise_db_error(ModuleState *st, sqlite3 *db, int rc);
PyObject *raise_error_object(ModuleState *st, int rc, PyObject *msg);
PyObject *raise_error_format(ModuleState *st, int rc, const char *format, ...);
int add_exceptions(PyObject *module, ModuleState *st);

/* connection.c */
extern PyType_Spec connection_spec;
enum { CHECK_OPEN = 1, CHECK_UNLOCKED = 2 };
int connection_check(Connection *self, int what);
int parse_force(PyObject *args, PyObject *kwds, int *force);
PyObject *connection_locked_message(Connection *self);

/* cursor.c */
extern PyType_Spec cursor_spec;
Cursor *cursor_new(Connection *connection);
int cursor_execute(Cursor *self, PyObject *statements, PyObject *bindings,
                   PyObject *many);
void cursor_close_internal(Cursor *self);
int statements_pending(void);
void statements_finalize_pending(Connection *only);

/* backup.c */
extern PyType_Spec backup_spec;
PyObject *backup_create(Connection *dest, PyObject *dest_name,
                        Connection *source, PyObject *source_name);
int backup_finish_internal(Backup *self);
int backup_finish_allowed(Backup *self, Connection *closing);
void backup_forget(Backup *self);
extern Backup *pending_finishes;
void backup_finish_pending(void);

/* recorder.c: PageRecorder (over pageshim.c) and the page hash */
extern PyType_Spec recorder_spec;
PyObject *module_page_hash(PyObject *module, PyObject *data);
PyObject *module_page_hash_variants(PyObject *module, PyObject *data);

#endif /* APSW_BACKUP_H */
