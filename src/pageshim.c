/* The page-recording VFS shim: see pageshim.h for what it is for.
 *
 * How writes become page hashes.  SQLite hands the main database file whole
 * pages at page-aligned offsets (commits, cache spills, checkpoints of a
 * WAL, the rollback of a hot journal), so a write of a page-sized buffer at
 * a multiple of that size is hashed straight from SQLite's buffer: that is
 * the claim a later read-back checks.  The page size is the header's (read
 * through the file's own handle at open, or taken from page 1 when it is
 * written); a new file takes it from its first page-shaped write.  Anything
 * else -- a write that is not one aligned page, a page 1 that declares a new
 * page size, writes that came before the size was known -- has the pages it
 * touched hashed by reading them back through the same handle at once:
 * weaker (it proves what the OS accepted, not what SQLite meant), counted
 * apart (`reread`), and rare (the backup API and the pager write whole
 * pages).  xTruncate forgets the pages past the new end.
 *
 * Threads.  SQLite calls these methods with the GIL released, from any
 * thread, so nothing here touches Python.  A Recording has its own mutex; a
 * hash is computed before it is taken.  The registry of live Recordings
 * (looked up by xOpen) has another; the order is registry, then Recording,
 * then whatever SQLite's own VFS takes.
 *
 * Reading back, and the rule about descriptors.  Closing any descriptor of
 * a file drops every POSIX lock this process holds on it, SQLite's
 * included, so this code never open()s the database itself:
 *  - while a connection has the file open through the shim, the read-back
 *    goes through that connection's own handle (the base VFS's file inside
 *    our ShimFile); the Recording's mutex is held throughout, and xClose
 *    takes it first, so the handle cannot be closed under the read;
 *  - otherwise it opens a read-only handle of its own through the base
 *    VFS (for the unix VFS, whose xClose keeps the descriptor open, parked
 *    on the inode, while any connection of this process holds a lock on the
 *    file: the case SQLite itself has to handle for two connections);
 *  - to make the pages come from the disk and not the page cache, it syncs
 *    through that handle, then finds a descriptor this process already has
 *    on the same inode in /proc/self/fd (fstat only: nothing is opened) and
 *    calls posix_fadvise(POSIX_FADV_DONTNEED) on it for the range about to
 *    be read (then WILLNEED, so the device reads it all at once) -- hints
 *    to the kernel about the inode's cached pages, harmless even if that
 *    descriptor were closed and reused meanwhile.  The read itself never
 *    depends on it: it always goes through the handle above.
 *  - better, when the handle is our own one of the unix VFS: its
 *    descriptor is ours alone, so it is switched to O_DIRECT (fcntl
 *    F_SETFL; the descriptor found in the handle is checked to be the
 *    file's by fstat first) and read in large aligned pieces straight from
 *    the device.  The page cache is then left warm for the quick_check
 *    that runs beside the read-back (dropping it made that check wait for
 *    the disk).  A file system or page size that refuses O_DIRECT falls
 *    back to the cache drop above.
 *
 * The rollback shim (pageshim_rollback_vfs) is this same VFS registered a
 * second time per base VFS; its main database files also have a page 1
 * saying WAL written saying rollback journal (shim_write), so that a
 * backup of a WAL source commits a rollback-journal database
 * (docs/journal-mode.md).
 */
#define _GNU_SOURCE
#include "pageshim.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SHIM_PREFIX "apsw_backup-pages-"
#define ROLLBACK_PREFIX "apsw_backup-rollback-"
/* Not in the 3.26 headers the Linux wheels are built with (xOpen's name is
 * a plain `const char *` there, as used here). */
#ifndef SQLITE_OK_SYMLINK
#define SQLITE_OK_SYMLINK (SQLITE_OK | (2 << 8))
#endif
#define MAX_SHIMS 16 /* a plain and a rollback shim per base VFS */
#define READ_CHUNK (1 << 20)
#define DIRECT_CHUNK \
    (4 << 20) /* an O_DIRECT read: larger ones are not faster */
#define DIRECT_ALIGN 4096
#define PENDING_BYTE 0x40000000 /* SQLite's lock-byte offset */

typedef struct ShimFile ShimFile;
struct ShimFile {
    sqlite3_file base;  /* pMethods: ours */
    sqlite3_file *real; /* the base VFS's file, allocated right after us */
    Recording *rec;     /* the Recording it feeds, or NULL */
    ShimFile *next;     /* in rec->files */
    dev_t dev;
    ino_t ino;
    int have_id;
    int rollback; /* a main database file opened through a rollback shim */
    int wal;      /* xShmMap was called: the connection is in WAL mode */
};
#define SHIM_HEAD ((int)((sizeof(ShimFile) + 7) & ~(size_t)7))

struct Recording {
    pthread_mutex_t mutex;
    int refs; /* the owner's and one per attached file */
    int registered;
    Recording *next_registered;
    sqlite3_vfs *base;
    char *path;
    /* the page table: slot n-1 is page n */
    int page_size;
    unsigned char *hashes; /* PAGE_HASH_SIZE bytes a slot */
    unsigned char *known;  /* 1 when the slot's hash is set */
    sqlite3_int64 slots;   /* allocated */
    sqlite3_int64 pages;   /* slots in use: the highest page + 1 */
    int rehash_pending;    /* writes came before the page size was known */
    RecordingStats stats;
    ShimFile *files; /* attached open files */
    sqlite3_int64 tamper_page;
    int synced; /* read_back synced the file, and nothing was written
                 * through the shim since: the next one need not sync */
};

