/* The two VFS of incremental backups: see deltashim.h and
 * docs/incremental.md.
 *
 * The delta shim.  The destination of an incremental backup is a database
 * file that exists only here: xFileSize answers the size SQLite has written
 * so far (0 at first, so the backup API starts as into a new file), and a
 * page SQLite writes is hashed and compared with the parent's manifest.  A
 * page equal to its parent's is forgotten but for its hash; any other is
 * written into the Delta's data file, in a slot reused when the same page is
 * written again (a restart of the backup, a cache spill), so the data file
 * only grows by pages that differ.  A slot freed (a page that became equal
 * to its parent's again, a truncation) is reused by the next kept page;
 * one still free at the end is compacted away by the Python side.
 *
 * The pitfalls of docs/incremental.md, and where they are met:
 *  - page 1 is written last by the backup: pages are addressed through the
 *    slot table, never by their order in the file;
 *  - after a restart SQLite may read back a page it spilled: a kept page is
 *    served from the data file; an unkept one is not here, so it is served
 *    as zeros and marked poisoned -- a write of it clears the mark (the
 *    backup rewrites every page after a restart), and a mark left at the
 *    end makes the recording fail loudly (DeltaResult.poisoned);
 *  - the lock-byte page is never written by SQLite: its manifest entry is
 *    all zeros, and a missing page elsewhere is an error (missing);
 *  - a write that is not one aligned page of the expected size (a page-size
 *    change mid-backup) fails the write with SQLITE_IOERR_WRITE.
 *
 * The overlay.  Read only, immutable (SQLITE_IOCAP_IMMUTABLE: no locks, no
 * hot-journal checks): page n is read with pread() from the file of the
 * chain that holds its newest version.  Those descriptors are our own
 * files (restore points), never a database SQLite has open, so the
 * descriptor rule of pageshim.c does not apply to them.
 *
 * Threads: SQLite calls these methods with the GIL released.  Each Delta
 * and Overlay has its own mutex; the registry of both has another, taken
 * first.
 */
#define _GNU_SOURCE
#include "deltashim.h"
#include "table.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PENDING_BYTE 0x40000000
#define TABLE_BLOCKS 8 /* cached blocks a table: 512 KiB */
#define DELTA_VFS_NAME "apsw_backup-delta"
#define OVERLAY_VFS_NAME "apsw_backup-overlay"

enum { P_NONE = 0, P_SAME = 1, P_KEPT = 2, P_POISON = 4 };

/* What a Delta and an Overlay share, first in both: the path the VFS
 * finds it by, its place in the registry, its references (the owner's and
 * each open file's) and its mutex. */
typedef struct Entry Entry;
struct Entry {
    pthread_mutex_t mutex;
    int refs;
    int registered;
    Entry *next;
    char *path;
};

struct Delta {
    Entry e; /* first: a Delta is an Entry */
    int fd;
    sqlite3_int64 data_offset;
    int page_size;
    Table *parent; /* the parent's manifest in its file (NULL: a base) */
    sqlite3_int64 parent_pages;
    Table *pages;      /* per page (entry n-1 is page n): a Record */
    Table *slots;      /* per data slot: the page it holds (0: a dead slot) */
    sqlite3_int64 top; /* the highest page number recorded */
    sqlite3_int64 nslots; /* slots used in the data file */
    sqlite3_int64 size;   /* the file's size as SQLite sees it */
    sqlite3_int64 writes, unchanged, unkept_reads;
    int failed;
    int os_errno; /* the first failure's OS cause (0: none) */
    char message[200];
};

/* A page's entry in Delta.pages: its hash, its data slot when kept, its
 * state (P_*). */
typedef struct {
    unsigned char hash[PAGE_HASH_SIZE];
    sqlite3_int64 slot;
    unsigned char state;
    unsigned char pad[7];
} Record;

struct ChainMap {
    pthread_mutex_t mutex;
    int refs;
    int page_size;
    sqlite3_int64 page_count;
    int nfds;
    int *fds;                   /* the chain's files, oldest first */
    sqlite3_int64 *data_offset; /* of each */
    Table *map;      /* per page: 0 none, else (file + 1) << 40 | position */
    Table *manifest; /* the tip's, where it lies in its file */
};

#define MAP_SHIFT 40

struct Overlay {
    Entry e; /* first: an Overlay is an Entry */
    ChainMap *map;
};

typedef struct {
    sqlite3_file base;
    Delta *delta;
} DeltaFile;

typedef struct {
    sqlite3_file base;
    Overlay *overlay;
} OverlayFile;

static pthread_mutex_t registry_mutex = PTHREAD_MUTEX_INITIALIZER;
static Entry *deltas, *overlays; /* the registry: one list a VFS */
static pthread_once_t vfs_once = PTHREAD_ONCE_INIT;
static sqlite3_vfs delta_vfs_struct, overlay_vfs_struct;
static int vfs_ok;

static void
registry_after_fork_child(void)
{
    pthread_mutex_init(&registry_mutex, NULL);
    deltas = NULL;
    overlays = NULL;
}

/* -- the registry (Delta and Overlay alike) -------------------------------
 */

static void
entry_init(Entry *e)
{
    e->refs = 1;
    pthread_mutex_init(&e->mutex, NULL);
}

/* Drop a reference: 1 when it was the last (the caller frees the object,
 * whose mutex is destroyed here), else 0. */
