/* Backup: sqlite3_backup_* with the guarantees SQLite leaves to its caller.
 *
 * SQLite does not stop the destination connection being used, or closed,
 * during a backup (sqlite3_close(dest) returns OK and leaves a dangling
 * backup).  So the unfinished backup (its BackupCore) holds both
 * connections, locks the destination (dest->locking), and every path that
 * ends a connection finishes its backups first.
 *
 * Every call holds both connections' locks (locks.c) while it touches the
 * backup: step() and backup() try-lock and refuse a busy one; finish(),
 * close() and __exit__ wait for them; dealloc and GC never wait -- a
 * backup they cannot finish now is left, whole, to the lock's holder.
 *
 * A failed step leaves "not an error" in the destination's error message,
 * so step errors are described from the step's own result code.
 */
#include "apsw_backup.h"

#include <sys/stat.h>

static PyObject *
raise_finished(ModuleState *st)
{
    PyErr_SetString(st->ConnectionClosedError, "The backup is finished");
    return NULL;
}

/* Unfinished, and made before a fork this process is the child of. */
static int
backup_forked(Backup *self)
{
    BackupCore *core = self->core;
    return core != NULL && core->handle != NULL
           && (FORKED(core->source) || FORKED(core->dest));
}

static int
is_open(Backup *self)
{
    return self->core != NULL && self->core->handle != NULL;
}

/* Let go of both locks and of what finishing orphans on the way gathered. */
static void
leave_pair(Connection *source, Connection *dest, BackupCore **done)
{
    unlock(dest, done);
    unlock(source, done);
}

/* try-lock both connections of a call on the backup. */
static int
enter_pair(Backup *self, Connection *source, Connection *dest)
{
    if (lock_try(source, "backup's source connection") < 0) {
        return -1;
    }
    int rc = lock_try_quiet(dest);
    if (rc < 0) {
        BackupCore *done = NULL;
        unlock(source, &done);
        drop_done(done);
        return rc == -2 ? shared_cache_error(dest,
                                             "backup's destination connection")
                        : busy_error(dest, "backup's destination connection");
    }
    (void)self;
    return 0;
}

/* The sqlite3_file SQLite reads schema `name` of db through, or NULL.
 * Connections that share one cache (shared-cache mode) share the pager and
 * so this pointer. */
static sqlite3_file *
schema_file(sqlite3 *db, const char *name)
{
    sqlite3_file *file = NULL;
    if (sqlite3_file_control(db, name, SQLITE_FCNTL_FILE_POINTER, &file)
        != SQLITE_OK) {
        return NULL;
    }
    return file;
}

/* Device and inode of schema `name` of c: for main, as recorded when the
 * connection opened its file (a connection keeps the file it opened,
 * whatever later happens to the name); for others, of the name now. */
static int
schema_file_id(Connection *c, const char *name, unsigned long long *dev,
               unsigned long long *ino)
{
    struct stat st;
    if (strcmp(name, "main") == 0 && c->main_known) {
        *dev = c->main_dev;
        *ino = c->main_ino;
        return 1;
    }
    const char *fn = sqlite3_db_filename(c->db, name);
    if (fn == NULL || !fn[0] || stat(fn, &st) != 0) {
        return 0;
    }
    *dev = (unsigned long long)st.st_dev;
    *ino = (unsigned long long)st.st_ino;
    return 1;
}

/* Whether two schemas are one file (device and inode). */
static int
same_file(Connection *dest, const char *dname, Connection *source,
          const char *sname)
{
    unsigned long long ddev, dino, sdev, sino;
    return schema_file_id(dest, dname, &ddev, &dino)
           && schema_file_id(source, sname, &sdev, &sino) && ddev == sdev
           && dino == sino;
}

/* An int PRAGMA on schema of db (-1 when it fails).  The caller releases
 * the GIL. */
static int
pragma_int(sqlite3 *db, const char *schema, const char *pragma)
{
    char *sql = sqlite3_mprintf("PRAGMA \"%w\".%s", schema, pragma);
    int value = -1;
    sqlite3_stmt *stmt = NULL;
    if (sql != NULL
        && sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) == SQLITE_OK
        && stmt != NULL && sqlite3_step(stmt) == SQLITE_ROW) {
        value = sqlite3_column_int(stmt, 0);
    }
    sqlite3_finalize(stmt);
    sqlite3_free(sql);
    return value;
}

enum {
    PAIR_OK,
    PAIR_SHARED_CACHE,
    PAIR_SAME_FILE,
    PAIR_SAME_NAME,
    PAIR_DEST_STATEMENT,
    PAIR_DEST_TRANSACTION
};

/* Whether any schema of dest reads through `file` (the source's pager):
 * an attached shared cache too -- at the end of a copy SQLite resets every
 * schema of the destination, entering each one's BtShared mutex, and the
 * source's is held by the step itself (a self-deadlock).  The schemas are
 * listed without SQL (a statement could wait on a lock and call the
 * destination's busy handler): sqlite3_db_name(), from SQLite 3.39.  Before
 * that only main and temp are checked here (docs/testing.md). */
static int
dest_shares_pager(sqlite3 *dest, sqlite3_file *file)
{
    if (file == NULL) {
        return 0;
    }
    if (!HAVE_DB_NAME) {
        return schema_file(dest, "main") == file
               || schema_file(dest, "temp") == file;
    }
    for (int i = 0;; i++) {
        const char *name = sqlite3_db_name(dest, i);
        if (name == NULL) {
            return 0;
        }
        if (schema_file(dest, name) == file) {
            return 1;
        }
    }
}

