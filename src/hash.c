/* The page hash: XXH3-128 (seed 0, default secret), written here from the
 * public specification (xxHash's doc/xxhash_spec.md, "XXH3 Algorithm
 * Description").  A non-cryptographic 128-bit hash: it tells pages apart
 * that differ by accident (a dropped or torn write, a flipped bit), which is
 * what verification and the incremental manifests need, at memory speed.
 *
 * Pure C, no Python: the VFS shim calls it with the GIL released.  The long
 * input loop (every database page is longer than 240 bytes) has SSE2 and
 * AVX2 versions on x86-64, chosen once at run time; elsewhere the portable
 * loop runs.  All give the same result (tests/test_page_hash.py checks the
 * published test vectors).
 */
#include "hash.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_SIMD 1
#else
#define HAVE_X86_SIMD 0
#endif

typedef uint64_t u64;
typedef uint32_t u32;

#define PRIME32_1 0x9E3779B1U
#define PRIME32_2 0x85EBCA77U
#define PRIME32_3 0xC2B2AE3DU
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL
#define PRIME_MX1 0x165667919E3779F9ULL
#define PRIME_MX2 0x9FB21C651E98DF25ULL

#define SECRET_SIZE 192
#define STRIPE 64
#define STRIPES_PER_BLOCK ((SECRET_SIZE - STRIPE) / 8) /* 16 */
#define BLOCK (STRIPE * STRIPES_PER_BLOCK)             /* 1024 bytes */

/* The specification's default secret. */
static const unsigned char secret[SECRET_SIZE] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c,
    0xf7, 0x21, 0xad, 0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb,
    0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e,
    0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
    0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
    0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97,
    0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7,
    0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
    0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83,
    0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26,
    0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc,
    0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
    0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* Little-endian reads, whatever the host's byte order. */