static int
entry_unref(Entry *e)
{
    pthread_mutex_lock(&e->mutex);
    int left = --e->refs;
    pthread_mutex_unlock(&e->mutex);
    if (left > 0) {
        return 0;
    }
    pthread_mutex_destroy(&e->mutex);
    return 1;
}

/* The entry of `list` registered for `name`, with a reference taken for
 * the caller, or NULL. */
static Entry *
registry_find(Entry *const *list, const char *name)
{
    Entry *found = NULL;
    pthread_mutex_lock(&registry_mutex);
    for (Entry *e = *list; e != NULL; e = e->next) {
        if (strcmp(e->path, name) == 0) {
            found = e;
            pthread_mutex_lock(&e->mutex);
            e->refs++;
            pthread_mutex_unlock(&e->mutex);
            break;
        }
    }
    pthread_mutex_unlock(&registry_mutex);
    return found;
}

/* Register e (its path set) on `list`: SQLITE_CONSTRAINT if the path is
 * taken. */
static int
registry_add(Entry **list, Entry *e)
{
    int rc = SQLITE_OK;
    pthread_mutex_lock(&registry_mutex);
    for (Entry *other = *list; other != NULL; other = other->next) {
        if (strcmp(other->path, e->path) == 0) {
            rc = SQLITE_CONSTRAINT;
        }
    }
    if (rc == SQLITE_OK) {
        e->registered = 1;
        e->next = *list;
        *list = e;
    }
    pthread_mutex_unlock(&registry_mutex);
    return rc;
}

static void
registry_remove(Entry **list, Entry *e)
{
    pthread_mutex_lock(&registry_mutex);
    if (e->registered) {
        for (Entry **p = list; *p != NULL; p = &(*p)->next) {
            if (*p == e) {
                *p = e->next;
                break;
            }
        }
        e->registered = 0;
    }
    pthread_mutex_unlock(&registry_mutex);
}

static sqlite3_int64
lock_byte_page(int page_size)
{
    return (sqlite3_int64)PENDING_BYTE / page_size + 1;
}

/* -- Delta: tables (its mutex held) ----------------------------------------
 */

static void
delta_fail(Delta *d, const char *message)
{
    if (!d->failed) {
        d->failed = 1;
        snprintf(d->message, sizeof(d->message), "%s", message);
    }
}

/* A table of the recording failed: the run fails, saying why (its mutex
 * held). */
static void
table_failed(Delta *d, Table *t, const char *doing)
{
    int cause = table_errno(t);
    if (!d->failed) {
        d->os_errno = cause;
    }
    char why[200];
    snprintf(why, sizeof(why), "%s failed: %s", doing, strerror(cause));
    delta_fail(d, why);
}

static int
get_record(Delta *d, sqlite3_int64 pgno, Record *r)
{
    if (table_get(d->pages, pgno - 1, r) < 0) {
        table_failed(d, d->pages, "reading the recording's page table");
        return -1;
    }
    return 0;
}

static int
put_record(Delta *d, sqlite3_int64 pgno, const Record *r)
{
    if (table_put(d->pages, pgno - 1, r) < 0) {
        table_failed(d, d->pages, "writing the recording's page table");
        return -1;
    }
    if (pgno > d->top) {
        d->top = pgno;
    }
    return 0;
}

static int
set_slot(Delta *d, sqlite3_int64 slot, sqlite3_int64 pgno)
{
    if (table_put(d->slots, slot, &pgno) < 0) {
        table_failed(d, d->slots, "writing the recording's slot table");
        return -1;
    }
    return 0;
}

static int
full_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return -1;
        }
        p += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

/* 1 when all n bytes were read, 0 at the end of the file, -1 on error. */
static int
full_pread(int fd, void *buf, size_t n, off_t off)
{
    char *p = buf;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, off);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return -1;
        }
        if (r == 0) {
            return 0;
        }
        p += r;
        n -= (size_t)r;
        off += r;
    }
    return 1;
}

/* -- Delta: file methods ---------------------------------------------------
 */

static void
delta_unref(Delta *d)
{
    if (!entry_unref(&d->e)) {
        return;
    }
    if (d->fd >= 0) {
        close(d->fd);
    }
    free(d->e.path);
    table_free(d->parent);
    table_free(d->pages);
    table_free(d->slots);
    free(d);
}

static int
dfile_close(sqlite3_file *file)
{
    DeltaFile *f = (DeltaFile *)file;
    if (f->delta != NULL) {
        delta_unref(f->delta);
        f->delta = NULL;
    }
    return SQLITE_OK;
}

/* 1 when page pgno has its parent's hash, 0 when not, -1: the parent's
 * manifest could not be read (its mutex held). */
static int
same_as_parent(Delta *d, sqlite3_int64 pgno, const unsigned char *hash)
{
    if (pgno > d->parent_pages) {
        return 0;
    }
    unsigned char theirs[PAGE_HASH_SIZE];
    if (table_get(d->parent, pgno - 1, theirs) < 0) {
        table_failed(d, d->parent, "reading the parent's manifest");
        return -1;
    }
    return memcmp(theirs, hash, PAGE_HASH_SIZE) == 0;
}

/* Record one page as SQLite writing it would (its mutex not held):
 * hashed, compared with the parent's, kept or forgotten.  A slot freed
 * (a kept page found equal to its parent's again) is left dead: the
 * Python side compacts dead slots away. */
