/* The Python face of deltashim.c, for apsw_backup/incremental.py: private
 * module functions over capsules (no new type: the Python module owns the
 * objects' lifetime and the file format).  None of them calls SQLite or
 * releases the GIL; the VFS methods behind them run when SQLite calls them
 * (with the GIL released, inside Backup.step() and Cursor calls). */
#include "apsw_backup.h"
#include "deltashim.h"
#include "table.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>

/* The objects of deltashim.c handed to Python, each in a capsule holding a
 * Box: one kind of box, one guard (box_object) and one release
 * (box_release) for all three.  A box remembers the fork generation it was
 * made in: a forked child's copy lets go of nothing (the objects' mutexes
 * may have been held by another thread of the parent at the fork). */
typedef struct {
    const char *name;   /* the capsule's */
    const char *what;   /* for ForkingViolationError */
    const char *closed; /* for the ValueError of a closed one */
    void (*release)(void *object);
} BoxKind;

typedef struct {
    void *object; /* NULL once closed */
    const BoxKind *kind;
    unsigned long fork_generation;
} Box;

static void
release_delta(void *object)
{
    delta_close(object);
}

static void
release_overlay(void *object)
{
    overlay_close(object);
}

static void
release_chain(void *object)
{
    chain_map_unref(object);
}

static const BoxKind DELTA_BOX = {"apsw_backup.Delta",
                                  "an incremental backup's recording",
                                  "the recording is closed", release_delta};
static const BoxKind OVERLAY_BOX = {"apsw_backup.Overlay",
                                    "a restore point's overlay",
                                    "the overlay is closed", release_overlay};
static const BoxKind CHAIN_BOX = {"apsw_backup.ChainMap",
                                  "a restore point's chain",
                                  "the chain is closed", release_chain};

static void
box_release(Box *box)
{
    void *object = box->object;
    box->object = NULL;
    if (object != NULL && box->fork_generation == fork_generation) {
        box->kind->release(object);
    }
}

static void
box_destroy(PyObject *capsule)
{
    Box *box = PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule));
    if (box != NULL) {
        box_release(box);
        PyMem_Free(box);
    }
}

/* A capsule of kind holding an empty box (*out: the caller puts the object
 * in once made), or NULL with an exception. */
static PyObject *
box_new(const BoxKind *kind, Box **out)
{
    Box *box = PyMem_Calloc(1, sizeof(*box));
    if (box == NULL) {
        return PyErr_NoMemory();
    }
    box->kind = kind;
    box->fork_generation = fork_generation;
    PyObject *capsule = PyCapsule_New(box, kind->name, box_destroy);
    if (capsule == NULL) {
        PyMem_Free(box);
        return NULL;
    }
    *out = box;
    return capsule;
}

/* The object in a capsule of kind, or NULL with an exception: not such a
 * capsule, made before a fork, or closed. */
static void *
box_object(PyObject *module, PyObject *capsule, const BoxKind *kind)
{
    Box *box = PyCapsule_GetPointer(capsule, kind->name);
    if (box == NULL) {
        return NULL;
    }
    if (box->fork_generation != fork_generation) {
        raise_forked((ModuleState *)PyModule_GetState(module), kind->what);
        return NULL;
    }
    if (box->object == NULL) {
        PyErr_SetString(PyExc_ValueError, kind->closed);
    }
    return box->object;
}

/* _delta_close, _overlay_close, _chain_close: let go of the object (once;
 * again is a no-op). */
static PyObject *
box_close(PyObject *capsule, const BoxKind *kind)
{
    Box *box = PyCapsule_GetPointer(capsule, kind->name);
    if (box == NULL) {
        return NULL;
    }
    box_release(box);
    Py_RETURN_NONE;
}

