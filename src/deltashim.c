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

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PENDING_BYTE 0x40000000
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
    unsigned char *parent;
    sqlite3_int64 parent_pages;
    sqlite3_int64 expected; /* pages announced by the owner (0: unknown) */
    /* per page (slot n-1 is page n) */
    sqlite3_int64 cap;
    unsigned char *state;
    unsigned char *hashes;
    sqlite3_int64 *slot_of;
    /* per data slot */
    sqlite3_int64 slot_cap, nslots, nfree;
    sqlite3_int64 *page_of_slot;
    sqlite3_int64 *free_slots;
    sqlite3_int64 size; /* the file's size as SQLite sees it */
    sqlite3_int64 writes, unchanged, unkept_reads;
    int failed;
    int os_errno; /* the first failure's OS cause (0: none) */
    char message[200];
};

struct Overlay {
    Entry e; /* first: an Overlay is an Entry */
    int page_size;
    sqlite3_int64 page_count;
    int nfds;
    int *fds;
    int *file_of;
    sqlite3_int64 *offset_of;
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

static int
grow_pages(Delta *d, sqlite3_int64 pgno)
{
    if (pgno <= d->cap) {
        return 0;
    }
    sqlite3_int64 want = d->cap ? d->cap : 1024;
    while (want < pgno) {
        want *= 2;
    }
    if (d->cap == 0 && d->expected >= pgno) {
        want = d->expected; /* the size the owner announced: exactly */
    }
    unsigned char *s = realloc(d->state, (size_t)want);
    if (s == NULL) {
        return -1;
    }
    d->state = s;
    memset(s + d->cap, 0, (size_t)(want - d->cap));
    unsigned char *h = realloc(d->hashes, (size_t)want * PAGE_HASH_SIZE);
    if (h == NULL) {
        return -1;
    }
    d->hashes = h;
    sqlite3_int64 *so = realloc(d->slot_of, (size_t)want * sizeof(*so));
    if (so == NULL) {
        return -1;
    }
    d->slot_of = so;
    d->cap = want;
    return 0;
}

/* A data slot for a page, or -1 (memory). */
static sqlite3_int64
take_slot(Delta *d)
{
    if (d->nfree > 0) {
        return d->free_slots[--d->nfree];
    }
    if (d->nslots == d->slot_cap) {
        sqlite3_int64 want = d->slot_cap ? d->slot_cap * 2 : 1024;
        sqlite3_int64 *p = realloc(d->page_of_slot, (size_t)want * sizeof(*p));
        if (p == NULL) {
            return -1;
        }
        d->page_of_slot = p;
        sqlite3_int64 *f = realloc(d->free_slots, (size_t)want * sizeof(*f));
        if (f == NULL) {
            return -1;
        }
        d->free_slots = f;
        d->slot_cap = want;
    }
    return d->nslots++;
}

static void
free_slot(Delta *d, sqlite3_int64 pgno)
{
    sqlite3_int64 slot = d->slot_of[pgno - 1];
    d->page_of_slot[slot] = 0;
    d->free_slots[d->nfree++] = slot;
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
    free(d->parent);
    free(d->state);
    free(d->hashes);
    free(d->slot_of);
    free(d->page_of_slot);
    free(d->free_slots);
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

/* Record one page as SQLite writing it would (its mutex not held):
 * hashed, compared with the parent's, kept or forgotten. */
static int
record_page(Delta *d, const void *buf, sqlite3_int64 pgno)
{
    int P = d->page_size;
    unsigned char hash[PAGE_HASH_SIZE];
    page_hash(buf, (size_t)P, hash);
    int rc = SQLITE_OK;
    pthread_mutex_lock(&d->e.mutex);
    if (grow_pages(d, pgno) < 0) {
        delta_fail(d, "out of memory recording a page");
        pthread_mutex_unlock(&d->e.mutex);
        return SQLITE_NOMEM;
    }
    int was = d->state[pgno - 1] & 3;
    int same = pgno <= d->parent_pages
               && memcmp(d->parent + (pgno - 1) * PAGE_HASH_SIZE, hash,
                         PAGE_HASH_SIZE)
                      == 0;
    d->writes++;
    if (same) {
        if (was == P_KEPT) {
            free_slot(d, pgno);
        }
        d->state[pgno - 1] = P_SAME;
        d->unchanged++;
    }
    else {
        sqlite3_int64 slot =
            was == P_KEPT ? d->slot_of[pgno - 1] : take_slot(d);
        if (slot < 0) {
            delta_fail(d, "out of memory recording a page");
            rc = SQLITE_NOMEM;
        }
        else if (full_pwrite(d->fd, buf, (size_t)P,
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
            if (was != P_KEPT) {
                d->free_slots[d->nfree++] = slot;
                d->page_of_slot[slot] = 0;
            }
            rc = SQLITE_IOERR_WRITE;
        }
        else {
            d->slot_of[pgno - 1] = slot;
            d->page_of_slot[slot] = pgno;
            d->state[pgno - 1] = P_KEPT;
        }
    }
    if (rc == SQLITE_OK) {
        memcpy(d->hashes + (pgno - 1) * PAGE_HASH_SIZE, hash, PAGE_HASH_SIZE);
        if (pgno * P > d->size) {
            d->size = pgno * P;
        }
    }
    pthread_mutex_unlock(&d->e.mutex);
    return rc;
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
        int st = pgno <= d->cap ? d->state[pgno - 1] & 3 : P_NONE;
        memset(page, 0, (size_t)P);
        if (st == P_KEPT) {
            off_t at = (off_t)(d->data_offset + d->slot_of[pgno - 1] * P);
            if (full_pread(d->fd, page, (size_t)P, at) != 1) {
                rc = SQLITE_IOERR_READ;
                break;
            }
        }
        else if (st == P_SAME) {
            d->state[pgno - 1] |= P_POISON;
            d->unkept_reads++;
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
    pthread_mutex_lock(&d->e.mutex);
    sqlite3_int64 keep = (size + P - 1) / P;
    for (sqlite3_int64 p = keep + 1; p <= d->cap; p++) {
        if ((d->state[p - 1] & 3) == P_KEPT) {
            free_slot(d, p);
        }
        d->state[p - 1] = P_NONE;
    }
    d->size = size;
    pthread_mutex_unlock(&d->e.mutex);
    return SQLITE_OK;
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

/* -- Overlay: file methods -------------------------------------------------
 */

static void
overlay_unref(Overlay *o)
{
    if (!entry_unref(&o->e)) {
        return;
    }
    for (int i = 0; i < o->nfds; i++) {
        if (o->fds[i] >= 0) {
            close(o->fds[i]);
        }
    }
    free(o->fds);
    free(o->file_of);
    free(o->offset_of);
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

/* One whole page, straight into SQLite's buffer (the common case). */
static int
ofile_read_page(Overlay *o, unsigned char *buf, sqlite3_int64 pgno)
{
    int P = o->page_size;
    int which = o->file_of[pgno - 1];
    if (which < 0) {
        memset(buf, 0, (size_t)P);
        return SQLITE_OK;
    }
    if (full_pread(o->fds[which], buf, (size_t)P,
                   (off_t)o->offset_of[pgno - 1])
        != 1) {
        return SQLITE_IOERR_READ;
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
    int P = o->page_size;
    if (amt == P && off % P == 0 && off / P < o->page_count) {
        return ofile_read_page(o, buf, off / P + 1);
    }
    unsigned char *page = malloc((size_t)P);
    if (page == NULL) {
        return SQLITE_IOERR_NOMEM;
    }
    int rc = SQLITE_OK;
    unsigned char *out = buf;
    sqlite3_int64 end = o->page_count * P;
    while (amt > 0) {
        if (off >= end) {
            memset(out, 0, (size_t)amt);
            rc = SQLITE_IOERR_SHORT_READ;
            break;
        }
        sqlite3_int64 pgno = off / P + 1;
        int in_page = (int)(off % P);
        int n = P - in_page < amt ? P - in_page : amt;
        int which = o->file_of[pgno - 1];
        memset(page, 0, (size_t)P);
        if (which >= 0
            && full_pread(o->fds[which], page, (size_t)P,
                          (off_t)o->offset_of[pgno - 1])
                   != 1) {
            rc = SQLITE_IOERR_READ;
            break;
        }
        if (pgno == 1 && page[18] == 2 && page[19] == 2) {
            page[18] = page[19] = 1; /* one file: no -wal to look for */
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
    *size = o->page_count * o->page_size;
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
          const unsigned char *parent, sqlite3_int64 parent_pages,
          sqlite3_int64 expected_pages, Delta **out)
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
    int path_rc = SQLITE_OK;
    d->e.path = full_path(BASE(vfs), path, &path_rc);
    int path_errno = errno;
    size_t n = (size_t)parent_pages * PAGE_HASH_SIZE;
    d->parent = malloc(n ? n : 1);
    if (d->e.path == NULL || d->parent == NULL) {
        int rc = d->e.path == NULL ? path_rc : SQLITE_NOMEM;
        free(d->e.path);
        free(d->parent);
        free(d);
        errno = path_errno;
        return rc;
    }
    memcpy(d->parent, parent, n);
    d->parent_pages = parent_pages;
    d->fd = dup(fd);
    if (d->fd < 0) {
        free(d->e.path);
        free(d->parent);
        free(d);
        return SQLITE_CANTOPEN;
    }
    d->data_offset = data_offset;
    d->page_size = page_size;
    d->expected = expected_pages > 0 ? expected_pages : 0;
    entry_init(&d->e);
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
    out->failed = d->failed;
    out->os_errno = d->os_errno;
    memcpy(out->message, d->message, sizeof(out->message));
    if (d->size % P != 0) {
        out->failed = 1;
        snprintf(out->message, sizeof(out->message),
                 "the copy's size (%lld bytes) is not a whole number of "
                 "pages",
                 (long long)d->size);
    }
    sqlite3_int64 lockpage = lock_byte_page(P);
    for (sqlite3_int64 p = 1; p <= out->page_count; p++) {
        int st = p <= d->cap ? d->state[p - 1] : P_NONE;
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
    pthread_mutex_unlock(&d->e.mutex);
}

void
delta_manifest(Delta *d, unsigned char *out, sqlite3_int64 page_count)
{
    pthread_mutex_lock(&d->e.mutex);
    for (sqlite3_int64 p = 1; p <= page_count; p++) {
        unsigned char *to = out + (p - 1) * PAGE_HASH_SIZE;
        if (p <= d->cap && (d->state[p - 1] & 3) != P_NONE) {
            memcpy(to, d->hashes + (p - 1) * PAGE_HASH_SIZE, PAGE_HASH_SIZE);
        }
        else {
            memset(to, 0, PAGE_HASH_SIZE);
        }
    }
    pthread_mutex_unlock(&d->e.mutex);
}

void
delta_slots(Delta *d, sqlite3_int64 *out, sqlite3_int64 slots)
{
    pthread_mutex_lock(&d->e.mutex);
    for (sqlite3_int64 i = 0; i < slots; i++) {
        out[i] = i < d->nslots ? d->page_of_slot[i] : 0;
    }
    pthread_mutex_unlock(&d->e.mutex);
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
overlay_new(const char *path, int page_size, sqlite3_int64 page_count,
            const int *fds, int nfds, const int *file_of,
            const sqlite3_int64 *offset_of, Overlay **out)
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
    size_t n = (size_t)(page_count ? page_count : 1);
    int path_rc = SQLITE_OK;
    o->e.path = full_path(BASE(vfs), path, &path_rc);
    int path_errno = errno;
    o->fds = malloc(sizeof(int) * (size_t)(nfds ? nfds : 1));
    o->file_of = malloc(sizeof(int) * n);
    o->offset_of = malloc(sizeof(sqlite3_int64) * n);
    entry_init(&o->e);
    if (o->e.path == NULL || o->fds == NULL || o->file_of == NULL
        || o->offset_of == NULL) {
        int rc = o->e.path == NULL ? path_rc : SQLITE_NOMEM;
        overlay_unref(o);
        errno = path_errno;
        return rc;
    }
    for (int i = 0; i < nfds; i++) {
        o->fds[i] = dup(fds[i]);
        o->nfds = i + 1;
        if (o->fds[i] < 0) {
            overlay_unref(o);
            return SQLITE_CANTOPEN;
        }
    }
    for (sqlite3_int64 i = 0; i < page_count; i++) {
        if (file_of[i] >= nfds || file_of[i] < -1) {
            overlay_unref(o);
            return SQLITE_MISUSE;
        }
    }
    memcpy(o->file_of, file_of, sizeof(int) * (size_t)page_count);
    memcpy(o->offset_of, offset_of,
           sizeof(sqlite3_int64) * (size_t)page_count);
    o->page_size = page_size;
    o->page_count = page_count;
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