static int
record_page(Delta *d, const void *buf, sqlite3_int64 pgno)
{
    int P = d->page_size;
    Record r;
    unsigned char hash[PAGE_HASH_SIZE];
    page_hash(buf, (size_t)P, hash);
    pthread_mutex_lock(&d->e.mutex);
    int same = -1;
    if (get_record(d, pgno, &r) < 0
        || (same = same_as_parent(d, pgno, hash)) < 0) {
        pthread_mutex_unlock(&d->e.mutex);
        return SQLITE_IOERR_WRITE;
    }
    int was = r.state & 3;
    d->writes++;
    if (same) {
        if (was == P_KEPT && set_slot(d, r.slot, 0) < 0) {
            pthread_mutex_unlock(&d->e.mutex);
            return SQLITE_IOERR_WRITE;
        }
        r.state = P_SAME;
        r.slot = 0;
        d->unchanged++;
    }
    else {
        sqlite3_int64 slot = was == P_KEPT ? r.slot : d->nslots;
        if (full_pwrite(d->fd, buf, (size_t)P,
                        (off_t)(d->data_offset + slot * P))
            < 0) {
            int cause = errno ? errno : EIO;
            if (!d->failed) {
                d->os_errno = cause; /* a full disk is said as one */
            }
            char why[200];
            snprintf(why, sizeof(why),
                     "writing a page to the restore point "
                     "failed: %s",
                     strerror(cause));
            delta_fail(d, why);
            pthread_mutex_unlock(&d->e.mutex);
            return SQLITE_IOERR_WRITE;
        }
        if (was != P_KEPT) {
            if (set_slot(d, slot, pgno) < 0) {
                pthread_mutex_unlock(&d->e.mutex);
                return SQLITE_IOERR_WRITE;
            }
            d->nslots++;
        }
        r.slot = slot;
        r.state = P_KEPT;
    }
    memcpy(r.hash, hash, PAGE_HASH_SIZE);
    if (put_record(d, pgno, &r) < 0) {
        pthread_mutex_unlock(&d->e.mutex);
        return SQLITE_IOERR_WRITE;
    }
    if (pgno * P > d->size) {
        d->size = pgno * P;
    }
    pthread_mutex_unlock(&d->e.mutex);
    return SQLITE_OK;
}

static int
dfile_write(sqlite3_file *file, const void *buf, int amt, sqlite3_int64 off)
{
    Delta *d = ((DeltaFile *)file)->delta;
    int P = d->page_size;
    if (amt != P || off % P != 0) {
        pthread_mutex_lock(&d->e.mutex);
        char why[200];
        snprintf(why, sizeof(why),
                 "SQLite wrote %d bytes at offset %lld, not one page of %d "
                 "bytes: did the source's page size change?",
                 amt, (long long)off, P);
        delta_fail(d, why);
        pthread_mutex_unlock(&d->e.mutex);
        return SQLITE_IOERR_WRITE;
    }
    return record_page(d, buf, off / P + 1);
}

static int
dfile_read(sqlite3_file *file, void *buf, int amt, sqlite3_int64 off)
{
    Delta *d = ((DeltaFile *)file)->delta;
    int P = d->page_size;
    unsigned char *page = malloc((size_t)P);
    if (page == NULL) {
        return SQLITE_IOERR_NOMEM;
    }
    int rc = SQLITE_OK;
    unsigned char *out = buf;
    pthread_mutex_lock(&d->e.mutex);
    while (amt > 0) {
        if (off >= d->size) {
            memset(out, 0, (size_t)amt);
            rc = SQLITE_IOERR_SHORT_READ;
            break;
        }
        sqlite3_int64 pgno = off / P + 1;
        int in_page = (int)(off % P);
        int n = P - in_page < amt ? P - in_page : amt;
        Record r;
        if (get_record(d, pgno, &r) < 0) {
            rc = SQLITE_IOERR_READ;
            break;
        }
        int st = r.state & 3;
        memset(page, 0, (size_t)P);
        if (st == P_KEPT) {
            off_t at = (off_t)(d->data_offset + r.slot * P);
            if (full_pread(d->fd, page, (size_t)P, at) != 1) {
                rc = SQLITE_IOERR_READ;
                break;
            }
        }
        else if (st == P_SAME) {
            r.state |= P_POISON;
            d->unkept_reads++;
            if (put_record(d, pgno, &r) < 0) {
                rc = SQLITE_IOERR_READ;
                break;
            }
        }
        memcpy(out, page + in_page, (size_t)n);
        out += n;
        off += n;
        amt -= n;
    }
    pthread_mutex_unlock(&d->e.mutex);
    free(page);
    return rc;
}

static int
dfile_truncate(sqlite3_file *file, sqlite3_int64 size)
{
    Delta *d = ((DeltaFile *)file)->delta;
    int P = d->page_size;
    int rc = SQLITE_OK;
    pthread_mutex_lock(&d->e.mutex);
    sqlite3_int64 keep = (size + P - 1) / P;
    static const Record none;
    for (sqlite3_int64 p = keep + 1; p <= d->top && rc == SQLITE_OK; p++) {
        Record r;
        if (get_record(d, p, &r) < 0
            || ((r.state & 3) == P_KEPT && set_slot(d, r.slot, 0) < 0)
            || (r.state != P_NONE && put_record(d, p, &none) < 0)) {
            rc = SQLITE_IOERR_TRUNCATE;
        }
    }
    if (rc == SQLITE_OK) {
        d->size = size;
        if (keep < d->top) {
            d->top = keep;
        }
    }
    pthread_mutex_unlock(&d->e.mutex);
    return rc;
}