static PyObject *
raise_errno(int err)
{
    errno = err ? err : EIO;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int
valid_page_size(long n)
{
    return n >= 512 && n <= 65536 && (n & (n - 1)) == 0;
}

static PyObject *
open_failed(int rc, const char *what)
{
    if (rc == SQLITE_CONSTRAINT) {
        PyErr_Format(PyExc_ValueError, "another %s uses that path", what);
    }
    else if (rc == SQLITE_NOMEM) {
        PyErr_NoMemory();
    }
    else if (rc == SQLITE_CANTOPEN) {
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else {
        PyErr_Format(PyExc_RuntimeError, "the %s VFS could not be set up",
                     what);
    }
    return NULL;
}

PyObject *
incremental_vfs_names(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    sqlite3_vfs *d = delta_vfs(), *o = overlay_vfs();
    if (d == NULL || o == NULL) {
        return open_failed(SQLITE_ERROR, "incremental");
    }
    return Py_BuildValue("(ss)", d->zName, o->zName);
}

/* _delta_open(path, fd, data_offset, page_size, parent, pages_fd,
 * slots_fd): parent is None (a base) or (fd, manifest offset, pages) of the
 * parent's file; pages_fd and slots_fd are scratch files for the
 * recording's tables (deltashim.h). */
PyObject *
incremental_delta_open(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *path; /* bytes, as os.fsencode(): any name the OS allows */
    int fd, page_size, pages_fd, slots_fd;
    long long data_offset;
    PyObject *parent;
    if (!PyArg_ParseTuple(args, "O&iLiOii:_delta_open", PyUnicode_FSConverter,
                          &path, &fd, &data_offset, &page_size, &parent,
                          &pages_fd, &slots_fd)) {
        return NULL;
    }
    int parent_fd = -1;
    long long parent_off = 0, parent_pages = 0;
    if (parent != Py_None
        && !PyArg_ParseTuple(parent, "iLL:_delta_open", &parent_fd,
                             &parent_off, &parent_pages)) {
        Py_DECREF(path);
        return NULL;
    }
    if (!valid_page_size(page_size) || data_offset < 0 || parent_off < 0
        || parent_pages < 0) {
        PyErr_SetString(PyExc_ValueError, "bad page size or data offset");
        Py_DECREF(path);
        return NULL;
    }
    Box *box;
    PyObject *capsule = box_new(&DELTA_BOX, &box);
    if (capsule == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    const char *name = PyBytes_AsString(path); /* bytes: cannot fail */
    Delta *d = NULL;
    int rc = delta_new(name, fd, data_offset, page_size, parent_fd, parent_off,
                       parent_pages, pages_fd, slots_fd, &d);
    Py_DECREF(path); /* delta_new() keeps a copy */
    if (rc != SQLITE_OK) {
        Py_DECREF(capsule);
        return open_failed(rc, "recording");
    }
    box->object = d;
    return capsule;
}

PyObject *
incremental_delta_close(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    return box_close(capsule, &DELTA_BOX);
}

PyObject *
incremental_delta_result(PyObject *module, PyObject *capsule)
{
    Delta *d = box_object(module, capsule, &DELTA_BOX);
    if (d == NULL) {
        return NULL;
    }
    DeltaResult r;
    /* with the GIL held: the capsule cannot be closed meanwhile; the
     * tables are our own files, read through their cache */
    delta_result(d, &r);
    return Py_BuildValue(
        "{s:i,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:O,s:i,s:s}",
        "page_size", r.page_size, "page_count", (long long)r.page_count,
        "kept", (long long)r.kept, "slots", (long long)r.slots, "writes",
        (long long)r.writes, "unchanged", (long long)r.unchanged, "poisoned",
        (long long)r.poisoned, "first_poisoned", (long long)r.first_poisoned,
        "unkept_reads", (long long)r.unkept_reads, "missing",
        (long long)r.missing, "first_missing", (long long)r.first_missing,
        "failed", r.failed ? Py_True : Py_False, "errno", r.os_errno,
        "message", r.message);
}

/* The most a _delta_manifest / _delta_slots / _chain_gather call or a
 * _check_stored run takes: a window. */
#define WINDOW_ENTRIES 65536

static PyObject *
delta_table_failed(Delta *d)
{
    DeltaResult r;
    delta_result(d, &r);
    errno = r.os_errno ? r.os_errno : EIO;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* _delta_manifest(recording, first, count) -> bytes: count (at most
 * WINDOW_ENTRIES) hashes of the manifest from page first.  With the GIL
 * held, as all calls on a recording: it cannot be closed meanwhile. */
PyObject *
incremental_delta_manifest(PyObject *module, PyObject *args)
{
    PyObject *capsule;
    long long first, count;
    if (!PyArg_ParseTuple(args, "OLL:_delta_manifest", &capsule, &first,
                          &count)) {
        return NULL;
    }
    Delta *d = box_object(module, capsule, &DELTA_BOX);
    if (d == NULL) {
        return NULL;
    }
    if (first < 1 || count < 0 || count > WINDOW_ENTRIES) {
        PyErr_SetString(PyExc_ValueError, "pages out of range");
        return NULL;
    }
    unsigned char *buf =
        PyMem_Malloc((size_t)(count ? count : 1) * PAGE_HASH_SIZE);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    int rc = delta_manifest(d, buf, first, count);
    PyObject *out =
        rc < 0 ? delta_table_failed(d)
               : PyBytes_FromStringAndSize((const char *)buf,
                                           (Py_ssize_t)count * PAGE_HASH_SIZE);
    PyMem_Free(buf);
    return out;
}

/* _delta_slots(recording, start, count) -> bytes: the page each of count
 * (at most WINDOW_ENTRIES) data slots from start holds, native int64s (0: a
 * dead slot). */
PyObject *
incremental_delta_slots(PyObject *module, PyObject *args)
{
    PyObject *capsule;
    long long start, count;
    if (!PyArg_ParseTuple(args, "OLL:_delta_slots", &capsule, &start,
                          &count)) {
        return NULL;
    }
    Delta *d = box_object(module, capsule, &DELTA_BOX);
    if (d == NULL) {
        return NULL;
    }
    if (start < 0 || count < 0 || count > WINDOW_ENTRIES) {
        PyErr_SetString(PyExc_ValueError, "slots out of range");
        return NULL;
    }
    sqlite3_int64 *buf =
        PyMem_Malloc(sizeof(*buf) * (size_t)(count ? count : 1));
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    int rc = delta_slots(d, buf, start, count);
    PyObject *out = rc < 0 ? delta_table_failed(d)
                           : PyBytes_FromStringAndSize(
                                 (const char *)buf, (Py_ssize_t)(count * 8));
    PyMem_Free(buf);
    return out;
}

/* _overlay_open(path, chain) -> capsule: the overlay of a chain's map
 * (_chain_open); it holds a reference of its own to the map. */
PyObject *
incremental_overlay_open(PyObject *module, PyObject *args)
{
    PyObject *path; /* bytes, as os.fsencode(): any name the OS allows */
    PyObject *chain;
    if (!PyArg_ParseTuple(args, "O&O:_overlay_open", PyUnicode_FSConverter,
                          &path, &chain)) {
        return NULL;
    }
    ChainMap *map = box_object(module, chain, &CHAIN_BOX);
    if (map == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    /* a reference of our own at once: box_new() may run the GC, and
     * foreign code could close the chain's capsule meanwhile */
    chain_map_ref(map);
    Box *box;
    PyObject *capsule = box_new(&OVERLAY_BOX, &box);
    if (capsule == NULL) {
        chain_map_unref(map);
        Py_DECREF(path);
        return NULL;
    }
    Overlay *o = NULL;
    /* takes a reference of its own to the map, a copy of the path */
    int rc = overlay_new(PyBytes_AsString(path), map, &o);
    chain_map_unref(map);
    Py_DECREF(path);
    if (rc != SQLITE_OK) {
        Py_DECREF(capsule);
        return open_failed(rc, "overlay");
    }
    box->object = o;
    return capsule;
}

PyObject *
incremental_overlay_close(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    return box_close(capsule, &OVERLAY_BOX);
}

/* _check_pages(data, page_size, expected) -> int: the index of the first
 * page of data whose hash differs from its 16 bytes in expected (an entry
 * of 16 zero bytes is skipped: the lock-byte page), or -1.  One call per
 * run of pages instead of one per page. */
PyObject *
incremental_check_pages(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *data, *expected;
    int page_size;
    if (!PyArg_ParseTuple(args, "SiS:_check_pages", &data, &page_size,
                          &expected)) {
        return NULL;
    }
    Py_ssize_t n = PyBytes_Size(data);
    if (!valid_page_size(page_size) || n % page_size != 0
        || PyBytes_Size(expected) != n / page_size * PAGE_HASH_SIZE) {
        PyErr_SetString(PyExc_ValueError,
                        "data is not whole pages, or expected is not one "
                        "hash a page");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AsString(data);
    const unsigned char *e = (const unsigned char *)PyBytes_AsString(expected);
    static const unsigned char zero[PAGE_HASH_SIZE];
    Py_ssize_t bad = -1;
    /* bytes are immutable and the caller holds them: the GIL can go */
    RELEASE_GIL("incremental_check_pages");
    for (Py_ssize_t i = 0; i < n / page_size; i++) {
        const unsigned char *want = e + i * PAGE_HASH_SIZE;
        if (memcmp(want, zero, PAGE_HASH_SIZE) == 0) {
            continue;
        }
        unsigned char got[PAGE_HASH_SIZE];
        page_hash(d + i * page_size, (size_t)page_size, got);
        if (memcmp(got, want, PAGE_HASH_SIZE) != 0) {
            bad = i;
            break;
        }
    }
    REACQUIRE_GIL();
    return PyLong_FromSsize_t(bad);
}

/* Bytes read (fewer only at the end of the file), or -1 (errno). */
static long long
read_at(int fd, unsigned char *buf, size_t n, sqlite3_int64 off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return -1;
        }
        if (r == 0) {
            break;
        }
        done += (size_t)r;
    }
    return (long long)done;
}

static void
put4(unsigned char *p, unsigned int v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* _delta_read_source(recording, connection, first, count, page_count)
 *
 * The fast path of a recording: pages first .. first+count-1 of the
 * connection's main database file, read through SQLite's own file handle
 * (xRead: never a descriptor of ours), recorded as the backup API would
 * have written them into a new database.  The caller holds a read
 * transaction on a database in rollback-journal mode, so the file is the
 * database (no -wal holds newer pages).  The lock-byte page is skipped (the
 * backup never writes it).  Page 1 is written by the backup as the source's
 * with the fields a commit into a new, empty file sets: the change counter
 * and its version-valid-for number 1, the page count, the schema cookie 1
 * (the empty destination's 0 plus one) and this library's version number.
 * The tests compare every restore with copy() of the same state. */
PyObject *
incremental_delta_read_source(PyObject *module, PyObject *args)
{
    ModuleState *st = (ModuleState *)PyModule_GetState(module);
    PyObject *capsule;
    Connection *conn;
    long long first, count, page_count;
    if (!PyArg_ParseTuple(args, "OO!LLL:_delta_read_source", &capsule,
                          st->ConnectionType, &conn, &first, &count,
                          &page_count)) {
        return NULL;
    }
    Delta *d = box_object(module, capsule, &DELTA_BOX);
    if (d == NULL) {
        return NULL;
    }
    int P = delta_page_size(d);
    if (first < 1 || count < 0 || count > 65536
        || first + count - 1 > page_count || page_count > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "pages out of range");
        return NULL;
    }
    unsigned char *buf = malloc((size_t)(count ? count : 1) * (size_t)P);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    if (conn_enter(conn, CHECK_OPEN | CHECK_UNLOCKED) < 0) {
        free(buf);
        return NULL;
    }
    int rc = SQLITE_OK, read_failed = 0;
    RELEASE_GIL("incremental_delta_read_source");
    sqlite3_file *file = NULL;
    if (sqlite3_file_control(conn->db, "main", SQLITE_FCNTL_FILE_POINTER,
                             &file)
            != SQLITE_OK
        || file == NULL || file->pMethods == NULL) {
        rc = SQLITE_MISUSE;
        read_failed = 1;
    }
    sqlite3_int64 lock = (sqlite3_int64)0x40000000 / P + 1;
    sqlite3_int64 pgno = first, end = first + count;
    while (rc == SQLITE_OK && pgno < end) {
        /* one read up to the lock-byte page, or the end */
        sqlite3_int64 stop = pgno < lock && lock < end ? lock : end;
        if (pgno == lock) {
            pgno++;
            continue;
        }
        int amt = (int)((stop - pgno) * P);
        rc = file->pMethods->xRead(file, buf, amt, (pgno - 1) * P);
        if (rc == SQLITE_IOERR_SHORT_READ) {
            /* a file that ends inside its last page: the VFS zero-fills
             * the rest, and SQLite's pager reads such a page as that (the
             * backup API's copy has the same bytes) */
            rc = SQLITE_OK;
        }
        if (rc != SQLITE_OK) {
            read_failed = 1;
            break;
        }
        for (sqlite3_int64 p = pgno; p < stop && rc == SQLITE_OK; p++) {
            unsigned char *page = buf + (p - pgno) * P;
            if (p == 1) {
                put4(page + 24, 1);
                put4(page + 28, (unsigned int)page_count);
                put4(page + 40, 1);
                put4(page + 92, 1);
                put4(page + 96, (unsigned int)sqlite3_libversion_number());
            }
            rc = delta_record(d, page, p);
        }
        pgno = stop;
    }
    REACQUIRE_GIL();
    conn_leave(conn);
    free(buf);
    if (rc == SQLITE_OK) {
        Py_RETURN_NONE;
    }
    if (read_failed) {
        return raise_sqlite_error(st, rc,
                                  "reading the source database failed");
    }
    char why[200];
    delta_failure(d, why, sizeof(why));
    return raise_sqlite_error(st, rc, why[0] ? why : NULL);
}

/* _chain_open(page_size, page_count, files, tip_manifest, scratch_fd)
 * -> (chain, missing)
 *
 * The map of a chain (deltashim.h, ChainMap): files is a tuple, oldest
 * first, of (fd, data_offset, index_offset, stored) of each file; the tip
 * is the last, its manifest at tip_manifest.  missing: the first page no
 * file holds other than the lock-byte page, or 0.  OSError for a failed
 * read or write (EIO: an index ended early); ValueError for an index
 * naming page 0.  The GIL is released while it reads the indexes (all its
 * arguments are C values by then). */
PyObject *
incremental_chain_open(PyObject *Py_UNUSED(module), PyObject *args)
{
    long long page_count, tip_manifest;
    int page_size, scratch_fd;
    PyObject *files;
    if (!PyArg_ParseTuple(args, "iLO!Li:_chain_open", &page_size, &page_count,
                          &PyTuple_Type, &files, &tip_manifest, &scratch_fd)) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_Size(files);
    if (!valid_page_size(page_size) || page_count < 0 || n < 1
        || n >= (1 << 23) || tip_manifest < 0) {
        PyErr_SetString(PyExc_ValueError, "bad chain");
        return NULL;
    }
    int *fds = PyMem_Calloc((size_t)n, sizeof(int));
    sqlite3_int64 *nums = PyMem_Calloc((size_t)n * 3, sizeof(sqlite3_int64));
    PyObject *capsule = NULL;
    if (fds == NULL || nums == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long off, idx, stored;
        if (!PyArg_ParseTuple(PyTuple_GetItem(files, i), "iLLL:_chain_open",
                              &fds[i], &off, &idx, &stored)) {
            goto fail;
        }
        if (off < 0 || idx < 0 || stored < 0) {
            PyErr_SetString(PyExc_ValueError, "bad chain");
            goto fail;
        }
        nums[i] = off;
        nums[n + i] = idx;
        nums[2 * n + i] = stored;
    }
    Box *box;
    capsule = box_new(&CHAIN_BOX, &box);
    if (capsule == NULL) {
        goto fail;
    }
    sqlite3_int64 missing = 0;
    int err = 0, rc;
    ChainMap *map = NULL;
    RELEASE_GIL("incremental_chain_open");
    rc = chain_map_new(page_size, page_count, (int)n, fds, nums, nums + n,
                       nums + 2 * n, tip_manifest, scratch_fd, &map, &missing,
                       &err);
    REACQUIRE_GIL();
    if (rc == SQLITE_CORRUPT) {
        PyErr_SetString(PyExc_ValueError, "page number 0 in an index");
    }
    else if (rc == SQLITE_NOMEM) {
        PyErr_NoMemory();
    }
    else if (rc != SQLITE_OK) {
        raise_errno(err);
    }
    if (rc != SQLITE_OK) {
        goto fail;
    }
    box->object = map;
    PyMem_Free(fds);
    PyMem_Free(nums);
    return Py_BuildValue("NL", capsule, (long long)missing);
fail:
    Py_XDECREF(capsule);
    PyMem_Free(fds);
    PyMem_Free(nums);
    return NULL;
}

PyObject *
incremental_chain_close(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    return box_close(capsule, &CHAIN_BOX);
}

/* _chain_gather(chain, first, count, check) -> (bytes, bad)
 *
 * Pages first .. first+count-1 (count at most WINDOW_ENTRIES) of the
 * chain's tip, each from the newest file holding it (a run adjacent in one
 * file read at once; zeros for none), each checked against the tip's
 * manifest when check.  bad: the first page (0-based in the run) that does
 * not match or could not be read whole, or -1.  OSError for a failed read.
 * The GIL is released while it reads and hashes: a reference to the map is
 * held meanwhile, so a close from another thread cannot free it. */
PyObject *
incremental_chain_gather(PyObject *module, PyObject *args)
{
    PyObject *capsule;
    long long first, count;
    int check;
    if (!PyArg_ParseTuple(args, "OLLp:_chain_gather", &capsule, &first, &count,
                          &check)) {
        return NULL;
    }
    ChainMap *m = box_object(module, capsule, &CHAIN_BOX);
    if (m == NULL) {
        return NULL;
    }
    /* a reference of our own at once: the allocation below may run the
     * GC, and foreign code could close the capsule meanwhile */
    chain_map_ref(m);
    int P = 0;
    sqlite3_int64 pages = 0;
    chain_map_geometry(m, &P, &pages);
    PyObject *data = NULL;
    if (first < 1 || count < 0 || count > WINDOW_ENTRIES
        || first + count - 1 > pages) {
        PyErr_SetString(PyExc_ValueError, "pages out of range");
    }
    else {
        data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * P));
    }
    if (data == NULL) {
        chain_map_unref(m);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AsString(data);
    sqlite3_int64 bad = -1;
    int err = 0, rc;
    RELEASE_GIL("incremental_chain_gather");
    rc = chain_map_gather(m, first, count, out, check, &bad, &err);
    chain_map_unref(m);
    REACQUIRE_GIL();
    if (rc < 0) {
        Py_DECREF(data);
        return raise_errno(err);
    }
    return Py_BuildValue("NL", data, (long long)bad);
}

/* _chain_file_of(chain, pgno) -> int: the chain's file holding page pgno
 * (-1: none). */
PyObject *
incremental_chain_file_of(PyObject *module, PyObject *args)
{
    PyObject *capsule;
    long long pgno;
    if (!PyArg_ParseTuple(args, "OL:_chain_file_of", &capsule, &pgno)) {
        return NULL;
    }
    ChainMap *m = box_object(module, capsule, &CHAIN_BOX);
    if (m == NULL) {
        return NULL;
    }
    int P = 0;
    sqlite3_int64 pages = 0;
    chain_map_geometry(m, &P, &pages);
    if (pgno < 1 || pgno > pages) {
        PyErr_SetString(PyExc_ValueError, "pages out of range");
        return NULL;
    }
    int file = -1;
    sqlite3_int64 at;
    if (chain_map_page(m, pgno, &file, &at) < 0) {
        return raise_errno(EIO);
    }
    return PyLong_FromLong(file);
}

/* _check_stored(fd, index_off, data_offset, page_size, manifest_off,
 *               page_count, start, count) -> int
 *
 * Stored pages start .. start+count-1 (at most WINDOW_ENTRIES) of one
 * restore point (fd), read with one pread, each checked against its own
 * manifest entry -- the index and the manifest read where they lie in the
 * file.  An entry of zeros (the lock-byte page's, never stored) or a page
 * number outside the manifest is a mismatch.  Returns -1, or the position
 * (in the point's file order) of the first page that does not match or
 * could not be read whole (a truncated file).  OSError for a failed read.
 * The GIL is released while it reads and hashes. */
PyObject *
incremental_check_stored(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, page_size;
    long long index_off, data_offset, manifest_off, pages, start, count;
    if (!PyArg_ParseTuple(args, "iLLiLLLL:_check_stored", &fd, &index_off,
                          &data_offset, &page_size, &manifest_off, &pages,
                          &start, &count)) {
        return NULL;
    }
    if (!valid_page_size(page_size) || start < 0 || count < 0
        || count > WINDOW_ENTRIES || data_offset < 0 || index_off < 0
        || manifest_off < 0 || pages < 0) {
        PyErr_SetString(PyExc_ValueError, "inconsistent page map");
        return NULL;
    }
    unsigned char *buf = malloc((size_t)(count ? count : 1) * page_size);
    unsigned char *idx = malloc((size_t)(count ? count : 1) * 8);
    if (buf == NULL || idx == NULL) {
        free(buf);
        free(idx);
        return PyErr_NoMemory();
    }
    static const unsigned char zero[PAGE_HASH_SIZE];
    long long bad = -1;
    int err = 0;
    Table *manifest = NULL;
    RELEASE_GIL("incremental_check_stored");
    manifest = table_new(fd, manifest_off, PAGE_HASH_SIZE, 0, 2);
    long long igot =
        read_at(fd, idx, (size_t)(count * 8), index_off + start * 8);
    long long got = read_at(fd, buf, (size_t)(count * page_size),
                            data_offset + start * page_size);
    if (manifest == NULL || igot < 0 || got < 0) {
        err = errno ? errno : EIO;
    }
    long long whole = got < 0 ? 0 : got / page_size;
    if (igot >= 0 && igot / 8 < whole) {
        whole = igot / 8;
    }
    for (long long k = 0; !err && k < count; k++) {
        unsigned char w[PAGE_HASH_SIZE], h[PAGE_HASH_SIZE];
        sqlite3_uint64 pgno = k < whole ? table_be64(idx + k * 8) : 0;
        if (pgno < 1 || pgno > (sqlite3_uint64)pages) {
            bad = start + k;
            break;
        }
        if (table_get(manifest, (sqlite3_int64)pgno - 1, w) < 0) {
            err = table_errno(manifest);
            break;
        }
        page_hash(buf + k * page_size, (size_t)page_size, h);
        if (memcmp(w, zero, PAGE_HASH_SIZE) == 0
            || memcmp(h, w, PAGE_HASH_SIZE) != 0) {
            bad = start + k;
            break;
        }
    }
    table_free(manifest);
    REACQUIRE_GIL();
    free(buf);
    free(idx);
    if (err) {
        return raise_errno(err);
    }
    return PyLong_FromLongLong(bad);
}

/* _check_inherited(fd, manifest_off, page_count, index_off, stored,
 *                  parent, page_size, scratch_fd) -> (what, page)
 *
 * The rule of a point's unstored pages (docs/incremental.md): every page
 * it does not store has its parent's hash (parent: (fd, manifest_off,
 * page_count) of the parent's file, or None for a base), and a page past
 * the parent's end is stored unless it is the lock-byte page.  what: 0 all
 * hold; 1 page is stored twice; 2 page is neither stored nor its parent's
 * (or the index names a page the point does not have).  The set of stored
 * pages is a bitmap in the scratch file (emptied first); both manifests
 * are read where they lie.  OSError for a failed read or write.  The GIL
 * is released while it works. */
PyObject *
incremental_check_inherited(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, page_size, scratch_fd;
    long long manifest_off, count, index_off, stored;
    PyObject *parent;
    if (!PyArg_ParseTuple(args, "iLLLLOii:_check_inherited", &fd,
                          &manifest_off, &count, &index_off, &stored, &parent,
                          &page_size, &scratch_fd)) {
        return NULL;
    }
    int pfd = -1;
    long long pman = 0, theirs = 0;
    if (parent != Py_None
        && !PyArg_ParseTuple(parent, "iLL:_check_inherited", &pfd, &pman,
                             &theirs)) {
        return NULL;
    }
    if (!valid_page_size(page_size) || count < 0 || stored < 0 || theirs < 0
        || manifest_off < 0 || index_off < 0 || pman < 0) {
        PyErr_SetString(PyExc_ValueError, "inconsistent manifests");
        return NULL;
    }
    unsigned char *buf = malloc(TABLE_BLOCK);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    long long inherited = count < theirs ? count : theirs;
    long long lock = 0x40000000LL / page_size + 1;
    int what = 0, err = 0;
    long long page = 0;
    Table *bits = NULL, *mine = NULL, *their = NULL;
    RELEASE_GIL("incremental_check_inherited");
    if (ftruncate(scratch_fd, 0) < 0) { /* the bitmap starts empty */
        err = errno ? errno : EIO;
    }
    if (!err) {
        bits = table_new(scratch_fd, 0, 1, 1, 4);
        mine = table_new(fd, manifest_off, PAGE_HASH_SIZE, 0, 4);
        their =
            inherited > 0 ? table_new(pfd, pman, PAGE_HASH_SIZE, 0, 4) : NULL;
        if (bits == NULL || mine == NULL || (inherited > 0 && their == NULL)) {
            err = errno ? errno : ENOMEM;
        }
    }
    long long per = TABLE_BLOCK / 8;
    for (long long k = 0; !err && what == 0 && k < stored; k += per) {
        long long n = stored - k < per ? stored - k : per;
        long long got = read_at(fd, buf, (size_t)(n * 8), index_off + k * 8);
        if (got != n * 8) {
            err = got < 0 && errno ? errno : EIO;
            break;
        }
        for (long long j = 0; j < n; j++) {
            sqlite3_uint64 p = table_be64(buf + j * 8);
            unsigned char b;
            if (p < 1 || p > (sqlite3_uint64)count) {
                what = 2;
                page = (long long)p;
                break;
            }
            if (table_get(bits, (sqlite3_int64)(p / 8), &b) < 0) {
                err = table_errno(bits);
                break;
            }
            if (b & (1u << (p % 8))) {
                what = 1;
                page = (long long)p;
                break;
            }
            b |= (unsigned char)(1u << (p % 8));
            if (table_put(bits, (sqlite3_int64)(p / 8), &b) < 0) {
                err = table_errno(bits);
                break;
            }
        }
    }
    for (long long p = 1; !err && what == 0 && p <= count; p++) {
        unsigned char b, m[PAGE_HASH_SIZE], t[PAGE_HASH_SIZE];
        if (table_get(bits, p / 8, &b) < 0) {
            err = table_errno(bits);
            break;
        }
        if (b & (1u << (p % 8))) {
            continue;
        }
        if (p > inherited) {
            if (p != lock) {
                what = 2;
                page = p;
            }
            continue;
        }
        if (table_get(mine, p - 1, m) < 0) {
            err = table_errno(mine);
            break;
        }
        if (table_get(their, p - 1, t) < 0) {
            err = table_errno(their);
            break;
        }
        if (memcmp(m, t, PAGE_HASH_SIZE) != 0) {
            what = 2;
            page = p;
        }
    }
    table_free(bits);
    table_free(mine);
    table_free(their);
    REACQUIRE_GIL();
    free(buf);
    if (err) {
        return raise_errno(err);
    }
    return Py_BuildValue("iL", what, page);
}
