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
 * into descriptor `fd` (duplicated) from byte `data_offset` on.  The
 * parent's manifest (parent_pages hashes) is read where it lies: in
 * descriptor parent_fd from byte parent_manifest (unused for a base, 0
 * pages).  The page and slot tables live in the scratch files pages_fd and
 * slots_fd (table.h; all descriptors duplicated), so memory stays a few
 * blocks whatever the database's size.  SQLITE_CONSTRAINT: the path is
 * taken. */
int delta_new(const char *path, int fd, sqlite3_int64 data_offset,
              int page_size, int parent_fd, sqlite3_int64 parent_manifest,
              sqlite3_int64 parent_pages, int pages_fd, int slots_fd,
              Delta **out);
void delta_close(Delta *d); /* unregister, drop the owner's reference */
void delta_result(Delta *d, DeltaResult *out);
/* count hashes of the manifest from page first (the lock-byte page's and
 * an unwritten page's are all zeros) into out.  0, or -1: a table could
 * not be read (delta_failure says why, DeltaResult.os_errno the cause). */
int delta_manifest(Delta *d, unsigned char *out, sqlite3_int64 first,
                   sqlite3_int64 count);
/* Which page data slots start.. hold (0: a dead slot); 0 or -1 as above. */
int delta_slots(Delta *d, sqlite3_int64 *out, sqlite3_int64 start,
                sqlite3_int64 count);

/* Record page pgno (page_size bytes) as if SQLite had written it there:
 * what the backup API would have written, read by the caller (the fast
 * path of incremental.c).  SQLITE_OK, or the failure (delta_failure says
 * why). */
int delta_record(Delta *d, const unsigned char *page, sqlite3_int64 pgno);
void delta_failure(Delta *d, char *out, size_t size); /* "" if none */
int delta_page_size(Delta *d);

/* Where each page of a chain's tip lives: the newest of the chain's files
 * holding it.  Built from the files' indexes read where they lie, kept in
 * a scratch file (table.h): a few blocks of memory whatever the size.
 * Shared, reference-counted and locked: an Overlay holds one, and the
 * restore reads pages through one (from any thread). */
typedef struct ChainMap ChainMap;

/* The map of a chain of nfds files, oldest first: descriptor fds[f]
 * (duplicated) stores stored[f] pages from byte data_offset[f], its index
 * (big-endian u64 page numbers, in file order) at index_off[f].  The tip
 * (the last file) holds page_count pages; its manifest is at tip_manifest.
 * The map's table lives in scratch_fd.  *missing: the first page no file
 * holds other than the lock-byte page, or 0.  SQLITE_OK; SQLITE_NOMEM;
 * SQLITE_IOERR with *err the OS errno (EIO: an index ended early);
 * SQLITE_CORRUPT: an index names page 0. */
int chain_map_new(int page_size, sqlite3_int64 page_count, int nfds,
                  const int *fds, const sqlite3_int64 *data_offset,
                  const sqlite3_int64 *index_off, const sqlite3_int64 *stored,
                  sqlite3_int64 tip_manifest, int scratch_fd, ChainMap **out,
                  sqlite3_int64 *missing, int *err);
void chain_map_ref(ChainMap *m);
void chain_map_unref(ChainMap *m);
void chain_map_geometry(ChainMap *m, int *page_size,
                        sqlite3_int64 *page_count);
/* The file (index into the chain, -1 for none) holding page pgno, and
 * where.  0, or -1 (the map could not be read). */
int chain_map_page(ChainMap *m, sqlite3_int64 pgno, int *file,
                   sqlite3_int64 *offset);
/* Pages first.. of the tip into out (count pages), each checked against
 * the tip's manifest when check (an all-zero entry, the lock-byte page's,
 * is not).  *bad: the first page (0-based in the run) that does not match
 * or ends early, or -1.  0, or -1 with *err (an OS errno). */
int chain_map_gather(ChainMap *m, sqlite3_int64 first, sqlite3_int64 count,
                     unsigned char *out, int check, sqlite3_int64 *bad,
                     int *err);

typedef struct Overlay Overlay;

sqlite3_vfs *overlay_vfs(void);
/* An Overlay for `path`: page n as the map says (a reference is taken);
 * page 1's WAL flag is presented as rollback-journal mode (one file,
 * nothing beside it). */
int overlay_new(const char *path, ChainMap *map, Overlay **out);
void overlay_close(Overlay *o);

#endif /* APSW_BACKUP_DELTASHIM_H */
