/* Tables in files: see table.h. */
#define _GNU_SOURCE
#include "table.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct Table {
    int fd;
    int size;
    int writable;
    int nblocks;
    int err;
    sqlite3_int64 base;
    unsigned char *blocks; /* nblocks * TABLE_BLOCK */
    sqlite3_int64 *tag;    /* the block each slot holds, -1: none */
    unsigned char *dirty;
};

Table *
table_new(int fd, sqlite3_int64 base, int size, int writable, int nblocks)
{
    if (size < 1 || size > TABLE_BLOCK || (size & (size - 1)) != 0
        || nblocks < 1 || base < 0) {
        errno = EINVAL;
        return NULL;
    }
    Table *t = calloc(1, sizeof(*t));
    if (t == NULL) {
        return NULL;
    }
    t->blocks = malloc((size_t)nblocks * TABLE_BLOCK);
    t->tag = malloc(sizeof(*t->tag) * (size_t)nblocks);
    t->dirty = calloc((size_t)nblocks, 1);
    t->fd = -1;
    if (t->blocks == NULL || t->tag == NULL || t->dirty == NULL) {
        table_free(t);
        errno = ENOMEM;
        return NULL;
    }
    t->fd = dup(fd);
    if (t->fd < 0) {
        int cause = errno;
        table_free(t);
        errno = cause;
        return NULL;
    }
    for (int k = 0; k < nblocks; k++) {
        t->tag[k] = -1;
    }
    t->size = size;
    t->writable = writable;
    t->nblocks = nblocks;
    t->base = base;
    return t;
}

void
table_free(Table *t)
{
    if (t == NULL) {
        return;
    }
    if (t->fd >= 0) {
        close(t->fd);
    }
    free(t->blocks);
    free(t->tag);
    free(t->dirty);
    free(t);
}

int
table_errno(const Table *t)
{
    return t->err ? t->err : EIO;
}

static int
fail(Table *t, int cause)
{
    if (!t->err) {
        t->err = cause ? cause : EIO;
    }
    return -1;
}

static int
write_block(Table *t, int k)
{
    const unsigned char *p = t->blocks + (size_t)k * TABLE_BLOCK;
    size_t n = TABLE_BLOCK;
    off_t off = (off_t)(t->base + t->tag[k] * TABLE_BLOCK);
    while (n > 0) {
        ssize_t w = pwrite(t->fd, p, n, off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return fail(t, w < 0 ? errno : ENOSPC);
        }
        p += w;
        n -= (size_t)w;
        off += w;
    }
    t->dirty[k] = 0;
    return 0;
}

/* The cached block holding byte `at` of the table, loaded if need be. */
static unsigned char *
block_of(Table *t, sqlite3_int64 at)
{
    sqlite3_int64 b = at / TABLE_BLOCK;
    int k = (int)(b % t->nblocks);
    unsigned char *p = t->blocks + (size_t)k * TABLE_BLOCK;
    if (t->tag[k] == b) {
        return p;
    }
    if (t->dirty[k] && write_block(t, k) < 0) {
        return NULL;
    }
    t->tag[k] = -1;
    size_t got = 0;
    off_t off = (off_t)(t->base + b * TABLE_BLOCK);
    while (got < TABLE_BLOCK) {
        ssize_t r = pread(t->fd, p + got, TABLE_BLOCK - got, off + (off_t)got);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            fail(t, errno);
            return NULL;
        }
        if (r == 0) {
            break;
        }
        got += (size_t)r;
    }
    /* past the end: a scratch table's unwritten entries are zeros; a
     * read-only table's caller asks only for entries its file holds, and
     * table_get checks what came (got) */
    memset(p + got, 0, TABLE_BLOCK - got);
    t->tag[k] = b;
    return p;
}

/* The end of the file's data in the block of byte `at`, for a read-only
 * table: entries past it were not in the file. */
static int
held(Table *t, sqlite3_int64 at)
{
    if (t->writable) {
        return 1;
    }
    /* re-read lazily: a short block is rare (the table's end) */
    unsigned char probe;
    ssize_t r;
    do {
        r = pread(t->fd, &probe, 1, (off_t)(t->base + at + t->size - 1));
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        return fail(t, errno);
    }
    return r == 1 ? 1 : fail(t, EIO);
}

int
table_get(Table *t, sqlite3_int64 i, void *out)
{
    sqlite3_int64 at = i * t->size;
    unsigned char *p = block_of(t, at);
    if (p == NULL) {
        return -1;
    }
    memcpy(out, p + at % TABLE_BLOCK, (size_t)t->size);
    if (!t->writable) {
        /* an all-zero entry may be past the file's end (truncated) */
        const unsigned char *e = out;
        int zero = 1;
        for (int k = 0; k < t->size && zero; k++) {
            zero = e[k] == 0;
        }
        if (zero && held(t, at) < 0) {
            return -1;
        }
    }
    return 0;
}

int
table_put(Table *t, sqlite3_int64 i, const void *in)
{
    if (!t->writable) {
        return fail(t, EBADF);
    }
    sqlite3_int64 at = i * t->size;
    unsigned char *p = block_of(t, at);
    if (p == NULL) {
        return -1;
    }
    memcpy(p + at % TABLE_BLOCK, in, (size_t)t->size);
    t->dirty[(at / TABLE_BLOCK) % t->nblocks] = 1;
    return 0;
}

int
table_flush(Table *t)
{
    for (int k = 0; k < t->nblocks; k++) {
        if (t->dirty[k] && write_block(t, k) < 0) {
            return -1;
        }
    }
    return 0;
}
