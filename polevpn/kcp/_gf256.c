/*
 * polevpn.kcp._gf256: GF(2^8) matrix product over byte buffers, the hot loop of the FEC codec.
 *
 *     matmul(coefs, rows, srcs, dsts, length, src_offset=0, dst_offset=0) -> None
 *
 * With cols = len(srcs), rows = len(dsts), s = src_offset and d = dst_offset:
 *
 *     dsts[r][d:d+length] = XOR over c of  coefs[r * cols + c] * srcs[c][s:s+length]
 *
 * in GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d, the usual Reed-Solomon
 * field, generator 2).  A source that ends before s + length counts as zero-padded (so
 * callers never copy a short shard to pad it); a longer one is read up to there.  The
 * offsets let the FEC layer code the regions behind its shard headers without slicing a
 * memoryview per shard.  Each destination must be writable, at least d + length bytes
 * long, and must not overlap a source.  Any object with the buffer protocol works (bytes,
 * bytearray, memoryview, mmap).  The GIL is released while computing.
 *
 * Kernels: AVX2 and SSSE3 multiply 32 / 16 bytes at a time with two `pshufb` lookups into
 * 16-entry tables (products with the low and with the high nibble), XOR-ed together; the
 * scalar fallback uses a 256x256 product table.  The best kernel the CPU supports is picked
 * at import; set_simd() lowers it (tests use it to check every kernel against the others).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GF_X86 1
#include <immintrin.h>
#endif

enum { SIMD_SCALAR = 0, SIMD_SSSE3 = 1, SIMD_AVX2 = 2 };

static uint8_t gf_mul[256][256];
/* per coefficient: products with 0x00..0x0f, then with 0x00, 0x10 .. 0xf0 */
static uint8_t gf_nib[256][32] __attribute__((aligned(32)));
static int simd_best = SIMD_SCALAR;
static int simd_level = SIMD_SCALAR;

static void
init_tables(void)
{
    uint8_t exp[512], log[256];
    unsigned x = 1;
    for (int i = 0; i < 255; i++) {
        exp[i] = (uint8_t)x;
        log[x] = (uint8_t)i;
        x <<= 1;
        if (x & 0x100)
            x ^= 0x11d;
    }
    for (int i = 255; i < 512; i++)
        exp[i] = exp[i - 255];
    log[0] = 0; /* unused */
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            gf_mul[a][b] = (a && b) ? exp[log[a] + log[b]] : 0;
    for (int c = 0; c < 256; c++)
        for (int i = 0; i < 16; i++) {
            gf_nib[c][i] = gf_mul[c][i];
            gf_nib[c][16 + i] = gf_mul[c][i << 4];
        }
}

/* -- scalar kernels: also the tails of the SIMD ones */

static void
xor_scalar(uint8_t *restrict dst, const uint8_t *restrict src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dst + i, 8);
        memcpy(&b, src + i, 8);
        a ^= b;
        memcpy(dst + i, &a, 8);
    }
    for (; i < n; i++)
        dst[i] ^= src[i];
}

static void
mul_acc_scalar(uint8_t *restrict dst, const uint8_t *restrict src, size_t n, uint8_t c)
{
    const uint8_t *t = gf_mul[c];
    size_t i = 0;
    /* eight lookups gathered into one word: one load and one store of dst per 8 bytes */
    for (; i + 8 <= n; i += 8) {
        uint64_t s, d;
        memcpy(&s, src + i, 8);
        memcpy(&d, dst + i, 8);
        uint64_t p = (uint64_t)t[s & 0xff] | (uint64_t)t[(s >> 8) & 0xff] << 8 |
                     (uint64_t)t[(s >> 16) & 0xff] << 16 | (uint64_t)t[(s >> 24) & 0xff] << 24 |
                     (uint64_t)t[(s >> 32) & 0xff] << 32 | (uint64_t)t[(s >> 40) & 0xff] << 40 |
                     (uint64_t)t[(s >> 48) & 0xff] << 48 | (uint64_t)t[s >> 56] << 56;
        d ^= p;
        memcpy(dst + i, &d, 8);
    }
    for (; i < n; i++)
        dst[i] ^= t[src[i]];
}

