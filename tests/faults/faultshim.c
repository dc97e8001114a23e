/* Test-only fault injection for the system libsqlite3 (docs/testing.md).
 *
 * Built by tests/faults/shim.py with the system compiler into a shared
 * object that links libsqlite3.so.0 -- so it lands in the very SQLite the
 * extension under test uses -- and driven through ctypes.  Never part of
 * the package.
 *
 * Two injectors:
 *
 * - A VFS ("faultvfs") wrapping the default VFS, registered as the new
 *   default, so every connection opened afterwards goes through it whatever
 *   code opens it (Backup, copy(), the CLI, its temporary file).  It counts
 *   the calls of each method on files under a chosen folder (plus SQLite's
 *   nameless temporary files) and can make the Nth call of one method fail,
 *   once or from then on, with a chosen SQLite code, setting errno as the
 *   failing system call would.
 *
 * - An allocator (SQLITE_CONFIG_MALLOC, before SQLite initialises) wrapping
 *   SQLite's default one, which counts allocations and can make the Nth
 *   fail, once or from then on.
 *
 * Faults are armed for one kind of call at a time; a run is: reset, arm,
 * do the work, disarm, read the counters.
 */
#include <errno.h>
#include <sqlite3.h>
#include <string.h>

enum {
    OP_OPEN,
    OP_DELETE,
    OP_READ,
    OP_WRITE,
    OP_TRUNCATE,
    OP_SYNC,
    OP_FILESIZE,
    OP_LOCK,
    OP_UNLOCK,
    OP_SHMMAP,
    OP_COUNT
};

static struct {
    int counting;             /* count calls (and inject) at all */
    char folder[512];         /* only files under this prefix count */
    long calls[OP_COUNT];     /* calls seen since the last reset */
    int target;               /* the op to fail, or -1 */
    long nth;                 /* fail its nth call (1-based) ... */
    int persistent;           /* ... and every later one */
    int rc;                   /* with this SQLite code */
    int err;                  /* and errno */
    long injected;            /* faults injected since the last reset */
    int last_errno;           /* errno of the last injected fault */
} vfs_ctl = {.target = -1};

static sqlite3_vfs *real_vfs;
static sqlite3_vfs fault_vfs;

typedef struct {
    sqlite3_file base;
    int counted;    /* under the folder (or nameless) */
    int last_errno; /* errno of the last fault injected on this file */
    sqlite3_file *real;
} FaultFile;

/* Count a call of op on a counted file; nonzero (the code) to fail it.
 * file (NULL for the VFS's own calls) remembers the errno, as the unix
 * VFS's files do (SQLITE_FCNTL_LAST_ERRNO). */
static int
fault_on(void *file, int counted, int op)
{
    if (!vfs_ctl.counting || !counted) {
        return SQLITE_OK;
    }
    long n = ++vfs_ctl.calls[op];
    if (op != vfs_ctl.target) {
        return SQLITE_OK;
    }
    if (n == vfs_ctl.nth || (vfs_ctl.persistent && n > vfs_ctl.nth)) {
        vfs_ctl.injected++;
        vfs_ctl.last_errno = vfs_ctl.err;
        if (file != NULL) {
            ((FaultFile *)file)->last_errno = vfs_ctl.err;
        }
        errno = vfs_ctl.err;
        return vfs_ctl.rc;
    }
    return SQLITE_OK;
}

#define fault(counted, op) fault_on(NULL, counted, op)
#define file_fault(f, op) fault_on(f, ((FaultFile *)(f))->counted, op)

#define REAL(f) (((FaultFile *)(f))->real)

static int
f_close(sqlite3_file *f)
{
    int rc = SQLITE_OK;
    if (REAL(f)->pMethods != NULL) {
        rc = REAL(f)->pMethods->xClose(REAL(f));
    }
    f->pMethods = NULL;
    return rc;
}

static int
f_read(sqlite3_file *f, void *buf, int amount, sqlite3_int64 offset)
{
    int rc = file_fault(f, OP_READ);
    return rc ? rc : REAL(f)->pMethods->xRead(REAL(f), buf, amount, offset);
}

/* A write armed with rc FAULT_DROP reports success but never reaches the
 * file: a write lost by a disk or a driver (the byte check of docs/verification.md). */
#define FAULT_DROP (-1)

static int
f_write(sqlite3_file *f, const void *buf, int amount, sqlite3_int64 offset)
{
    int rc = file_fault(f, OP_WRITE);
    if (rc == FAULT_DROP) {
        return SQLITE_OK;
    }
    return rc ? rc : REAL(f)->pMethods->xWrite(REAL(f), buf, amount, offset);
}

