/* The page-recording VFS shim (pageshim.c): pure C, no Python, so SQLite
 * may call it with the GIL released.
 *
 * A Recording is made for one database file (its full path, as the base
 * VFS's xFullPathname spells it).  A connection opened on that file through
 * the shim's VFS (pageshim_vfs_name()) has every write SQLite hands to the
 * main database file hashed, page by page, into the Recording.  The
 * Recording then re-reads the file from the disk and compares
 * (recording_read_back()).  Journals, WAL and temporary files pass through
 * untouched.
 *
 * Incremental backups can reuse the pieces: the VFS registration per
 * base VFS, the path registry xOpen consults, the write -> page mapping
 * (page size, partial writes, truncation) and the page hash table.
 */
#ifndef APSW_BACKUP_PAGESHIM_H
#define APSW_BACKUP_PAGESHIM_H

#include <sqlite3.h>

#include "hash.h"

typedef struct Recording Recording;

/* What recording_stats() reports. */
typedef struct {
    int page_size;           /* 0 until known */
    sqlite3_int64 pages;     /* highest page number with a slot */
    sqlite3_int64 recorded;  /* pages whose hash is known */
    sqlite3_int64 writes;    /* xWrite calls on the file */
    sqlite3_int64 hashed;    /* pages hashed from SQLite's buffers */
    sqlite3_int64 reread;    /* pages hashed by reading them back at
                              * once (partial writes, page-size change) */
    sqlite3_int64 truncates; /* xTruncate calls */
    sqlite3_int64 failed;    /* writes or truncates that failed */
    int page_size_changes;   /* the header's page size changed */
    int incomplete;          /* bookkeeping failed (memory): the hashes
                              * cannot prove anything */
    int open_files;          /* connections' files attached now */
    sqlite3_int64 syncs;     /* syncs read_back made */
    sqlite3_int64 attached;  /* files ever attached (opened through the shim
                              * while recording): more than its owner
                              * opened means another connection of this
                              * process had the file, its writes recorded as
                              * the owner's */
} RecordingStats;

/* The outcome of recording_read_back() over pages first..last. */
#define READ_BACK_LISTED 100 /* page numbers kept per kind */
typedef struct {
    int rc;                   /* SQLITE_OK, or the failure's code */
    char message[256];        /* what failed, when rc != SQLITE_OK */
    int page_size;            /* of the recording (0: nothing recorded) */
    int incomplete;           /* the recording is incomplete (memory) */
    sqlite3_int64 file_pages; /* pages in the file now */
    sqlite3_int64 checked;    /* pages compared with their hash */
    sqlite3_int64 mismatched; /* ... that differ */
    sqlite3_int64 unrecorded; /* pages of the file with no hash */
    sqlite3_int64 missing;    /* recorded pages past the file's end */
    int partial_tail;         /* file size not a multiple of page_size */
    int cache_dropped;        /* the bytes came from the disk: read with
                               * O_DIRECT, or posix_fadvise(DONTNEED)
                               * done first */
    int direct;               /* read with O_DIRECT (the page cache left
                               * as it was, for the SQL checks beside) */
    int through_connection;   /* read through a connection's own handle
                               * (else a read-only handle of ours) */
    sqlite3_int64 bytes_read;
    int n_mismatched_listed, n_unrecorded_listed, n_missing_listed;
    sqlite3_int64 mismatched_pages[READ_BACK_LISTED];
    sqlite3_int64 unrecorded_pages[READ_BACK_LISTED];
    sqlite3_int64 missing_pages[READ_BACK_LISTED];
} ReadBack;

/* The shim VFS over `base` (NULL: the default VFS), registered on first
 * use under a private name; NULL when it cannot be (out of memory). */
sqlite3_vfs *pageshim_vfs(sqlite3_vfs *base);

/* The same shim, but its main database files also have a page 1 that says
 * "WAL" (header bytes 18/19 = 2) written saying "rollback journal" (1),
 * unless the connection is in WAL mode (see shim_write in pageshim.c):
 * what copy() opens a target with when the copy is to end in rollback-
 * journal mode.  Recordings attach to its files as to the plain shim's. */
sqlite3_vfs *pageshim_rollback_vfs(sqlite3_vfs *base);

/* A new Recording of `path` through the shim over `base`, registered so
 * that the shim's xOpen finds it; one reference, the caller's.
 * SQLITE_CONSTRAINT when another live Recording has the same path. */
int recording_new(sqlite3_vfs *shim, const char *path, Recording **out);
/* Stop attaching new opens to it (files already attached go on). */
void recording_unregister(Recording *rec);
void recording_ref(Recording *rec);
void recording_unref(Recording *rec);
const char *recording_path(Recording *rec);
void recording_stats(Recording *rec, RecordingStats *out);
/* Copy the hash of page pgno (1-based) into out: 1, or 0 if not known. */
int recording_page_hash(Recording *rec, sqlite3_int64 pgno,
                        unsigned char out[PAGE_HASH_SIZE]);

/* Re-read pages first..last (last < 0: to the end of the file) and
 * compare them with the recorded hashes.  When `prepare` is set the file is
 * first synced and the range's cached pages dropped just before they are
 * read, so that they come from the disk, not the page cache (range by
 * range: a check reading the rest of the file meanwhile keeps its cache).
 * See pageshim.c for which handle it uses. */
void recording_read_back(Recording *rec, sqlite3_int64 first,
                         sqlite3_int64 last, int prepare, ReadBack *out);

/* Test only: at the next prepared read-back, after the sync and before
 * the cache is dropped, flip one byte of page pgno on the disk without
 * recording it -- a page changed after SQLite wrote it.  0 disarms. */
void recording_tamper(Recording *rec, sqlite3_int64 pgno);

#endif /* APSW_BACKUP_PAGESHIM_H */
