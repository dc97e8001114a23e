/* The Python face of deltashim.c, for apsw_backup/incremental.py: private
 * module functions over capsules (no new type: the Python module owns the
 * objects' lifetime and the file format).  None of them calls SQLite or
 * releases the GIL; the VFS methods behind them run when SQLite calls them
 * (with the GIL released, inside Backup.step() and Cursor calls). */
#include "apsw_backup.h"
#include "deltashim.h"

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
    PyObject *parent;
    if (!PyArg_ParseTuple(args, "siLiS:_delta_open", &path, &fd, &data_offset,
                          &page_size, &parent)) {
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
                       n / PAGE_HASH_SIZE, &box->delta);
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
        "{s:i,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:O,s:s,s:N,s:N}",
        "page_size", r.page_size, "page_count", (long long)r.page_count,
        "kept", (long long)r.kept, "slots", (long long)r.slots, "writes",
        (long long)r.writes, "unchanged", (long long)r.unchanged, "poisoned",
        (long long)r.poisoned, "first_poisoned", (long long)r.first_poisoned,
        "unkept_reads", (long long)r.unkept_reads, "missing",
        (long long)r.missing, "first_missing", (long long)r.first_missing,
        "failed", r.failed ? Py_True : Py_False, "message", r.message,
        "manifest", manifest, "slot_pages", slots);
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
    for (Py_ssize_t i = 0; i < n / page_size; i++) {
        const unsigned char *want = e + i * PAGE_HASH_SIZE;
        if (memcmp(want, zero, PAGE_HASH_SIZE) == 0) {
            continue;
        }
        unsigned char got[PAGE_HASH_SIZE];
        page_hash(d + i * page_size, (size_t)page_size, got);
        if (memcmp(got, want, PAGE_HASH_SIZE) != 0) {
            return PyLong_FromSsize_t(i);
        }
    }
    return PyLong_FromLong(-1);
}