static int
f_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    int rc = file_fault(f, OP_TRUNCATE);
    return rc ? rc : REAL(f)->pMethods->xTruncate(REAL(f), size);
}

static int
f_sync(sqlite3_file *f, int flags)
{
    int rc = file_fault(f, OP_SYNC);
    return rc ? rc : REAL(f)->pMethods->xSync(REAL(f), flags);
}

static int
f_filesize(sqlite3_file *f, sqlite3_int64 *size)
{
    int rc = file_fault(f, OP_FILESIZE);
    return rc ? rc : REAL(f)->pMethods->xFileSize(REAL(f), size);
}

static int
f_lock(sqlite3_file *f, int level)
{
    int rc = file_fault(f, OP_LOCK);
    return rc ? rc : REAL(f)->pMethods->xLock(REAL(f), level);
}

static int
f_unlock(sqlite3_file *f, int level)
{
    int rc = file_fault(f, OP_UNLOCK);
    return rc ? rc : REAL(f)->pMethods->xUnlock(REAL(f), level);
}

static int
f_check_reserved(sqlite3_file *f, int *out)
{
    return REAL(f)->pMethods->xCheckReservedLock(REAL(f), out);
}

static int
f_file_control(sqlite3_file *f, int op, void *arg)
{
    if (op == SQLITE_FCNTL_LAST_ERRNO && ((FaultFile *)f)->last_errno != 0) {
        *(int *)arg = ((FaultFile *)f)->last_errno;
        return SQLITE_OK;
    }
    return REAL(f)->pMethods->xFileControl(REAL(f), op, arg);
}

static int
f_sector_size(sqlite3_file *f)
{
    return REAL(f)->pMethods->xSectorSize(REAL(f));
}

static int
f_device_characteristics(sqlite3_file *f)
{
    return REAL(f)->pMethods->xDeviceCharacteristics(REAL(f));
}

static int
f_shm_map(sqlite3_file *f, int region, int size, int extend,
          void volatile **out)
{
    int rc = file_fault(f, OP_SHMMAP);
    return rc ? rc
              : REAL(f)->pMethods->xShmMap(REAL(f), region, size, extend, out);
}

static int
f_shm_lock(sqlite3_file *f, int offset, int n, int flags)
{
    return REAL(f)->pMethods->xShmLock(REAL(f), offset, n, flags);
}

static void
f_shm_barrier(sqlite3_file *f)
{
    REAL(f)->pMethods->xShmBarrier(REAL(f));
}

static int
f_shm_unmap(sqlite3_file *f, int delete_flag)
{
    return REAL(f)->pMethods->xShmUnmap(REAL(f), delete_flag);
}

static int
f_fetch(sqlite3_file *f, sqlite3_int64 offset, int amount, void **out)
{
    return REAL(f)->pMethods->xFetch(REAL(f), offset, amount, out);
}

static int
f_unfetch(sqlite3_file *f, sqlite3_int64 offset, void *p)
{
    return REAL(f)->pMethods->xUnfetch(REAL(f), offset, p);
}

static const sqlite3_io_methods fault_methods = {
    3,
    f_close,
    f_read,
    f_write,
    f_truncate,
    f_sync,
    f_filesize,
    f_lock,
    f_unlock,
    f_check_reserved,
    f_file_control,
    f_sector_size,
    f_device_characteristics,
    f_shm_map,
    f_shm_lock,
    f_shm_barrier,
    f_shm_unmap,
    f_fetch,
    f_unfetch,
};

/* One io_methods table per version the real VFS hands out, so SQLite
 * never calls a method (shm, mmap) the real file does not have. */
static sqlite3_io_methods methods_v1, methods_v2;

static int
under_folder(const char *name)
{
    size_t n = strlen(vfs_ctl.folder);
    return name == NULL || (n > 0 && strncmp(name, vfs_ctl.folder, n) == 0);
}

static int
v_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags,
       int *out_flags)
{
    (void)vfs;
    FaultFile *ff = (FaultFile *)f;
    ff->base.pMethods = NULL;
    ff->real = (sqlite3_file *)&ff[1];
    ff->counted = under_folder(name);
    ff->last_errno = 0;
    int rc = file_fault(f, OP_OPEN);
    if (rc) {
        return rc;
    }
    rc = real_vfs->xOpen(real_vfs, name, ff->real, flags, out_flags);
    if (ff->real->pMethods == NULL) {
        return rc;
    }
    int version = ff->real->pMethods->iVersion;
    ff->base.pMethods = version >= 3   ? &fault_methods
                        : version == 2 ? &methods_v2
                                       : &methods_v1;
    return rc;
}

