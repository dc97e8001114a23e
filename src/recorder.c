/* PageRecorder: the Python face of a Recording (pageshim.c), and
 * page_hash().
 *
 * A PageRecorder is made for a file path; a Connection opened on that path
 * with vfs=recorder.vfs then has every page SQLite writes to the main
 * database file hashed as it is written.  read_back() re-reads the file
 * from the disk and compares.  The Connection itself is never touched: the
 * shim finds the Recording by the path SQLite opens, so a plain
 * Connection.backup() into that connection is recorded.
 */
#include "apsw_backup.h"
#include "pageshim.h"

#include <stdarg.h>

#define SHIM_PREFIX "apsw_backup-pages-"
#define ROLLBACK_PREFIX "apsw_backup-rollback-"

typedef struct {
    PyObject_HEAD
    ModuleState *state;
    Recording *rec; /* NULL once closed */
    PyObject *vfs_name;
    PyObject *filename;
    unsigned long fork_generation;
} PageRecorder;

static int
recorder_check(PageRecorder *self)
{
    if (self->fork_generation != fork_generation) {
        raise_forked(self->state, "PageRecorder");
        return -1;
    }
    if (self->rec == NULL) {
        PyErr_SetString(PyExc_ValueError, "The PageRecorder is closed");
        return -1;
    }
    return 0;
}

/* The path argument as bytes; NULL with ValueError for names that are no
 * file (memory databases, URIs). */