/* -- registry ----------------------------------------------------------- */

static pthread_mutex_t registry_mutex = PTHREAD_MUTEX_INITIALIZER;
static Recording *registry;
typedef struct {
    sqlite3_vfs vfs; /* first: a shim's sqlite3_vfs * is its ShimVfs * */
    char name[96];
    int rollback; /* rewrite page 1's WAL flags (see shim_write) */
} ShimVfs;
static ShimVfs shims[MAX_SHIMS];
static int n_shims;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

/* A forked child starts with a registry nobody uses: a mutex another
 * thread of the parent held at fork time would never be released.  Its
 * inherited Recordings are left alone (their Python owners are inert). */
static void
registry_after_fork_child(void)
{
    pthread_mutex_init(&registry_mutex, NULL);
    registry = NULL;
}

static void
install_fork_handler_once(void)
{
    (void)pthread_atfork(NULL, NULL, registry_after_fork_child);
}

static Recording *
registry_find_ref(const char *path)
{
    Recording *found = NULL;
    pthread_mutex_lock(&registry_mutex);
    for (Recording *r = registry; r != NULL; r = r->next_registered) {
        if (strcmp(r->path, path) == 0) {
            found = r;
            recording_ref(r);
            break;
        }
    }
    pthread_mutex_unlock(&registry_mutex);
    return found;
}

/* -- the page table (Recording's mutex held) ------------------------------ */

static int
valid_page_size(sqlite3_int64 n)
{
    return n >= 512 && n <= 65536 && (n & (n - 1)) == 0;
}

/* The page size a database header declares, or 0. */
static int
header_page_size(const unsigned char *h, sqlite3_int64 n)
{
    if (n < 18 || memcmp(h, "SQLite format 3", 16) != 0) {
        return 0;
    }
    int size = (h[16] << 8) | h[17];
    if (size == 1) {
        size = 65536;
    }
    return valid_page_size(size) ? size : 0;
}

static sqlite3_int64
lock_byte_page(int page_size)
{
    return (sqlite3_int64)PENDING_BYTE / page_size + 1;
}

static void
table_clear(Recording *rec)
{
    if (rec->known != NULL) {
        memset(rec->known, 0, (size_t)rec->slots);
    }
    rec->pages = 0;
}

static int
table_store(Recording *rec, sqlite3_int64 pgno, const unsigned char *hash)
{
    if (pgno > rec->slots) {
        sqlite3_int64 want = rec->slots ? rec->slots : 1024;
        while (want < pgno) {
            want *= 2;
        }
        unsigned char *h = realloc(rec->hashes, (size_t)want * PAGE_HASH_SIZE);
        if (h == NULL) {
            rec->stats.incomplete = 1;
            return -1;
        }
        rec->hashes = h;
        unsigned char *k = realloc(rec->known, (size_t)want);
        if (k == NULL) {
            rec->stats.incomplete = 1;
            return -1;
        }
        memset(k + rec->slots, 0, (size_t)(want - rec->slots));
        rec->known = k;
        rec->slots = want;
    }
    memcpy(rec->hashes + (pgno - 1) * PAGE_HASH_SIZE, hash, PAGE_HASH_SIZE);
    rec->known[pgno - 1] = 1;
    if (pgno > rec->pages) {
        rec->pages = pgno;
    }
    return 0;
}

static void
table_forget(Recording *rec, sqlite3_int64 pgno)
{
    if (pgno >= 1 && pgno <= rec->pages) {
        rec->known[pgno - 1] = 0;
    }
}

/* Hash page pgno as the file holds it now (read through `file`). */
static void
rehash_page(Recording *rec, sqlite3_file *file, sqlite3_int64 pgno,
            unsigned char *buf)
{
    int P = rec->page_size;
    int rc = file->pMethods->xRead(file, buf, P, (pgno - 1) * P);
    if (rc != SQLITE_OK && rc != SQLITE_IOERR_SHORT_READ) {
        table_forget(rec, pgno); /* read-back will count it unrecorded */
        return;
    }
    unsigned char hash[PAGE_HASH_SIZE];
    page_hash(buf, (size_t)P, hash);
    if (table_store(rec, pgno, hash) == 0) {
        rec->stats.reread++;
    }
}

static void
rehash_range(Recording *rec, sqlite3_file *file, sqlite3_int64 first,
             sqlite3_int64 last)
{
    unsigned char *buf = malloc((size_t)rec->page_size);
    if (buf == NULL) {
        rec->stats.incomplete = 1;
        return;
    }
    for (sqlite3_int64 p = first; p <= last; p++) {
        rehash_page(rec, file, p, buf);
    }
    free(buf);
}

static void
rehash_file(Recording *rec, sqlite3_file *file)
{
    sqlite3_int64 size = 0;
    if (file->pMethods->xFileSize(file, &size) != SQLITE_OK) {
        rec->stats.incomplete = 1;
        return;
    }
    sqlite3_int64 last = (size + rec->page_size - 1) / rec->page_size;
    rehash_range(rec, file, 1, last);
}

/* A write of amt bytes at off succeeded; `hash` is the hash of the buffer
 * when it is page-shaped (a valid page size, aligned to it), else NULL. */
