/* The page hash (hash.c): XXH3-128, seed 0, default secret.  Pure C, safe
 * with the GIL released; shared by verification and incremental backups. */
#ifndef APSW_BACKUP_HASH_H
#define APSW_BACKUP_HASH_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t low, high;
} Hash128;

#define PAGE_HASH_SIZE 16

/* The 16-byte canonical form (most significant byte first), as xxHash's
 * own tools print it. */
void page_hash(const void *data, size_t n, unsigned char out[PAGE_HASH_SIZE]);
Hash128 xxh3_128(const void *data, size_t n);

/* Which loop hashes long inputs: the best this CPU has, or a given one
 * (tests compare them; a variant the build lacks falls back to the best). */
enum { HASH_BEST = 0, HASH_PORTABLE = 1, HASH_SSE2 = 2 };
Hash128 xxh3_128_with(const void *data, size_t n, int variant);
const char *page_hash_variant_name(int variant);

/* The same hash of data given in pieces (the hash of their concatenation),
 * in constant memory: manifests and indexes are hashed as they are read or
 * written, never joined into one buffer. */
#define HASH_STREAM_BLOCK 1024
typedef struct {
    uint64_t acc[8];
    uint64_t total;
    size_t pending;
    /* 64 bytes already run (the last stripe may reach back), then up to one
     * block still to run */
    unsigned char buf[64 + HASH_STREAM_BLOCK];
} HashStream;
void hash_stream_init(HashStream *s);
void hash_stream_update(HashStream *s, const void *data, size_t n);
void hash_stream_digest(const HashStream *s,
                        unsigned char out[PAGE_HASH_SIZE]);

#endif /* APSW_BACKUP_HASH_H */