/* The VFS a schema of db uses, or NULL. */
static sqlite3_vfs *
schema_vfs(sqlite3 *db, const char *name)
{
    sqlite3_vfs *vfs = NULL;
    if (sqlite3_file_control(db, name, SQLITE_FCNTL_VFS_POINTER, &vfs)
        != SQLITE_OK) {
        return NULL;
    }
    return vfs;
}

/* The memdb VFS names a schema's store in SQLITE_FCNTL_VFSNAME as
 * "memdb(<address of its content>,<size>)": connections sharing one store
 * ("/name") show one address.  Copies "memdb(<address>" into id (the size
 * may differ between the two answers); 0 when the schema is not memdb or
 * its store holds nothing yet (SQLite prints that NULL address as "0",
 * which every empty store shares). */
static int
memdb_store_id(sqlite3 *db, const char *name, char *id, size_t size)
{
    static const char prefix[] = "memdb(";
    const size_t skip = sizeof(prefix) - 1;
    char *vfsname = NULL;
    int found = 0;
    if (sqlite3_file_control(db, name, SQLITE_FCNTL_VFSNAME, &vfsname)
            != SQLITE_OK
        || vfsname == NULL || strncmp(vfsname, prefix, skip) != 0) {
        goto done;
    }
    const char *comma = strchr(vfsname + skip, ',');
    size_t length = comma == NULL ? 0 : (size_t)(comma - vfsname);
    if (length <= skip || length >= size
        || (length == skip + 1 && vfsname[skip] == '0')) {
        goto done;
    }
    memcpy(id, vfsname, length);
    id[length] = '\0';
    found = 1;
done:
    sqlite3_free(vfsname);
    return found;
}

/* Two schemas with one name in one VFS that names no file (the memdb VFS
 * shares "/name" between connections): one database.  SQLite 3.40 reports
 * that name as the schema's filename, 3.46 and later report "": so the
 * store itself is compared first. */
static int
same_named_database(sqlite3 *dest, const char *dname, const char *dfn,
                    sqlite3 *source, const char *sname, const char *sfn)
{
    struct stat st;
    char did[64], sid[64];
    if (memdb_store_id(dest, dname, did, sizeof(did))
        && memdb_store_id(source, sname, sid, sizeof(sid))
        && strcmp(did, sid) == 0) {
        return 1;
    }
    /* Only "/name" is shared (memdb): other names are private to each
     * connection, whatever they are called. */
    if (dfn == NULL || sfn == NULL || dfn[0] != '/' || strcmp(dfn, sfn) != 0
        || stat(dfn, &st) == 0) {
        return 0;
    }
    sqlite3_vfs *vfs = schema_vfs(dest, dname);
    return vfs != NULL && vfs == schema_vfs(source, sname);
}

/* A statement of dest still running (a cursor not read to the end): when
 * it is finalized -- close() or garbage collection of its cursor, which the
 * destination lock cannot stop -- SQLite, in autocommit mode, commits every
 * schema with a write transaction: the backup's partial copy too. */
static int
dest_statement_running(sqlite3 *dest)
{
    for (sqlite3_stmt *stmt = sqlite3_next_stmt(dest, NULL); stmt != NULL;
         stmt = sqlite3_next_stmt(dest, stmt)) {
        if (sqlite3_stmt_busy(stmt)) {
            return 1;
        }
    }
    return 0;
}

/* Checks made with both locks held and the GIL released (they may wait for
 * the file system), before sqlite3_backup_init: whether the pair can work
 * at all, and what the page-size message may need later. */
static int
check_pair(Backup *self, Connection *dconn, const char *dname,
           Connection *sconn, const char *sname)
{
    sqlite3 *dest = dconn->db, *source = sconn->db;
    sqlite3_file *df = schema_file(dest, dname);
    sqlite3_file *sf = schema_file(source, sname);
    if (df != NULL && df == sf) {
        /* One pager: SQLite's step would wait on itself, forever. */
        return PAIR_SHARED_CACHE;
    }
    if (dest_shares_pager(dest, sf)) {
        return PAIR_SHARED_CACHE;
    }
    const char *dfn = sqlite3_db_filename(dest, dname);
    const char *sfn = sqlite3_db_filename(source, sname);
    if (same_file(dconn, dname, sconn, sname)) {
        return PAIR_SAME_FILE;
    }
    if (same_named_database(dest, dname, dfn, source, sname, sfn)) {
        return PAIR_SAME_NAME;
    }
    if (dest_statement_running(dest)) {
        return PAIR_DEST_STATEMENT;
    }
    if (!sqlite3_get_autocommit(dest)) {
        /* A with-block's SAVEPOINT or a BEGIN: the backup commits its own
         * transaction past it, and its rollback would not undo the copy. */
        return PAIR_DEST_TRANSACTION;
    }
    self->dest_in_memory = dfn == NULL || dfn[0] == '\0';
    if (self->dest_in_memory) {
        /* Private to the connection (no file lock to wait for), and not yet
         * a backup's destination: this read cannot end any transaction. */
        self->dest_page_size = pragma_int(dest, dname, "page_size");
    }
    else {
        /* Through SQLite's own handle: a descriptor of ours, once closed,
         * would drop every POSIX lock this process holds on the file. */
        unsigned char h[100];
        FileHeader header;
        int io_rc; /* a failed read: page size unknown (0), as for no file */
        parse_file_header(
            h, read_file_header(dest, dname, h, sizeof(h), &io_rc), &header);
        self->dest_page_size = header.page_size;
        self->dest_wal = header.wal;
    }
    return PAIR_OK;
}