static inline u64
le64(const unsigned char *p)
{
    u64 v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline u32
le32(const unsigned char *p)
{
    u32 v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline u64
swap64(u64 x)
{
    return __builtin_bswap64(x);
}

static inline u32
swap32(u32 x)
{
    return __builtin_bswap32(x);
}

static inline u32
rotl32(u32 x, int r)
{
    return (x << r) | (x >> (32 - r));
}

/* The full 128-bit product of two 64-bit values. */
static inline void
mul128(u64 a, u64 b, u64 *lo, u64 *hi)
{
#if defined(__SIZEOF_INT128__)
    unsigned __int128 p = (unsigned __int128)a * b;
    *lo = (u64)p;
    *hi = (u64)(p >> 64);
#else
    u64 a0 = a & 0xFFFFFFFFU, a1 = a >> 32, b0 = b & 0xFFFFFFFFU, b1 = b >> 32;
    u64 p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    u64 mid = (p00 >> 32) + (p10 & 0xFFFFFFFFU) + p01;
    *lo = (mid << 32) | (p00 & 0xFFFFFFFFU);
    *hi = p11 + (p10 >> 32) + (mid >> 32);
#endif
}

static inline u64
fold128(u64 a, u64 b)
{
    u64 lo, hi;
    mul128(a, b, &lo, &hi);
    return lo ^ hi;
}

static inline u64
avalanche(u64 x)
{
    x ^= x >> 37;
    x *= PRIME_MX1;
    return x ^ (x >> 32);
}

static inline u64
avalanche_xxh64(u64 x)
{
    x ^= x >> 33;
    x *= PRIME64_2;
    x ^= x >> 29;
    x *= PRIME64_3;
    return x ^ (x >> 32);
}

/* -- 0 to 16 bytes ------------------------------------------------------ */

static Hash128
hash_0to16(const unsigned char *p, size_t n)
{
    Hash128 h;
    if (n == 0) {
        h.low = avalanche_xxh64(le64(secret + 64) ^ le64(secret + 72));
        h.high = avalanche_xxh64(le64(secret + 80) ^ le64(secret + 88));
    }
    else if (n <= 3) {
        u32 c = (u32)p[n - 1] | ((u32)n << 8) | ((u32)p[0] << 16)
                | ((u32)p[n >> 1] << 24);
        u64 lo = (u64)(le32(secret) ^ le32(secret + 4)) ^ c;
        u64 hi = (u64)(le32(secret + 8) ^ le32(secret + 12))
                 ^ rotl32(swap32(c), 13);
        h.low = avalanche_xxh64(lo);
        h.high = avalanche_xxh64(hi);
    }
    else if (n <= 8) {
        u64 first = le32(p), last = le32(p + n - 4);
        u64 v = (le64(secret + 16) ^ le64(secret + 24)) ^ (first | last << 32);
        u64 lo, hi;
        mul128(v, PRIME64_1 + ((u64)n << 2), &lo, &hi);
        hi += lo << 1;
        lo ^= hi >> 3;
        lo ^= lo >> 35;
        lo *= PRIME_MX2;
        lo ^= lo >> 28;
        h.low = lo;
        h.high = avalanche(hi);
    }
    else {
        u64 first = le64(p), last = le64(p + n - 8);
        u64 v1 = (le64(secret + 32) ^ le64(secret + 40)) ^ first ^ last;
        u64 v2 = (le64(secret + 48) ^ le64(secret + 56)) ^ last;
        u64 lo, hi, lo2, hi2;
        mul128(v1, PRIME64_1, &lo, &hi);
        lo += (u64)(n - 1) << 54;
        hi += v2 + (u64)(u32)v2 * (PRIME32_2 - 1);
        lo ^= swap64(hi);
        mul128(lo, PRIME64_2, &lo2, &hi2);
        hi2 += hi * PRIME64_2;
        h.low = avalanche(lo2);
        h.high = avalanche(hi2);
    }
    return h;
}

/* -- 17 to 240 bytes ---------------------------------------------------- */

static inline u64
mix16(const unsigned char *p, const unsigned char *s)
{
    return fold128(le64(p) ^ le64(s), le64(p + 8) ^ le64(s + 8));
}

static inline void
mix32(u64 acc[2], const unsigned char *a, const unsigned char *b,
      const unsigned char *s)
{
    acc[0] += mix16(a, s);
    acc[1] += mix16(b, s + 16);
    acc[0] ^= le64(b) + le64(b + 8);
    acc[1] ^= le64(a) + le64(a + 8);
}

static Hash128
hash_17to240(const unsigned char *p, size_t n)
{
    u64 acc[2] = {(u64)n * PRIME64_1, 0};
    if (n <= 128) {
        for (int i = (int)((n - 1) >> 5); i >= 0; i--) {
            mix32(acc, p + 16 * i, p + n - 16 * i - 16, secret + 32 * i);
        }
    }
    else {
        size_t chunks = n >> 5;
        for (size_t i = 0; i < 4; i++) {
            mix32(acc, p + 32 * i, p + 32 * i + 16, secret + 32 * i);
        }
        acc[0] = avalanche(acc[0]);
        acc[1] = avalanche(acc[1]);
        for (size_t i = 4; i < chunks; i++) {
            mix32(acc, p + 32 * i, p + 32 * i + 16, secret + 32 * (i - 4) + 3);
        }
        mix32(acc, p + n - 16, p + n - 32, secret + 103);
    }
    Hash128 h;
    u64 hi = acc[0] * PRIME64_1 + acc[1] * PRIME64_4 + (u64)n * PRIME64_2;
    h.low = avalanche(acc[0] + acc[1]);
    h.high = (u64)0 - avalanche(hi);
    return h;
}

/* -- more than 240 bytes: the striped loop -------------------------------- */

/* accumulate() of the specification on `nstripes` consecutive stripes,
 * the secret moving on by 8 bytes a stripe. */
static void
accumulate_portable(u64 acc[8], const unsigned char *p, size_t nstripes,
                    const unsigned char *s)
{
    for (size_t n = 0; n < nstripes; n++, p += STRIPE, s += 8) {
        for (int i = 0; i < 8; i++) {
            u64 d = le64(p + 8 * i);
            u64 v = d ^ le64(s + 8 * i);
            acc[i ^ 1] += d;
            acc[i] += (v & 0xFFFFFFFFU) * (v >> 32);
        }
    }
}

static void
scramble_portable(u64 acc[8])
{
    const unsigned char *s = secret + SECRET_SIZE - STRIPE;
    for (int i = 0; i < 8; i++) {
        u64 a = acc[i];
        a ^= a >> 47;
        a ^= le64(s + 8 * i);
        acc[i] = a * PRIME32_1;
    }
}

#if HAVE_X86_SIMD
/* SSE2 is part of x86-64: two lanes per register.  The product of the two
 * 32-bit halves of each lane is _mm_mul_epu32 of the value and the value
 * with its halves swapped; acc[i ^ 1] += d is a swap of the two lanes. */
static void
accumulate_sse2(u64 acc[8], const unsigned char *p, size_t nstripes,
                const unsigned char *s)
{
    __m128i a[4];
    memcpy(a, acc, sizeof(a));
    for (size_t n = 0; n < nstripes; n++, p += STRIPE, s += 8) {
        for (int i = 0; i < 4; i++) {
            __m128i d = _mm_loadu_si128((const __m128i *)(p + 16 * i));
            __m128i k = _mm_loadu_si128((const __m128i *)(s + 16 * i));
            __m128i v = _mm_xor_si128(d, k);
            __m128i vh = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1));
            __m128i prod = _mm_mul_epu32(v, vh);
            __m128i dswap = _mm_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
            a[i] = _mm_add_epi64(a[i], _mm_add_epi64(prod, dswap));
        }
    }
    memcpy(acc, a, sizeof(a));
}

