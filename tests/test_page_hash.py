"""The page hash: XXH3-128 (seed 0), written in src/hash.c from the public
specification, checked against the algorithm's published test vectors."""

import random

import pytest

import apsw_backup
from apsw_backup import _apsw_backup

# XXH3-128 with seed 0, from xxHash's own sanity check (Cyan4973/xxHash,
# cli/xsum_sanity_check.c, table XSUM_XXH128_testdata; the entries with seed
# 0).  Each hashes the first `len` bytes of the buffer that file's
# fillTestBuffer() makes (reproduced by sanity_buffer() below).  Pairs are
# (low64, high64); the canonical 16 bytes are high64 then low64, big-endian.
# The lengths cover every code path: empty, 1-3, 4-8, 9-16, 17-128,
# 129-240, one block with an overlapping or aligned last stripe, two and
# three blocks.
VECTORS = [
    (0, 0x6001C324468D497F, 0x99AA06D3014798D8),
    (1, 0xC44BDFF4074EECDB, 0xA6CD5E9392000F6A),
    (6, 0x3E7039BDDA43CFC6, 0x082AFE0B8162D12A),
    (12, 0x061A192713F69AD9, 0x6E3EFD8FC7802B18),
    (24, 0x1E7044D28B1B901D, 0x0CE966E4678D3761),
    (48, 0xF942219AED80F67B, 0xA002AC4E5478227E),
    (81, 0x5E8BAFB9F95FB803, 0x4952F58181AB0042),
    (222, 0xF1AEBD597CEC6B3A, 0x337E09641B948717),
    (403, 0xCDEB804D65C6DEA4, 0x1B6DE21E332DD73D),
    (512, 0x617E49599013CB6B, 0x18D2D110DCC9BCA1),
    (2048, 0xDD59E2C3A5F038E0, 0xF736557FD47073A5),
    (2240, 0x6E73A90539CF2948, 0xCCB134FBFA7CE49D),
    (2367, 0xCB37AEB9E5D361ED, 0xE89C0F6FF369B427),
]


def sanity_buffer(size: int) -> bytes:
    """xxHash's test buffer: the top byte of a multiplicative generator."""
    out = bytearray(size)
    gen = 2654435761
    for i in range(size):
        out[i] = gen >> 56
        gen = (gen * 11400714785074694797) & 0xFFFFFFFFFFFFFFFF
    return bytes(out)


BUFFER = sanity_buffer(4096 + 64 + 1)


def canonical(low: int, high: int) -> bytes:
    return high.to_bytes(8, "big") + low.to_bytes(8, "big")


@pytest.mark.parametrize(("length", "low", "high"), VECTORS)
def test_page_hash_matches_published_vectors(length, low, high):
    assert apsw_backup.page_hash(BUFFER[:length]) == canonical(low, high)


@pytest.mark.parametrize(("length", "low", "high"), VECTORS)
def test_every_long_input_loop_gives_the_published_hash(length, low, high):
    # The SIMD loops (AVX2, SSE2) and the portable one must agree; the
    # portable one is what non-x86 builds run.
    variants = _apsw_backup._page_hash_variants(BUFFER[:length])
    assert set(variants.values()) == {canonical(low, high)}, variants


def test_loops_agree_on_every_page_size_and_odd_lengths():
    rnd = random.Random(20)
    lengths = [241, 1023, 1024, 1025, 1087, 1088, 4095, 4096, 4097, 65536]
    lengths += [rnd.randrange(241, 70000) for _ in range(40)]
    for n in lengths:
        data = rnd.randbytes(n)
        variants = _apsw_backup._page_hash_variants(data)
        assert len(set(variants.values())) == 1, (n, variants)
        assert apsw_backup.page_hash(data) == variants["portable"]


def test_page_hash_agrees_with_the_reference_implementation():
    xxhash = pytest.importorskip("xxhash")  # the reference C code's binding
    rnd = random.Random(21)
    for n in list(range(0, 300)) + [512, 1024, 4096, 8192, 65536, 100_001]:
        data = rnd.randbytes(n)
        assert apsw_backup.page_hash(data) == xxhash.xxh3_128_digest(data), n


def test_page_hash_accepts_bytes_like_objects():
    data = BUFFER[:4096]
    expected = apsw_backup.page_hash(data)
    assert apsw_backup.page_hash(bytearray(data)) == expected
    assert apsw_backup.page_hash(memoryview(data)) == expected
    big = bytes(1 << 17)  # hashed with the GIL released
    assert apsw_backup.page_hash(big) == apsw_backup.page_hash(bytearray(big))


def test_page_hash_refuses_str_and_non_buffers():
    with pytest.raises(TypeError, match="not str"):
        apsw_backup.page_hash("text")
    with pytest.raises(TypeError):
        apsw_backup.page_hash(12)


def test_one_flipped_bit_changes_the_hash():
    page = bytearray(BUFFER[:4096])
    before = apsw_backup.page_hash(page)
    for bit in (0, 7, 8 * 1000 + 3, 8 * 4095 + 7):
        page[bit // 8] ^= 1 << (bit % 8)
        assert apsw_backup.page_hash(page) != before
        page[bit // 8] ^= 1 << (bit % 8)
    assert apsw_backup.page_hash(page) == before


# Lengths around every boundary of the streaming hash: the short-input
# functions (16, 128, 240), one stripe (64), a block (1024), a block and a
# stripe (the kept tail), and a few blocks.
STREAM_LENGTHS = sorted(
    set(range(0, 300))
    | {
        base + d
        for base in (1024, 1088, 2048, 3072, 4096, 65536)
        for d in range(-70, 71)
        if base + d >= 0
    }
)


def test_hash_of_parts_is_the_hash_of_their_concatenation():
    rnd = random.Random(7)
    for length in STREAM_LENGTHS:
        data = bytes(rnd.getrandbits(8) for _ in range(length))
        want = apsw_backup.page_hash(data)
        cuts = sorted(rnd.randrange(0, length + 1) for _ in range(rnd.randrange(1, 6)))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [length], strict=True)]
        assert _apsw_backup._page_hash_parts(pieces) == want, (length, cuts)
        assert _apsw_backup._page_hash_parts(tuple(pieces) + (b"",)) == want
        if length <= 2100:  # one byte at a time crosses every boundary
            ones = [data[i : i + 1] for i in range(length)]
            assert _apsw_backup._page_hash_parts(ones) == want, length
    assert _apsw_backup._page_hash_parts([]) == apsw_backup.page_hash(b"")


def test_hash_of_parts_refuses_what_is_not_bytes():
    for bad in ("abc", [b"a", "b"], [b"a", bytearray(b"b")], b"ab", None):
        with pytest.raises(TypeError, match="list or tuple of bytes"):
            _apsw_backup._page_hash_parts(bad)