static void
record_write(ShimFile *f, const unsigned char *buf, int amt, sqlite3_int64 off,
             const unsigned char *hash)
{
    Recording *rec = f->rec;
    pthread_mutex_lock(&rec->mutex);
    rec->stats.writes++;
    rec->synced = 0;
    int declared = off == 0 ? header_page_size(buf, amt) : 0;
    int rehash_all = 0;
    if (declared != 0 && declared != rec->page_size) {
        if (rec->page_size != 0) {
            rec->stats.page_size_changes++;
            rehash_all = 1; /* pages written before page 1 had the new size */
        }
        table_clear(rec);
        rec->page_size = declared;
    }
    else if (rec->page_size == 0 && hash != NULL) {
        rec->page_size = amt;
    }
    int P = rec->page_size;
    if (P == 0) {
        rec->rehash_pending = 1;
    }
    else if (rehash_all || rec->rehash_pending) {
        rec->rehash_pending = 0;
        rehash_file(rec, f->real);
        if (hash != NULL && amt == P) {
            /* the page just written: from SQLite's buffer after all */
            if (table_store(rec, off / P + 1, hash) == 0) {
                rec->stats.hashed++;
                rec->stats.reread--;
            }
        }
    }
    else if (hash != NULL && amt == P) {
        if (table_store(rec, off / P + 1, hash) == 0) {
            rec->stats.hashed++;
        }
    }
    else {
        rehash_range(rec, f->real, off / P + 1, (off + amt - 1) / P + 1);
    }
    pthread_mutex_unlock(&rec->mutex);
}

static void
record_truncate(ShimFile *f, sqlite3_int64 size)
{
    Recording *rec = f->rec;
    pthread_mutex_lock(&rec->mutex);
    rec->stats.truncates++;
    rec->synced = 0;
    int P = rec->page_size;
    if (P != 0) {
        sqlite3_int64 keep = size / P;
        for (sqlite3_int64 p = keep + 1; p <= rec->pages; p++) {
            rec->known[p - 1] = 0;
        }
        if (rec->pages > keep) {
            rec->pages = keep;
        }
        if (size % P != 0) {
            rehash_range(rec, f->real, keep + 1, keep + 1);
        }
    }
    pthread_mutex_unlock(&rec->mutex);
}

static void
record_failure(ShimFile *f, sqlite3_int64 off, sqlite3_int64 amt)
{
    Recording *rec = f->rec;
    pthread_mutex_lock(&rec->mutex);
    rec->stats.failed++;
    rec->synced = 0;
    int P = rec->page_size;
    if (P != 0) {
        /* the write may have happened in part: nothing is claimed */
        for (sqlite3_int64 p = off / P + 1; p <= (off + amt - 1) / P + 1;
             p++) {
            table_forget(rec, p);
        }
    }
    pthread_mutex_unlock(&rec->mutex);
}

/* -- io methods ------------------------------------------------------------
 */

#define REAL(file) (((ShimFile *)(file))->real)

static int
shim_close(sqlite3_file *file)
{
    ShimFile *f = (ShimFile *)file;
    Recording *rec = f->rec;
    if (rec != NULL) {
        pthread_mutex_lock(&rec->mutex); /* waits for a read-back */
        for (ShimFile **p = &rec->files; *p != NULL; p = &(*p)->next) {
            if (*p == f) {
                *p = f->next;
                break;
            }
        }
        pthread_mutex_unlock(&rec->mutex);
        f->rec = NULL;
        recording_unref(rec);
    }
    int rc = f->real->pMethods->xClose(f->real);
    f->real->pMethods = NULL;
    return rc;
}

static int
shim_read(sqlite3_file *file, void *buf, int amt, sqlite3_int64 off)
{
    return REAL(file)->pMethods->xRead(REAL(file), buf, amt, off);
}

/* Whether a write is of a page 1 whose header says "WAL": the file
 * format's write or read version (bytes 18 and 19) is 2. */
static int
page1_says_wal(const unsigned char *buf, int amt, sqlite3_int64 off)
{
    return off == 0 && amt >= 100 && memcmp(buf, "SQLite format 3", 16) == 0
           && (buf[18] == 2 || buf[19] == 2);
}

/* Through a rollback shim, a page 1 that says "WAL" is written saying
 * "rollback journal" (each of bytes 18 and 19 that is 2 becomes 1, what
 * PRAGMA journal_mode=DELETE writes), while the connection is not in WAL
 * mode: so the backup API's commit of a WAL source's page 1 (copied with
 * its flags, backup.c) makes a rollback-journal database, in the same
 * transaction.  A connection in WAL mode (it mapped the -shm) writes the
 * main file only to checkpoint: its page 1 says what its WAL and its
 * other users say, and is left alone.  The hash is of the bytes written. */
static int
shim_write(sqlite3_file *file, const void *buf, int amt, sqlite3_int64 off)
{
    ShimFile *f = (ShimFile *)file;
    unsigned char *rewritten = NULL;
    if (f->rollback && !f->wal && page1_says_wal(buf, amt, off)) {
        rewritten = sqlite3_malloc(amt);
        if (rewritten == NULL) {
            return SQLITE_IOERR_NOMEM;
        }
        memcpy(rewritten, buf, (size_t)amt);
        for (int i = 18; i <= 19; i++) {
            if (rewritten[i] == 2) {
                rewritten[i] = 1;
            }
        }
        buf = rewritten;
    }
    int rc = f->real->pMethods->xWrite(f->real, buf, amt, off);
    if (f->rec == NULL) {
        sqlite3_free(rewritten);
        return rc;
    }
    if (rc != SQLITE_OK) {
        sqlite3_free(rewritten);
        record_failure(f, off, amt);
        return rc;
    }
    unsigned char hash[PAGE_HASH_SIZE];
    int shaped = valid_page_size(amt) && off % amt == 0;
    if (shaped) {
        page_hash(buf, (size_t)amt, hash);
    }
    record_write(f, buf, amt, off, shaped ? hash : NULL);
    sqlite3_free(rewritten);
    return SQLITE_OK;
}