static int
dfile_sync(sqlite3_file *file, int flags)
{
    (void)file;
    (void)flags;
    return SQLITE_OK; /* the restore point is fsynced once complete */
}

static int
dfile_file_size(sqlite3_file *file, sqlite3_int64 *size)
{
    Delta *d = ((DeltaFile *)file)->delta;
    pthread_mutex_lock(&d->e.mutex);
    *size = d->size;
    pthread_mutex_unlock(&d->e.mutex);
    return SQLITE_OK;
}

static int
nolock(sqlite3_file *file, int level)
{
    (void)file;
    (void)level;
    return SQLITE_OK;
}

static int
check_reserved(sqlite3_file *file, int *out)
{
    (void)file;
    *out = 0;
    return SQLITE_OK;
}

static int
file_control(sqlite3_file *file, int op, void *arg)
{
    (void)file;
    (void)op;
    (void)arg;
    return SQLITE_NOTFOUND;
}

static int
sector_size(sqlite3_file *file)
{
    (void)file;
    return 4096;
}

static int
delta_characteristics(sqlite3_file *file)
{
    (void)file;
    return 0;
}

static const sqlite3_io_methods delta_methods = {1,
                                                 dfile_close,
                                                 dfile_read,
                                                 dfile_write,
                                                 dfile_truncate,
                                                 dfile_sync,
                                                 dfile_file_size,
                                                 nolock,
                                                 nolock,
                                                 check_reserved,
                                                 file_control,
                                                 sector_size,
                                                 delta_characteristics,
                                                 NULL,
                                                 NULL,
                                                 NULL,
                                                 NULL,
                                                 NULL,
                                                 NULL};

/* -- ChainMap -------------------------------------------------------------
 */

void
chain_map_ref(ChainMap *m)
{
    pthread_mutex_lock(&m->mutex);
    m->refs++;
    pthread_mutex_unlock(&m->mutex);
}

void
chain_map_unref(ChainMap *m)
{
    pthread_mutex_lock(&m->mutex);
    int last = --m->refs == 0;
    pthread_mutex_unlock(&m->mutex);
    if (!last) {
        return;
    }
    for (int i = 0; i < m->nfds; i++) {
        if (m->fds[i] >= 0) {
            close(m->fds[i]);
        }
    }
    free(m->fds);
    free(m->data_offset);
    table_free(m->map);
    table_free(m->manifest);
    pthread_mutex_destroy(&m->mutex);
    free(m);
}

/* (its mutex held) */
static int
map_entry(ChainMap *m, sqlite3_int64 pgno, int *file, sqlite3_int64 *offset)
{
    sqlite3_uint64 e;
    if (table_get(m->map, pgno - 1, &e) < 0) {
        return -1;
    }
    if (e == 0) {
        *file = -1;
        *offset = 0;
        return 0;
    }
    *file = (int)((e >> MAP_SHIFT) - 1);
    *offset = m->data_offset[*file]
              + (sqlite3_int64)(e & ((1ULL << MAP_SHIFT) - 1)) * m->page_size;
    return 0;
}

void
chain_map_geometry(ChainMap *m, int *page_size, sqlite3_int64 *page_count)
{
    *page_size = m->page_size; /* fixed when made: no lock needed */
    *page_count = m->page_count;
}

int
chain_map_page(ChainMap *m, sqlite3_int64 pgno, int *file,
               sqlite3_int64 *offset)
{
    pthread_mutex_lock(&m->mutex);
    int rc = map_entry(m, pgno, file, offset);
    pthread_mutex_unlock(&m->mutex);
    return rc;
}

/* Fill the map from file f's index (its mutex not needed: not shared
 * yet).  0, or an SQLite code with *err. */
static int
map_file(ChainMap *m, int f, sqlite3_int64 index_off, sqlite3_int64 stored,
         unsigned char *buf, size_t bufsize, int *err)
{
    sqlite3_int64 per = (sqlite3_int64)(bufsize / 8);
    for (sqlite3_int64 k = 0; k < stored; k += per) {
        sqlite3_int64 n = stored - k < per ? stored - k : per;
        int got = full_pread(m->fds[f], buf, (size_t)n * 8,
                             (off_t)(index_off + k * 8));
        if (got != 1) {
            *err = got < 0 && errno ? errno : EIO;
            return SQLITE_IOERR;
        }
        for (sqlite3_int64 j = 0; j < n; j++) {
            sqlite3_uint64 pgno = table_be64(buf + j * 8);
            if (pgno < 1) {
                return SQLITE_CORRUPT;
            }
            if (pgno > (sqlite3_uint64)m->page_count) {
                continue; /* an older file of a longer database */
            }
            sqlite3_uint64 e = ((sqlite3_uint64)(f + 1) << MAP_SHIFT)
                               | (sqlite3_uint64)(k + j);
            if (table_put(m->map, (sqlite3_int64)pgno - 1, &e) < 0) {
                *err = table_errno(m->map);
                return SQLITE_IOERR;
            }
        }
    }
    return SQLITE_OK;
}