static PyObject *
refuse_pair(Backup *self, int pair)
{
    if (pair == PAIR_SHARED_CACHE) {
        PyErr_Format(PyExc_ValueError,
                     "cannot back up %U: the source and destination "
                     "connections share one SQLite cache (shared-cache mode, "
                     "e.g. cache=shared in a URI), so they are the same "
                     "database and the copy could never run. Open the "
                     "destination without shared cache, or back up into "
                     "another database",
                     self->repr_names);
    }
    else if (pair == PAIR_SAME_FILE) {
        PyErr_Format(PyExc_ValueError,
                     "cannot back up %U: the source and destination are the "
                     "same database file, so the copy could never finish. "
                     "Back up into another file",
                     self->repr_names);
    }
    else if (pair == PAIR_SAME_NAME) {
        PyErr_Format(PyExc_ValueError,
                     "cannot back up %U: the source and destination are the "
                     "same database (one name in one VFS, as the memdb VFS "
                     "shares it between connections), so the copy could never "
                     "finish. Back up into another database",
                     self->repr_names);
    }
    else if (pair == PAIR_DEST_TRANSACTION) {
        raise_error_format(
            self->state, SQLITE_ERROR,
            "destination database is in use: the destination connection has "
            "an open transaction (a with-block, or BEGIN), which the backup "
            "would commit past -- its rollback would not undo the copy. End "
            "the transaction first (leave the with-block, COMMIT or "
            "ROLLBACK), then start the backup (%U)",
            self->repr_names);
    }
    else {
        raise_error_format(
            self->state, SQLITE_ERROR,
            "destination database is in use: a statement of the destination "
            "connection is still running (a cursor that was not read to the "
            "end); when it ends, SQLite would commit the backup's partial "
            "copy. "
            "Read the cursor to the end or close it, then start the backup "
            "(%U)",
            self->repr_names);
    }
    return NULL;
}

/* "'main' of 'a.db' -> 'main' of 'b.db'", for messages: plain memory (no
 * Python object), so it is made while the locks are held. */
static char *
pair_names(Connection *dest, const char *dname, Connection *source,
           const char *sname)
{
    const char *dfn = sqlite3_db_filename(dest->db, "main");
    const char *sfn = sqlite3_db_filename(source->db, "main");
    dfn = dfn && dfn[0] ? dfn : ":memory:";
    sfn = sfn && sfn[0] ? sfn : ":memory:";
    size_t size =
        strlen(dname) + strlen(sname) + strlen(dfn) + strlen(sfn) + 32;
    char *names = PyMem_Malloc(size);
    if (names != NULL) {
        PyOS_snprintf(names, size, "'%s' of '%s' -> '%s' of '%s'", sname, sfn,
                      dname, dfn);
    }
    return names;
}

static char *
raw_copy(const char *text)
{
    size_t n = strlen(text) + 1;
    char *copy = PyMem_Malloc(n);
    if (copy != NULL) {
        memcpy(copy, text, n);
    }
    return copy;
}

/* Why backup() refused, decided under the locks, said after them. */
enum {
    MADE,
    NO_DEST,   /* the destination is closed */
    NO_SOURCE, /* the source is closed */
    DEST_LOCKED,
    SOURCE_LOCKED,
    FORKED_PAIR,
    REFUSED_PAIR, /* check_pair() said no: self->... has which */
    INIT_FAILED,  /* sqlite3_backup_init: error */
    NO_MEMORY
};