static int
shim_truncate(sqlite3_file *file, sqlite3_int64 size)
{
    ShimFile *f = (ShimFile *)file;
    int rc = f->real->pMethods->xTruncate(f->real, size);
    if (f->rec != NULL) {
        if (rc == SQLITE_OK) {
            record_truncate(f, size);
        }
        else {
            record_failure(f, size, 1);
        }
    }
    return rc;
}

static int
shim_sync(sqlite3_file *file, int flags)
{
    return REAL(file)->pMethods->xSync(REAL(file), flags);
}

static int
shim_file_size(sqlite3_file *file, sqlite3_int64 *size)
{
    return REAL(file)->pMethods->xFileSize(REAL(file), size);
}

static int
shim_lock(sqlite3_file *file, int level)
{
    return REAL(file)->pMethods->xLock(REAL(file), level);
}

static int
shim_unlock(sqlite3_file *file, int level)
{
    return REAL(file)->pMethods->xUnlock(REAL(file), level);
}

static int
shim_check_reserved(sqlite3_file *file, int *out)
{
    return REAL(file)->pMethods->xCheckReservedLock(REAL(file), out);
}

static int
shim_file_control(sqlite3_file *file, int op, void *arg)
{
    return REAL(file)->pMethods->xFileControl(REAL(file), op, arg);
}

static int
shim_sector_size(sqlite3_file *file)
{
    return REAL(file)->pMethods->xSectorSize(REAL(file));
}

static int
shim_device_characteristics(sqlite3_file *file)
{
    return REAL(file)->pMethods->xDeviceCharacteristics(REAL(file));
}

static int
shim_shm_map(sqlite3_file *file, int region, int size, int extend,
             void volatile **out)
{
    ((ShimFile *)file)->wal = 1;
    return REAL(file)->pMethods->xShmMap(REAL(file), region, size, extend,
                                         out);
}

static int
shim_shm_lock(sqlite3_file *file, int offset, int n, int flags)
{
    return REAL(file)->pMethods->xShmLock(REAL(file), offset, n, flags);
}

static void
shim_shm_barrier(sqlite3_file *file)
{
    REAL(file)->pMethods->xShmBarrier(REAL(file));
}

static int
shim_shm_unmap(sqlite3_file *file, int delete_flag)
{
    return REAL(file)->pMethods->xShmUnmap(REAL(file), delete_flag);
}

static int
shim_fetch(sqlite3_file *file, sqlite3_int64 off, int amt, void **pp)
{
    return REAL(file)->pMethods->xFetch(REAL(file), off, amt, pp);
}

static int
shim_unfetch(sqlite3_file *file, sqlite3_int64 off, void *p)
{
    return REAL(file)->pMethods->xUnfetch(REAL(file), off, p);
}

/* One table per io-methods version, so SQLite sees what the base file has
 * (WAL needs version 2, memory-mapped reads version 3). */
#define METHODS_V1                                                   \
    shim_close, shim_read, shim_write, shim_truncate, shim_sync,     \
        shim_file_size, shim_lock, shim_unlock, shim_check_reserved, \
        shim_file_control, shim_sector_size, shim_device_characteristics
static const sqlite3_io_methods methods_v1 = {1,    METHODS_V1, NULL, NULL,
                                              NULL, NULL,       NULL, NULL};
static const sqlite3_io_methods methods_v2 = {2,
                                              METHODS_V1,
                                              shim_shm_map,
                                              shim_shm_lock,
                                              shim_shm_barrier,
                                              shim_shm_unmap,
                                              NULL,
                                              NULL};
static const sqlite3_io_methods methods_v3 = {3,
                                              METHODS_V1,
                                              shim_shm_map,
                                              shim_shm_lock,
                                              shim_shm_barrier,
                                              shim_shm_unmap,
                                              shim_fetch,
                                              shim_unfetch};

/* -- vfs methods -----------------------------------------------------------
 */

#define BASE(vfs) ((sqlite3_vfs *)(vfs)->pAppData)

/* Attach a newly opened main database file to its Recording, if any. */
static void
attach(ShimFile *f, const char *name)
{
    Recording *rec = registry_find_ref(name);
    if (rec == NULL) {
        return;
    }
    struct stat st;
    if (stat(name, &st) == 0) {
        f->dev = st.st_dev;
        f->ino = st.st_ino;
        f->have_id = 1;
    }
    pthread_mutex_lock(&rec->mutex);
    if (rec->page_size == 0) {
        /* an existing database: its header says the page size */
        unsigned char h[100];
        sqlite3_int64 size = 0;
        if (f->real->pMethods->xFileSize(f->real, &size) == SQLITE_OK
            && size >= 100
            && f->real->pMethods->xRead(f->real, h, 100, 0) == SQLITE_OK) {
            rec->page_size = header_page_size(h, 100);
        }
    }
    f->rec = rec;
    f->next = rec->files;
    rec->files = f;
    rec->stats.attached++;
    pthread_mutex_unlock(&rec->mutex);
}

