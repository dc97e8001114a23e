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

#define APSW_BACKUP_VERSION "0.1.0"

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
    PyObject *Error;
    PyObject *ThreadingViolationError;
    PyObject *ConnectionClosedError;
    PyObject *CursorClosedError;
    PyObject *BindingsError;
    PyObject *code_errors[N_CODE_ERRORS]; /* by primary code; [0] unused */
} ModuleState;

struct Connection {
    PyObject_HEAD
    ModuleState *state;
    sqlite3 *db;       /* NULL before __init__ and once closed */
    int inuse;         /* calls inside SQLite now (GIL released); a
                        * count, as a collected Backup may finish
                        * while another thread uses the source */
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
    PyObject *dest_name;
    PyObject *source_name;
    PyObject *repr_names; /* "source -> dest" text kept for repr */
    int inuse;
    int done;
    int remaining;
    int page_count;
    long restarts;
    int sticky_rc; /* a failed step's code, reported again */
    PyObject *sticky_msg;
};

/* module.c */
ModuleState *state_from_type(PyTypeObject *type);

/* errors.c */
PyObject *raise_sqlite_error(ModuleState *st, int rc, const char *msg);
PyObject *raise_db_error(ModuleState *st, sqlite3 *db, int rc);
PyObject *raise_error_object(ModuleState *st, int rc, PyObject *msg);
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

/* backup.c */
extern PyType_Spec backup_spec;
PyObject *backup_create(Connection *dest, PyObject *dest_name,
                        Connection *source, PyObject *source_name);
int backup_finish_internal(Backup *self);

#endif /* APSW_BACKUP_H */
