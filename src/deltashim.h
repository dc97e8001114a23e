/* Incremental backups (docs/incremental.md): the two VFS of
 * docs/incremental.md. Pure C, no Python: SQLite calls them with the GIL
 * released.
 *
 * The delta shim -- the recording destination.  A Delta is registered for a
 * path that need not exist.  A connection opened on that path through
 * delta_vfs() sees an empty database that never touches the disk: every
 * page SQLite writes is hashed, and kept (written to the Delta's data file)
 * only when its hash differs from the parent's manifest.  The backup API
 * into that connection thus produces a restore point's pages and manifest.
 *
 * The overlay (same file) -- the read-only view of a chain.  An Overlay is
 * registered for a path; a connection opened on it through overlay_vfs() reads
 * a database whose page n comes from the newest file of the chain that holds
 * it.
 */
#ifndef APSW_BACKUP_DELTASHIM_H
#define APSW_BACKUP_DELTASHIM_H

#include <sqlite3.h>
#include <stddef.h>

#include "hash.h"

typedef struct Delta Delta;

/* The outcome of a recording (delta_result). */
typedef struct {
    int page_size;
    sqlite3_int64 page_count; /* the database's size in pages */
    sqlite3_int64 kept;       /* pages in the data file now */
    sqlite3_int64 slots;      /* page slots used in the data file */
    sqlite3_int64 writes;     /* page writes seen */
    sqlite3_int64 unchanged;  /* ... whose hash matched the parent's */
    sqlite3_int64 poisoned;   /* unkept pages SQLite read back and never
                               * wrote again: the recording is unusable */
    sqlite3_int64 first_poisoned;
    sqlite3_int64 unkept_reads; /* unkept pages SQLite read back (a restart
                                 * after a cache spill) */
    sqlite3_int64 missing;      /* pages below page_count never written */
    sqlite3_int64 first_missing;
    int failed;        /* a write SQLite made could not be kept */
    int os_errno;      /* the OS's cause, when a write to the file failed */
    char message[200]; /* why, when failed */
} DeltaResult;

sqlite3_vfs *delta_vfs(void);
/* A Delta for `path` (through the VFS's xFullPathname), writing kept pages
 * into descriptor `fd` (duplicated) from byte `data_offset` on; `parent` is
 * the parent's manifest, parent_pages hashes of PAGE_HASH_SIZE bytes
 * (copied); expected_pages, when known, sizes its page tables at once
 * (they grow as needed: a page past it costs a copy of the tables).
 * SQLITE_CONSTRAINT: the path is taken. */
int delta_new(const char *path, int fd, sqlite3_int64 data_offset,
              int page_size, const unsigned char *parent,
              sqlite3_int64 parent_pages, sqlite3_int64 expected_pages,
              Delta **out);
void delta_close(Delta *d); /* unregister, drop the owner's reference */
void delta_result(Delta *d, DeltaResult *out);
/* The manifest (page_count hashes; the lock-byte page's is all zeros) into
 * out, which has room for page_count * PAGE_HASH_SIZE bytes. */
void delta_manifest(Delta *d, unsigned char *out, sqlite3_int64 page_count);
/* Which page each data slot holds (0: a dead slot), `slots` entries. */
void delta_slots(Delta *d, sqlite3_int64 *out, sqlite3_int64 slots);

/* Record page pgno (page_size bytes) as if SQLite had written it there:
 * what the backup API would have written, read by the caller (the fast
 * path of incremental.c).  SQLITE_OK, or the failure (delta_failure says
 * why). */
int delta_record(Delta *d, const unsigned char *page, sqlite3_int64 pgno);
void delta_failure(Delta *d, char *out, size_t size); /* "" if none */
int delta_page_size(Delta *d);

typedef struct Overlay Overlay;

sqlite3_vfs *overlay_vfs(void);
/* An Overlay for `path` of page_count pages: page n is read from
 * descriptor fds[file_of[n-1]] (duplicated) at offset_of[n-1]; a file
 * index of -1 reads as zeros (the lock-byte page).  Page 1's WAL flag is
 * presented as rollback-journal mode (one file, nothing beside it). */
int overlay_new(const char *path, int page_size, sqlite3_int64 page_count,
                const int *fds, int nfds, const int *file_of,
                const sqlite3_int64 *offset_of, Overlay **out);
void overlay_close(Overlay *o);

#endif /* APSW_BACKUP_DELTASHIM_H */