static int
shim_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags,
          int *out_flags)
{
    sqlite3_vfs *base = BASE(vfs);
    ShimFile *f = (ShimFile *)file;
    memset(f, 0, sizeof(*f));
    f->real = (sqlite3_file *)((char *)f + SHIM_HEAD);
    memset(f->real, 0, (size_t)base->szOsFile);
    int rc = base->xOpen(base, name, f->real, flags, out_flags);
    const sqlite3_io_methods *m = f->real->pMethods;
    if (m == NULL) {
        file->pMethods = NULL;
        return rc == SQLITE_OK ? SQLITE_CANTOPEN : rc;
    }
    if (m->iVersion >= 3 && m->xFetch != NULL) {
        file->pMethods = &methods_v3;
    }
    else if (m->iVersion >= 2 && m->xShmMap != NULL) {
        file->pMethods = &methods_v2;
    }
    else {
        file->pMethods = &methods_v1;
    }
    if (rc == SQLITE_OK && (flags & SQLITE_OPEN_MAIN_DB) && name != NULL) {
        f->rollback = ((ShimVfs *)vfs)->rollback;
        attach(f, name);
    }
    return rc;
}

static int
shim_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    return BASE(vfs)->xDelete(BASE(vfs), name, sync_dir);
}

static int
shim_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    return BASE(vfs)->xAccess(BASE(vfs), name, flags, out);
}

static int
shim_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out)
{
    return BASE(vfs)->xFullPathname(BASE(vfs), name, n, out);
}

static void *
shim_dlopen(sqlite3_vfs *vfs, const char *name)
{
    return BASE(vfs)->xDlOpen(BASE(vfs), name);
}

static void
shim_dlerror(sqlite3_vfs *vfs, int n, char *out)
{
    BASE(vfs)->xDlError(BASE(vfs), n, out);
}

static void (*shim_dlsym(sqlite3_vfs *vfs, void *h, const char *sym))(void)
{
    return BASE(vfs)->xDlSym(BASE(vfs), h, sym);
}

static void
shim_dlclose(sqlite3_vfs *vfs, void *h)
{
    BASE(vfs)->xDlClose(BASE(vfs), h);
}

static int
shim_randomness(sqlite3_vfs *vfs, int n, char *out)
{
    return BASE(vfs)->xRandomness(BASE(vfs), n, out);
}

static int
shim_sleep(sqlite3_vfs *vfs, int us)
{
    return BASE(vfs)->xSleep(BASE(vfs), us);
}

static int
shim_current_time(sqlite3_vfs *vfs, double *out)
{
    return BASE(vfs)->xCurrentTime(BASE(vfs), out);
}

static int
shim_get_last_error(sqlite3_vfs *vfs, int n, char *out)
{
    return BASE(vfs)->xGetLastError(BASE(vfs), n, out);
}

static int
shim_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out)
{
    return BASE(vfs)->xCurrentTimeInt64(BASE(vfs), out);
}

static int
shim_set_system_call(sqlite3_vfs *vfs, const char *name,
                     sqlite3_syscall_ptr call)
{
    return BASE(vfs)->xSetSystemCall(BASE(vfs), name, call);
}

static sqlite3_syscall_ptr
shim_get_system_call(sqlite3_vfs *vfs, const char *name)
{
    return BASE(vfs)->xGetSystemCall(BASE(vfs), name);
}

static const char *
shim_next_system_call(sqlite3_vfs *vfs, const char *name)
{
    return BASE(vfs)->xNextSystemCall(BASE(vfs), name);
}

static sqlite3_vfs *
shim_vfs(sqlite3_vfs *base, int rollback)
{
    if (base == NULL) {
        base = sqlite3_vfs_find(NULL);
        if (base == NULL) {
            return NULL;
        }
    }
    pthread_once(&fork_once, install_fork_handler_once);
    sqlite3_vfs *found = NULL;
    pthread_mutex_lock(&registry_mutex);
    for (int i = 0; i < n_shims; i++) {
        if (shims[i].vfs.pAppData == base && shims[i].rollback == rollback) {
            found = &shims[i].vfs;
        }
    }
    if (found == NULL && n_shims < MAX_SHIMS) {
        sqlite3_vfs *v = &shims[n_shims].vfs;
        char *name = shims[n_shims].name;
        snprintf(name, sizeof(shims[0].name), "%s%s",
                 rollback ? ROLLBACK_PREFIX : SHIM_PREFIX, base->zName);
        shims[n_shims].rollback = rollback;
        memset(v, 0, sizeof(*v));
        v->iVersion = base->iVersion < 3 ? base->iVersion : 3;
        v->szOsFile = SHIM_HEAD + base->szOsFile;
        v->mxPathname = base->mxPathname;
        v->zName = name;
        v->pAppData = base;
        v->xOpen = shim_open;
        v->xDelete = shim_delete;
        v->xAccess = shim_access;
        v->xFullPathname = shim_full_pathname;
        v->xDlOpen = base->xDlOpen ? shim_dlopen : NULL;
        v->xDlError = base->xDlError ? shim_dlerror : NULL;
        v->xDlSym = base->xDlSym ? shim_dlsym : NULL;
        v->xDlClose = base->xDlClose ? shim_dlclose : NULL;
        v->xRandomness = shim_randomness;
        v->xSleep = shim_sleep;
        v->xCurrentTime = shim_current_time;
        v->xGetLastError = base->xGetLastError ? shim_get_last_error : NULL;
        if (v->iVersion >= 2) {
            v->xCurrentTimeInt64 =
                base->xCurrentTimeInt64 ? shim_current_time_int64 : NULL;
        }
        if (v->iVersion >= 3) {
            v->xSetSystemCall =
                base->xSetSystemCall ? shim_set_system_call : NULL;
            v->xGetSystemCall =
                base->xGetSystemCall ? shim_get_system_call : NULL;
            v->xNextSystemCall =
                base->xNextSystemCall ? shim_next_system_call : NULL;
        }
        if (sqlite3_vfs_register(v, 0) == SQLITE_OK) {
            n_shims++;
            found = v;
        }
    }
    pthread_mutex_unlock(&registry_mutex);
    return found;
}