static int
v_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    (void)vfs;
    int rc = fault(under_folder(name), OP_DELETE);
    return rc ? rc : real_vfs->xDelete(real_vfs, name, sync_dir);
}

static int
v_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    (void)vfs;
    return real_vfs->xAccess(real_vfs, name, flags, out);
}

static int
v_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out)
{
    (void)vfs;
    return real_vfs->xFullPathname(real_vfs, name, n, out);
}

static void *
v_dl_open(sqlite3_vfs *vfs, const char *name)
{
    (void)vfs;
    return real_vfs->xDlOpen(real_vfs, name);
}

static void
v_dl_error(sqlite3_vfs *vfs, int n, char *out)
{
    (void)vfs;
    real_vfs->xDlError(real_vfs, n, out);
}

static void (*v_dl_sym(sqlite3_vfs *vfs, void *handle, const char *sym))(void)
{
    (void)vfs;
    return real_vfs->xDlSym(real_vfs, handle, sym);
}

static void
v_dl_close(sqlite3_vfs *vfs, void *handle)
{
    (void)vfs;
    real_vfs->xDlClose(real_vfs, handle);
}

static int
v_randomness(sqlite3_vfs *vfs, int n, char *out)
{
    (void)vfs;
    return real_vfs->xRandomness(real_vfs, n, out);
}

static int
v_sleep(sqlite3_vfs *vfs, int microseconds)
{
    (void)vfs;
    return real_vfs->xSleep(real_vfs, microseconds);
}

static int
v_current_time(sqlite3_vfs *vfs, double *out)
{
    (void)vfs;
    return real_vfs->xCurrentTime(real_vfs, out);
}

/* What the OS said for the last failure: the injected errno while that is
 * the newest news (the unix VFS answers with errno, which SQLite reads only
 * after other calls may have changed it). */
static int
v_get_last_error(sqlite3_vfs *vfs, int n, char *out)
{
    (void)vfs;
    if (vfs_ctl.last_errno != 0) {
        return vfs_ctl.last_errno;
    }
    return real_vfs->xGetLastError(real_vfs, n, out);
}

static int
v_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out)
{
    (void)vfs;
    return real_vfs->xCurrentTimeInt64(real_vfs, out);
}

static int
v_set_system_call(sqlite3_vfs *vfs, const char *name,
                  sqlite3_syscall_ptr call)
{
    (void)vfs;
    return real_vfs->xSetSystemCall(real_vfs, name, call);
}

static sqlite3_syscall_ptr
v_get_system_call(sqlite3_vfs *vfs, const char *name)
{
    (void)vfs;
    return real_vfs->xGetSystemCall(real_vfs, name);
}

static const char *
v_next_system_call(sqlite3_vfs *vfs, const char *name)
{
    (void)vfs;
    return real_vfs->xNextSystemCall(real_vfs, name);
}

/* Register faultvfs around the current default VFS; as the new default
 * when make_default.  SQLITE_OK, or SQLite's code. */
int
faultvfs_register(int make_default)
{
    if (real_vfs != NULL) {
        return sqlite3_vfs_register(&fault_vfs, make_default);
    }
    int rc = sqlite3_initialize();
    if (rc != SQLITE_OK) {
        return rc;
    }
    real_vfs = sqlite3_vfs_find(NULL);
    if (real_vfs == NULL) {
        return SQLITE_ERROR;
    }
    fault_vfs = (sqlite3_vfs){
        .iVersion = real_vfs->iVersion < 3 ? real_vfs->iVersion : 3,
        .szOsFile = (int)sizeof(FaultFile) + real_vfs->szOsFile,
        .mxPathname = real_vfs->mxPathname,
        .zName = "faultvfs",
        .xOpen = v_open,
        .xDelete = v_delete,
        .xAccess = v_access,
        .xFullPathname = v_full_pathname,
        .xDlOpen = v_dl_open,
        .xDlError = v_dl_error,
        .xDlSym = v_dl_sym,
        .xDlClose = v_dl_close,
        .xRandomness = v_randomness,
        .xSleep = v_sleep,
        .xCurrentTime = v_current_time,
        .xGetLastError = v_get_last_error,
        .xCurrentTimeInt64 = v_current_time_int64,
        .xSetSystemCall = v_set_system_call,
        .xGetSystemCall = v_get_system_call,
        .xNextSystemCall = v_next_system_call,
    };
    methods_v2 = fault_methods;
    methods_v2.iVersion = 2;
    methods_v2.xFetch = NULL;
    methods_v2.xUnfetch = NULL;
    methods_v1 = methods_v2;
    methods_v1.iVersion = 1;
    methods_v1.xShmMap = NULL;
    methods_v1.xShmLock = NULL;
    methods_v1.xShmBarrier = NULL;
    methods_v1.xShmUnmap = NULL;
    return sqlite3_vfs_register(&fault_vfs, make_default);
}