#ifdef GF_X86

__attribute__((target("ssse3"))) static void
mul_acc_ssse3(uint8_t *restrict dst, const uint8_t *restrict src, size_t n, uint8_t c)
{
    const __m128i lo = _mm_load_si128((const __m128i *)gf_nib[c]);
    const __m128i hi = _mm_load_si128((const __m128i *)(gf_nib[c] + 16));
    const __m128i mask = _mm_set1_epi8(0x0f);
    size_t i = 0;
    /* two independent blocks per iteration: the shuffles of one hide the latency of the
     * other */
    for (; i + 32 <= n; i += 32) {
        __m128i s0 = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i s1 = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i p0 = _mm_xor_si128(
            _mm_shuffle_epi8(lo, _mm_and_si128(s0, mask)),
            _mm_shuffle_epi8(hi, _mm_and_si128(_mm_srli_epi64(s0, 4), mask)));
        __m128i p1 = _mm_xor_si128(
            _mm_shuffle_epi8(lo, _mm_and_si128(s1, mask)),
            _mm_shuffle_epi8(hi, _mm_and_si128(_mm_srli_epi64(s1, 4), mask)));
        __m128i d0 = _mm_loadu_si128((const __m128i *)(dst + i));
        __m128i d1 = _mm_loadu_si128((const __m128i *)(dst + i + 16));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(d0, p0));
        _mm_storeu_si128((__m128i *)(dst + i + 16), _mm_xor_si128(d1, p1));
    }
    for (; i + 16 <= n; i += 16) {
        __m128i s = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i p = _mm_xor_si128(
            _mm_shuffle_epi8(lo, _mm_and_si128(s, mask)),
            _mm_shuffle_epi8(hi, _mm_and_si128(_mm_srli_epi64(s, 4), mask)));
        __m128i d = _mm_loadu_si128((const __m128i *)(dst + i));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(d, p));
    }
    mul_acc_scalar(dst + i, src + i, n - i, c);
}

__attribute__((target("ssse3"))) static void
xor_ssse3(uint8_t *restrict dst, const uint8_t *restrict src, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i s = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i d = _mm_loadu_si128((const __m128i *)(dst + i));
        _mm_storeu_si128((__m128i *)(dst + i), _mm_xor_si128(d, s));
    }
    xor_scalar(dst + i, src + i, n - i);
}

__attribute__((target("avx2"))) static void
mul_acc_avx2(uint8_t *restrict dst, const uint8_t *restrict src, size_t n, uint8_t c)
{
    const __m256i lo =
        _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)gf_nib[c]));
    const __m256i hi =
        _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(gf_nib[c] + 16)));
    const __m256i mask = _mm256_set1_epi8(0x0f);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m256i s0 = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i s1 = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i p0 = _mm256_xor_si256(
            _mm256_shuffle_epi8(lo, _mm256_and_si256(s0, mask)),
            _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(s0, 4), mask)));
        __m256i p1 = _mm256_xor_si256(
            _mm256_shuffle_epi8(lo, _mm256_and_si256(s1, mask)),
            _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(s1, 4), mask)));
        __m256i d0 = _mm256_loadu_si256((const __m256i *)(dst + i));
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(dst + i + 32));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(d0, p0));
        _mm256_storeu_si256((__m256i *)(dst + i + 32), _mm256_xor_si256(d1, p1));
    }
    for (; i + 32 <= n; i += 32) {
        __m256i s = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i p = _mm256_xor_si256(
            _mm256_shuffle_epi8(lo, _mm256_and_si256(s, mask)),
            _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi64(s, 4), mask)));
        __m256i d = _mm256_loadu_si256((const __m256i *)(dst + i));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(d, p));
    }
    /* the SSSE3 kernel finishes the last 16-byte block and the scalar tail */
    mul_acc_ssse3(dst + i, src + i, n - i, c);
}

