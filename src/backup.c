/* Backup: sqlite3_backup_* with the guarantees SQLite leaves to its caller.
 *
 * SQLite does not stop the destination connection being used, or closed,
 * during a backup (sqlite3_close(dest) returns OK and leaves a dangling
 * backup).  So the Backup holds both connections, locks the destination
 * (dest->locked_by) until it is finished, and every path that ends a
 * connection finishes its backups first.
 *
 * A failed step leaves "not an error" in the destination's error message,
 * so step errors are described from the step's own result code.
 *
 * Who owns what while the GIL is released, and why a finish can never run
 * twice, is written down in src/README.md ("Ownership"): keep it true.
 */
#include "apsw_backup.h"

#include <sys/stat.h>

static int
backup_forked(Backup *self)
{
    return FORKED(self->source) || FORKED(self->dest);
}

static int
backup_check(Backup *self)
{
    if (self->backup == NULL && !self->finishing) {
        PyErr_SetString(self->state->ConnectionClosedError,
                        "The backup is finished");
        return -1;
    }
    if (backup_forked(self)) {
        raise_forked(self->state, "backup");
        return -1;
    }
    if (self->inuse) {
        PyErr_SetString(
            in_call_here(self) ? self->state->ReentrancyError
                               : self->state->InUseError,
            "The backup is in use by a call that has not returned "
            "(in another thread, or re-entrantly from a callback "
            "running inside step()); wait for that call to finish");
        return -1;
    }
    return 0;
}

#define BACKUP_GUARD(self)            \
    do {                              \
        if (backup_check(self) < 0) { \
            return NULL;              \
        }                             \
    } while (0)

static void
link_source(Backup *self, Connection *source)
{
    self->src_prev = NULL;
    self->src_next = source->sources;
    if (source->sources != NULL) {
        source->sources->src_prev = self;
    }
    source->sources = self;
}

static void
unlink_source(Backup *self, Connection *source)
{
    if (self->src_prev != NULL) {
        self->src_prev->src_next = self->src_next;
    }
    else {
        source->sources = self->src_next;
    }
    if (self->src_next != NULL) {
        self->src_next->src_prev = self->src_prev;
    }
    self->src_prev = self->src_next = NULL;
}

/* The end of every finish, once the sqlite3_backup is gone: unlock the
 * destination, leave the source's list, drop both references (last: their
 * destructors may run any code). */
static void
let_go(Backup *self)
{
    Connection *source = self->source, *dest = self->dest;
    dest->locked_by = NULL;
    unlink_source(self, source);
    self->remaining = 0;
    self->page_count = 0;
    self->source = NULL;
    self->dest = NULL;
    self->finishing = 0;
    Py_DECREF(source);
    Py_DECREF(dest);
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
    PAIR_DEST_STATEMENT
};

/* Whether any schema of dest reads through `file` (the source's pager):
 * an attached shared cache too -- at the end of a copy SQLite resets every
 * schema of the destination, entering each one's BtShared mutex, and the
 * source's is held by the step itself (a self-deadlock).  The schemas are
 * listed without SQL (a statement could wait on a lock and call the
 * destination's busy handler): sqlite3_db_name(), from SQLite 3.39.  Before
 * that only main and temp are checked here (README). */
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

/* Checks made with the GIL released (they may wait for SQLite's mutexes,
 * or for the file system), before sqlite3_backup_init: whether the pair
 * can work at all, and what the page-size message may need later. */
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
        parse_file_header(h, read_file_header(dest, dname, h, sizeof(h)),
                          &header);
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