PyObject *
backup_create(Connection *dest, PyObject *dest_name, Connection *source,
              PyObject *source_name)
{
    ModuleState *st = dest->state;
    DbError error;
    int pair = PAIR_OK, outcome;
    BackupCore *core = NULL;

    /* (i) exact names, the Backup and its core: everything that can run
     * user code or fail for memory, before any check */
    PyObject *dname_str = name_as_str(dest_name, "databasename");
    PyObject *sname_str =
        dname_str ? name_as_str(source_name, "sourcedatabasename") : NULL;
    if (sname_str == NULL) {
        Py_XDECREF(dname_str);
        return NULL;
    }
    Backup *self = NULL;
    if (HOOK("backup_create_alloc") == 0) {
        allocfunc alloc =
            (allocfunc)PyType_GetSlot(st->BackupType, Py_tp_alloc);
        self = (Backup *)alloc(st->BackupType, 0);
    }
    core = PyMem_Calloc(1, sizeof(BackupCore));
    if (self == NULL || core == NULL) {
        Py_XDECREF(self);
        PyMem_Free(core);
        Py_DECREF(dname_str);
        Py_DECREF(sname_str);
        return core == NULL ? PyErr_NoMemory() : NULL;
    }
    self->state = st;
    self->dest_name = dname_str;
    self->source_name = sname_str;
    core->dname = raw_copy(PyUnicode_AsUTF8AndSize(dname_str, NULL));
    core->sname = raw_copy(PyUnicode_AsUTF8AndSize(sname_str, NULL));
    self->core = core; /* freed with self, whatever happens */
    if (core->dname == NULL || core->sname == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }

    /* (ii) both locks, the checks (docs/api.md#backup), the act */
    if (dest->db == NULL || FORKED(dest) || source->db == NULL
        || FORKED(source)) {
        outcome = dest->db == NULL     ? NO_DEST
                  : FORKED(dest)       ? FORKED_PAIR
                  : source->db == NULL ? NO_SOURCE
                                       : FORKED_PAIR;
    }
    else if (lock_try(dest, "destination connection") < 0) {
        Py_DECREF(self);
        return NULL;
    }
    else if (lock_try(source, "source connection") < 0) {
        BackupCore *done = NULL;
        unlock(dest, &done);
        drop_done(done);
        Py_DECREF(self);
        return NULL;
    }
    else {
        sqlite3_backup *handle = NULL;
        outcome = dest->db == NULL          ? NO_DEST
                  : source->db == NULL      ? NO_SOURCE
                  : dest->locking != NULL   ? DEST_LOCKED
                  : source->locking != NULL ? SOURCE_LOCKED
                                            : MADE;
        if (outcome == MADE) {
            core->names = pair_names(dest, core->dname, source, core->sname);
            RELEASE_GIL("backup_create");
            pair = check_pair(self, dest, core->dname, source, core->sname);
            if (pair == PAIR_OK) {
                handle = sqlite3_backup_init(dest->db, core->dname, source->db,
                                             core->sname);
                if (handle == NULL) {
                    /* sqlite3_backup_init leaves its error on dest. */
                    capture_db_error(
                        dest->db, sqlite3_extended_errcode(dest->db), &error);
                }
            }
            REACQUIRE_GIL();
            outcome = core->names == NULL ? NO_MEMORY
                      : pair != PAIR_OK   ? REFUSED_PAIR
                      : handle == NULL    ? INIT_FAILED
                                          : MADE;
            if (outcome != MADE && handle != NULL) {
                sqlite3_backup_finish(handle); /* only for lack of memory */
                handle = NULL;
            }
        }
        if (outcome == MADE) {
            core->handle = handle;
            core->source = (Connection *)Py_NewRef(source);
            core->dest = (Connection *)Py_NewRef(dest);
            core->src_next = source->sources;
            if (source->sources != NULL) {
                source->sources->src_prev = core;
            }
            source->sources = core;
            dest->locking = core;
        }
        BackupCore *done = NULL;
        unlock(source, &done);
        unlock(dest, &done);
        drop_done(done);
    }

    /* (iii) the Backup, or the error */
    if (outcome != NO_DEST && outcome != NO_SOURCE && outcome != FORKED_PAIR
        && outcome != NO_MEMORY) {
        const char *names = core->names ? core->names : "";
        self->repr_names =
            HOOK("backup_create_repr") < 0
                ? NULL
                : PyUnicode_DecodeUTF8(names, (Py_ssize_t)strlen(names),
                                       "replace");
        if (self->repr_names == NULL) {
            Py_DECREF(self); /* finishes the backup if it was made */
            return NULL;
        }
    }
    switch (outcome) {
    case MADE:
        return (PyObject *)self;
    case NO_DEST:
        PyErr_SetString(st->ConnectionClosedError, "The connection is closed");
        break;
    case NO_SOURCE:
        PyErr_SetString(st->ConnectionClosedError,
                        "The source connection is closed");
        break;
    case FORKED_PAIR:
        raise_forked(st, "connection");
        break;
    case DEST_LOCKED:
        PyErr_Format(st->DestinationLockedError,
                     "The destination connection already has an unfinished "
                     "Backup; finish it (backup.finish() or close()) before "
                     "starting another");
        break;
    case SOURCE_LOCKED:
        PyErr_Format(st->DestinationLockedError,
                     "The source connection is the destination of an "
                     "unfinished Backup; finish that backup (finish(), "
                     "close() or the end of its with-block) before copying "
                     "from it");
        break;
    case REFUSED_PAIR:
        refuse_pair(self, pair);
        break;
    case INIT_FAILED:
        raise_captured(st, &error);
        break;
    default:
        PyErr_NoMemory();
    }
    Py_DECREF(self);
    return NULL;
}

/* What a failed step's message needs, read under the locks (SQL on the
 * source only: on the destination it could commit the partial copy). */
typedef struct {
    int rc;
    int source_write;      /* the source schema has a write transaction */
    char *locking_names;   /* the source is a destination: whose (mprintf) */
    int source_page_size;  /* for the page-size trap, else 0 */
    int restarted;         /* a sticky lock code began a fresh backup */
    int restart_failed_rc; /* ... and that failed with this code */
} StepFacts;

/* SQLITE_READONLY from a step into a WAL, in-memory or temp destination
 * whose page size differs from the source's: SQLite cannot change such a
 * page size.  Reads the source's page size (locks held, GIL released). */
static int
trap_source_page_size(Backup *self, BackupCore *core)
{
    if (!(self->dest_wal || self->dest_in_memory)
        || sqlite3_db_readonly(core->dest->db, core->dname) != 0) {
        return 0;
    }
    int size = pragma_int(core->source->db, core->sname, "page_size");
    return size > 0 && size != self->dest_page_size ? size : 0;
}

static PyObject *
page_size_trap_message(Backup *self, int source_size)
{
    PyObject *dest_size =
        self->dest_page_size > 0
            ? PyUnicode_FromFormat("%d", self->dest_page_size)
            : PyUnicode_FromString("another size");
    if (dest_size == NULL) {
        return NULL;
    }
    PyObject *msg = PyUnicode_FromFormat(
        "cannot copy into %R: the destination is %s and its page size (%U) "
        "differs from the source's page size (%d); SQLite cannot change the "
        "page size of such a database. Give the destination page_size %d "
        "before the backup (%s), or copy into a file database in "
        "rollback-journal mode. The destination was not changed",
        self->dest_name,
        self->dest_wal ? "in WAL mode" : "an in-memory or temp database",
        dest_size, source_size, source_size,
        self->dest_wal
            ? "PRAGMA journal_mode=DELETE, then PRAGMA page_size and VACUUM"
            : "PRAGMA page_size on the empty database");
    Py_DECREF(dest_size);
    return msg;
}

/* " (OS error: ...)" for a failed read or write, else "".  SQLite's own
 * text for those ("disk I/O error") does not say what the system said. */
static const char *
os_error(Backup *self, int primary, char *text, size_t size)
{
    if (primary != SQLITE_IOERR && primary != SQLITE_FULL
        && primary != SQLITE_CANTOPEN) {
        return "";
    }
    if (self->last_errno == 0) {
        return "";
    }
    PyOS_snprintf(text, size, " (OS error: %s)", strerror(self->last_errno));
    return text;
}