__attribute__((target("avx2"))) static void
xor_avx2(uint8_t *restrict dst, const uint8_t *restrict src, size_t n)
{
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i s = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i d = _mm256_loadu_si256((const __m256i *)(dst + i));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_xor_si256(d, s));
    }
    xor_ssse3(dst + i, src + i, n - i);
}

#endif /* GF_X86 */

typedef void (*mul_acc_fn)(uint8_t *restrict, const uint8_t *restrict, size_t, uint8_t);
typedef void (*xor_fn)(uint8_t *restrict, const uint8_t *restrict, size_t);

static void
compute(int level, const uint8_t *coefs, Py_ssize_t rows, Py_ssize_t cols, Py_buffer *srcs,
        Py_buffer *dsts, size_t length, size_t src_off, size_t dst_off)
{
    mul_acc_fn mul_acc = mul_acc_scalar;
    xor_fn xor_acc = xor_scalar;
#ifdef GF_X86
    if (level >= SIMD_AVX2) {
        mul_acc = mul_acc_avx2;
        xor_acc = xor_avx2;
    }
    else if (level >= SIMD_SSSE3) {
        mul_acc = mul_acc_ssse3;
        xor_acc = xor_ssse3;
    }
#else
    (void)level;
#endif
    for (Py_ssize_t r = 0; r < rows; r++) {
        uint8_t *dst = (uint8_t *)dsts[r].buf + dst_off;
        const uint8_t *row = coefs + r * cols;
        memset(dst, 0, length);
        for (Py_ssize_t c = 0; c < cols; c++) {
            uint8_t k = row[c];
            size_t have = (size_t)srcs[c].len;
            size_t n = have <= src_off ? 0 : have - src_off;
            if (n > length)
                n = length;
            if (k == 0 || n == 0)
                continue;
            const uint8_t *src = (const uint8_t *)srcs[c].buf + src_off;
            if (k == 1)
                xor_acc(dst, src, n);
            else
                mul_acc(dst, src, n, k);
        }
    }
}

static void
release_all(Py_buffer *views, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

PyDoc_STRVAR(matmul_doc,
"matmul(coefs, rows, srcs, dsts, length, src_offset=0, dst_offset=0, /) -> None\n"
"\n"
"dsts[r][d:d+length] = XOR_c coefs[r*len(srcs)+c] * srcs[c][s:s+length] over\n"
"GF(2^8)/0x11d, with s = src_offset and d = dst_offset. A source ending before s+length\n"
"counts as zero-padded; destinations must be writable, at least d+length bytes, and must\n"
"not overlap a source. rows must equal len(dsts).");

static PyObject *
gf_matmul(PyObject *self, PyObject *args)
{
    Py_buffer coefs;
    Py_ssize_t rows, length, src_off = 0, dst_off = 0;
    PyObject *src_obj, *dst_obj;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nOOn|nn:matmul", &coefs, &rows, &src_obj, &dst_obj, &length,
                          &src_off, &dst_off))
        return NULL;

    PyObject *src_seq = NULL, *dst_seq = NULL, *result = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t cols = 0, nviews = 0;

    if (rows < 0 || length < 0 || src_off < 0 || dst_off < 0 ||
        dst_off > PY_SSIZE_T_MAX - length) {
        PyErr_SetString(PyExc_ValueError, "rows, length and offsets must not be negative");
        goto done;
    }
    src_seq = PySequence_Fast(src_obj, "srcs must be a sequence of buffers");
    if (src_seq == NULL)
        goto done;
    dst_seq = PySequence_Fast(dst_obj, "dsts must be a sequence of writable buffers");
    if (dst_seq == NULL)
        goto done;
    cols = PySequence_Fast_GET_SIZE(src_seq);
    if (PySequence_Fast_GET_SIZE(dst_seq) != rows) {
        PyErr_Format(PyExc_ValueError, "%zd destinations for %zd rows",
                     PySequence_Fast_GET_SIZE(dst_seq), rows);
        goto done;
    }
    if (rows > 0 && cols > PY_SSIZE_T_MAX / rows) {
        PyErr_SetString(PyExc_OverflowError, "matrix too large");
        goto done;
    }
    if (coefs.len < rows * cols) {
        PyErr_Format(PyExc_ValueError, "%zd coefficients for a %zdx%zd matrix", coefs.len,
                     rows, cols);
        goto done;
    }
    views = PyMem_Calloc((size_t)(rows + cols) + 1, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t c = 0; c < cols; c++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(src_seq, c), &views[nviews],
                               PyBUF_SIMPLE) < 0)
            goto done;
        nviews++;
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        Py_buffer *v = &views[nviews];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(dst_seq, r), v, PyBUF_WRITABLE) < 0)
            goto done;
        nviews++;
        if (v->len < dst_off + length) {
            PyErr_Format(PyExc_ValueError, "destination %zd is %zd bytes, shorter than %zd",
                         r, v->len, dst_off + length);
            goto done;
        }
    }

    {
        const uint8_t *cbuf = coefs.buf;
        Py_buffer *src_views = views, *dst_views = views + cols;
        int level = simd_level;
        Py_BEGIN_ALLOW_THREADS
        compute(level, cbuf, rows, cols, src_views, dst_views, (size_t)length, (size_t)src_off,
                (size_t)dst_off);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);

