/* The Python face of deltashim.c, for apsw_backup/incremental.py: private
 * module functions over capsules (no new type: the Python module owns the
 * objects' lifetime and the file format).  None of them calls SQLite or
 * releases the GIL; the VFS methods behind them run when SQLite calls them
 * (with the GIL released, inside Backup.step() and Cursor calls). */
#include "apsw_backup.h"
#include "deltashim.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>

#define DELTA_CAPSULE "apsw_backup.Delta"
#define OVERLAY_CAPSULE "apsw_backup.Overlay"

/* A box remembers the fork generation it was made in: a forked child's
 * copy lets go of nothing (the objects' mutexes may have been held by
 * another thread of the parent at the fork). */
typedef struct {
    Delta *delta;
    unsigned long fork_generation;
} DeltaBox;

typedef struct {
    Overlay *overlay;
    unsigned long fork_generation;
} OverlayBox;

static void
delta_box_destroy(PyObject *capsule)
{
    DeltaBox *box = PyCapsule_GetPointer(capsule, DELTA_CAPSULE);
    if (box != NULL) {
        if (box->delta != NULL && box->fork_generation == fork_generation) {
            delta_close(box->delta);
        }
        PyMem_Free(box);
    }
}

static void
overlay_box_destroy(PyObject *capsule)
{
    OverlayBox *box = PyCapsule_GetPointer(capsule, OVERLAY_CAPSULE);
    if (box != NULL) {
        if (box->overlay != NULL && box->fork_generation == fork_generation) {
            overlay_close(box->overlay);
        }
        PyMem_Free(box);
    }
}