static void
scramble_sse2(u64 acc[8])
{
    const unsigned char *s = secret + SECRET_SIZE - STRIPE;
    const __m128i prime = _mm_set1_epi32((int)PRIME32_1);
    __m128i a[4];
    memcpy(a, acc, sizeof(a));
    for (int i = 0; i < 4; i++) {
        __m128i k = _mm_loadu_si128((const __m128i *)(s + 16 * i));
        __m128i x = _mm_xor_si128(a[i], _mm_srli_epi64(a[i], 47));
        x = _mm_xor_si128(x, k);
        /* 64 x 32-bit product: low half times prime, plus the high half
         * times prime shifted up. */
        __m128i lo = _mm_mul_epu32(x, prime);
        __m128i hi = _mm_mul_epu32(_mm_srli_epi64(x, 32), prime);
        a[i] = _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
    }
    memcpy(acc, a, sizeof(a));
}

__attribute__((target("avx2"))) static void
accumulate_avx2(u64 acc[8], const unsigned char *p, size_t nstripes,
                const unsigned char *s)
{
    __m256i a[2];
    memcpy(a, acc, sizeof(a));
    for (size_t n = 0; n < nstripes; n++, p += STRIPE, s += 8) {
        for (int i = 0; i < 2; i++) {
            __m256i d = _mm256_loadu_si256((const __m256i *)(p + 32 * i));
            __m256i k = _mm256_loadu_si256((const __m256i *)(s + 32 * i));
            __m256i v = _mm256_xor_si256(d, k);
            __m256i vh = _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1));
            __m256i prod = _mm256_mul_epu32(v, vh);
            __m256i dswap = _mm256_shuffle_epi32(d, _MM_SHUFFLE(1, 0, 3, 2));
            a[i] = _mm256_add_epi64(a[i], _mm256_add_epi64(prod, dswap));
        }
    }
    memcpy(acc, a, sizeof(a));
}

__attribute__((target("avx2"))) static void
scramble_avx2(u64 acc[8])
{
    const unsigned char *s = secret + SECRET_SIZE - STRIPE;
    const __m256i prime = _mm256_set1_epi32((int)PRIME32_1);
    __m256i a[2];
    memcpy(a, acc, sizeof(a));
    for (int i = 0; i < 2; i++) {
        __m256i k = _mm256_loadu_si256((const __m256i *)(s + 32 * i));
        __m256i x = _mm256_xor_si256(a[i], _mm256_srli_epi64(a[i], 47));
        x = _mm256_xor_si256(x, k);
        __m256i lo = _mm256_mul_epu32(x, prime);
        __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), prime);
        a[i] = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
    }
    memcpy(acc, a, sizeof(a));
}
#endif

typedef void (*accumulate_fn)(u64 *, const unsigned char *, size_t,
                              const unsigned char *);
typedef void (*scramble_fn)(u64 *);

typedef struct {
    accumulate_fn accumulate;
    scramble_fn scramble;
    const char *name;
} LongLoop;

static const LongLoop loop_portable = {accumulate_portable, scramble_portable,
                                       "portable"};
#if HAVE_X86_SIMD
static const LongLoop loop_sse2 = {accumulate_sse2, scramble_sse2, "sse2"};
static const LongLoop loop_avx2 = {accumulate_avx2, scramble_avx2, "avx2"};
#endif

/* Chosen once; a race between two first callers stores the same value. */
static const LongLoop *volatile chosen_loop;

static const LongLoop *
long_loop(void)
{
    const LongLoop *loop = chosen_loop;
    if (loop == NULL) {
#if HAVE_X86_SIMD
        __builtin_cpu_init();
        loop = __builtin_cpu_supports("avx2") ? &loop_avx2 : &loop_sse2;
#else
        loop = &loop_portable;
#endif
        chosen_loop = loop;
    }
    return loop;
}

static u64
merge(const u64 acc[8], u64 init, const unsigned char *s)
{
    u64 r = init;
    for (int i = 0; i < 4; i++) {
        r += fold128(acc[2 * i] ^ le64(s + 16 * i),
                     acc[2 * i + 1] ^ le64(s + 16 * i + 8));
    }
    return avalanche(r);
}