done:
    if (views != NULL) {
        release_all(views, nviews);
        PyMem_Free(views);
    }
    Py_XDECREF(src_seq);
    Py_XDECREF(dst_seq);
    PyBuffer_Release(&coefs);
    return result;
}

PyDoc_STRVAR(set_simd_doc,
"set_simd(level, /) -> int\n"
"\n"
"Use kernel `level` (0 scalar, 1 SSSE3, 2 AVX2), capped at what this CPU supports;\n"
"returns the level now in use. For tests and benchmarks.");

static PyObject *
gf_set_simd(PyObject *self, PyObject *arg)
{
    (void)self;
    long level = PyLong_AsLong(arg);
    if (level == -1 && PyErr_Occurred())
        return NULL;
    if (level < 0) {
        PyErr_SetString(PyExc_ValueError, "level must not be negative");
        return NULL;
    }
    simd_level = level < simd_best ? (int)level : simd_best;
    return PyLong_FromLong(simd_level);
}

PyDoc_STRVAR(get_simd_doc, "get_simd() -> int\n\nThe kernel in use: 0 scalar, 1 SSSE3, 2 AVX2.");

static PyObject *
gf_get_simd(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(simd_level);
}

static PyMethodDef gf_methods[] = {
    {"matmul", gf_matmul, METH_VARARGS, matmul_doc},
    {"set_simd", gf_set_simd, METH_O, set_simd_doc},
    {"get_simd", gf_get_simd, METH_NOARGS, get_simd_doc},
    {NULL, NULL, 0, NULL},
};

static int
gf_exec(PyObject *m)
{
    if (PyModule_AddIntConstant(m, "SCALAR", SIMD_SCALAR) < 0 ||
        PyModule_AddIntConstant(m, "SSSE3", SIMD_SSSE3) < 0 ||
        PyModule_AddIntConstant(m, "AVX2", SIMD_AVX2) < 0 ||
        PyModule_AddIntConstant(m, "SIMD_BEST", simd_best) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot gf_slots[] = {
    {Py_mod_exec, gf_exec},
    {0, NULL},
};

static struct PyModuleDef gf_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "polevpn.kcp._gf256",
    .m_doc = "GF(2^8) matrix product over buffers (SSSE3/AVX2 pshufb kernels, scalar fallback).",
    .m_size = 0,
    .m_methods = gf_methods,
    .m_slots = gf_slots,
};

PyMODINIT_FUNC
PyInit__gf256(void)
{
    static int ready = 0;
    if (!ready) {
        init_tables();
#ifdef GF_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2"))
            simd_best = SIMD_AVX2;
        else if (__builtin_cpu_supports("ssse3"))
            simd_best = SIMD_SSSE3;
#endif
        simd_level = simd_best;
        ready = 1;
    }
    return PyModuleDef_Init(&gf_module);
}