int
chain_map_new(int page_size, sqlite3_int64 page_count, int nfds,
              const int *fds, const sqlite3_int64 *data_offset,
              const sqlite3_int64 *index_off, const sqlite3_int64 *stored,
              sqlite3_int64 tip_manifest, int scratch_fd, ChainMap **out,
              sqlite3_int64 *missing, int *err)
{
    *out = NULL;
    *missing = 0;
    *err = 0;
    if (nfds < 1 || nfds >= (1 << 23)) {
        return SQLITE_MISUSE;
    }
    ChainMap *m = calloc(1, sizeof(*m));
    if (m == NULL) {
        return SQLITE_NOMEM;
    }
    pthread_mutex_init(&m->mutex, NULL);
    m->refs = 1;
    m->page_size = page_size;
    m->page_count = page_count;
    m->fds = malloc(sizeof(int) * (size_t)nfds);
    m->data_offset = malloc(sizeof(sqlite3_int64) * (size_t)nfds);
    size_t bufsize = TABLE_BLOCK;
    unsigned char *buf = malloc(bufsize);
    if (m->fds == NULL || m->data_offset == NULL || buf == NULL) {
        free(buf);
        chain_map_unref(m);
        return SQLITE_NOMEM;
    }
    int rc = SQLITE_OK;
    for (int i = 0; i < nfds && rc == SQLITE_OK; i++) {
        m->data_offset[i] = data_offset[i];
        m->fds[i] = dup(fds[i]);
        m->nfds = i + 1;
        if (m->fds[i] < 0) {
            *err = errno;
            rc = SQLITE_IOERR;
        }
    }
    if (rc == SQLITE_OK && ftruncate(scratch_fd, 0) < 0) { /* empty map */
        *err = errno;
        rc = SQLITE_IOERR;
    }
    if (rc == SQLITE_OK) {
        m->map = table_new(scratch_fd, 0, 8, 1, TABLE_BLOCKS);
        m->manifest = table_new(m->fds[nfds - 1], tip_manifest, PAGE_HASH_SIZE,
                                0, TABLE_BLOCKS);
        if (m->map == NULL || m->manifest == NULL) {
            *err = errno;
            rc = errno == ENOMEM ? SQLITE_NOMEM : SQLITE_IOERR;
        }
    }
    for (int f = 0; f < nfds && rc == SQLITE_OK; f++) {
        rc = map_file(m, f, index_off[f], stored[f], buf, bufsize, err);
    }
    free(buf);
    sqlite3_int64 lock = lock_byte_page(page_size);
    for (sqlite3_int64 p = 1; rc == SQLITE_OK && p <= page_count; p++) {
        int file;
        sqlite3_int64 at;
        if (map_entry(m, p, &file, &at) < 0) {
            *err = table_errno(m->map);
            rc = SQLITE_IOERR;
        }
        else if (file < 0 && p != lock) {
            *missing = p;
            break;
        }
    }
    /* written out now: later lookups only read, so a full disk under the
     * scratch file can fail only here */
    if (rc == SQLITE_OK && table_flush(m->map) < 0) {
        *err = table_errno(m->map);
        rc = SQLITE_IOERR;
    }
    if (rc != SQLITE_OK) {
        chain_map_unref(m);
        return rc;
    }
    *out = m;
    return SQLITE_OK;
}

int
chain_map_gather(ChainMap *m, sqlite3_int64 first, sqlite3_int64 count,
                 unsigned char *out, int check, sqlite3_int64 *bad, int *err)
{
    static const unsigned char zero[PAGE_HASH_SIZE];
    int P = m->page_size;
    *bad = -1;
    *err = 0;
    pthread_mutex_lock(&m->mutex);
    sqlite3_int64 i = 0;
    while (i < count) {
        int f;
        sqlite3_int64 at;
        if (map_entry(m, first + i, &f, &at) < 0) {
            *err = table_errno(m->map);
            break;
        }
        sqlite3_int64 n = 1;
        if (f < 0) {
            memset(out + i * P, 0, (size_t)P);
        }
        else {
            /* a run of pages adjacent in one file: one read */
            while (i + n < count) {
                int g;
                sqlite3_int64 next;
                if (map_entry(m, first + i + n, &g, &next) < 0) {
                    *err = table_errno(m->map);
                    break;
                }
                if (g != f || next != at + n * P) {
                    break;
                }
                n++;
            }
            if (*err) {
                break;
            }
            size_t done = 0, want = (size_t)(n * P);
            while (done < want) {
                ssize_t r = pread(m->fds[f], out + i * P + done, want - done,
                                  (off_t)(at + (sqlite3_int64)done));
                if (r < 0 && errno == EINTR) {
                    continue;
                }
                if (r < 0) {
                    *err = errno ? errno : EIO;
                    break;
                }
                if (r == 0) {
                    break;
                }
                done += (size_t)r;
            }
            if (*err) {
                break;
            }
            if (done < want) { /* short: the file was truncated */
                *bad = i + (sqlite3_int64)(done / (size_t)P);
                break;
            }
        }
        for (sqlite3_int64 k = i; check && k < i + n; k++) {
            unsigned char want_hash[PAGE_HASH_SIZE], got[PAGE_HASH_SIZE];
            if (table_get(m->manifest, first + k - 1, want_hash) < 0) {
                *err = table_errno(m->manifest);
                break;
            }
            if (memcmp(want_hash, zero, PAGE_HASH_SIZE) == 0) {
                continue;
            }
            page_hash(out + k * P, (size_t)P, got);
            if (memcmp(got, want_hash, PAGE_HASH_SIZE) != 0) {
                *bad = k;
                break;
            }
        }
        if (*err || *bad >= 0) {
            break;
        }
        i += n;
    }
    pthread_mutex_unlock(&m->mutex);
    return *err ? -1 : 0;
}