static PyObject *
path_argument(PyObject *arg)
{
    PyObject *encoded = NULL;
    if (!PyUnicode_FSConverter(arg, &encoded)) {
        return NULL;
    }
    const char *s = PyBytes_AsString(encoded);
    if (s == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    if (s[0] == '\0' || strcmp(s, ":memory:") == 0
        || strncmp(s, "file:", 5) == 0) {
        PyErr_Format(PyExc_ValueError,
                     "PageRecorder needs the path of a database file, not "
                     "%R: an in-memory or temporary database has no file to "
                     "read back, and URI names are not supported (pass the "
                     "file's path)",
                     arg);
        Py_DECREF(encoded);
        return NULL;
    }
    return encoded;
}

static PyObject *
recorder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"filename", "vfs", NULL};
    PyObject *filename, *vfs = Py_None;
    ModuleState *st = state_from_type(type);
    if (st == NULL
        || !PyArg_ParseTupleAndKeywords(args, kwds, "O|O:PageRecorder", kwlist,
                                        &filename, &vfs)) {
        return NULL;
    }
    sqlite3_vfs *base = NULL;
    if (vfs != Py_None) {
        if (!PyUnicode_Check(vfs)) {
            PyErr_Format(PyExc_TypeError, "vfs must be a str or None, not %R",
                         vfs);
            return NULL;
        }
        const char *name = PyUnicode_AsUTF8AndSize(vfs, NULL);
        if (name == NULL) {
            return NULL;
        }
        if (strncmp(name, SHIM_PREFIX, strlen(SHIM_PREFIX)) == 0
            || strncmp(name, ROLLBACK_PREFIX, strlen(ROLLBACK_PREFIX)) == 0) {
            PyErr_Format(PyExc_ValueError,
                         "vfs %R is a PageRecorder's own VFS; name the VFS it "
                         "should record over (None: the default)",
                         vfs);
            return NULL;
        }
        base = sqlite3_vfs_find(name);
        if (base == NULL) {
            PyErr_Format(PyExc_ValueError, "no SQLite VFS is named %R", vfs);
            return NULL;
        }
    }
    PyObject *encoded = path_argument(filename);
    if (encoded == NULL) {
        return NULL;
    }
    sqlite3_vfs *shim = pageshim_vfs(base);
    if (shim == NULL) {
        Py_DECREF(encoded);
        return raise_sqlite_error(st, SQLITE_NOMEM,
                                  "the page-recording VFS could not be "
                                  "registered");
    }
    Recording *rec = NULL;
    int rc = recording_new(shim, PyBytes_AsString(encoded), &rec);
    Py_DECREF(encoded);
    if (rc == SQLITE_CONSTRAINT) {
        PyErr_Format(PyExc_ValueError,
                     "another PageRecorder is recording %R; close it first",
                     filename);
        return NULL;
    }
    if (rc != SQLITE_OK) {
        return raise_sqlite_error(st, rc,
                                  "the database file's full path could not "
                                  "be made");
    }
    PageRecorder *self = (PageRecorder *)PyType_GenericAlloc(type, 0);
    if (self == NULL) {
        recording_unref(rec);
        return NULL;
    }
    self->state = st;
    self->rec = rec;
    self->fork_generation = fork_generation;
    self->vfs_name = PyUnicode_FromString(shim->zName);
    self->filename = PyUnicode_DecodeFSDefault(recording_path(rec));
    if (self->vfs_name == NULL || self->filename == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
recorder_release(PageRecorder *self)
{
    Recording *rec = self->rec;
    self->rec = NULL;
    if (rec != NULL && self->fork_generation == fork_generation) {
        recording_unregister(rec);
        recording_unref(rec);
    }
}

static void
recorder_dealloc(PageRecorder *self)
{
    PyTypeObject *type = Py_TYPE(self);
    recorder_release(self);
    Py_CLEAR(self->vfs_name);
    Py_CLEAR(self->filename);
    freefunc free_fn = (freefunc)PyType_GetSlot(type, Py_tp_free);
    free_fn(self);
    Py_DECREF(type);
}

static PyObject *
recorder_close(PageRecorder *self, PyObject *Py_UNUSED(ignored))
{
    recorder_release(self);
    Py_RETURN_NONE;
}

static PyObject *
recorder_enter(PageRecorder *self, PyObject *Py_UNUSED(ignored))
{
    if (recorder_check(self) < 0) {
        return NULL;
    }
    return Py_NewRef(self);
}

static PyObject *
recorder_exit(PageRecorder *self, PyObject *Py_UNUSED(args))
{
    recorder_release(self);
    Py_RETURN_FALSE;
}

static PyObject *
page_list(const sqlite3_int64 *pages, int n)
{
    PyObject *list = PyList_New(n);
    for (int i = 0; list != NULL && i < n; i++) {
        PyObject *v = PyLong_FromLongLong(pages[i]);
        if (v == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SetItem(list, i, v);
    }
    return list;
}

/* Build a dict from "name", kind, value triples: 'L' long long, 'i' int,
 * 'b' bool, 'O' a new reference (stolen). */
static PyObject *
build_dict(int n, const char **names, const char *kinds, ...)
{
    va_list ap;
    PyObject *d = PyDict_New();
    va_start(ap, kinds);
    for (int i = 0; i < n; i++) {
        PyObject *v = NULL;
        switch (kinds[i]) {
        case 'L':
            v = PyLong_FromLongLong(va_arg(ap, long long));
            break;
        case 'i':
            v = PyLong_FromLong(va_arg(ap, int));
            break;
        case 'b':
            v = PyBool_FromLong(va_arg(ap, int));
            break;
        default:
            v = va_arg(ap, PyObject *);
            break;
        }
        if (d != NULL
            && (v == NULL || PyDict_SetItemString(d, names[i], v) < 0)) {
            Py_CLEAR(d);
        }
        Py_XDECREF(v);
    }
    va_end(ap);
    return d;
}

static PyObject *
recorder_stats(PageRecorder *self, PyObject *Py_UNUSED(ignored))
{
    static const char *names[] = {
        "page_size",  "pages",      "recorded",
        "writes",     "hashed",     "reread",
        "truncates",  "failed",     "page_size_changes",
        "incomplete", "open_files", "syncs",
        "attached"};
    if (recorder_check(self) < 0) {
        return NULL;
    }
    RecordingStats s;
    recording_stats(self->rec, &s);
    return build_dict(13, names, "iLLLLLLLibiLL", s.page_size,
                      (long long)s.pages, (long long)s.recorded,
                      (long long)s.writes, (long long)s.hashed,
                      (long long)s.reread, (long long)s.truncates,
                      (long long)s.failed, s.page_size_changes, s.incomplete,
                      s.open_files, (long long)s.syncs, (long long)s.attached);
}

static PyObject *
recorder_page_hash(PageRecorder *self, PyObject *arg)
{
    if (recorder_check(self) < 0) {
        return NULL;
    }
    long long pgno = PyLong_AsLongLong(arg);
    if (pgno == -1 && PyErr_Occurred()) {
        return NULL;
    }
    unsigned char h[PAGE_HASH_SIZE];
    if (!recording_page_hash(self->rec, pgno, h)) {
        Py_RETURN_NONE;
    }
    return PyBytes_FromStringAndSize((const char *)h, PAGE_HASH_SIZE);
}

static PyObject *
recorder_read_back(PageRecorder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"first", "last", "prepare", NULL};
    static const char *names[] = {"page_size",
                                  "file_pages",
                                  "checked",
                                  "mismatched",
                                  "unrecorded",
                                  "missing",
                                  "partial_tail",
                                  "cache_dropped",
                                  "through_connection",
                                  "bytes_read",
                                  "mismatched_pages",
                                  "unrecorded_pages",
                                  "missing_pages",
                                  "direct"};
    long long first = 1, last = -1;
    int prepare = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|LLp:read_back", kwlist,
                                     &first, &last, &prepare)
        || recorder_check(self) < 0) {
        return NULL;
    }
    ReadBack *out = PyMem_Malloc(sizeof(ReadBack));
    if (out == NULL) {
        return PyErr_NoMemory();
    }
    Recording *rec = self->rec;
    recording_ref(rec); /* close() in another thread cannot free it */
    RELEASE_GIL("recorder_read_back");
    recording_read_back(rec, first, last, prepare, out);
    REACQUIRE_GIL();
    recording_unref(rec);
    PyObject *result = NULL;
    if (out->rc != SQLITE_OK) {
        const char *name = PyUnicode_AsUTF8AndSize(self->filename, NULL);
        if (name != NULL) {
            raise_error_format(self->state, out->rc, "%s: %s", out->message,
                               name);
        }
    }
    else if (out->incomplete) {
        raise_sqlite_error(self->state, SQLITE_NOMEM,
                           "the page recording is incomplete (memory ran "
                           "out while recording): the pages cannot be "
                           "verified");
    }
    else if (out->page_size == 0) {
        PyErr_Format(PyExc_ValueError,
                     "nothing was recorded for %R: open it with "
                     "Connection(path, vfs=recorder.vfs) and write it "
                     "through that connection first",
                     self->filename);
    }
    else {
        result = build_dict(
            14, names, "iLLLLLbbbLOOOb", out->page_size,
            (long long)out->file_pages, (long long)out->checked,
            (long long)out->mismatched, (long long)out->unrecorded,
            (long long)out->missing, out->partial_tail, out->cache_dropped,
            out->through_connection, (long long)out->bytes_read,
            page_list(out->mismatched_pages, out->n_mismatched_listed),
            page_list(out->unrecorded_pages, out->n_unrecorded_listed),
            page_list(out->missing_pages, out->n_missing_listed), out->direct);
    }
    PyMem_Free(out);
    return result;
}