/* Zero the counters; count calls on files under folder from now on. */
void
faultvfs_reset(const char *folder)
{
    memset(vfs_ctl.calls, 0, sizeof(vfs_ctl.calls));
    vfs_ctl.injected = 0;
    vfs_ctl.last_errno = 0;
    vfs_ctl.target = -1;
    strncpy(vfs_ctl.folder, folder, sizeof(vfs_ctl.folder) - 1);
    vfs_ctl.folder[sizeof(vfs_ctl.folder) - 1] = '\0';
    vfs_ctl.counting = 1;
}

/* Fail the nth call of op (and every later one if persistent) with rc,
 * errno err.  op -1 counts only. */
void
faultvfs_arm(int op, long nth, int persistent, int rc, int err)
{
    vfs_ctl.target = op;
    vfs_ctl.nth = nth;
    vfs_ctl.persistent = persistent;
    vfs_ctl.rc = rc;
    vfs_ctl.err = err;
}

/* Stop counting and injecting; the VFS passes everything through. */
void
faultvfs_disarm(void)
{
    vfs_ctl.counting = 0;
    vfs_ctl.target = -1;
    vfs_ctl.last_errno = 0;
}

long
faultvfs_calls(int op)
{
    return op >= 0 && op < OP_COUNT ? vfs_ctl.calls[op] : -1;
}

long
faultvfs_injected(void)
{
    return vfs_ctl.injected;
}

/* The sqlite3_libversion this shim calls: the caller checks it is the one
 * the extension uses. */
void *
faultshim_libversion_address(void)
{
    return (void *)sqlite3_libversion;
}

/* ---- allocation failures ------------------------------------------------ */

static sqlite3_mem_methods real_mem;

static struct {
    int counting;
    long calls;
    long nth;
    int persistent;
    long injected;
} mem_ctl;

static int
mem_fault(void)
{
    if (!mem_ctl.counting) {
        return 0;
    }
    long n = ++mem_ctl.calls;
    if (mem_ctl.nth > 0
        && (n == mem_ctl.nth || (mem_ctl.persistent && n > mem_ctl.nth))) {
        mem_ctl.injected++;
        return 1;
    }
    return 0;
}

static void *
m_malloc(int n)
{
    return mem_fault() ? NULL : real_mem.xMalloc(n);
}

static void
m_free(void *p)
{
    real_mem.xFree(p);
}

static void *
m_realloc(void *p, int n)
{
    return mem_fault() ? NULL : real_mem.xRealloc(p, n);
}

static int
m_size(void *p)
{
    return real_mem.xSize(p);
}

static int
m_roundup(int n)
{
    return real_mem.xRoundup(n);
}

static int
m_init(void *data)
{
    return real_mem.xInit(data);
}

static void
m_shutdown(void *data)
{
    real_mem.xShutdown(data);
}

/* Install the counting allocator.  Must run before SQLite initialises:
 * SQLITE_MISUSE says it already has. */
int
faultmem_install(void)
{
    int rc = sqlite3_config(SQLITE_CONFIG_GETMALLOC, &real_mem);
    if (rc != SQLITE_OK) {
        return rc;
    }
    sqlite3_mem_methods ours = real_mem;
    ours.xMalloc = m_malloc;
    ours.xFree = m_free;
    ours.xRealloc = m_realloc;
    ours.xSize = m_size;
    ours.xRoundup = m_roundup;
    ours.xInit = m_init;
    ours.xShutdown = m_shutdown;
    return sqlite3_config(SQLITE_CONFIG_MALLOC, &ours);
}

/* Count allocations from now on; fail the nth (0: none), and every later
 * one if persistent. */
void
faultmem_arm(long nth, int persistent)
{
    mem_ctl.calls = 0;
    mem_ctl.injected = 0;
    mem_ctl.nth = nth;
    mem_ctl.persistent = persistent;
    mem_ctl.counting = 1;
}

void
faultmem_disarm(void)
{
    mem_ctl.counting = 0;
}

long
faultmem_calls(void)
{
    return mem_ctl.calls;
}

long
faultmem_injected(void)
{
    return mem_ctl.injected;
}