/* The message for a failed step, built from the step's own code. */
static PyObject *
step_error_message(Backup *self, const StepFacts *f)
{
    int rc = f->rc, primary = rc & 0xff;
    char text[160];

    if (primary == SQLITE_BUSY) {
        /* Blamed on the backup writing into the source only when that
         * backup holds the source's write transaction (it stepped). */
        if (f->locking_names != NULL && f->source_write) {
            return PyUnicode_FromFormat(
                "The source connection is itself the destination of an "
                "unfinished Backup (%s), which holds its write transaction: "
                "SQLite refuses to copy from it until that backup is "
                "finished. Finish that backup first, then step again",
                f->locking_names);
        }
        if (f->source_write) {
            return PyUnicode_FromFormat(
                "The source connection has its own open write transaction "
                "on %R: SQLite refuses to copy from it (every step would be "
                "BUSY) until that transaction ends. Commit or roll back the "
                "source's transaction (source.execute(\"COMMIT\") or "
                "\"ROLLBACK\"), then step again",
                self->source_name);
        }
        return PyUnicode_FromFormat(
            "backup step (%U): the database is locked (SQLITE_BUSY): another "
            "connection holds a lock on the source or the destination. The "
            "backup is still usable: call step() again later",
            self->repr_names);
    }
    if (primary == SQLITE_LOCKED) {
        return PyUnicode_FromFormat(
            "backup step (%U): a table is locked (SQLITE_LOCKED) by another "
            "connection sharing the cache. The backup is still usable: call "
            "step() again later",
            self->repr_names);
    }
    if (primary == SQLITE_READONLY && f->source_page_size > 0) {
        return page_size_trap_message(self, f->source_page_size);
    }
    return PyUnicode_FromFormat(
        "backup step (%U) failed: %s%s (the backup cannot continue; finish() "
        "rolls the destination back)",
        self->repr_names, sqlite3_errstr(rc),
        os_error(self, primary, text, sizeof(text)));
}

static PyObject *
raise_step_error(Backup *self, const StepFacts *f)
{
    PyObject *msg = step_error_message(self, f);
    if (msg == NULL) {
        return NULL;
    }
    raise_error_object(self->state, f->rc, msg);
    int primary = f->rc & 0xff;
    if (primary != SQLITE_BUSY && primary != SQLITE_LOCKED) {
        self->sticky_rc = f->rc;
        REPLACE_REF(self->sticky_msg, msg);
    }
    else {
        Py_DECREF(msg);
    }
    return NULL;
}

/* npages from step()'s one optional argument (positional or keyword). */
static int
parse_npages(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
             int *npages)
{
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    PyObject *value = NULL;
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError,
                     "step() takes at most 1 argument (npages), %zd given",
                     nargs + nkw);
        return -1;
    }
    if (nargs == 1) {
        value = args[0];
    }
    else if (nkw == 1) {
        PyObject *key = PyTuple_GetItem(kwnames, 0);
        if (key == NULL
            || PyUnicode_CompareWithASCIIString(key, "npages") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "step() got an unexpected keyword argument %R", key);
            return -1;
        }
        value = args[0];
    }
    if (value == NULL) {
        *npages = -1;
        return 0;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "npages must be an int, not %R",
                     (PyObject *)Py_TYPE(value));
        return -1;
    }
    int overflow;
    long v = PyLong_AsLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || v > INT_MAX || v < INT_MIN) {
        PyErr_Format(PyExc_OverflowError,
                     "npages %R is out of range: it must fit a C int "
                     "(negative copies every remaining page)",
                     value);
        return -1;
    }
    *npages = (int)v;
    return 0;
}

/* An extended BUSY or LOCKED code (SQLITE_BUSY_RECOVERY while another
 * connection recovers the WAL, BUSY_SNAPSHOT, BUSY_TIMEOUT,
 * LOCKED_SHAREDCACHE...).  SQLite's step retries only the exact codes: any
 * other answer is kept as the backup's error, and every later step returns
 * it without trying again -- a retry loop would spin for ever on a lock
 * that is long gone. */
static int
sticky_lock_code(int rc)
{
    int primary = rc & 0xff;
    return (primary == SQLITE_BUSY || primary == SQLITE_LOCKED)
           && rc != primary;
}

static const char *
lock_code_cause(int rc)
{
    switch (rc) {
    case SQLITE_BUSY | (1 << 8):
        return "another connection is recovering the write-ahead log";
    case SQLITE_BUSY | (2 << 8):
        return "a read snapshot is out of date";
    case SQLITE_BUSY | (3 << 8):
        return "a blocking lock timed out";
    case SQLITE_LOCKED | (1 << 8):
        return "a table is locked by a connection sharing the cache";
    default:
        return "the database is locked";
    }
}

/* Start the copy again on a fresh sqlite3_backup after a sticky lock code
 * -- what SQLite itself does when another connection changes the source:
 * the destination is rolled back and the next step starts from page 1.
 * Locks held.  If no fresh backup can be made (out of memory), the backup
 * is finished: its core goes on *done. */
static void
restart_backup(Backup *self, BackupCore *core, StepFacts *f, BackupCore **done)
{
    sqlite3 *ddb = core->dest->db, *sdb = core->source->db;
    sqlite3_backup *old = core->handle, *fresh = NULL;
    int init_rc = SQLITE_OK;

    RELEASE_GIL("restart_backup");
    sqlite3_backup_finish(old); /* answers the sticky code again: known */
    fresh = sqlite3_backup_init(ddb, core->dname, sdb, core->sname);
    if (fresh == NULL) {
        init_rc = sqlite3_extended_errcode(ddb);
    }
    REACQUIRE_GIL();
    self->remaining = 0;
    self->page_count = 0;
    f->restarted = 1;
    if (fresh == NULL) {
        f->restart_failed_rc = init_rc ? init_rc : SQLITE_NOMEM;
        core_forget(core, done); /* finished above */
        return;
    }
    core->handle = fresh;
    core->stepped = 0;
    self->restarts++;
}