sqlite3_vfs *
pageshim_vfs(sqlite3_vfs *base)
{
    return shim_vfs(base, 0);
}

sqlite3_vfs *
pageshim_rollback_vfs(sqlite3_vfs *base)
{
    return shim_vfs(base, 1);
}

/* -- Recordings -------------------------------------------------------------
 */

int
recording_new(sqlite3_vfs *shim, const char *path, Recording **out)
{
    sqlite3_vfs *base = BASE(shim);
    *out = NULL;
    Recording *rec = calloc(1, sizeof(*rec));
    char *full = malloc((size_t)base->mxPathname + 1);
    if (rec == NULL || full == NULL) {
        free(rec);
        free(full);
        return SQLITE_NOMEM;
    }
    int rc = base->xFullPathname(base, path, base->mxPathname + 1, full);
    if (rc != SQLITE_OK && rc != SQLITE_OK_SYMLINK) {
        free(rec);
        free(full);
        return rc;
    }
    pthread_mutex_init(&rec->mutex, NULL);
    rec->refs = 1;
    rec->base = base;
    rec->path = full;
    rc = SQLITE_OK;
    pthread_mutex_lock(&registry_mutex);
    for (Recording *r = registry; r != NULL; r = r->next_registered) {
        if (strcmp(r->path, full) == 0) {
            rc = SQLITE_CONSTRAINT;
        }
    }
    if (rc == SQLITE_OK) {
        rec->registered = 1;
        rec->next_registered = registry;
        registry = rec;
    }
    pthread_mutex_unlock(&registry_mutex);
    if (rc != SQLITE_OK) {
        pthread_mutex_destroy(&rec->mutex);
        free(full);
        free(rec);
        return rc;
    }
    *out = rec;
    return SQLITE_OK;
}

void
recording_unregister(Recording *rec)
{
    pthread_mutex_lock(&registry_mutex);
    if (rec->registered) {
        for (Recording **p = &registry; *p != NULL;
             p = &(*p)->next_registered) {
            if (*p == rec) {
                *p = rec->next_registered;
                break;
            }
        }
        rec->registered = 0;
    }
    pthread_mutex_unlock(&registry_mutex);
}

void
recording_ref(Recording *rec)
{
    pthread_mutex_lock(&rec->mutex);
    rec->refs++;
    pthread_mutex_unlock(&rec->mutex);
}

void
recording_unref(Recording *rec)
{
    pthread_mutex_lock(&rec->mutex);
    int left = --rec->refs;
    pthread_mutex_unlock(&rec->mutex);
    if (left == 0) {
        recording_unregister(rec);
        pthread_mutex_destroy(&rec->mutex);
        free(rec->hashes);
        free(rec->known);
        free(rec->path);
        free(rec);
    }
}

const char *
recording_path(Recording *rec)
{
    return rec->path;
}

void
recording_stats(Recording *rec, RecordingStats *out)
{
    pthread_mutex_lock(&rec->mutex);
    *out = rec->stats;
    out->page_size = rec->page_size;
    out->pages = rec->pages;
    out->recorded = 0;
    for (sqlite3_int64 i = 0; i < rec->pages; i++) {
        out->recorded += rec->known[i];
    }
    out->open_files = 0;
    for (ShimFile *f = rec->files; f != NULL; f = f->next) {
        out->open_files++;
    }
    pthread_mutex_unlock(&rec->mutex);
}

int
recording_page_hash(Recording *rec, sqlite3_int64 pgno,
                    unsigned char out[PAGE_HASH_SIZE])
{
    int known = 0;
    pthread_mutex_lock(&rec->mutex);
    if (pgno >= 1 && pgno <= rec->pages && rec->known[pgno - 1]) {
        memcpy(out, rec->hashes + (pgno - 1) * PAGE_HASH_SIZE, PAGE_HASH_SIZE);
        known = 1;
    }
    pthread_mutex_unlock(&rec->mutex);
    return known;
}

void
recording_tamper(Recording *rec, sqlite3_int64 pgno)
{
    pthread_mutex_lock(&rec->mutex);
    rec->tamper_page = pgno;
    pthread_mutex_unlock(&rec->mutex);
}

/* -- reading back (Recording's mutex held) ----------------------------------
 */

/* A descriptor this process already has on the inode (see the top of the
 * file: found with fstat, nothing opened), or -1.  Only used for hints to
 * the kernel about the inode's cached pages. */
static int
find_descriptor(dev_t dev, ino_t ino)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL) {
        return -1;
    }
    int own = dirfd(d), found = -1;
    struct dirent *e;
    while (found < 0 && (e = readdir(d)) != NULL) {
        char *end;
        long fd = strtol(e->d_name, &end, 10);
        struct stat st;
        if (end == e->d_name || *end != '\0' || fd == own) {
            continue;
        }
        if (fstat((int)fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_dev == dev
            && st.st_ino == ino) {
            found = (int)fd;
        }
    }
    closedir(d);
    return found;
}