PyObject *
backup_create(Connection *dest, PyObject *dest_name, Connection *source,
              PyObject *source_name)
{
    ModuleState *st = dest->state;
    const char *dname = PyUnicode_AsUTF8AndSize(dest_name, NULL);
    const char *sname = PyUnicode_AsUTF8AndSize(source_name, NULL);
    sqlite3_backup *backup = NULL;
    int pair;

    if (dname == NULL || sname == NULL) {
        return NULL;
    }
    PyObject *memory = PyUnicode_FromString(":memory:");
    if (memory == NULL) {
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(st->BackupType, Py_tp_alloc);
    Backup *self = (Backup *)alloc(st->BackupType, 0);
    if (self == NULL) {
        Py_DECREF(memory);
        return NULL;
    }
    self->state = st;
    self->dest_name = Py_NewRef(dest_name);
    self->source_name = Py_NewRef(source_name);
    self->dname = dname;
    self->sname = sname;
    self->repr_names = PyUnicode_FromFormat(
        "%R of %R -> %R of %R", source_name,
        PyUnicode_GetLength(source->filename) ? source->filename : memory,
        dest_name,
        PyUnicode_GetLength(dest->filename) ? dest->filename : memory);
    Py_DECREF(memory);
    if (self->repr_names == NULL) {
        Py_DECREF(self);
        return NULL;
    }

    /* Both connections are marked in use (and owned by our caller) while
     * the GIL is released: no other thread can close them meanwhile. */
    call_enter(dest, &dest->inuse);
    call_enter(source, &source->inuse);
    Py_BEGIN_ALLOW_THREADS
    pair = check_pair(self, dest, dname, source, sname);
    if (pair == PAIR_OK) {
        backup = sqlite3_backup_init(dest->db, dname, source->db, sname);
    }
    Py_END_ALLOW_THREADS
    if (pair == PAIR_OK && backup == NULL) {
        /* sqlite3_backup_init leaves its error on the destination. */
        raise_db_error(st, dest->db, sqlite3_extended_errcode(dest->db));
    }
    call_leave(&source->inuse);
    call_leave(&dest->inuse);
    if (pair != PAIR_OK) {
        refuse_pair(self, pair);
    }
    if (backup == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->backup = backup;
    self->dest = (Connection *)Py_NewRef(dest);
    self->source = (Connection *)Py_NewRef(source);
    dest->locked_by = self;
    link_source(self, source);
    return (PyObject *)self;
}

/* SQLITE_READONLY from a step into a WAL, in-memory or temp destination
 * whose page size differs from the source's: SQLite cannot change such a
 * page size.  The message for that case, or None when it is not that.
 *
 * No SQL runs on the destination here: the backup holds its write
 * transaction, and a statement could commit it (a partial copy).  What is
 * known of the destination was read before sqlite3_backup_init; the
 * source's page size is asked of the source. */
static PyObject *
page_size_trap_message(Backup *self, const char *sname)
{
    const char *dname = self->dname;
    sqlite3 *source = self->source->db;
    int source_size;

    if (!(self->dest_wal || self->dest_in_memory)
        || sqlite3_db_readonly(self->dest->db, dname) != 0) {
        Py_RETURN_NONE;
    }
    call_enter(self->source, &self->source->inuse);
    Py_BEGIN_ALLOW_THREADS
    source_size = pragma_int(source, sname, "page_size");
    Py_END_ALLOW_THREADS
    call_leave(&self->source->inuse);
    if (source_size <= 0 || source_size == self->dest_page_size) {
        Py_RETURN_NONE;
    }
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
os_error(Backup *self, int primary)
{
    static char text[160];
    if (primary != SQLITE_IOERR && primary != SQLITE_FULL
        && primary != SQLITE_CANTOPEN) {
        return "";
    }
    int err = self->last_errno;
    if (err == 0) {
        return "";
    }
    PyOS_snprintf(text, sizeof(text), " (OS error: %s)", strerror(err));
    return text;
}

/* The message for a failed step, built from the step's own code. */
static PyObject *
step_error_message(Backup *self, int rc)
{
    const char *sname = self->sname;
    int primary = rc & 0xff;

    if (primary == SQLITE_BUSY) {
        int own_write =
            db_txn_state(self->source->db, sname) == SQLITE_TXN_WRITE;
        if (self->source->locked_by != NULL) {
            return PyUnicode_FromFormat(
                "The source connection is itself the destination of an "
                "unfinished Backup (%U), which holds its write transaction: "
                "SQLite refuses to copy from it until that backup is "
                "finished. Finish that backup first, then step again",
                self->source->locked_by->repr_names);
        }
        if (own_write) {
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
    if (primary == SQLITE_READONLY) {
        PyObject *msg = page_size_trap_message(self, sname);
        if (msg != Py_None) {
            return msg;
        }
        Py_DECREF(msg);
    }
    return PyUnicode_FromFormat(
        "backup step (%U) failed: %s%s (the backup cannot continue; finish() "
        "rolls the destination back)",
        self->repr_names, sqlite3_errstr(rc), os_error(self, primary));
}

static PyObject *
raise_step_error(Backup *self, int rc)
{
    PyObject *msg = step_error_message(self, rc);
    if (msg == NULL) {
        return NULL;
    }
    raise_error_object(self->state, rc, msg);
    int primary = rc & 0xff;
    if (primary != SQLITE_BUSY && primary != SQLITE_LOCKED) {
        self->sticky_rc = rc;
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
 * Raises the step's BusyError/LockedError (still retryable) on success.
 * If a fresh backup cannot be made (out of memory), the backup is finished
 * (self->backup NULL; the caller lets go of the connections) and that
 * error is raised. */
static void
restart_backup(Backup *self, int rc)
{
    const char *dname = self->dname;
    const char *sname = self->sname;
    sqlite3 *ddb = self->dest->db, *sdb = self->source->db;
    sqlite3_backup *old = self->backup, *fresh = NULL;
    int init_rc = SQLITE_OK;

    self->backup = NULL; /* claimed, as by a finish: others wait */
    self->finishing = 1;
    Py_BEGIN_ALLOW_THREADS
    sqlite3_backup_finish(old); /* answers the sticky code again: known */
    fresh = sqlite3_backup_init(ddb, dname, sdb, sname);
    if (fresh == NULL) {
        init_rc = sqlite3_extended_errcode(ddb);
    }
    Py_END_ALLOW_THREADS
    self->finishing = 0;
    self->remaining = 0;
    self->page_count = 0;
    if (fresh == NULL) {
        raise_error_format(self->state, init_rc,
                           "backup step (%U): SQLite answered %s (%s) and "
                           "keeps that answer for the rest of a backup; "
                           "starting the copy again failed: %s. The backup is "
                           "finished and the destination was rolled back",
                           self->repr_names, sqlite3_errstr(rc),
                           lock_code_cause(rc), sqlite3_errstr(init_rc));
        return;
    }
    self->backup = fresh;
    self->restarts++;
    raise_error_format(
        self->state, rc,
        "backup step (%U): the database is locked (%s; extended "
        "code %d). SQLite keeps such an answer for the rest of a "
        "backup, so the copy was started again on a fresh "
        "backup (the destination rolled back to its previous "
        "content). The backup is still usable: call step() "
        "again later",
        self->repr_names, lock_code_cause(rc), rc);
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

    BACKUP_GUARD(self);
    if (parse_npages(args, nargs, kwnames, &npages) < 0) {
        return NULL;
    }
    if (self->sticky_rc != SQLITE_OK) {
        return raise_error_object(self->state, self->sticky_rc,
                                  self->sticky_msg);
    }
    if (self->done) {
        Py_RETURN_TRUE;
    }
    Connection *source = self->source, *dest = self->dest;
    if (connection_check(source, CHECK_OPEN) < 0) {
        return NULL;
    }
    long before = self->page_count - self->remaining;
    sqlite3_backup *backup = self->backup;
    const char *dname = self->dname;
    const char *sname = self->sname;
    /* In use, self cannot be finished (nor its references dropped) by any
     * other thread until we leave; our caller owns self. */
    call_enter(self, &self->inuse);
    call_enter(source, &source->inuse);
    call_enter(dest, &dest->inuse);
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_backup_step(backup, npages);
    remaining = sqlite3_backup_remaining(backup);
    page_count = sqlite3_backup_pagecount(backup);
    if (is_os_failure(rc)) {
        /* Read now, under the same release: sqlite3_backup_step sets no
         * connection's system errno, but each file keeps its own. */
        self->last_errno = file_errno(dest->db, dname, source->db, sname);
    }
    Py_END_ALLOW_THREADS

    PyObject *result = NULL;
    if (backup_forked(self)) {
        /* A busy handler forked and this is the child: nothing more of the
         * parent's SQLite state may be touched. */
        if (!PyErr_Occurred()) {
            raise_forked(self->state, "backup");
        }
        goto done;
    }

    if (PyErr_Occurred()) {
        /* A callback (busy handler) raised: that is what the user sees. */
        goto done;
    }
    if (rc == SQLITE_OK || rc == SQLITE_DONE) {
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
        result = Py_NewRef(self->done ? Py_True : Py_False);
        goto done;
    }
    if (sticky_lock_code(rc)) {
        restart_backup(self, rc); /* raises either way */
        goto done;
    }
    raise_step_error(self, rc);
done:
    call_leave(&dest->inuse);
    call_leave(&source->inuse);
    call_leave(&self->inuse);
    if (self->backup == NULL && self->source != NULL) {
        let_go(self); /* the restart failed: finished; let go after leaving */
    }
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

/* In a forked child: let go of a backup without calling SQLite, whatever
 * state a vanished thread of the parent left it in (claimed, in use). */
void
backup_forget(Backup *self)
{
    if (self->source != NULL) {
        self->backup = NULL;
        let_go(self);
    }
}

/* This thread's calls inside c, less the one call of `closing` (the
 * Connection.close() asking, if any). */
static int
own_calls(Connection *c, Connection *closing)
{
    return calls_here_count(c) - (c != NULL && c == closing);
}

/* Whether this thread may finish self now -- the one rule for finish(),
 * close(), __exit__ and both connections' close():
 *   0: yes (nothing is inside self);
 *   1: not yet: another thread is inside self (a step) or finishing it;
 *      wait, then ask again;
 *  -1: refused, ThreadingViolationError set: a callback of ours (a busy
 *      handler, a destructor run by one of our calls) is asking while this
 *      thread is inside self or one of its connections -- that call is
 *      still using them -- or while it would have to wait for another
 *      thread's call: a callback holds the SQLite mutex of the connection
 *      whose callback it is, and the other thread may be waiting for it.
 * `closing` is the connection whose close() asks (its own call is not a
 * callback), or NULL. */
int
backup_finish_allowed(Backup *self, Connection *closing)
{
    ModuleState *st = self->state;
    Connection *source = self->source, *dest = self->dest;

    if (in_call_here(self) || own_calls(source, closing) > 0
        || own_calls(dest, closing) > 0) {
        PyErr_Format(st->ReentrancyError,
                     "cannot finish the backup (%U) from a callback running "
                     "inside a call on it or on its connections (a busy "
                     "handler, say): that call is still using them. Finish it "
                     "after the call returns",
                     self->repr_names);
        return -1;
    }
    int busy_here = self->inuse || self->finishing;
    int in_callback = call_depth_here() > (closing != NULL);
    if (in_callback
        && (busy_here || source->inuse > (source == closing)
            || dest->inuse > (dest == closing))) {
        PyErr_Format(
            st->ReentrancyError,
            "cannot finish the backup (%U) from a callback (a busy "
            "handler, say) while another thread is inside it or its "
            "connections: it would wait for that thread, which may be "
            "waiting for this one. Finish it after the callback "
            "returns",
            self->repr_names);
        return -1;
    }
    return busy_here ? 1 : 0;
}

/* Finish now.  The caller owns self (a reference, or it is self's dealloc)
 * and has made sure it may (backup_finish_allowed() answered 0).  Waits for a
 * connection busy in another thread if need be: SQLite's mutex serializes,
 * with the GIL released.  Unlocks the destination and drops both
 * references.  -1 with the error set when SQLite reported one.
 *
 * The sqlite3_backup is claimed -- taken out of self -- before the GIL is
 * released, so no other path can finish it a second time; until the end,
 * `finishing` tells others to wait, and the destination stays locked. */
int
backup_finish_internal(Backup *self)
{
    if (self->backup == NULL) {
        return 0;
    }
    sqlite3_backup *backup = self->backup;
    Connection *source = self->source, *dest = self->dest;
    int rc = SQLITE_OK;

    self->backup = NULL;
    self->finishing = 1;
    call_enter(self, &self->inuse);
    call_enter(source, &source->inuse);
    call_enter(dest, &dest->inuse);
    if (!backup_forked(self)) {
        Py_BEGIN_ALLOW_THREADS
        rc = sqlite3_backup_finish(backup);
        Py_END_ALLOW_THREADS
    }
    /* else: the parent's SQLite state, never touched in a forked child. */
    call_leave(&dest->inuse);
    call_leave(&source->inuse);
    call_leave(&self->inuse);

    if (rc != SQLITE_OK) {
        PyObject *msg = finish_error_message(self, rc);
        if (msg != NULL) {
            raise_error_object(self->state, rc, msg);
            Py_DECREF(msg);
        }
    }
    else if (PyErr_Occurred()) {
        rc = SQLITE_ERROR; /* a busy handler raised: report that */
    }
    let_go(self);
    return rc == SQLITE_OK ? 0 : -1;
}

/* finish() for a caller that owns self: waits for a call another thread
 * is making on it (a step) or for another thread's finish to end, refuses
 * a callback running inside a call on it or its connections, then
 * finishes.  0 once finished (by whichever thread), -1 with the error. */
static int
finish_when_free(Backup *self)
{
    long wait_us = 50;
    for (;;) {
        if (self->backup == NULL && !self->finishing) {
            return 0;
        }
        if (backup_forked(self)) {
            /* A thread of the parent claimed it and is gone: never wait. */
            return raise_forked(self->state, "backup"), -1;
        }
        int allowed = backup_finish_allowed(self, NULL);
        if (allowed < 0) {
            return -1;
        }
        if (allowed == 0) {
            return backup_finish_internal(self);
        }
        wait_a_little(&wait_us);
    }
}

/* Unfinished (or being finished) and inherited through fork(). */
static int
backup_forked_open(Backup *self)
{
    return self->source != NULL && backup_forked(self);
}

static PyObject *
backup_finish(Backup *self, PyObject *Py_UNUSED(ignored))
{
    if (backup_forked_open(self)) {
        return raise_forked(self->state, "backup");
    }
    if (finish_when_free(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
backup_close(Backup *self, PyObject *args, PyObject *kwds)
{
    int force;

    if (parse_force(args, kwds, &force) < 0) {
        return NULL;
    }
    if (backup_forked_open(self)) {
        if (!force) {
            return raise_forked(self->state, "backup");
        }
        backup_forget(self); /* lets go without calling SQLite */
        Py_RETURN_NONE;
    }
    if (finish_when_free(self) < 0) {
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
    BACKUP_GUARD(self);
    return Py_NewRef(self);
}

static PyObject *
backup_exit(Backup *self, PyObject *args)
{
    PyObject *etype, *evalue, *etb;

    if (!PyArg_ParseTuple(args, "OOO:__exit__", &etype, &evalue, &etb)) {
        return NULL;
    }
    int res = backup_forked_open(self)
                  ? (raise_forked(self->state, "backup"), -1)
                  : finish_when_free(self);
    if (res < 0) {
        if (etype == Py_None) {
            return NULL;
        }
        /* The body's exception is the one that comes out. */
        PyErr_Clear();
    }
    Py_RETURN_FALSE;
}

/* Deferred finishes (GIL-protected): Backups collected while a call was
 * inside their source or destination.  Finishing then could wait for that
 * call's SQLite mutex -- from a callback holding another one, or while the
 * call's thread waits for the GIL: a deadlock -- so a stand-in Backup takes
 * over the sqlite3_backup, the destination lock and the place in the
 * source's list, and is finished once no call of ours is inside either
 * connection (backup_finish_pending(), from call_leave()). */
Backup *pending_finishes;

static int
defer_finish(Backup *self)
{
    ModuleState *st = self->state;
    allocfunc alloc = (allocfunc)PyType_GetSlot(st->BackupType, Py_tp_alloc);
    Backup *g = (Backup *)alloc(st->BackupType, 0);
    if (g == NULL) {
        return -1;
    }
    g->state = st;
    g->backup = self->backup;
    g->dest = self->dest;
    g->source = self->source;
    g->dest_name = Py_NewRef(self->dest_name);
    g->source_name = Py_NewRef(self->source_name);
    g->dname = self->dname;
    g->sname = self->sname;
    g->repr_names = Py_NewRef(self->repr_names);
    g->sticky_rc = self->sticky_rc;
    g->sticky_msg = self->sticky_msg ? Py_NewRef(self->sticky_msg) : NULL;
    g->done = self->done;
    g->restarts = self->restarts;
    g->dest_in_memory = self->dest_in_memory;
    g->dest_wal = self->dest_wal;
    g->dest_page_size = self->dest_page_size;
    g->dest->locked_by = g;
    g->src_prev = self->src_prev;
    g->src_next = self->src_next;
    if (g->src_prev != NULL) {
        g->src_prev->src_next = g;
    }
    else {
        g->source->sources = g;
    }
    if (g->src_next != NULL) {
        g->src_next->src_prev = g;
    }
    self->backup = NULL;
    self->dest = self->source = NULL;
    self->src_prev = self->src_next = NULL;
    g->pending_next = pending_finishes; /* the list owns g's reference */
    pending_finishes = g;
    return 0;
}

void
backup_finish_pending(void)
{
    static int draining;
    if (draining) {
        return;
    }
    draining = 1;
    Backup **link = &pending_finishes;
    while (*link != NULL) {
        Backup *g = *link;
        int finished = g->backup == NULL && !g->finishing;
        if (!finished
            && (g->inuse || g->finishing || g->source->inuse || g->dest->inuse
                || backup_forked(g))) {
            link = &g->pending_next; /* not yet (a forked child: never) */
            continue;
        }
        *link = g->pending_next;
        g->pending_next = NULL;
        if (!finished) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            if (backup_finish_internal(g) < 0) {
                PyErr_WriteUnraisable(g->repr_names);
            }
            PyErr_Restore(et, ev, tb);
        }
        Py_DECREF(g);
        link = &pending_finishes; /* the GIL was released: read afresh */
    }
    draining = 0;
}

/* Finish from garbage collection or dealloc: nobody can be told, so an
 * error goes to sys.unraisablehook.  Nothing can be inside a call on self
 * (a call owns a reference); if a call is inside one of its connections,
 * the finish is deferred (above).  A forked child lets go of the parent's
 * backup without calling SQLite. */
static void
finish_unraisable(Backup *self)
{
    if (self->backup == NULL) {
        return;
    }
    if (backup_forked(self)) {
        backup_forget(self);
        return;
    }
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (self->source->inuse || self->dest->inuse) {
        if (defer_finish(self) == 0) {
            PyErr_Restore(et, ev, tb);
            return;
        }
        PyErr_Clear(); /* no memory for the stand-in: finish now */
    }
    if (backup_finish_internal(self) < 0) {
        PyErr_WriteUnraisable(self->repr_names);
    }
    PyErr_Restore(et, ev, tb);
}

static int
backup_traverse(Backup *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->dest);
    Py_VISIT(self->source);
    return 0;
}

static int
backup_clear(Backup *self)
{
    finish_unraisable(self);
    return 0;
}

static void
backup_dealloc(Backup *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    finish_unraisable(self);
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
    return self->backup != NULL || self->finishing;
}

static PyObject *
backup_repr(Backup *self)
{
    if (self->backup == NULL && self->finishing) {
        return PyUnicode_FromFormat(
            "<apsw_backup.Backup %U: finishing in another call>",
            self->repr_names);
    }
    if (self->backup == NULL) {
        return PyUnicode_FromFormat("<apsw_backup.Backup %U: finished%s>",
                                    self->repr_names,
                                    self->done ? " (complete)" : "");
    }
    return PyUnicode_FromFormat(
        "<apsw_backup.Backup %U: %d of %d pages copied, %d remaining, "
        "%ld restarts%s>",
        self->repr_names, self->page_count - self->remaining, self->page_count,
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
    return PyLong_FromLong(self->remaining);
}

static PyObject *
backup_get_page_count(Backup *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->page_count);
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
