"""GF(256) arithmetic, the C matrix product on every kernel, and the erasure code."""

from __future__ import annotations

import itertools
import random

import pytest

from polevpn.kcp import gf256


def ref_mul(a: int, b: int) -> int:
    """Shift-and-add multiply modulo 0x11d: shares no table with the code under test."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


def ref_matmul(coefs: bytes, rows: int, srcs: list[bytes], length: int, offset: int = 0) -> list:
    out = []
    for r in range(rows):
        acc = bytearray(length)
        for c, src in enumerate(srcs):
            k = coefs[r * len(srcs) + c]
            for i, x in enumerate(src[offset : offset + length]):
                acc[i] ^= ref_mul(k, x)
        out.append(bytes(acc))
    return out


KERNELS = gf256.simd_levels()


@pytest.fixture(params=KERNELS + ["python"], ids=lambda p: gf256.KERNELS.get(p, str(p)))
def matmul(request):
    """Each C kernel this CPU has, and the pure-Python fallback."""
    if request.param == "python":
        yield gf256.py_matmul
        return
    assert gf256.set_simd(request.param) == request.param
    try:
        yield gf256._gf256.matmul
    finally:
        gf256.set_simd(gf256.AVX2)


def test_c_extension_built_with_simd():
    # the development machines and CI have gcc and an x86-64 CPU with SSSE3
    assert gf256.HAVE_C
    assert gf256.SSSE3 in KERNELS


def test_set_simd_caps_at_the_cpu():
    best = max(KERNELS)
    try:
        assert gf256.set_simd(99) == best
        assert gf256.set_simd(0) == 0 == gf256.get_simd()
        with pytest.raises(ValueError):
            gf256.set_simd(-1)
    finally:
        gf256.set_simd(best)
    assert gf256.get_simd() == best


def test_field_tables_match_reference():
    for a in range(256):
        for b in range(0, 256, 7):
            assert gf256.mul(a, b) == ref_mul(a, b)
    for a in range(1, 256):
        assert ref_mul(a, gf256.inv(a)) == 1
        assert gf256.div(gf256.mul(a, 77), a) == 77
    with pytest.raises(ZeroDivisionError):
        gf256.inv(0)


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 1400])
def test_matmul_matches_reference(matmul, length):
    rng = random.Random(length)
    rows, cols = 3, 5
    coefs = bytes([0, 1, 2, 0x80, 0xFF] + [rng.randrange(256) for _ in range(10)])
    # some sources shorter than length: they count as zero-padded
    srcs = [rng.randbytes(rng.choice([length, length // 2, 0, length + 9])) for _ in range(cols)]
    dsts = [bytearray(rng.randbytes(length + 3)) for _ in range(rows)]  # stale content
    tails = [bytes(d[length:]) for d in dsts]
    matmul(coefs, rows, srcs, dsts, length)
    assert [bytes(d[:length]) for d in dsts] == ref_matmul(coefs, rows, srcs, length)
    assert [bytes(d[length:]) for d in dsts] == tails  # nothing written past length


def test_matmul_all_coefficients(matmul):
    # every multiplier on every byte value, through the nibble tables and the tails
    src = bytes(range(256)) + bytes(range(255, -1, -1)) + b"\x5a" * 13
    for c in range(256):
        dst = bytearray(len(src))
        matmul(bytes([c]), 1, [src], [dst], len(src))
        assert dst == bytes(ref_mul(c, x) for x in src), c


def test_matmul_offsets(matmul):
    rng = random.Random(7)
    srcs = [rng.randbytes(n) for n in (40, 100, 12, 5)]  # some end before offset + length
    coefs = bytes(rng.randrange(1, 256) for _ in range(8))
    dsts = [bytearray(b"\xee" * 90) for _ in range(2)]
    matmul(coefs, 2, srcs, dsts, 70, 12, 20)
    want = ref_matmul(coefs, 2, srcs, 70, offset=12)
    for d, w in zip(dsts, want, strict=True):
        assert d[:20] == b"\xee" * 20 and d[20:] == w


def test_matmul_buffer_types(matmul):
    src = bytes(range(100))
    srcs = [src, bytearray(src), memoryview(src)[3:]]
    out = memoryview(bytearray(64))
    matmul(b"\x01\x01\x02", 1, srcs, [out], 64)
    assert bytes(out) == ref_matmul(b"\x01\x01\x02", 1, [src, src, src[3:]], 64)[0]


def test_matmul_rejects_bad_arguments():
    m = gf256._gf256.matmul
    with pytest.raises(BufferError):
        m(b"\x01", 1, [b"ab"], [b"xx"], 2)  # read-only destination
    with pytest.raises(ValueError):
        m(b"", 1, [b"ab"], [bytearray(2)], 2)  # too few coefficients
    with pytest.raises(ValueError):
        m(b"\x01", 1, [b"ab"], [bytearray(1)], 2)  # destination too short
    with pytest.raises(ValueError):
        m(b"\x01", 1, [b"ab"], [bytearray(8)], 2, 0, 7)  # ... for its offset
    with pytest.raises(ValueError):
        m(b"\x01\x01", 2, [b"ab"], [bytearray(2)], 2)  # rows != len(dsts)
    with pytest.raises(ValueError):
        m(b"\x01", 1, [b"ab"], [bytearray(2)], -1)
    with pytest.raises(TypeError):
        m(b"\x01", 1, [1], [bytearray(2)], 2)
    with pytest.raises(TypeError):
        m(b"\x01", 1, None, [bytearray(2)], 2)
    m(b"", 0, [], [], 5)  # an empty product is fine
    dst = bytearray(b"\xff" * 4)
    m(b"", 1, [], [dst], 4)  # no sources: zeros
    assert dst == bytes(4)


def test_parity_coefficients_do_not_depend_on_group_shape():
    big = gf256.parity_matrix(gf256.K_MAX, 4)
    for k, m in [(1, 1), (7, 3), (10, 3), (32, 16), (64, 32)]:
        pm = gf256.parity_matrix(k, m)
        for j in range(min(m, 4)):
            assert pm[j * k : (j + 1) * k] == big[j * gf256.K_MAX : j * gf256.K_MAX + k]
    # row 0 is the XOR of the data, column 0 all ones
    assert set(gf256.parity_matrix(20, 1)) == {1}
    assert all(gf256.coefficient(j, 0) == 1 for j in range(gf256.M_MAX))
    with pytest.raises(ValueError):
        gf256.parity_matrix(0, 1)
    with pytest.raises(ValueError):
        gf256.parity_matrix(gf256.K_MAX + 1, 1)


def test_invert_matrix():
    rng = random.Random(3)
    for n in (1, 2, 5, 12):
        while True:
            a = [[rng.randrange(256) for _ in range(n)] for _ in range(n)]
            try:
                inv = gf256.invert_matrix(a)
                break
            except ValueError:
                continue  # a random singular matrix: draw again
        for r in range(n):
            for c in range(n):
                acc = 0
                for t in range(n):
                    acc ^= ref_mul(a[r][t], inv[t][c])
                assert acc == (r == c)
    with pytest.raises(ValueError):
        gf256.invert_matrix([[1, 2], [2, 4]])  # row 2 = 2 * row 1
    with pytest.raises(ValueError):
        gf256.invert_matrix([[1, 2, 3], [4, 5, 6]])


def _check_recovery(data: list[bytes], parity: list, lost: set[int], length: int) -> None:
    k = len(data)
    d = [None if i in lost else x for i, x in enumerate(data)]
    p = [None if k + j in lost else x for j, x in enumerate(parity)]
    out = gf256.reconstruct(d, p, length)
    for i, (got, want) in enumerate(zip(out, data, strict=True)):
        assert bytes(got[: len(want)]) == want, (i, sorted(lost))
        assert not any(got[len(want) :]), "padding must decode to zeros"


@pytest.mark.parametrize("k,m", [(1, 1), (3, 2), (10, 3)])
def test_any_k_of_k_plus_m_recover_exhaustive(k, m):
    rng = random.Random(k * 100 + m)
    data = [rng.randbytes(rng.randrange(1, 300)) for _ in range(k)]
    length = max(map(len, data))
    parity = gf256.encode(data, m)
    assert all(len(p) == length for p in parity)
    for e in range(m + 1):
        for lost in itertools.combinations(range(k + m), e):
            _check_recovery(data, parity, set(lost), length)


@pytest.mark.parametrize("k,m", [(32, 16), (64, 32), (100, 28), (5, 100)])
def test_any_k_of_k_plus_m_recover_sampled(k, m):
    rng = random.Random(k * 1000 + m)
    data = [rng.randbytes(rng.randrange(1, 64)) for _ in range(k)]
    length = max(map(len, data))
    parity = gf256.encode(data, m)
    for _ in range(25):
        _check_recovery(data, parity, set(rng.sample(range(k + m), m)), length)
    # every data shard lost at once, when there is enough parity
    if m >= k:
        _check_recovery(data, parity, set(range(k)), length)


def test_early_closed_group_and_variable_parity():
    # a group closed after 4 shards uses the first 4 columns; the receiver decodes it with
    # k=4 and any parity row, whatever the configured size or other groups' parity
    rng = random.Random(11)
    data = [rng.randbytes(50) for _ in range(4)]
    p3 = gf256.encode(data, 3)
    p1 = gf256.encode(data, 1)
    assert p1[0] == p3[0]
    assert p1[0] == bytes(a ^ b ^ c ^ d for a, b, c, d in zip(*data, strict=True))
    _check_recovery(data, p3, {0, 2, 5}, 50)
    _check_recovery(data, p1, {3}, 50)


def test_reconstruct_needs_enough_parity():
    data = [b"abc", b"def", b"ghi"]
    parity = gf256.encode(data, 2)
    with pytest.raises(ValueError, match="unrecoverable"):
        gf256.reconstruct([None, None, b"ghi"], [parity[0], None], 3)
    assert gf256.reconstruct(data, [None, None], 3) == data


def test_decode_matrix_is_cached():
    gf256.decode_matrix.cache_clear()
    a = gf256.decode_matrix(10, (1, 4), (0, 2))
    b = gf256.decode_matrix(10, (1, 4), (0, 2))
    assert a is b and len(a) == 2 * 10
    assert gf256.decode_matrix.cache_info().hits == 1
    with pytest.raises(ValueError):
        gf256.decode_matrix(10, (1, 4), (0,))
    with pytest.raises(ValueError):
        gf256.decode_matrix(10, (1, 10), (0, 1))
