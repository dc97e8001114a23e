/* A table of fixed-size entries that lives in a file (table.c): the way
 * incremental backups hold what grows with the database -- a manifest, an
 * index, the recording's page table, a chain's page map -- in a few blocks
 * of memory, whatever the database's size (docs/incremental.md, "Memory").
 *
 * Entry i is at byte base + i * size of the file.  A scratch table is an
 * unnamed file of the run's own (writable; never-written entries read as
 * zeros); a point's manifest or index is read where it lies in its file
 * (read-only; an entry the file does not hold is an error).  Blocks of
 * TABLE_BLOCK bytes are cached, direct-mapped; a writable table writes a
 * block back when it is evicted or flushed.
 *
 * Pure C, no Python, no locking: the owner serializes the calls.  Every
 * call returns 0, or -1 with the cause in table_errno() (an OS errno;
 * EIO when a read-only table's file ends early). */
#ifndef APSW_BACKUP_TABLE_H
#define APSW_BACKUP_TABLE_H

#include <sqlite3.h>

#define TABLE_BLOCK 65536

typedef struct Table Table;

/* A table over descriptor fd (duplicated: the caller keeps its own),
 * entries of size bytes (a power of two up to TABLE_BLOCK) from byte base,
 * with nblocks cached blocks.  NULL: out of memory, or dup() failed
 * (errno). */
Table *table_new(int fd, sqlite3_int64 base, int size, int writable,
                 int nblocks);
void table_free(Table *t); /* no write-back: flush first to keep it */
int table_get(Table *t, sqlite3_int64 i, void *out);
int table_put(Table *t, sqlite3_int64 i, const void *in);
int table_flush(Table *t);
int table_errno(const Table *t);

/* An entry of a point's index as it lies in the file: a big-endian u64. */
static inline sqlite3_uint64
table_be64(const unsigned char *p)
{
    sqlite3_uint64 v = 0;
    for (int i = 0; i < 8; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

#endif /* APSW_BACKUP_TABLE_H */