static Hash128
hash_long(const unsigned char *p, size_t n, const LongLoop *loop)
{
    u64 acc[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,
                  PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    size_t blocks = (n - 1) / BLOCK; /* the last block is left for below */
    for (size_t b = 0; b < blocks; b++) {
        loop->accumulate(acc, p + b * BLOCK, STRIPES_PER_BLOCK, secret);
        loop->scramble(acc);
    }
    size_t rest = n - blocks * BLOCK; /* 1 .. BLOCK */
    loop->accumulate(acc, p + blocks * BLOCK, (rest - 1) / STRIPE, secret);
    /* The last 64 bytes, which may overlap the stripes above. */
    loop->accumulate(acc, p + n - STRIPE, 1, secret + SECRET_SIZE - 71);
    Hash128 h;
    h.low = merge(acc, (u64)n * PRIME64_1, secret + 11);
    h.high = merge(acc, ~((u64)n * PRIME64_2), secret + SECRET_SIZE - 75);
    return h;
}

/* -- streaming: the hash of pieces, as of their concatenation ------------
 *
 * hash_long() above, fed piece by piece.  A block is run only once a byte
 * after it has come (hash_long leaves the last block, even a full one, for
 * the end), and the last 64 bytes before the pending ones are kept: the
 * final stripe is the input's last 64 bytes, which may reach back into the
 * block already run.  Up to 240 bytes in all, nothing has been run and the
 * short-input functions take the pending bytes. */

_Static_assert(HASH_STREAM_BLOCK == BLOCK, "one block of the long loop");

void
hash_stream_init(HashStream *s)
{
    static const u64 init[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,
                                PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    memcpy(s->acc, init, sizeof(init));
    s->total = 0;
    s->pending = 0;
}

void
hash_stream_update(HashStream *s, const void *data, size_t n)
{
    const LongLoop *loop = long_loop();
    const unsigned char *p = (const unsigned char *)data;
    s->total += n;
    while (n > 0) {
        if (s->pending == HASH_STREAM_BLOCK) {
            /* a full block, and a byte follows it: run it, keep its tail */
            loop->accumulate(s->acc, s->buf + STRIPE, STRIPES_PER_BLOCK,
                             secret);
            loop->scramble(s->acc);
            memcpy(s->buf, s->buf + BLOCK, STRIPE);
            s->pending = 0;
        }
        size_t room = HASH_STREAM_BLOCK - s->pending;
        size_t take = n < room ? n : room;
        memcpy(s->buf + STRIPE + s->pending, p, take);
        s->pending += take;
        p += take;
        n -= take;
    }
}

void
hash_stream_digest(const HashStream *s, unsigned char out[16])
{
    Hash128 h;
    const unsigned char *pending = s->buf + STRIPE;
    if (s->total <= 240) {
        h = s->total <= 16 ? hash_0to16(pending, (size_t)s->total)
                           : hash_17to240(pending, (size_t)s->total);
    }
    else {
        const LongLoop *loop = long_loop();
        u64 acc[8];
        memcpy(acc, s->acc, sizeof(acc));
        size_t rest = s->pending; /* 1 .. BLOCK: the last block */
        loop->accumulate(acc, pending, (rest - 1) / STRIPE, secret);
        loop->accumulate(acc, pending + rest - STRIPE, 1,
                         secret + SECRET_SIZE - 71);
        u64 n = (u64)s->total;
        h.low = merge(acc, n * PRIME64_1, secret + 11);
        h.high = merge(acc, ~(n * PRIME64_2), secret + SECRET_SIZE - 75);
    }
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(h.high >> (56 - 8 * i));
        out[8 + i] = (unsigned char)(h.low >> (56 - 8 * i));
    }
}

Hash128
xxh3_128_with(const void *data, size_t n, int variant)
{
    const unsigned char *p = (const unsigned char *)data;
    if (n <= 16) {
        return hash_0to16(p, n);
    }
    if (n <= 240) {
        return hash_17to240(p, n);
    }
    const LongLoop *loop = long_loop();
    if (variant == HASH_PORTABLE) {
        loop = &loop_portable;
    }
#if HAVE_X86_SIMD
    else if (variant == HASH_SSE2) {
        loop = &loop_sse2;
    }
#endif
    return hash_long(p, n, loop);
}

Hash128
xxh3_128(const void *data, size_t n)
{
    return xxh3_128_with(data, n, HASH_BEST);
}

void
page_hash(const void *data, size_t n, unsigned char out[16])
{
    Hash128 h = xxh3_128(data, n);
    /* The canonical form: the 128-bit value, most significant byte first. */
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(h.high >> (56 - 8 * i));
        out[8 + i] = (unsigned char)(h.low >> (56 - 8 * i));
    }
}

const char *
page_hash_variant_name(int variant)
{
    if (variant == HASH_PORTABLE) {
        return loop_portable.name;
    }
#if HAVE_X86_SIMD
    if (variant == HASH_SSE2) {
        return loop_sse2.name;
    }
#endif
    return long_loop()->name;
}