/* -- Overlay: file methods -------------------------------------------------
 */

static void
overlay_unref(Overlay *o)
{
    if (!entry_unref(&o->e)) {
        return;
    }
    if (o->map != NULL) {
        chain_map_unref(o->map);
    }
    free(o->e.path);
    free(o);
}

static int
ofile_close(sqlite3_file *file)
{
    OverlayFile *f = (OverlayFile *)file;
    if (f->overlay != NULL) {
        overlay_unref(f->overlay);
        f->overlay = NULL;
    }
    return SQLITE_OK;
}

/* One whole page into buf: from the newest file holding it, zeros for
 * none (the lock-byte page), checked against the point's manifest -- the
 * overlay serves no page that differs from what the point recorded (a
 * file altered or truncated after the chain was checked: SQLITE_CORRUPT).
 * Page 1's WAL flag says rollback journal. */
static int
ofile_read_page(Overlay *o, unsigned char *buf, sqlite3_int64 pgno)
{
    sqlite3_int64 bad;
    int err;
    if (chain_map_gather(o->map, pgno, 1, buf, 1, &bad, &err) < 0) {
        return SQLITE_IOERR_READ;
    }
    if (bad >= 0) {
        return SQLITE_CORRUPT;
    }
    if (pgno == 1 && buf[18] == 2 && buf[19] == 2) {
        buf[18] = buf[19] = 1; /* one file: no -wal to look for */
    }
    return SQLITE_OK;
}

static int
ofile_read(sqlite3_file *file, void *buf, int amt, sqlite3_int64 off)
{
    Overlay *o = ((OverlayFile *)file)->overlay;
    int P = o->map->page_size;
    sqlite3_int64 end = o->map->page_count * P;
    if (amt == P && off % P == 0 && off < end) {
        return ofile_read_page(o, buf, off / P + 1);
    }
    unsigned char *page = malloc((size_t)P);
    if (page == NULL) {
        return SQLITE_IOERR_NOMEM;
    }
    int rc = SQLITE_OK;
    unsigned char *out = buf;
    while (amt > 0) {
        if (off >= end) {
            memset(out, 0, (size_t)amt);
            rc = SQLITE_IOERR_SHORT_READ;
            break;
        }
        int in_page = (int)(off % P);
        int n = P - in_page < amt ? P - in_page : amt;
        rc = ofile_read_page(o, page, off / P + 1);
        if (rc != SQLITE_OK) {
            break;
        }
        memcpy(out, page + in_page, (size_t)n);
        out += n;
        off += n;
        amt -= n;
    }
    free(page);
    return rc;
}

static int
ofile_write(sqlite3_file *file, const void *buf, int amt, sqlite3_int64 off)
{
    (void)file;
    (void)buf;
    (void)amt;
    (void)off;
    return SQLITE_READONLY;
}

static int
ofile_truncate(sqlite3_file *file, sqlite3_int64 size)
{
    (void)file;
    (void)size;
    return SQLITE_READONLY;
}

static int
ofile_file_size(sqlite3_file *file, sqlite3_int64 *size)
{
    Overlay *o = ((OverlayFile *)file)->overlay;
    *size = o->map->page_count * o->map->page_size;
    return SQLITE_OK;
}

static int
overlay_characteristics(sqlite3_file *file)
{
    (void)file;
    return SQLITE_IOCAP_IMMUTABLE;
}

static const sqlite3_io_methods overlay_methods = {1,
                                                   ofile_close,
                                                   ofile_read,
                                                   ofile_write,
                                                   ofile_truncate,
                                                   dfile_sync,
                                                   ofile_file_size,
                                                   nolock,
                                                   nolock,
                                                   check_reserved,
                                                   file_control,
                                                   sector_size,
                                                   overlay_characteristics,
                                                   NULL,
                                                   NULL,
                                                   NULL,
                                                   NULL,
                                                   NULL,
                                                   NULL};

/* -- the two VFS -----------------------------------------------------------
 */

#define BASE(vfs) ((sqlite3_vfs *)(vfs)->pAppData)

/* The absolute path, or NULL with *rc: SQLITE_NOMEM, or SQLITE_CANTOPEN
 * with errno set when the base VFS could not resolve it (its lstat() of a
 * component failed: an I/O error is not "out of memory"). */
static char *
full_path(sqlite3_vfs *base, const char *path, int *rc)
{
    char *full = malloc((size_t)base->mxPathname + 1);
    if (full == NULL) {
        *rc = SQLITE_NOMEM;
        return NULL;
    }
    errno = 0;
    int got = base->xFullPathname(base, path, base->mxPathname + 1, full);
    if (got != SQLITE_OK && got != (SQLITE_OK | (2 << 8))) {
        int saved = errno ? errno : EIO;
        free(full);
        errno = saved;
        *rc = SQLITE_CANTOPEN;
        return NULL;
    }
    return full;
}

static int
delta_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags,
           int *out_flags)
{
    if (!(flags & SQLITE_OPEN_MAIN_DB) || name == NULL) {
        return BASE(vfs)->xOpen(BASE(vfs), name, file, flags, out_flags);
    }
    file->pMethods = NULL;
    Delta *found = (Delta *)registry_find(&deltas, name);
    if (found == NULL) {
        return SQLITE_CANTOPEN;
    }
    ((DeltaFile *)file)->delta = found;
    file->pMethods = &delta_methods;
    if (out_flags != NULL) {
        *out_flags = flags;
    }
    return SQLITE_OK;
}