static void
fail(ReadBack *out, int rc, const char *what)
{
    /* The OS error the base VFS's failed call left, if it was one: the
     * message names it, as SQLite's own errors do (sqlite3_system_errno is
     * per connection, and this handle has none). */
    int err = errno;
    out->rc = rc;
    if (rc != SQLITE_NOMEM && (rc & 0xff) != SQLITE_CORRUPT && err != 0) {
        snprintf(out->message, sizeof(out->message), "%s (%s)", what,
                 strerror(err));
    }
    else {
        snprintf(out->message, sizeof(out->message), "%s", what);
    }
}

static void
list_page(sqlite3_int64 *list, int *n, sqlite3_int64 pgno)
{
    if (*n < READ_BACK_LISTED) {
        list[(*n)++] = pgno;
    }
}

/* The test hook: flip a byte of page pgno behind SQLite's back. */
static int
tamper(sqlite3_file *file, int P, sqlite3_int64 pgno)
{
    unsigned char *buf = malloc((size_t)P);
    if (buf == NULL) {
        return SQLITE_NOMEM;
    }
    sqlite3_int64 off = (pgno - 1) * P;
    int rc = file->pMethods->xRead(file, buf, P, off);
    if (rc == SQLITE_OK) {
        buf[P / 2] ^= 0x5a;
        rc = file->pMethods->xWrite(file, buf, P, off);
    }
    if (rc == SQLITE_OK) {
        rc = file->pMethods->xSync(file, SQLITE_SYNC_NORMAL);
    }
    free(buf);
    return rc;
}

/* The descriptor of our own handle of the unix VFS, switched to O_DIRECT;
 * -1 if that cannot be done (another VFS, a file system without O_DIRECT).
 * The unix VFS's file begins with its methods, its VFS, its inode info and
 * then the descriptor (os_unix.c's unixFile, unchanged since 3.7); the
 * descriptor is used only if fstat says it is this very file. */
static int
direct_descriptor(sqlite3_vfs *base, sqlite3_file *own, dev_t dev, ino_t ino,
                  int *flags)
{
    struct unix_file_head {
        const void *methods, *vfs, *inode;
        int h;
    };
    if (own == NULL || strncmp(base->zName, "unix", 4) != 0
        || base->szOsFile < (int)sizeof(struct unix_file_head)) {
        return -1;
    }
    int fd = ((struct unix_file_head *)own)->h;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_dev != dev
        || st.st_ino != ino) {
        return -1;
    }
    *flags = fcntl(fd, F_GETFL);
    if (*flags < 0 || fcntl(fd, F_SETFL, *flags | O_DIRECT) != 0) {
        return -1;
    }
    return fd;
}

/* Read n pages from page p into buf: with O_DIRECT while *direct_fd
 * allows (a refusal turns it off for good: the range's cache is dropped
 * and it is read through the handle instead). */
static int
read_pages(sqlite3_file *file, int *direct_fd, int cache_fd,
           unsigned char *buf, sqlite3_int64 p, sqlite3_int64 n, int P)
{
    off_t off = (off_t)((p - 1) * P);
    size_t len = (size_t)(n * P);
    if (*direct_fd >= 0) {
        size_t done = 0;
        while (done < len) {
            ssize_t got =
                pread(*direct_fd, buf + done, len - done, off + (off_t)done);
            if (got <= 0) {
                break;
            }
            done += (size_t)got;
        }
        if (done == len) {
            return SQLITE_OK;
        }
        *direct_fd = -2; /* refused (alignment, file system): give it up */
    }
    if (*direct_fd == -2 && cache_fd >= 0) {
        (void)posix_fadvise(cache_fd, off, (off_t)len, POSIX_FADV_DONTNEED);
    }
    return file->pMethods->xRead(file, buf, (int)len, (sqlite3_int64)off);
}

static void
compare_pages(Recording *rec, sqlite3_file *file, int *direct_fd, int cache_fd,
              sqlite3_int64 first, sqlite3_int64 last, ReadBack *out)
{
    int P = rec->page_size;
    int chunk = *direct_fd >= 0 ? DIRECT_CHUNK : READ_CHUNK;
    sqlite3_int64 per_chunk = chunk / P ? chunk / P : 1;
    unsigned char *buf = NULL;
    if (posix_memalign((void **)&buf, DIRECT_ALIGN, (size_t)(per_chunk * P))
        != 0) {
        fail(out, SQLITE_NOMEM, "out of memory reading the file back");
        return;
    }
    sqlite3_int64 lockpage = lock_byte_page(P);
    for (sqlite3_int64 p = first; p <= last; p += per_chunk) {
        sqlite3_int64 n = last - p + 1 < per_chunk ? last - p + 1 : per_chunk;
        errno = 0;
        int rc = read_pages(file, direct_fd, cache_fd, buf, p, n, P);
        if (rc != SQLITE_OK && rc != SQLITE_IOERR_SHORT_READ) {
            fail(out, rc, "reading the file back failed");
            break;
        }
        out->bytes_read += n * P;
        for (sqlite3_int64 i = 0; i < n; i++) {
            sqlite3_int64 pgno = p + i;
            int known = pgno <= rec->pages && rec->known[pgno - 1];
            if (!known) {
                if (pgno != lockpage) {
                    out->unrecorded++;
                    list_page(out->unrecorded_pages, &out->n_unrecorded_listed,
                              pgno);
                }
                continue;
            }
            unsigned char hash[PAGE_HASH_SIZE];
            page_hash(buf + i * P, (size_t)P, hash);
            out->checked++;
            if (memcmp(hash, rec->hashes + (pgno - 1) * PAGE_HASH_SIZE,
                       PAGE_HASH_SIZE)
                != 0) {
                out->mismatched++;
                list_page(out->mismatched_pages, &out->n_mismatched_listed,
                          pgno);
            }
        }
    }
    free(buf);
}

