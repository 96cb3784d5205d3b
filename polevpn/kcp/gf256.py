"""GF(2^8) arithmetic and a systematic Reed-Solomon erasure code over byte buffers.

Field: polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator 2, as in most RS codecs.

Code: a group of ``k`` data shards gets ``m`` parity shards; parity shard ``j`` is
``XOR_i P[j][i] * data[i]``, with the data shards zero-padded to a common length. ``P`` is a
Cauchy matrix, ``1 / (x_j + y_i)`` with ``y_i = i`` and ``x_j = 128 + j``, whose columns and
rows are then scaled so that row 0 and column 0 are all ones (parity 0 is the plain XOR of
the data, and one multiply per row is a XOR). Every square submatrix of a Cauchy matrix is
invertible and scaling rows or columns by non-zero constants keeps it so, hence
``[I; P]`` is MDS: any ``k`` of the ``k + m`` shards give back the data. The coefficients
depend only on ``(j, i)``, never on ``k`` or ``m``, so a group closed early (fewer data
shards than configured) simply uses the first columns, and groups of one stream may carry
different numbers of parity shards. Limits: ``k <= 128``, ``m <= 128``.

The byte crunching is :func:`matmul` from the C extension ``polevpn.kcp._gf256`` (SSSE3/AVX2
``pshufb`` kernels, scalar fallback): ``matmul(coefs, rows, srcs, dsts, length,
src_offset=0, dst_offset=0)`` computes ``dsts[r][d:d+length] = XOR_c coefs[r*cols+c] *
srcs[c][s:s+length]``, a source ending early counting as zero-padded. Without a compiler
the package still works with :func:`py_matmul`, built on ``bytes.translate`` and
big-integer XOR, at a fraction of the speed. Decoding inverts a small matrix in Python;
the results are cached per erasure pattern.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

try:
    from polevpn.kcp import _gf256
except ImportError:  # built without a C compiler: pure-Python fallback
    _gf256 = None  # type: ignore[assignment]

POLY = 0x11D
K_MAX = 128  # data shards per group (the y_i of the Cauchy matrix)
M_MAX = 128  # parity shards per group (the x_j)

Buffer = bytes | bytearray | memoryview


class WritableBuffer(Protocol):
    def __len__(self) -> int: ...
    def __setitem__(self, key: slice, value: bytes) -> None: ...


def _tables() -> tuple[bytes, bytes]:
    exp = bytearray(512)
    log = bytearray(256)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[255:510] = exp[0:255]
    return bytes(exp), bytes(log)


EXP, LOG = _tables()


def mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return EXP[LOG[a] + LOG[b]]


def inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return EXP[255 - LOG[a]]


def div(a: int, b: int) -> int:
    return mul(a, inv(b))


def _cauchy(j: int, i: int) -> int:
    return inv((M_MAX + j) ^ i)


def _build_parity_coefficients() -> list[bytes]:
    # scale column i by 1/C[0][i] (row 0 becomes ones), then row j by 1/C'[j][0]
    col = [inv(_cauchy(0, i)) for i in range(K_MAX)]
    rows = []
    for j in range(M_MAX):
        row = [mul(_cauchy(j, i), col[i]) for i in range(K_MAX)]
        r0 = inv(row[0])
        rows.append(bytes(mul(c, r0) for c in row))
    return rows


_PARITY = _build_parity_coefficients()


def coefficient(j: int, i: int) -> int:
    """Coefficient of data shard ``i`` in parity shard ``j``."""
    return _PARITY[j][i]


def _check_shape(k: int, m: int) -> None:
    if not 1 <= k <= K_MAX:
        raise ValueError(f"{k} data shards: must be 1..{K_MAX}")
    if not 0 <= m <= M_MAX:
        raise ValueError(f"{m} parity shards: must be 0..{M_MAX}")


@lru_cache(maxsize=512)
def parity_matrix(k: int, m: int) -> bytes:
    """The ``m x k`` encoding coefficients, row-major, as :func:`matmul` takes them."""
    _check_shape(k, m)
    return b"".join(_PARITY[j][:k] for j in range(m))


def invert_matrix(matrix: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inverse of a square matrix over GF(256) (Gauss-Jordan); ValueError if singular."""
    n = len(matrix)
    a = [list(row) + [int(i == r) for i in range(n)] for r, row in enumerate(matrix)]
    if any(len(row) != 2 * n for row in a):
        raise ValueError("matrix is not square")
    for c in range(n):
        pivot = next((r for r in range(c, n) if a[r][c]), None)
        if pivot is None:
            raise ValueError("matrix is singular")
        a[c], a[pivot] = a[pivot], a[c]
        row = a[c]
        log_p = 255 - LOG[row[c]]
        a[c] = row = [EXP[LOG[v] + log_p] if v else 0 for v in row]
        for r in range(n):
            f = a[r][c]
            if r != c and f:
                log_f = LOG[f]
                a[r] = [v ^ EXP[LOG[p] + log_f] if p else v for v, p in zip(a[r], row, strict=True)]
    return [row[n:] for row in a]