static int
overlay_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags,
             int *out_flags)
{
    if (!(flags & SQLITE_OPEN_MAIN_DB) || name == NULL) {
        return BASE(vfs)->xOpen(BASE(vfs), name, file, flags, out_flags);
    }
    file->pMethods = NULL;
    Overlay *found = (Overlay *)registry_find(&overlays, name);
    if (found == NULL) {
        return SQLITE_CANTOPEN;
    }
    ((OverlayFile *)file)->overlay = found;
    file->pMethods = &overlay_methods;
    if (out_flags != NULL) {
        *out_flags = (flags & ~(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE))
                     | SQLITE_OPEN_READONLY;
    }
    return SQLITE_OK;
}

static int
vfs_delete(sqlite3_vfs *vfs, const char *name, int sync_dir)
{
    return BASE(vfs)->xDelete(BASE(vfs), name, sync_dir);
}

static int
vfs_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    return BASE(vfs)->xAccess(BASE(vfs), name, flags, out);
}

/* Nothing lies beside an overlay: no journal, no -wal. */
static int
overlay_access(sqlite3_vfs *vfs, const char *name, int flags, int *out)
{
    (void)vfs;
    (void)name;
    (void)flags;
    *out = 0;
    return SQLITE_OK;
}

static int
vfs_full_pathname(sqlite3_vfs *vfs, const char *name, int n, char *out)
{
    return BASE(vfs)->xFullPathname(BASE(vfs), name, n, out);
}

static int
vfs_randomness(sqlite3_vfs *vfs, int n, char *out)
{
    return BASE(vfs)->xRandomness(BASE(vfs), n, out);
}

static int
vfs_sleep(sqlite3_vfs *vfs, int us)
{
    return BASE(vfs)->xSleep(BASE(vfs), us);
}

static int
vfs_current_time(sqlite3_vfs *vfs, double *out)
{
    return BASE(vfs)->xCurrentTime(BASE(vfs), out);
}

static int
vfs_get_last_error(sqlite3_vfs *vfs, int n, char *out)
{
    return BASE(vfs)->xGetLastError
               ? BASE(vfs)->xGetLastError(BASE(vfs), n, out)
               : 0;
}

static int
vfs_current_time_int64(sqlite3_vfs *vfs, sqlite3_int64 *out)
{
    return BASE(vfs)->xCurrentTimeInt64(BASE(vfs), out);
}

static void
fill_vfs(sqlite3_vfs *v, sqlite3_vfs *base, const char *name, int file_size)
{
    memset(v, 0, sizeof(*v));
    v->iVersion = base->iVersion >= 2 && base->xCurrentTimeInt64 ? 2 : 1;
    v->szOsFile = base->szOsFile > file_size ? base->szOsFile : file_size;
    v->mxPathname = base->mxPathname;
    v->zName = name;
    v->pAppData = base;
    v->xDelete = vfs_delete;
    v->xAccess = vfs_access;
    v->xFullPathname = vfs_full_pathname;
    v->xRandomness = vfs_randomness;
    v->xSleep = vfs_sleep;
    v->xCurrentTime = vfs_current_time;
    v->xGetLastError = vfs_get_last_error;
    if (v->iVersion >= 2) {
        v->xCurrentTimeInt64 = vfs_current_time_int64;
    }
}

static void
register_once(void)
{
    (void)pthread_atfork(NULL, NULL, registry_after_fork_child);
    sqlite3_vfs *base = sqlite3_vfs_find(NULL);
    if (base == NULL) {
        return;
    }
    fill_vfs(&delta_vfs_struct, base, DELTA_VFS_NAME, sizeof(DeltaFile));
    delta_vfs_struct.xOpen = delta_open;
    fill_vfs(&overlay_vfs_struct, base, OVERLAY_VFS_NAME, sizeof(OverlayFile));
    overlay_vfs_struct.xOpen = overlay_open;
    overlay_vfs_struct.xAccess = overlay_access;
    vfs_ok = sqlite3_vfs_register(&delta_vfs_struct, 0) == SQLITE_OK
             && sqlite3_vfs_register(&overlay_vfs_struct, 0) == SQLITE_OK;
}

sqlite3_vfs *
delta_vfs(void)
{
    pthread_once(&vfs_once, register_once);
    return vfs_ok ? &delta_vfs_struct : NULL;
}

sqlite3_vfs *
overlay_vfs(void)
{
    pthread_once(&vfs_once, register_once);
    return vfs_ok ? &overlay_vfs_struct : NULL;
}

/* -- Delta: the owner's side -----------------------------------------------
 */