void
recording_read_back(Recording *rec, sqlite3_int64 first, sqlite3_int64 last,
                    int prepare, ReadBack *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&rec->mutex);
    int P = rec->page_size;
    out->page_size = P;
    out->incomplete = rec->stats.incomplete;
    if (P == 0 || rec->stats.incomplete) {
        pthread_mutex_unlock(&rec->mutex);
        return; /* the caller says why: nothing recorded / incomplete */
    }
    sqlite3_file *file;
    sqlite3_file *own = NULL;
    dev_t dev = 0;
    ino_t ino = 0;
    int have_id = 0;
    if (rec->files != NULL) {
        file = rec->files->real;
        dev = rec->files->dev;
        ino = rec->files->ino;
        have_id = rec->files->have_id;
        out->through_connection = 1;
    }
    else {
        sqlite3_vfs *base = rec->base;
        own = calloc(1, (size_t)base->szOsFile);
        if (own == NULL) {
            pthread_mutex_unlock(&rec->mutex);
            fail(out, SQLITE_NOMEM, "out of memory opening the file");
            return;
        }
        int flags = SQLITE_OPEN_MAIN_DB
                    | (rec->tamper_page ? SQLITE_OPEN_READWRITE
                                        : SQLITE_OPEN_READONLY);
        errno = 0;
        int rc = base->xOpen(base, rec->path, own, flags, NULL);
        if (rc != SQLITE_OK) {
            if (own->pMethods != NULL) {
                own->pMethods->xClose(own);
            }
            free(own);
            pthread_mutex_unlock(&rec->mutex);
            fail(out, rc, "opening the file to read it back failed");
            return;
        }
        file = own;
        struct stat st;
        if (stat(rec->path, &st) == 0) {
            dev = st.st_dev;
            ino = st.st_ino;
            have_id = 1;
        }
    }
    int rc = SQLITE_OK;
    if (prepare) {
        /* One sync serves every range read back after it (a read-back in
         * ranges synced before each: a flush of the device's cache each
         * time, half of its cost), until the shim sees a write again. */
        errno = 0;
        if (!rec->synced) {
            rc = file->pMethods->xSync(file, SQLITE_SYNC_NORMAL);
            rec->synced = rc == SQLITE_OK;
            rec->stats.syncs++;
        }
        if (rc == SQLITE_OK && rec->tamper_page > 0) {
            rc = tamper(file, P, rec->tamper_page);
            rec->tamper_page = 0;
        }
        if (rc != SQLITE_OK) {
            fail(out, rc, "syncing the file before reading it back failed");
        }
    }
    int fd = have_id && out->rc == SQLITE_OK ? find_descriptor(dev, ino) : -1;
    int direct_flags = 0;
    int direct_fd =
        prepare && have_id && out->rc == SQLITE_OK
            ? direct_descriptor(rec->base, own, dev, ino, &direct_flags)
            : -1;
    int switched = direct_fd >= 0; /* restore its flags at the end */
    int restore_fd = direct_fd;
    sqlite3_int64 size = 0;
    if (out->rc == SQLITE_OK) {
        errno = 0;
        rc = file->pMethods->xFileSize(file, &size);
        if (rc != SQLITE_OK) {
            fail(out, rc, "reading the file's size failed");
        }
    }
    if (out->rc == SQLITE_OK) {
        out->file_pages = size / P;
        out->partial_tail = size % P != 0;
        if (first < 1) {
            first = 1;
        }
        sqlite3_int64 end =
            out->file_pages > rec->pages ? out->file_pages : rec->pages;
        if (last < 0 || last > end) {
            last = end;
        }
        sqlite3_int64 in_file =
            last < out->file_pages ? last : out->file_pages;
        if (first <= in_file) {
            if (prepare && fd >= 0 && direct_fd < 0) {
                /* Drop only this range's cached pages, just before reading
                 * it, and have the device start on all of it at once: a
                 * quick_check reading the file meanwhile finds the rest of
                 * the file still cached, and this range soon back. */
                off_t from = (off_t)((first - 1) * P);
                off_t len = (off_t)((in_file - first + 1) * P);
                out->cache_dropped =
                    posix_fadvise(fd, from, len, POSIX_FADV_DONTNEED) == 0;
                (void)posix_fadvise(fd, from, len, POSIX_FADV_WILLNEED);
            }
            compare_pages(rec, file, &direct_fd, fd, first, in_file, out);
            out->direct = direct_fd >= 0;
            if (out->direct) {
                out->cache_dropped = 1;
            }
            else if (direct_fd == -2 && fd >= 0) {
                out->cache_dropped = 1; /* dropped range by range */
            }
        }
        for (sqlite3_int64 p = in_file + 1 > first ? in_file + 1 : first;
             p <= last && p <= rec->pages; p++) {
            if (rec->known[p - 1]) {
                out->missing++;
                list_page(out->missing_pages, &out->n_missing_listed, p);
            }
        }
    }
    if (switched) {
        (void)fcntl(restore_fd, F_SETFL, direct_flags);
    }
    pthread_mutex_unlock(&rec->mutex);
    if (own != NULL) {
        own->pMethods->xClose(own);
        free(own);
    }
}