static void
raise_restarted(Backup *self, const StepFacts *f)
{
    if (f->restart_failed_rc != SQLITE_OK) {
        raise_error_format(self->state, f->restart_failed_rc,
                           "backup step (%U): SQLite answered %s (%s) and "
                           "keeps that answer for the rest of a backup; "
                           "starting the copy again failed: %s. The backup is "
                           "finished and the destination was rolled back",
                           self->repr_names, sqlite3_errstr(f->rc),
                           lock_code_cause(f->rc),
                           sqlite3_errstr(f->restart_failed_rc));
        return;
    }
    raise_error_format(
        self->state, f->rc,
        "backup step (%U): the database is locked (%s; extended "
        "code %d). SQLite keeps such an answer for the rest of a "
        "backup, so the copy was started again on a fresh "
        "backup (the destination rolled back to its previous "
        "content). The backup is still usable: call step() "
        "again later",
        self->repr_names, lock_code_cause(f->rc), f->rc);
}

static int
is_os_failure(int rc)
{
    int primary = rc & 0xff;
    return primary == SQLITE_IOERR || primary == SQLITE_FULL
           || primary == SQLITE_CANTOPEN;
}

/* The OS error the destination's, else the source's, file last saw (the
 * caller releases the GIL). */
static int
schema_errno(sqlite3 *db, const char *name)
{
    int err = 0;
    if (sqlite3_file_control(db, name, SQLITE_FCNTL_LAST_ERRNO, &err)
            == SQLITE_OK
        && err != 0) {
        return err;
    }
    /* The failing file may be the journal (or WAL) of that schema. */
    sqlite3_file *journal = NULL;
    err = 0;
    if (sqlite3_file_control(db, name, SQLITE_FCNTL_JOURNAL_POINTER, &journal)
            == SQLITE_OK
        && journal != NULL
        && journal->pMethods != NULL
        /* an in-memory journal has no xFileControl */
        && journal->pMethods->xFileControl != NULL
        && journal->pMethods->xFileControl(journal, SQLITE_FCNTL_LAST_ERRNO,
                                           &err)
               == SQLITE_OK) {
        return err;
    }
    return 0;
}

static int
file_errno(sqlite3 *dest, const char *dname, sqlite3 *source,
           const char *sname)
{
    int err = schema_errno(dest, dname);
    return err != 0 ? err : schema_errno(source, sname);
}

static PyObject *
backup_step(Backup *self, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames)
{
    int npages, rc, remaining, page_count;
    StepFacts f = {0, 0, NULL, 0, 0, 0};
    BackupCore *done = NULL;

    if (!is_open(self)) { /* said before an argument's fault */
        return raise_finished(self->state);
    }
    if (backup_forked(self)) {
        return raise_forked(self->state, "backup");
    }
    /* (i) */
    if (parse_npages(args, nargs, kwnames, &npages) < 0) {
        return NULL;
    }
    /* (ii) the arguments ran no code: the backup is as it was above */
    BackupCore *core = self->core;
    Connection *source = core->source, *dest = core->dest;
    if (enter_pair(self, source, dest) < 0) {
        return NULL;
    }
    /* Held: nothing can finish the core or close either connection. */
    if (self->sticky_rc != SQLITE_OK || self->done) {
        leave_pair(source, dest, &done);
        drop_done(done);
        if (self->sticky_rc != SQLITE_OK) {
            return raise_error_object(self->state, self->sticky_rc,
                                      self->sticky_msg);
        }
        Py_RETURN_TRUE;
    }
    long before = self->page_count - self->remaining;
    sqlite3_backup *handle = core->handle;
    int last_errno = 0;
    RELEASE_GIL("backup_step");
    rc = sqlite3_backup_step(handle, npages);
    remaining = sqlite3_backup_remaining(handle);
    page_count = sqlite3_backup_pagecount(handle);
    if (is_os_failure(rc) && !FORKED(source)) { /* no SQLite after fork */
        /* Read now: sqlite3_backup_step sets no connection's system
         * errno, but each file keeps its own. */
        last_errno =
            file_errno(dest->db, core->dname, source->db, core->sname);
    }
    REACQUIRE_GIL();
    core->stepped = 1;
    int forked = FORKED(source) || FORKED(dest);
    int callback_raised = PyErr_Occurred() != NULL;
    int ok =
        !forked && !callback_raised && (rc == SQLITE_OK || rc == SQLITE_DONE);
    if (ok) {
        /* SQLite can answer remaining = -1 when another backup through the
         * same connection shrank the source under this one (its count runs
         * past the new end): what is left is nothing. */
        if (remaining < 0 || rc == SQLITE_DONE) {
            remaining = 0;
        }
        long after = page_count - remaining;
        long expected = npages < 0 ? page_count : before + npages;
        if (expected > page_count) {
            expected = page_count;
        }
        /* The copy can only move forward unless another connection changed
         * the source and SQLite started again from page 1. */
        if (rc == SQLITE_OK && after < expected) {
            self->restarts++;
        }
        self->remaining = remaining;
        self->page_count = page_count;
        self->done = rc == SQLITE_DONE;
    }
    else if (!forked && !callback_raised) {
        f.rc = rc;
        self->last_errno = last_errno;
        if (sticky_lock_code(rc)) {
            restart_backup(self, core, &f, &done);
        }
        else {
            RELEASE_GIL("backup_step_facts");
            f.source_write =
                db_txn_state(source->db, core->sname) == SQLITE_TXN_WRITE;
            if ((rc & 0xff) == SQLITE_READONLY) {
                f.source_page_size = trap_source_page_size(self, core);
            }
            REACQUIRE_GIL();
            if (source->locking != NULL) {
                f.locking_names = sqlite3_mprintf(
                    "%s",
                    source->locking->names ? source->locking->names : "");
            }
        }
    }
    leave_pair(source, dest, &done); /* forked: touches no SQLite */
    /* (iii) */
    drop_done(done);
    HOOK_VOID("backup_step_result");
    PyObject *result = NULL;
    if (forked) {
        /* A busy handler forked and this is the child: the callback's own
         * exception (SystemExit) first. */
        if (!PyErr_Occurred()) {
            raise_forked(self->state, "backup");
        }
    }
    else if (callback_raised) {
        /* A callback (busy handler) raised: that is what the user sees. */
    }
    else if (ok) {
        result = PyBool_FromLong(self->done);
    }
    else if (f.restarted) {
        raise_restarted(self, &f);
    }
    else {
        raise_step_error(self, &f);
    }
    sqlite3_free(f.locking_names);
    return result;
}