static PyObject *
recorder_tamper(PageRecorder *self, PyObject *arg)
{
    if (recorder_check(self) < 0) {
        return NULL;
    }
    long long pgno = PyLong_AsLongLong(arg);
    if (pgno == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (pgno < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "page numbers start at 1 (0 disarms)");
        return NULL;
    }
    recording_tamper(self->rec, pgno);
    Py_RETURN_NONE;
}

static PyObject *
recorder_get_vfs(PageRecorder *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->vfs_name);
}

static PyObject *
recorder_get_filename(PageRecorder *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->filename);
}

static PyObject *
recorder_get_closed(PageRecorder *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->rec == NULL);
}

static PyObject *
recorder_repr(PageRecorder *self)
{
    return PyUnicode_FromFormat("<PageRecorder %R%s>", self->filename,
                                self->rec == NULL ? " (closed)" : "");
}

static PyMethodDef recorder_methods[] = {
    {"read_back", (PyCFunction)(void (*)(void))recorder_read_back,
     METH_VARARGS | METH_KEYWORDS,
     "read_back(first=1, last=-1, prepare=True) -> dict\n\n"
     "Re-read pages first..last of the file (last=-1: to the end) and "
     "compare each with the hash recorded when SQLite wrote it. With "
     "prepare, the file is first synced and the range's cached pages "
     "dropped, so the bytes come from the disk. Reads through the handle of a "
     "connection that has the file open through this recorder's VFS, else "
     "through a read-only handle of SQLite's own VFS; never a descriptor "
     "of ours (closing one would drop SQLite's locks). Returns counts and "
     "the first page numbers of each kind: mismatched (differ from what "
     "was written), unrecorded (never written while recording), missing "
     "(recorded, but past the file's end)."},
    {"page_hash", (PyCFunction)recorder_page_hash, METH_O,
     "page_hash(pgno) -> bytes | None\n\nThe recorded hash of page pgno "
     "(1-based), or None if it was not recorded."},
    {"stats", (PyCFunction)recorder_stats, METH_NOARGS,
     "stats() -> dict\n\nWhat was recorded: page_size, pages, recorded, "
     "writes, hashed (from SQLite's buffers), reread (hashed by reading "
     "the page back at once: partial writes, a page-size change), "
     "truncates, failed, page_size_changes, incomplete, open_files, "
     "syncs, attached (files ever opened through the shim while "
     "recording)."},
    {"close", (PyCFunction)recorder_close, METH_NOARGS,
     "close() -> None\n\nStop recording new opens of the file and let go "
     "of the hashes. Idempotent."},
    {"_tamper_on_read_back", (PyCFunction)recorder_tamper, METH_O,
     "_tamper_on_read_back(pgno) -> None\n\nTEST ONLY: at the next "
     "read_back(prepare=True), after the sync and before the cache is "
     "dropped, flip one byte of page pgno on the disk without recording "
     "it, as if the disk had changed it. 0 disarms."},
    {"__enter__", (PyCFunction)recorder_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)recorder_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef recorder_getset[] = {
    {"vfs", (getter)recorder_get_vfs, NULL,
     "The VFS name to open the file with: Connection(path, vfs=...)", NULL},
    {"filename", (getter)recorder_get_filename, NULL,
     "The full path that is recorded", NULL},
    {"closed", (getter)recorder_get_closed, NULL, "Whether close() ran", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot recorder_slots[] = {
    {Py_tp_doc,
     "PageRecorder(filename, vfs=None)\n\nRecord the hash of every page "
     "SQLite writes to the database file `filename` through connections "
     "opened with vfs=recorder.vfs (a private VFS over `vfs`, the default "
     "one when None), then read the file back from the disk and compare."},
    {Py_tp_new, recorder_new},
    {Py_tp_dealloc, recorder_dealloc},
    {Py_tp_repr, recorder_repr},
    {Py_tp_methods, recorder_methods},
    {Py_tp_getset, recorder_getset},
    {0, NULL},
};

PyType_Spec recorder_spec = {
    .name = "apsw_backup.PageRecorder",
    .basicsize = sizeof(PageRecorder),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = recorder_slots,
};

/* _rollback_vfs() -> str: the name of the rollback shim over the default
 * VFS (pageshim_rollback_vfs), registered on first use; copy() opens a
 * path target through it when the copy is to end in rollback-journal
 * mode. */
PyObject *
module_rollback_vfs(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    sqlite3_vfs *shim = pageshim_rollback_vfs(NULL);
    if (shim == NULL) {
        return raise_sqlite_error((ModuleState *)PyModule_GetState(module),
                                  SQLITE_NOMEM,
                                  "the rollback VFS shim could not be "
                                  "registered");
    }
    return PyUnicode_FromString(shim->zName);
}

/* page_hash(data) -> bytes: the 16-byte XXH3-128 of data. */
PyObject *
module_page_hash(PyObject *Py_UNUSED(module), PyObject *data)
{
    unsigned char h[PAGE_HASH_SIZE];
    if (PyBytes_Check(data)) {
        /* bytes cannot change: hash large ones with the GIL released */
        const char *p = PyBytes_AsString(data);
        Py_ssize_t n = PyBytes_Size(data);
        if (n >= (1 << 16)) {
            RELEASE_GIL("module_page_hash");
            page_hash(p, (size_t)n, h);
            REACQUIRE_GIL();
        }
        else {
            page_hash(p, (size_t)n, h);
        }
    }
    else if (PyByteArray_Check(data)) {
        page_hash(PyByteArray_AsString(data), (size_t)PyByteArray_Size(data),
                  h);
    }
    else if (PyUnicode_Check(data)) {
        PyErr_SetString(PyExc_TypeError,
                        "page_hash() takes bytes-like data, not str "
                        "(encode it first)");
        return NULL;
    }
    else {
        /* The buffer API is not in the 3.10 Limited API: copy. */
        PyObject *copy = PyBytes_FromObject(data);
        if (copy == NULL) {
            return NULL;
        }
        page_hash(PyBytes_AsString(copy), (size_t)PyBytes_Size(copy), h);
        Py_DECREF(copy);
    }
    return PyBytes_FromStringAndSize((const char *)h, PAGE_HASH_SIZE);
}

/* Hash n bytes of fd from off into the stream, a block at a time.  0,
 * or an errno (EIO: the file ended early). */
static int
hash_file_part(HashStream *stream, int fd, long long off, long long n,
               unsigned char *buf, size_t size)
{
    while (n > 0) {
        size_t want = n < (long long)size ? (size_t)n : size;
        ssize_t r = pread(fd, buf, want, (off_t)off);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return errno ? errno : EIO;
        }
        if (r == 0) {
            return EIO;
        }
        hash_stream_update(stream, buf, (size_t)r);
        off += r;
        n -= r;
    }
    return 0;
}

/* _page_hash_parts(parts) -> bytes: page_hash(b"".join(parts)) without
 * the join (a manifest of 16 bytes a page is hashed where it lies).  parts:
 * a list or tuple of bytes, or of (fd, offset, length) -- that part of a
 * file, read in blocks of 64 KiB with the GIL released (OSError for a
 * failed read; EIO when the file ends early). */
PyObject *
module_page_hash_parts(PyObject *Py_UNUSED(module), PyObject *parts)
{
    static const char wrong[] =
        "_page_hash_parts() takes a list or tuple of bytes or of (fd, "
        "offset, length)";
    if (!PyList_Check(parts) && !PyTuple_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, wrong);
        return NULL;
    }
    PyObject *items = PySequence_Tuple(parts);
    if (items == NULL) {
        return NULL;
    }
    enum { BLOCK = 65536 };
    typedef struct {
        const char *data; /* a bytes part's (items keeps it), or NULL */
        int fd;
        long long off, n;
    } Part;
    Py_ssize_t count = PyTuple_Size(items);
    Part *list = PyMem_Calloc((size_t)(count > 0 ? count : 1), sizeof(Part));
    HashStream *stream = PyMem_Malloc(sizeof(*stream));
    unsigned char *buf = PyMem_Malloc(BLOCK);
    int ok = list != NULL && stream != NULL && buf != NULL;
    if (!ok) {
        PyErr_NoMemory();
    }
    /* 1: every part as C values (a conversion may run Python code) */
    for (Py_ssize_t i = 0; ok && i < count; i++) {
        PyObject *part = PyTuple_GetItem(items, i); /* borrowed */
        if (part == NULL) {
            ok = 0;
        }
        else if (PyBytes_Check(part)) {
            list[i].data = PyBytes_AsString(part);
            list[i].n = (long long)PyBytes_Size(part);
        }
        else if (!PyTuple_Check(part)
                 || !PyArg_ParseTuple(part, "iLL", &list[i].fd, &list[i].off,
                                      &list[i].n)
                 || list[i].off < 0 || list[i].n < 0) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, wrong);
            ok = 0;
        }
    }
    /* 2: hashed with the GIL released: the stream and the buffer are ours
     * alone, the bytes immutable and kept by items, the descriptors the
     * caller's */
    int err = 0;
    unsigned char h[PAGE_HASH_SIZE];
    if (ok) {
        RELEASE_GIL("module_page_hash_parts");
        hash_stream_init(stream);
        for (Py_ssize_t i = 0; !err && i < count; i++) {
            if (list[i].data != NULL) {
                hash_stream_update(stream, list[i].data, (size_t)list[i].n);
            }
            else {
                err = hash_file_part(stream, list[i].fd, list[i].off,
                                     list[i].n, buf, BLOCK);
            }
        }
        hash_stream_digest(stream, h);
        REACQUIRE_GIL();
    }
    PyMem_Free(list);
    PyMem_Free(stream);
    PyMem_Free(buf);
    Py_DECREF(items);
    if (ok && err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        ok = 0;
    }
    /* 3: the result */
    return ok ? PyBytes_FromStringAndSize((const char *)h, PAGE_HASH_SIZE)
              : NULL;
}

/* _page_hash_variants(data) -> dict: the hash by each long-input loop this
 * build has, for the tests. */
PyObject *
module_page_hash_variants(PyObject *Py_UNUSED(module), PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "bytes expected");
        return NULL;
    }
    PyObject *d = PyDict_New();
    int variants[] = {HASH_BEST, HASH_PORTABLE, HASH_SSE2};
    for (int i = 0; d != NULL && i < 3; i++) {
        Hash128 x = xxh3_128_with(PyBytes_AsString(data),
                                  (size_t)PyBytes_Size(data), variants[i]);
        unsigned char h[PAGE_HASH_SIZE];
        for (int j = 0; j < 8; j++) {
            h[j] = (unsigned char)(x.high >> (56 - 8 * j));
            h[8 + j] = (unsigned char)(x.low >> (56 - 8 * j));
        }
        PyObject *v =
            PyBytes_FromStringAndSize((const char *)h, PAGE_HASH_SIZE);
        if (v == NULL
            || PyDict_SetItemString(d, page_hash_variant_name(variants[i]), v)
                   < 0) {
            Py_CLEAR(d);
        }
        Py_XDECREF(v);
    }
    return d;
}