int
delta_new(const char *path, int fd, sqlite3_int64 data_offset, int page_size,
          int parent_fd, sqlite3_int64 parent_manifest,
          sqlite3_int64 parent_pages, int pages_fd, int slots_fd, Delta **out)
{
    *out = NULL;
    sqlite3_vfs *vfs = delta_vfs();
    if (vfs == NULL) {
        return SQLITE_ERROR;
    }
    Delta *d = calloc(1, sizeof(*d));
    if (d == NULL) {
        return SQLITE_NOMEM;
    }
    d->fd = -1;
    entry_init(&d->e);
    int path_rc = SQLITE_OK;
    d->e.path = full_path(BASE(vfs), path, &path_rc);
    if (d->e.path == NULL) {
        int path_errno = errno;
        delta_unref(d);
        errno = path_errno;
        return path_rc;
    }
    if (parent_pages > 0) {
        d->parent = table_new(parent_fd, parent_manifest, PAGE_HASH_SIZE, 0,
                              TABLE_BLOCKS);
    }
    d->pages = table_new(pages_fd, 0, sizeof(Record), 1, TABLE_BLOCKS);
    d->slots = table_new(slots_fd, 0, sizeof(sqlite3_int64), 1, TABLE_BLOCKS);
    d->fd = dup(fd);
    if ((parent_pages > 0 && d->parent == NULL) || d->pages == NULL
        || d->slots == NULL || d->fd < 0) {
        int rc = errno == ENOMEM ? SQLITE_NOMEM : SQLITE_CANTOPEN;
        delta_unref(d);
        return rc;
    }
    d->parent_pages = parent_pages;
    d->data_offset = data_offset;
    d->page_size = page_size;
    int rc = registry_add(&deltas, &d->e);
    if (rc != SQLITE_OK) {
        delta_unref(d);
        return rc;
    }
    *out = d;
    return SQLITE_OK;
}

void
delta_close(Delta *d)
{
    registry_remove(&deltas, &d->e);
    delta_unref(d);
}

void
delta_result(Delta *d, DeltaResult *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&d->e.mutex);
    int P = d->page_size;
    out->page_size = P;
    out->page_count = d->size / P;
    out->slots = d->nslots;
    out->writes = d->writes;
    out->unchanged = d->unchanged;
    out->unkept_reads = d->unkept_reads;
    sqlite3_int64 lockpage = lock_byte_page(P);
    for (sqlite3_int64 p = 1; p <= out->page_count && !d->failed; p++) {
        Record r;
        if (get_record(d, p, &r) < 0) {
            break;
        }
        int st = r.state;
        if ((st & 3) == P_KEPT) {
            out->kept++;
        }
        if (st & P_POISON) {
            if (out->poisoned++ == 0) {
                out->first_poisoned = p;
            }
        }
        if ((st & 3) == P_NONE && p != lockpage) {
            if (out->missing++ == 0) {
                out->first_missing = p;
            }
        }
    }
    out->failed = d->failed;
    out->os_errno = d->os_errno;
    memcpy(out->message, d->message, sizeof(out->message));
    if (!out->failed && d->size % P != 0) {
        out->failed = 1;
        snprintf(out->message, sizeof(out->message),
                 "the copy's size (%lld bytes) is not a whole number of "
                 "pages",
                 (long long)d->size);
    }
    pthread_mutex_unlock(&d->e.mutex);
}

int
delta_manifest(Delta *d, unsigned char *out, sqlite3_int64 first,
               sqlite3_int64 count)
{
    int rc = 0;
    pthread_mutex_lock(&d->e.mutex);
    for (sqlite3_int64 k = 0; k < count && rc == 0; k++) {
        unsigned char *to = out + k * PAGE_HASH_SIZE;
        Record r;
        if (get_record(d, first + k, &r) < 0) {
            rc = -1;
        }
        else if ((r.state & 3) != P_NONE) {
            memcpy(to, r.hash, PAGE_HASH_SIZE);
        }
        else {
            memset(to, 0, PAGE_HASH_SIZE);
        }
    }
    pthread_mutex_unlock(&d->e.mutex);
    return rc;
}

int
delta_slots(Delta *d, sqlite3_int64 *out, sqlite3_int64 start,
            sqlite3_int64 count)
{
    int rc = 0;
    pthread_mutex_lock(&d->e.mutex);
    for (sqlite3_int64 i = 0; i < count && rc == 0; i++) {
        out[i] = 0;
        if (start + i < d->nslots
            && table_get(d->slots, start + i, &out[i]) < 0) {
            table_failed(d, d->slots, "reading the recording's slot table");
            rc = -1;
        }
    }
    pthread_mutex_unlock(&d->e.mutex);
    return rc;
}

int
delta_record(Delta *d, const unsigned char *page, sqlite3_int64 pgno)
{
    return record_page(d, page, pgno);
}

void
delta_failure(Delta *d, char *out, size_t size)
{
    pthread_mutex_lock(&d->e.mutex);
    snprintf(out, size, "%s", d->failed ? d->message : "");
    pthread_mutex_unlock(&d->e.mutex);
}

int
delta_page_size(Delta *d)
{
    return d->page_size;
}

/* -- Overlay: the owner's side ---------------------------------------------
 */

int
overlay_new(const char *path, ChainMap *map, Overlay **out)
{
    *out = NULL;
    sqlite3_vfs *vfs = overlay_vfs();
    if (vfs == NULL) {
        return SQLITE_ERROR;
    }
    Overlay *o = calloc(1, sizeof(*o));
    if (o == NULL) {
        return SQLITE_NOMEM;
    }
    entry_init(&o->e);
    int path_rc = SQLITE_OK;
    o->e.path = full_path(BASE(vfs), path, &path_rc);
    if (o->e.path == NULL) {
        int path_errno = errno;
        overlay_unref(o);
        errno = path_errno;
        return path_rc;
    }
    chain_map_ref(map);
    o->map = map;
    int rc = registry_add(&overlays, &o->e);
    if (rc != SQLITE_OK) {
        overlay_unref(o);
        return rc;
    }
    *out = o;
    return SQLITE_OK;
}

void
overlay_close(Overlay *o)
{
    registry_remove(&overlays, &o->e);
    overlay_unref(o);
}