/* Message for a failed sqlite3_backup_finish. */
static PyObject *
finish_error_message(Backup *self, int rc)
{
    if (rc == self->sticky_rc && self->sticky_msg != NULL) {
        return Py_NewRef(self->sticky_msg);
    }
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) {
        return PyUnicode_FromFormat(
            "the backup from %R into %R was finished after its last step "
            "failed with %s, before every page was copied: the destination "
            "was rolled back to its previous content",
            self->source_name, self->dest_name, sqlite3_errstr(rc));
    }
    return PyUnicode_FromFormat(
        "finishing the backup from %R into %R failed: %s; the destination "
        "was rolled back",
        self->source_name, self->dest_name, sqlite3_errstr(rc));
}

/* finish(), close() and __exit__: wait for both locks (never from inside a
 * call: refused there), finish unless someone else did meanwhile, and say
 * how it went.  0, or -1 with the error (the backup is finished anyway,
 * unless the error is a refusal to wait). */
static int
finish_now(Backup *self)
{
    if (!is_open(self)) {
        return 0;
    }
    BackupCore *core = self->core, *done = NULL;
    Connection *source = core->source, *dest = core->dest;
    /* Ours while we wait: another thread may finish the backup meanwhile
     * and drop its references. */
    Py_INCREF(source);
    Py_INCREF(dest);
    if (lock_wait(source, dest, "backup's connection") < 0) {
        Py_DECREF(source);
        Py_DECREF(dest);
        return -1;
    }
    int rc = SQLITE_OK;
    if (core->handle != NULL) { /* else finished by another meanwhile */
        core_finish(core, &done);
        rc = core->finish_rc;
    }
    leave_pair(source, dest, &done);
    /* (iii) */
    drop_done(done);
    HOOK_VOID("finish_decref");
    Py_DECREF(source);
    Py_DECREF(dest);
    if (rc == SQLITE_OK || rc == SQLITE_DONE) {
        return PyErr_Occurred() ? -1 : 0; /* a busy handler raised */
    }
    PyObject *msg = finish_error_message(self, rc);
    if (msg != NULL) {
        raise_error_object(self->state, rc, msg);
        Py_DECREF(msg);
    }
    return -1;
}