static Delta *
delta_of(PyObject *module, PyObject *capsule)
{
    DeltaBox *box = PyCapsule_GetPointer(capsule, DELTA_CAPSULE);
    if (box == NULL) {
        return NULL;
    }
    if (box->fork_generation != fork_generation) {
        raise_forked((ModuleState *)PyModule_GetState(module),
                     "an incremental backup's recording");
        return NULL;
    }
    if (box->delta == NULL) {
        PyErr_SetString(PyExc_ValueError, "the recording is closed");
    }
    return box->delta;
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

PyObject *
incremental_delta_open(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *path;
    int fd, page_size;
    long long data_offset;
    long long expected = 0;
    PyObject *parent;
    if (!PyArg_ParseTuple(args, "siLiS|L:_delta_open", &path, &fd,
                          &data_offset, &page_size, &parent, &expected)) {
        return NULL;
    }
    if (!valid_page_size(page_size) || data_offset < 0) {
        PyErr_SetString(PyExc_ValueError, "bad page size or data offset");
        return NULL;
    }
    Py_ssize_t n = PyBytes_Size(parent);
    if (n % PAGE_HASH_SIZE != 0) {
        PyErr_SetString(PyExc_ValueError,
                        "the parent manifest is not a list of page hashes");
        return NULL;
    }
    DeltaBox *box = PyMem_Calloc(1, sizeof(*box));
    if (box == NULL) {
        return PyErr_NoMemory();
    }
    box->fork_generation = fork_generation;
    PyObject *capsule = PyCapsule_New(box, DELTA_CAPSULE, delta_box_destroy);
    if (capsule == NULL) {
        PyMem_Free(box);
        return NULL;
    }
    int rc = delta_new(path, fd, data_offset, page_size,
                       (const unsigned char *)PyBytes_AsString(parent),
                       n / PAGE_HASH_SIZE, expected, &box->delta);
    if (rc != SQLITE_OK) {
        Py_DECREF(capsule);
        return open_failed(rc, "recording");
    }
    return capsule;
}

PyObject *
incremental_delta_close(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    DeltaBox *box = PyCapsule_GetPointer(capsule, DELTA_CAPSULE);
    if (box == NULL) {
        return NULL;
    }
    if (box->delta != NULL) {
        Delta *d = box->delta;
        box->delta = NULL;
        if (box->fork_generation == fork_generation) {
            delta_close(d);
        }
    }
    Py_RETURN_NONE;
}

PyObject *
incremental_delta_result(PyObject *module, PyObject *capsule)
{
    Delta *d = delta_of(module, capsule);
    if (d == NULL) {
        return NULL;
    }
    DeltaResult r;
    delta_result(d, &r);
    PyObject *manifest =
        PyBytes_FromStringAndSize(NULL, r.page_count * PAGE_HASH_SIZE);
    PyObject *slots =
        PyBytes_FromStringAndSize(NULL, r.slots * sizeof(sqlite3_int64));
    if (manifest == NULL || slots == NULL) {
        Py_XDECREF(manifest);
        Py_XDECREF(slots);
        return NULL;
    }
    delta_manifest(d, (unsigned char *)PyBytes_AsString(manifest),
                   r.page_count);
    delta_slots(d, (sqlite3_int64 *)PyBytes_AsString(slots), r.slots);
    return Py_BuildValue(
        "{s:i,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:O,s:i,s:s,s:N,s:N}",
        "page_size", r.page_size, "page_count", (long long)r.page_count,
        "kept", (long long)r.kept, "slots", (long long)r.slots, "writes",
        (long long)r.writes, "unchanged", (long long)r.unchanged, "poisoned",
        (long long)r.poisoned, "first_poisoned", (long long)r.first_poisoned,
        "unkept_reads", (long long)r.unkept_reads, "missing",
        (long long)r.missing, "first_missing", (long long)r.first_missing,
        "failed", r.failed ? Py_True : Py_False, "errno", r.os_errno,
        "message", r.message, "manifest", manifest, "slot_pages", slots);
}

PyObject *
incremental_overlay_open(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *path;
    int page_size;
    long long page_count;
    PyObject *fd_list, *file_of, *offset_of;
    if (!PyArg_ParseTuple(args, "siLO!SS:_overlay_open", &path, &page_size,
                          &page_count, &PyTuple_Type, &fd_list, &file_of,
                          &offset_of)) {
        return NULL;
    }
    if (!valid_page_size(page_size) || page_count < 0
        || PyBytes_Size(file_of) != page_count * (Py_ssize_t)sizeof(int)
        || PyBytes_Size(offset_of)
               != page_count * (Py_ssize_t)sizeof(sqlite3_int64)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent overlay map");
        return NULL;
    }
    Py_ssize_t nfds = PyTuple_Size(fd_list);
    int *fds = PyMem_Calloc((size_t)(nfds ? nfds : 1), sizeof(int));
    if (fds == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        fds[i] = (int)PyLong_AsLong(PyTuple_GetItem(fd_list, i));
        if (fds[i] == -1 && PyErr_Occurred()) {
            PyMem_Free(fds);
            return NULL;
        }
    }
    OverlayBox *box = PyMem_Calloc(1, sizeof(*box));
    if (box != NULL) {
        box->fork_generation = fork_generation;
    }
    PyObject *capsule =
        box ? PyCapsule_New(box, OVERLAY_CAPSULE, overlay_box_destroy) : NULL;
    if (capsule == NULL) {
        PyMem_Free(box);
        PyMem_Free(fds);
        return box ? NULL : PyErr_NoMemory();
    }
    int rc = overlay_new(path, page_size, page_count, fds, (int)nfds,
                         (const int *)PyBytes_AsString(file_of),
                         (const sqlite3_int64 *)PyBytes_AsString(offset_of),
                         &box->overlay);
    PyMem_Free(fds);
    if (rc != SQLITE_OK) {
        Py_DECREF(capsule);
        return open_failed(rc, "overlay");
    }
    return capsule;
}

PyObject *
incremental_overlay_close(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    OverlayBox *box = PyCapsule_GetPointer(capsule, OVERLAY_CAPSULE);
    if (box == NULL) {
        return NULL;
    }
    if (box->overlay != NULL) {
        Overlay *o = box->overlay;
        box->overlay = NULL;
        if (box->fork_generation == fork_generation) {
            overlay_close(o);
        }
    }
    Py_RETURN_NONE;
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
    Delta *d = delta_of(module, capsule);
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

/* _gather_pages(fds, file_of, offset_of, page_size, first, count, manifest)
 * -> (bytes, bad)
 *
 * Pages first .. first+count-1 of a chain (file_of: native ints, the index
 * into fds of the file holding each page, -1 for none: zeros; offset_of:
 * native int64s, where), read with pread -- a run of pages adjacent in one
 * file in one call -- and, when manifest is not None, each checked against
 * its 16 bytes there (a zero entry, the lock-byte page's, is not).  bad: the
 * first page (0-based in the run) whose hash differs, or -1; a short read
 * makes the first page missing bad.  The GIL is released while it reads
 * and hashes. */
PyObject *
incremental_gather_pages(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *fd_list, *manifest_obj;
    const char *fof_raw, *oof_raw, *want_raw = NULL;
    Py_ssize_t fof_len, oof_len, want_len = 0;
    int page_size;
    long long first, count;
    if (!PyArg_ParseTuple(args, "O!y#y#iLLO:_gather_pages", &PyTuple_Type,
                          &fd_list, &fof_raw, &fof_len, &oof_raw, &oof_len,
                          &page_size, &first, &count, &manifest_obj)) {
        return NULL;
    }
    if (manifest_obj != Py_None) {
        if (!PyBytes_Check(manifest_obj)) {
            PyErr_SetString(PyExc_TypeError, "manifest must be bytes or None");
            return NULL;
        }
        want_raw = PyBytes_AsString(manifest_obj);
        want_len = PyBytes_Size(manifest_obj);
    }
    long long pages = fof_len / (Py_ssize_t)sizeof(int);
    if (!valid_page_size(page_size) || first < 1 || count < 0
        || first + count - 1 > pages
        || fof_len != pages * (Py_ssize_t)sizeof(int)
        || oof_len != pages * (Py_ssize_t)sizeof(sqlite3_int64)
        || (want_raw != NULL && want_len < pages * PAGE_HASH_SIZE)) {
        PyErr_SetString(PyExc_ValueError, "inconsistent page map");
        return NULL;
    }
    Py_ssize_t nfds = PyTuple_Size(fd_list);
    int *fds = PyMem_Calloc((size_t)(nfds ? nfds : 1), sizeof(int));
    if (fds == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *result = NULL, *data = NULL;
    for (Py_ssize_t i = 0; i < nfds; i++) {
        fds[i] = (int)PyLong_AsLong(PyTuple_GetItem(fd_list, i));
        if (fds[i] == -1 && PyErr_Occurred()) {
            goto done;
        }
    }
    /* file_of and offset_of are bytes (immutable): safe to read with the
     * GIL released while the caller keeps its reference */
    const int *fof = (const int *)fof_raw;
    const sqlite3_int64 *oof = (const sqlite3_int64 *)oof_raw;
    for (long long i = first - 1; i < first - 1 + count; i++) {
        if (fof[i] < -1 || fof[i] >= nfds) {
            PyErr_SetString(PyExc_ValueError, "inconsistent page map");
            goto done;
        }
    }
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * page_size));
    if (data == NULL) {
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AsString(data);
    const unsigned char *want = (const unsigned char *)want_raw;
    long long bad = -1;
    int err = 0;
    RELEASE_GIL("incremental_gather_pages");
    static const unsigned char zero[PAGE_HASH_SIZE];
    long long i = 0;
    while (i < count) {
        long long pg = first - 1 + i; /* 0-based */
        int f = fof[pg];
        long long n = 1;
        if (f < 0) {
            memset(out + i * page_size, 0, (size_t)page_size);
        }
        else {
            while (i + n < count && fof[pg + n] == f
                   && oof[pg + n] == oof[pg] + n * page_size) {
                n++;
            }
            long long got = read_at(fds[f], out + i * page_size,
                                    (size_t)(n * page_size), oof[pg]);
            if (got < 0) {
                err = errno ? errno : EIO;
                break;
            }
            if (got < n * page_size) { /* short: the file was truncated */
                bad = i + got / page_size;
                break;
            }
        }
        if (want != NULL) {
            for (long long k = i; k < i + n; k++) {
                const unsigned char *w =
                    want + (first - 1 + k) * PAGE_HASH_SIZE;
                if (memcmp(w, zero, PAGE_HASH_SIZE) == 0) {
                    continue;
                }
                unsigned char h[PAGE_HASH_SIZE];
                page_hash(out + k * page_size, (size_t)page_size, h);
                if (memcmp(h, w, PAGE_HASH_SIZE) != 0) {
                    bad = k;
                    break;
                }
            }
            if (bad >= 0) {
                break;
            }
        }
        i += n;
    }
    REACQUIRE_GIL();
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = Py_BuildValue("OL", data, bad);
done:
    Py_XDECREF(data);
    PyMem_Free(fds);
    return result;
}

/* _chain_map(page_count, page_size, files) -> (file_of, offset_of, missing)
 *
 * Where each page of a chain's tip lives: files is a list, oldest first, of
 * (index, data_offset), index the native u64 page numbers of that file's
 * stored pages in file order; a later file's page replaces an earlier's.
 * file_of (native ints, -1: no file holds it) and offset_of (native int64)
 * as bytes; missing: the first page no file holds other than the lock-byte
 * page, or 0.  ValueError for a page number of 0. */
PyObject *
incremental_chain_map(PyObject *Py_UNUSED(module), PyObject *args)
{
    long long page_count;
    int page_size;
    PyObject *files;
    if (!PyArg_ParseTuple(args, "LiO!:_chain_map", &page_count, &page_size,
                          &PyList_Type, &files)) {
        return NULL;
    }
    if (!valid_page_size(page_size) || page_count < 0
        || page_count > PY_SSIZE_T_MAX / 8) {
        PyErr_SetString(PyExc_ValueError, "bad page size or page count");
        return NULL;
    }
    PyObject *fof_obj = PyBytes_FromStringAndSize(
        NULL, (Py_ssize_t)(page_count * (long long)sizeof(int)));
    PyObject *oof_obj = PyBytes_FromStringAndSize(
        NULL, (Py_ssize_t)(page_count * (long long)sizeof(sqlite3_int64)));
    if (fof_obj == NULL || oof_obj == NULL) {
        Py_XDECREF(fof_obj);
        Py_XDECREF(oof_obj);
        return NULL;
    }
    int *fof = (int *)PyBytes_AsString(fof_obj);
    sqlite3_int64 *oof = (sqlite3_int64 *)PyBytes_AsString(oof_obj);
    for (long long i = 0; i < page_count; i++) {
        fof[i] = -1;
        oof[i] = 0;
    }
    Py_ssize_t n = PyList_Size(files);
    for (Py_ssize_t f = 0; f < n; f++) {
        const char *raw;
        Py_ssize_t len;
        long long data_offset;
        if (!PyArg_ParseTuple(PyList_GetItem(files, f), "y#L:_chain_map", &raw,
                              &len, &data_offset)) {
            goto fail;
        }
        if (len % 8 != 0 || f > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "an index is not u64s");
            goto fail;
        }
        const unsigned long long *idx = (const unsigned long long *)raw;
        for (Py_ssize_t k = 0; k < len / 8; k++) {
            unsigned long long pgno = idx[k];
            if (pgno < 1) {
                PyErr_SetString(PyExc_ValueError, "page number 0 in an index");
                goto fail;
            }
            if (pgno <= (unsigned long long)page_count) {
                fof[pgno - 1] = (int)f;
                oof[pgno - 1] = data_offset + (sqlite3_int64)k * page_size;
            }
        }
    }
    long long lock = 0x40000000LL / page_size + 1, missing = 0;
    for (long long i = 0; i < page_count; i++) {
        if (fof[i] < 0 && i + 1 != lock) {
            missing = i + 1;
            break;
        }
    }
    return Py_BuildValue("NNL", fof_obj, oof_obj, missing);
fail:
    Py_DECREF(fof_obj);
    Py_DECREF(oof_obj);
    return NULL;
}

/* _check_stored(fd, index, data_offset, page_size, manifest, start, count)
 * -> int
 *
 * Stored pages start .. start+count-1 of one restore point (fd; index: the
 * native u64 page numbers of its stored pages, in file order; manifest:
 * its own), read with one pread and each checked against its manifest
 * entry (an entry of zeros -- the lock-byte page's, never stored -- is a
 * mismatch).  Returns -1, or the position (in the point's file order) of
 * the first page that does not match or could not be read whole (a
 * truncated file).  OSError for a failed read.  The GIL is released while
 * it reads and hashes. */
PyObject *
incremental_check_stored(PyObject *Py_UNUSED(module), PyObject *args)
{
    int fd, page_size;
    const char *idx_raw, *want_raw;
    Py_ssize_t idx_len, want_len;
    long long data_offset, start, count;
    if (!PyArg_ParseTuple(args, "iy#Liy#LL:_check_stored", &fd, &idx_raw,
                          &idx_len, &data_offset, &page_size, &want_raw,
                          &want_len, &start, &count)) {
        return NULL;
    }
    long long stored = idx_len / 8;
    long long pages = want_len / PAGE_HASH_SIZE;
    if (!valid_page_size(page_size) || idx_len % 8 != 0 || start < 0
        || count < 0 || start + count > stored || data_offset < 0) {
        PyErr_SetString(PyExc_ValueError, "inconsistent page map");
        return NULL;
    }
    const unsigned long long *idx = (const unsigned long long *)idx_raw;
    for (long long k = start; k < start + count; k++) {
        if (idx[k] < 1 || idx[k] > (unsigned long long)pages) {
            PyErr_SetString(PyExc_ValueError, "inconsistent page map");
            return NULL;
        }
    }
    unsigned char *buf = malloc((size_t)(count ? count : 1) * page_size);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    const unsigned char *want = (const unsigned char *)want_raw;
    static const unsigned char zero[PAGE_HASH_SIZE];
    long long bad = -1;
    int err = 0;
    RELEASE_GIL("incremental_check_stored");
    long long got = read_at(fd, buf, (size_t)(count * page_size),
                            data_offset + start * page_size);
    if (got < 0) {
        err = errno ? errno : EIO;
    }
    long long whole = got < 0 ? 0 : got / page_size;
    for (long long k = 0; !err && k < count; k++) {
        const unsigned char *w = want + (idx[start + k] - 1) * PAGE_HASH_SIZE;
        unsigned char h[PAGE_HASH_SIZE];
        if (k >= whole) {
            bad = start + k;
            break;
        }
        page_hash(buf + k * page_size, (size_t)page_size, h);
        if (memcmp(w, zero, PAGE_HASH_SIZE) == 0
            || memcmp(h, w, PAGE_HASH_SIZE) != 0) {
            bad = start + k;
            break;
        }
    }
    REACQUIRE_GIL();
    free(buf);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(bad);
}

/* _check_inherited(manifest, parent, index, page_size) -> (what, page)
 *
 * The rule of a point's unstored pages (docs/incremental.md): every page
 * it does not store (index: the native u64 page numbers it stores) has its
 * parent's hash (parent: the parent's manifest, or None for a base), and a
 * page past the parent's end is stored unless it is the lock-byte page.
 * what: 0 all hold; 1 page is stored twice; 2 page is neither stored nor
 * its parent's.  A bit a page, no copy of either manifest. */
PyObject *
incremental_check_inherited(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *mine_raw, *idx_raw, *theirs_raw = NULL;
    Py_ssize_t mine_len, idx_len, theirs_len = 0;
    PyObject *parent;
    int page_size;
    if (!PyArg_ParseTuple(args, "y#Oy#i:_check_inherited", &mine_raw,
                          &mine_len, &parent, &idx_raw, &idx_len,
                          &page_size)) {
        return NULL;
    }
    if (parent != Py_None) {
        if (!PyBytes_Check(parent)) {
            PyErr_SetString(PyExc_TypeError, "parent must be bytes or None");
            return NULL;
        }
        theirs_raw = PyBytes_AsString(parent);
        theirs_len = PyBytes_Size(parent);
    }
    if (!valid_page_size(page_size) || mine_len % PAGE_HASH_SIZE != 0
        || theirs_len % PAGE_HASH_SIZE != 0 || idx_len % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "inconsistent manifests");
        return NULL;
    }
    long long count = mine_len / PAGE_HASH_SIZE;
    long long theirs = theirs_len / PAGE_HASH_SIZE;
    long long inherited = count < theirs ? count : theirs;
    long long lock = 0x40000000LL / page_size + 1;
    unsigned char *stored = calloc((size_t)(count / 8 + 1), 1);
    if (stored == NULL) {
        return PyErr_NoMemory();
    }
    const unsigned long long *idx = (const unsigned long long *)idx_raw;
    const unsigned char *m = (const unsigned char *)mine_raw;
    const unsigned char *t = (const unsigned char *)theirs_raw;
    int what = 0;
    long long page = 0;
    for (Py_ssize_t k = 0; k < idx_len / 8; k++) {
        unsigned long long p = idx[k];
        if (p < 1 || p > (unsigned long long)count) {
            what = 2; /* _read_point refuses these before: never here */
            page = (long long)p;
            break;
        }
        if (stored[p / 8] & (1u << (p % 8))) {
            what = 1;
            page = (long long)p;
            break;
        }
        stored[p / 8] |= (unsigned char)(1u << (p % 8));
    }
    for (long long p = 1; what == 0 && p <= count; p++) {
        if (stored[p / 8] & (1u << (p % 8))) {
            continue;
        }
        if (p <= inherited
                ? memcmp(m + (p - 1) * PAGE_HASH_SIZE,
                         t + (p - 1) * PAGE_HASH_SIZE, PAGE_HASH_SIZE)
                      != 0
                : p != lock) {
            what = 2;
            page = p;
        }
    }
    free(stored);
    return Py_BuildValue("iL", what, page);
}