@lru_cache(maxsize=256)
def decode_matrix(k: int, lost: tuple[int, ...], rows: tuple[int, ...]) -> bytes:
    """Coefficients that rebuild the ``lost`` data shards in one :func:`matmul`.

    The sources are, in this order, the parity shards ``rows`` (as many as ``lost``) and
    then the data shards still present, ascending. With ``A`` the parity coefficients of
    the lost columns and ``B`` those of the present ones, ``lost = A^-1 (parity + B data)``,
    so the matrix is ``[A^-1 | A^-1 B]``. Cached: the same erasure patterns recur.
    """
    e = len(lost)
    if e != len(rows) or e == 0:
        raise ValueError("need as many parity rows as lost shards, at least one")
    _check_shape(k, max(rows) + 1)
    lost_set = set(lost)
    if len(lost_set) != e or min(lost) < 0 or max(lost) >= k:
        raise ValueError(f"bad lost shard indices {lost} for k={k}")
    present = [i for i in range(k) if i not in lost_set]
    a_inv = invert_matrix([[_PARITY[r][i] for i in lost] for r in rows])
    b = [[_PARITY[r][i] for i in present] for r in rows]
    out = bytearray()
    for row in a_inv:
        out += bytes(row)
        for col in range(len(present)):
            acc = 0
            for t in range(e):
                acc ^= mul(row[t], b[t][col])
            out.append(acc)
    return bytes(out)


# -- the matrix product


@lru_cache(maxsize=256)
def _translate_table(c: int) -> bytes:
    return bytes(mul(c, x) for x in range(256))


def py_matmul(
    coefs: Buffer,
    rows: int,
    srcs: Sequence[Buffer],
    dsts: Sequence[WritableBuffer],
    length: int,
    src_offset: int = 0,
    dst_offset: int = 0,
) -> None:
    """Pure-Python :func:`matmul` (same contract), for machines without the C extension.

    ``dsts[r][d:d+length] = XOR_c coefs[r*len(srcs)+c] * srcs[c][s:s+length]`` with
    ``s = src_offset``, ``d = dst_offset``; a source ending early counts as zero-padded.
    """
    cols = len(srcs)
    if len(dsts) != rows or len(coefs) < rows * cols or min(length, src_offset, dst_offset) < 0:
        raise ValueError("matmul: shapes do not match")
    if any(len(d) < dst_offset + length for d in dsts):
        raise ValueError("matmul: a destination is too short")
    end = src_offset + length
    padded = [bytes(s[src_offset:end]).ljust(length, b"\0") for s in srcs]
    # little-endian integers make the XOR of whole shards one big-int operation
    ints = [int.from_bytes(p, "little") for p in padded]
    for r in range(rows):
        acc = 0
        for c in range(cols):
            k = coefs[r * cols + c]
            if k == 1:
                acc ^= ints[c]
            elif k:
                acc ^= int.from_bytes(padded[c].translate(_translate_table(k)), "little")
        dsts[r][dst_offset : dst_offset + length] = acc.to_bytes(length, "little")


if _gf256 is not None:
    matmul = _gf256.matmul
    HAVE_C = True
else:
    matmul = py_matmul
    HAVE_C = False

SCALAR, SSSE3, AVX2 = 0, 1, 2
KERNELS = {SCALAR: "scalar", SSSE3: "ssse3", AVX2: "avx2"}


def simd_levels() -> list[int]:
    """Kernels this machine can run (empty without the C extension)."""
    return list(range(_gf256.SIMD_BEST + 1)) if _gf256 is not None else []


def set_simd(level: int) -> int:
    """Force a kernel (tests, benchmarks); capped at the best the CPU has. Returns it."""
    return _gf256.set_simd(level) if _gf256 is not None else -1


def get_simd() -> int:
    """Kernel in use: 0 scalar, 1 SSSE3, 2 AVX2; -1 for the pure-Python fallback."""
    return _gf256.get_simd() if _gf256 is not None else -1


# -- encode / reconstruct


def encode_into(data: Sequence[Buffer], parity: Sequence[WritableBuffer], length: int) -> None:
    """Write ``len(parity)`` parity shards of ``length`` bytes for ``data`` into ``parity``."""
    matmul(parity_matrix(len(data), len(parity)), len(parity), data, parity, length)


def encode(data: Sequence[Buffer], m: int, length: int | None = None) -> list[bytearray]:
    """``m`` parity shards for the data shards (shorter ones count as zero-padded)."""
    if length is None:
        length = max(map(len, data))
    out = [bytearray(length) for _ in range(m)]
    encode_into(data, out, length)
    return out


def reconstruct(
    data: Sequence[Buffer | None],
    parity: Sequence[Buffer | None],
    length: int,
) -> list[Buffer]:
    """The ``k = len(data)`` data shards, the missing (None) ones rebuilt from parity.

    ``parity[j]`` is parity shard ``j`` or None; ``length`` is the coded length (that of
    the parity shards). Present data shards are returned as given (not padded); rebuilt
    ones are new ``length``-byte bytearrays. ValueError when fewer than k shards remain.
    """
    k = len(data)
    lost = tuple(i for i, d in enumerate(data) if d is None)
    if not lost:
        return list(data)  # type: ignore[arg-type]
    rows = tuple(j for j, p in enumerate(parity) if p is not None)[: len(lost)]
    if len(rows) < len(lost):
        raise ValueError(
            f"{len(lost)} data shards lost, only {len(rows)} parity shards: unrecoverable"
        )
    srcs: list[Buffer] = [parity[j] for j in rows]  # type: ignore[misc]
    srcs += [d for d in data if d is not None]
    out = [bytearray(length) for _ in lost]
    matmul(decode_matrix(k, lost, rows), len(lost), srcs, out, length)
    result: list[Buffer] = list(data)  # type: ignore[arg-type]
    for i, buf in zip(lost, out, strict=True):
        result[i] = buf
    return result