static PyObject *
backup_finish(Backup *self, PyObject *Py_UNUSED(ignored))
{
    if (backup_forked(self)) {
        return raise_forked(self->state, "backup");
    }
    if (finish_now(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* In a forked child: let go of the backup without calling SQLite. */
static void
forget(Backup *self)
{
    BackupCore *done = NULL;
    if (is_open(self)) {
        core_forget(self->core, &done);
    }
    drop_done(done);
}

static PyObject *
backup_close(Backup *self, PyObject *args, PyObject *kwds)
{
    int force;

    if (parse_force(args, kwds, &force) < 0) {
        return NULL;
    }
    if (backup_forked(self)) {
        if (!force) {
            return raise_forked(self->state, "backup");
        }
        forget(self);
        Py_RETURN_NONE;
    }
    if (finish_now(self) < 0) {
        /* A refusal is not an error of the finish: force does not hide
         * that the backup is still open. */
        if (!force
            || PyErr_ExceptionMatches(self->state->ThreadingViolationError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    Py_RETURN_NONE;
}

static PyObject *
backup_enter(Backup *self, PyObject *Py_UNUSED(ignored))
{
    if (!is_open(self)) {
        return raise_finished(self->state);
    }
    if (backup_forked(self)) {
        return raise_forked(self->state, "backup");
    }
    /* As every method: refused from a callback of a call on the backup, or
     * while another thread's call uses it. */
    BackupCore *core = self->core, *done = NULL;
    if (enter_pair(self, core->source, core->dest) < 0) {
        return NULL;
    }
    leave_pair(core->source, core->dest, &done);
    drop_done(done);
    return Py_NewRef(self);
}

static PyObject *
backup_exit(Backup *self, PyObject *args)
{
    PyObject *etype, *evalue, *etb;

    if (!PyArg_ParseTuple(args, "OOO:__exit__", &etype, &evalue, &etb)) {
        return NULL;
    }
    int res = backup_forked(self) ? (raise_forked(self->state, "backup"), -1)
                                  : finish_now(self);
    if (res < 0) {
        if (etype == Py_None) {
            return NULL;
        }
        /* The body's exception is the one that comes out. */
        PyErr_Clear();
    }
    Py_RETURN_FALSE;
}

/* Let go from garbage collection or dealloc: never waits, never refuses.
 * Both locks free: finish now (an error goes to sys.unraisablehook).  A
 * lock busy (another thread's call, or this thread's, deeper): the core
 * becomes an orphan, still linked and still locking the destination, and
 * whoever holds the lock finishes it as it lets go (locks.c).  A forked
 * child lets go without calling SQLite. */
static void
let_go(Backup *self)
{
    BackupCore *core = self->core, *done = NULL;
    if (core == NULL) {
        return;
    }
    self->core = NULL;
    if (core->handle == NULL) {
        if (core->source != NULL) {
            /* Finished, but still on its finisher's list of references to
             * drop (it let go of the GIL since): freed there. */
            core->orphan = 1;
        }
        else {
            core_free(core);
        }
        return;
    }
    if (FORKED(core->source) || FORKED(core->dest)) {
        core->orphan = 1; /* freed by drop_done */
        core_forget(core, &done);
        drop_done(done);
        return;
    }
    Connection *source = core->source, *dest = core->dest;
    if (lock_try_quiet(source) < 0) {
        core->orphan = 1;
        return;
    }
    if (lock_try_quiet(dest) < 0) {
        core->orphan = 1;
        unlock(source, &done); /* settles the orphan if it can */
        drop_done(done);
        return;
    }
    core->orphan = 1; /* drop_done frees it and reports a failure */
    core_finish(core, &done);
    leave_pair(source, dest, &done);
    drop_done(done);
}

static int
backup_traverse(Backup *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    if (is_open(self)) {
        Py_VISIT(self->core->dest);
        Py_VISIT(self->core->source);
    }
    return 0;
}

static int
backup_clear(Backup *self)
{
    let_go(self);
    return 0;
}

static void
backup_dealloc(Backup *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    let_go(self);
    Py_CLEAR(self->dest_name);
    Py_CLEAR(self->source_name);
    Py_CLEAR(self->repr_names);
    Py_CLEAR(self->sticky_msg);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static int
backup_bool(Backup *self)
{
    return is_open(self);
}

static PyObject *
backup_repr(Backup *self)
{
    PyObject *names = self->repr_names;
    if (names == NULL) {
        return PyUnicode_FromString("<apsw_backup.Backup: not made>");
    }
    if (!is_open(self)) {
        return PyUnicode_FromFormat("<apsw_backup.Backup %U: finished%s>",
                                    names, self->done ? " (complete)" : "");
    }
    return PyUnicode_FromFormat(
        "<apsw_backup.Backup %U: %d of %d pages copied, %d remaining, "
        "%ld restarts%s>",
        names, self->page_count - self->remaining, self->page_count,
        self->remaining, self->restarts, self->done ? ", done" : "");
}

static PyObject *
backup_get_done(Backup *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->done);
}

static PyObject *
backup_get_remaining(Backup *self, void *Py_UNUSED(closure))
{
    /* 0 once finished, by whichever path (a connection's close too) */
    return PyLong_FromLong(is_open(self) ? self->remaining : 0);
}

static PyObject *
backup_get_page_count(Backup *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(is_open(self) ? self->page_count : 0);
}

static PyObject *
backup_get_restarts(Backup *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->restarts);
}

static PyMethodDef backup_methods[] = {
    {"step", (PyCFunction)(void (*)(void))backup_step,
     METH_FASTCALL | METH_KEYWORDS,
     "step(npages=-1) -> bool\n\nCopy up to npages pages (negative: all "
     "that remain; 0: none, but fill in remaining and page_count).  Returns "
     "True once the copy is complete.  BusyError and LockedError leave the "
     "backup usable; other errors are final and finish() reports them "
     "again."},
    {"finish", (PyCFunction)backup_finish, METH_NOARGS,
     "finish() -> None\n\nEnd the backup: the copy is kept if it completed, "
     "otherwise the destination is rolled back.  It always ends the backup, "
     "even when it raises; calling it again does nothing."},
    {"close", (PyCFunction)(void (*)(void))backup_close,
     METH_VARARGS | METH_KEYWORDS,
     "close(force=False) -> None\n\nfinish(); with force=True errors are "
     "ignored."},
    {"__enter__", (PyCFunction)backup_enter, METH_NOARGS,
     "Return the backup."},
    {"__exit__", (PyCFunction)backup_exit, METH_VARARGS,
     "finish(); its error is raised only if the block did not raise."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef backup_getset[] = {
    {"done", (getter)backup_get_done, NULL,
     "True once every page has been copied.", NULL},
    {"remaining", (getter)backup_get_remaining, NULL,
     "Pages still to copy, as of the last step (0 before the first step and "
     "after finishing).",
     NULL},
    {"page_count", (getter)backup_get_page_count, NULL,
     "Pages in the source, as of the last step (0 before the first step "
     "and after finishing).",
     NULL},
    {"pagecount", (getter)backup_get_page_count, NULL,
     "Alias of page_count (APSW's name).", NULL},
    {"restarts", (getter)backup_get_restarts, NULL,
     "How many times the copy started again from the first page because "
     "another connection changed the source.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot backup_slots[] = {
    {Py_tp_doc, "An online backup: made by Connection.backup()."},
    {Py_tp_dealloc, backup_dealloc},
    {Py_tp_traverse, backup_traverse},
    {Py_tp_clear, backup_clear},
    {Py_tp_repr, backup_repr},
    {Py_nb_bool, backup_bool},
    {Py_tp_methods, backup_methods},
    {Py_tp_getset, backup_getset},
    {0, NULL},
};

PyType_Spec backup_spec = {
    .name = "apsw_backup.Backup",
    .basicsize = sizeof(Backup),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC
             | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = backup_slots,
};
