/*
 * polevpn.kcp._ikcp: KCP (skywind3000/kcp, vendored in vendor/kcp/, MIT) for kcp_link and
 * kcp_pool, as one small CPython type. Replaces the `kcp` PyPI package, whose control block
 * polevpn had to reach through ctypes for statistics and to free it.
 *
 *   Kcp(conv=0)                 a control block (ikcp_create); freed with the object
 *   .reset(conv)                release the control block with all its segments now and
 *                               start a fresh one (settings back to ikcp's defaults)
 *   .set_output(callable|None)  called with one bytes object per KCP output buffer
 *   .send(buf) -> int           ikcp_send (one message); ValueError when ikcp refuses
 *   .write(buf) -> int          messages of at most mss bytes each, as kcp-go writes
 *   .write_frames(buf, light=False, urgent=False) -> (n, aligned)  whole frames, packed
 *                               into unordered messages (light: only light frames so, see
 *                               frame_light; urgent: small light ones ahead of the queue,
 *                               see frame_urgent)
 *   .set_unordered(bool)        deliver unordered messages ahead of a hole (recv_all)
 *   .set_urgent_dup(ms)         urgent segments go again ms after their first send (0: no
 *                               copy; -1, the default: no copy, and paced data is numbered
 *                               at once, as KCP does)
 *   .input(buf) -> int          ikcp_input's result (< 0: not a valid segment for us)
 *   .update(ms) .check(ms) .flush()
 *   .recv() -> bytes|None       one message;  .recv_all() -> bytes: every message joined
 *   .peeksize() .waitsnd() .setmtu(mtu) .wndsize(snd, rcv) .nodelay(nd, iv, resend, nc)
 *   .set_rcv_wnd(n)             the receive window as given (ikcp_wndsize keeps >= 128;
 *                               a smaller one is for a peer not yet authenticated)
 *   .ask_tell()                 announce the receive window with the next flush
 *   .buffered() -> (snd_queue, snd_buf, rcv_buf, rcv_queue) payload bytes (walks the lists)
 *   read-only attributes: conv mtu mss state snd_una snd_nxt rcv_nxt srtt rttval rto minrto
 *       snd_wnd rcv_wnd rmt_wnd cwnd probe interval xmit nrcv_buf nsnd_buf nrcv_que
 *       nsnd_que nodelay_mode dead_link ackcount ackblock
 *       snd_bytes (payload bytes queued or unacknowledged)
 *   module: allocated() -> (bytes, blocks) that every control block holds through ikcp's
 *       allocator right now (tests use it to see that a closed session kept nothing)
 *
 * The output callback may raise: the exception is kept, further output of that call is
 * dropped, and the method that flushed raises it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#include "vendor/kcp/ikcp.c"

/* -- allocator with accounting: ikcp's hook is process-wide (for this module) */

typedef union {
    size_t size;
    max_align_t align;
} alloc_head;

static size_t alloc_bytes = 0;
static size_t alloc_blocks = 0;

static void *counted_malloc(size_t size)
{
    alloc_head *h = (alloc_head *)malloc(sizeof(alloc_head) + size);
    if (h == NULL)
        return NULL;
    h->size = size;
    alloc_bytes += size;
    alloc_blocks++;
    return h + 1;
}

static void counted_free(void *p)
{
    if (p == NULL)
        return;
    alloc_head *h = (alloc_head *)p - 1;
    alloc_bytes -= h->size;
    alloc_blocks--;
    free(h);
}

/* -- the type */

typedef struct {
    PyObject_HEAD
    ikcpcb *kcp;
    PyObject *output;
    int failed; /* the output callback raised during the current call */
} KcpObject;

static int kcp_output(const char *buf, int len, ikcpcb *kcp, void *user)
{
    KcpObject *self = (KcpObject *)user;
    (void)kcp;
    if (self->failed || self->output == NULL)
        return 0;
    PyObject *data = PyBytes_FromStringAndSize(buf, len);
    if (data == NULL) {
        self->failed = 1;
        return 0;
    }
    PyObject *r = PyObject_CallOneArg(self->output, data);
    Py_DECREF(data);
    if (r == NULL)
        self->failed = 1;
    else
        Py_DECREF(r);
    return 0;
}

/* after an ikcp call that may have produced output: NULL if the callback raised */
static PyObject *done(KcpObject *self, PyObject *result)
{
    if (self->failed) {
        self->failed = 0;
        Py_XDECREF(result);
        return NULL;
    }
    return result;
}

static int fresh(KcpObject *self, IUINT32 conv)
{
    ikcpcb *kcp = ikcp_create(conv, self);
    if (kcp == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    kcp->output = kcp_output;
    self->kcp = kcp;
    return 0;
}

static PyObject *Kcp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"conv", NULL};
    unsigned int conv = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|I", kwlist, &conv))
        return NULL;
    KcpObject *self = (KcpObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->output = NULL;
    self->failed = 0;
    if (fresh(self, conv) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Kcp_traverse(KcpObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->output);
    return 0;
}

static int Kcp_clear(KcpObject *self)
{
    Py_CLEAR(self->output);
    return 0;
}

static void Kcp_dealloc(KcpObject *self)
{
    PyObject_GC_UnTrack(self);
    Kcp_clear(self);
    if (self->kcp != NULL) {
        ikcp_release(self->kcp);
        self->kcp = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Kcp_reset(KcpObject *self, PyObject *arg)
{
    unsigned long conv = PyLong_AsUnsignedLong(arg);
    if (conv == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    ikcpcb *old = self->kcp;
    if (fresh(self, (IUINT32)conv) < 0)
        return NULL;
    ikcp_release(old);
    Py_RETURN_NONE;
}

static PyObject *Kcp_set_output(KcpObject *self, PyObject *arg)
{
    if (arg == Py_None) {
        Py_CLEAR(self->output);
        Py_RETURN_NONE;
    }
    if (!PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "output must be callable or None");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(self->output, arg);
    Py_RETURN_NONE;
}

static PyObject *Kcp_send(KcpObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b.len > INT_MAX) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "message too long");
        return NULL;
    }
    int rc = ikcp_send(self->kcp, (const char *)b.buf, (int)b.len);
    PyBuffer_Release(&b);
    if (rc < 0) {
        PyErr_Format(PyExc_ValueError, "ikcp_send refused the message (%d)", rc);
        return NULL;
    }
    return PyLong_FromLong(rc);
}

static PyObject *Kcp_write(KcpObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *p = (const char *)b.buf;
    Py_ssize_t left = b.len;
    Py_ssize_t mss = (Py_ssize_t)self->kcp->mss;
    long n = 0;
    while (left > 0) {
        int size = (int)(left < mss ? left : mss);
        if (ikcp_send(self->kcp, p, size) < 0) {
            PyBuffer_Release(&b);
            return PyErr_NoMemory();
        }
        p += size;
        left -= size;
        n++;
    }
    PyBuffer_Release(&b);
    return PyLong_FromLong(n);
}

static PyObject *Kcp_input(KcpObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = ikcp_input(self->kcp, (const char *)b.buf, (long)b.len);
    PyBuffer_Release(&b);
    /* input itself never outputs, but keep the rule uniform */
    return done(self, PyLong_FromLong(rc));
}

static PyObject *Kcp_update(KcpObject *self, PyObject *arg)
{
    unsigned long ms = PyLong_AsUnsignedLongMask(arg);
    if (ms == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    ikcp_update(self->kcp, (IUINT32)ms);
    Py_INCREF(Py_None);
    return done(self, Py_None);
}

static PyObject *Kcp_check(KcpObject *self, PyObject *arg)
{
    unsigned long ms = PyLong_AsUnsignedLongMask(arg);
    if (ms == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLong(ikcp_check(self->kcp, (IUINT32)ms));
}

static PyObject *Kcp_flush(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    ikcp_flush(self->kcp);
    Py_INCREF(Py_None);
    return done(self, Py_None);
}

static PyObject *Kcp_peeksize(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(ikcp_peeksize(self->kcp));
}

static PyObject *Kcp_recv(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    int n = ikcp_peeksize(self->kcp);
    if (n < 0)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    int rc = ikcp_recv(self->kcp, PyBytes_AS_STRING(out), n);
    if (rc != n) {
        Py_DECREF(out);
        PyErr_Format(PyExc_RuntimeError, "ikcp_recv returned %d for %d bytes", rc, n);
        return NULL;
    }
    return out;
}

static PyObject *Kcp_recv_all(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    ikcpcb *k = self->kcp;
    int n = ikcp_peeksize(k);
    Py_ssize_t early = k->early_len;
    if (n < 0 && early == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    Py_ssize_t cap = early + (n > 0 ? n : 0), off = 0;
    if (cap < 65536)
        cap = 65536;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL)
        return NULL;
    if (early) {
        /* what arrived out of order (whole frames) goes first: it came first */
        memcpy(PyBytes_AS_STRING(out), k->early, (size_t)early);
        off = early;
        k->early_len = 0;
        if (k->early_cap > (1 << 18)) {  /* a burst's buffer is not kept for good */
            ikcp_free(k->early);
            k->early = NULL;
            k->early_cap = 0;
        }
    }
    while (n >= 0) {
        if (off + n > cap) {
            while (off + n > cap)
                cap *= 2;
            if (_PyBytes_Resize(&out, cap) < 0)
                return NULL;
        }
        int rc = ikcp_recv(self->kcp, PyBytes_AS_STRING(out) + off, n);
        if (rc != n) {
            Py_DECREF(out);
            PyErr_Format(PyExc_RuntimeError, "ikcp_recv returned %d for %d bytes", rc, n);
            return NULL;
        }
        off += n;
        n = ikcp_peeksize(self->kcp);
    }
    if (off != cap && _PyBytes_Resize(&out, off) < 0)
        return NULL;
    return out;
}

static PyObject *Kcp_waitsnd(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(ikcp_waitsnd(self->kcp));
}

static PyObject *Kcp_setmtu(KcpObject *self, PyObject *arg)
{
    long mtu = PyLong_AsLong(arg);
    if (mtu == -1 && PyErr_Occurred())
        return NULL;
    if (mtu < 50 || mtu > 65535 || ikcp_setmtu(self->kcp, (int)mtu) < 0) {
        PyErr_Format(PyExc_ValueError, "bad KCP MTU %ld", mtu);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Kcp_wndsize(KcpObject *self, PyObject *args)
{
    int snd, rcv;
    if (!PyArg_ParseTuple(args, "ii", &snd, &rcv))
        return NULL;
    ikcp_wndsize(self->kcp, snd, rcv);
    Py_RETURN_NONE;
}

static PyObject *Kcp_set_rcv_wnd(KcpObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 65535) {
        PyErr_Format(PyExc_ValueError, "bad receive window %ld", n);
        return NULL;
    }
    self->kcp->rcv_wnd = (IUINT32)n;
    Py_RETURN_NONE;
}

static PyObject *Kcp_nodelay(KcpObject *self, PyObject *args)
{
    int nodelay, interval, resend, nc;
    if (!PyArg_ParseTuple(args, "pii" "p", &nodelay, &interval, &resend, &nc))
        return NULL;
    ikcp_nodelay(self->kcp, nodelay, interval, resend, nc);
    Py_RETURN_NONE;
}

static PyObject *Kcp_ask_tell(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    self->kcp->probe |= IKCP_ASK_TELL;
    Py_RETURN_NONE;
}

/* -- congestion control hooks (kcp->rate, see ikcp.h) */

static int take_i64(PyObject *arg, long long *out)
{
    *out = PyLong_AsLongLong(arg);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *Kcp_clock(KcpObject *self, PyObject *arg)
{
    long long us;
    if (take_i64(arg, &us) < 0)
        return NULL;
    self->kcp->rate.now_us = us;
    Py_RETURN_NONE;
}

static PyObject *Kcp_tick(KcpObject *self, PyObject *arg)
{
    long long us;
    if (take_i64(arg, &us) < 0)
        return NULL;
    self->kcp->rate.now_us = us;
    ikcp_update(self->kcp, (IUINT32)(unsigned long long)(us / 1000));
    Py_INCREF(Py_None);
    return done(self, Py_None);
}

static PyObject *Kcp_set_pacing(KcpObject *self, PyObject *args)
{
    long long rate, burst;
    if (!PyArg_ParseTuple(args, "LL", &rate, &burst))
        return NULL;
    if (rate < 0 || burst < 0) {
        PyErr_SetString(PyExc_ValueError, "pacing rate and burst must not be negative");
        return NULL;
    }
    struct IKCPRATE *r = &self->kcp->rate;
    if (r->pace_rate == 0 && rate > 0) {
        /* pacing starts: a full bucket, counted from now */
        r->pace_tokens = burst;
        r->pace_ts = r->now_us;
    }
    r->pace_rate = rate;
    r->pace_burst = burst;
    if (r->pace_tokens > burst)
        r->pace_tokens = burst;
    Py_RETURN_NONE;
}

static PyObject *Kcp_set_cwnd_bytes(KcpObject *self, PyObject *arg)
{
    long long n;
    if (take_i64(arg, &n) < 0)
        return NULL;
    if (n < 0 || n > 0x7fffffffLL) {
        PyErr_Format(PyExc_ValueError, "bad in-flight cap %lld", n);
        return NULL;
    }
    self->kcp->rate.cwnd_bytes = (IUINT32)n;
    Py_RETURN_NONE;
}

static PyObject *Kcp_pace_debit(KcpObject *self, PyObject *arg)
{
    long long n;
    if (take_i64(arg, &n) < 0)
        return NULL;
    if (self->kcp->rate.pace_rate > 0)
        self->kcp->rate.pace_tokens -= n;
    Py_RETURN_NONE;
}

/* Frames of the PoleVPN stream (u16 length with the header, u16 command, u32 seq; a
   SUPER_IPDATA header of length 8 is followed by seq bytes) packed into messages of
   whole frames: as many as fit one MSS go in one unordered message (the peer may deliver
   it out of order), a longer frame goes alone as an unordered message of several
   fragments. Bytes that do not parse as whole frames go as plain messages, in order.
   With `light`, only light frames (frame_light) go unordered; the others go as plain
   messages, in order, each run of one kind packed as above. */
#define WIRE_HEADER 8
#define WIRE_SUPER 16
#define WIRE_S2C_IPDATA 2
#define WIRE_C2S_IPDATA 3

/* An IP packet that nothing gains from having in order behind a lost segment: ICMP,
   ICMPv6, UDP (its users expect reordering and loss: a call, DNS, a game, QUIC) and TCP
   segments without payload (ACKs, SYN, FIN: a late one costs a round trip of the flow's
   clock, an early one nothing, since TCP takes the newest ACK). TCP segments with payload
   stay in order: a TCP receiver takes a segment a round trip late for a lost one, and
   its sender's congestion control (cubic, reno) halves its window for it. Anything not
   understood stays in order. */
static int ip_light(const unsigned char *ip, Py_ssize_t n)
{
    if (n >= 20 && (ip[0] >> 4) == 4) {
        Py_ssize_t ihl = (Py_ssize_t)(ip[0] & 15) * 4;
        Py_ssize_t total = ((Py_ssize_t)ip[2] << 8) | ip[3];
        unsigned proto = ip[9];
        int first = ((((unsigned)ip[6] & 0x1F) << 8) | ip[7]) == 0;
        if (proto == 1 || proto == 17)
            return 1;
        if (proto == 6 && first && ihl >= 20 && total <= n && ihl + 20 <= total) {
            Py_ssize_t doff = (Py_ssize_t)(ip[ihl + 12] >> 4) * 4;
            return doff >= 20 && total - ihl == doff;
        }
        return 0;
    }
    if (n >= 40 && (ip[0] >> 4) == 6) {
        Py_ssize_t plen = ((Py_ssize_t)ip[4] << 8) | ip[5];
        unsigned nh = ip[6];
        if (nh == 58 || nh == 17)
            return 1;
        if (nh == 6 && plen >= 20 && 40 + plen <= n) {
            Py_ssize_t doff = (Py_ssize_t)(ip[40 + 12] >> 4) * 4;
            return doff >= 20 && plen == doff;
        }
    }
    return 0;
}

static int frame_light(const unsigned char *f, Py_ssize_t flen)
{
    unsigned cmd = ((unsigned)f[2] << 8) | f[3];
    if (cmd != WIRE_S2C_IPDATA && cmd != WIRE_C2S_IPDATA)
        return 0;  /* a super-packet is TCP bulk; control frames keep their order */
    return ip_light(f + WIRE_HEADER, flen - WIRE_HEADER);
}

/* An urgent frame: a light one whose IP packet is at most this long (a ping, a TCP ACK
   with SACK blocks, a call's audio, a DNS query), not a bulk UDP flow's full-size
   packets; see ikcp_send_urgent */
#define URGENT_IP_MAX 320

static int frame_urgent(const unsigned char *f, Py_ssize_t flen)
{
    return flen - WIRE_HEADER <= URGENT_IP_MAX && frame_light(f, flen);
}

/* urgent_packet(ip) -> bool: an IP packet that write_frames(urgent=True) sends urgent */
static PyObject *urgent_packet(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer b;
    int yes;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    yes = b.len <= URGENT_IP_MAX && ip_light((const unsigned char *)b.buf, b.len);
    PyBuffer_Release(&b);
    return PyBool_FromLong(yes);
}

static int send_plain(ikcpcb *kcp, const char *p, Py_ssize_t len, Py_ssize_t mss, long *n)
{
    while (len > 0) {
        int size = (int)(len < mss ? len : mss);
        if (ikcp_send(kcp, p, size) < 0)
            return -1;
        p += size;
        len -= size;
        (*n)++;
    }
    return 0;
}

/* what a run of frames goes as */
#define KIND_PLAIN 0
#define KIND_UNORDERED 1
#define KIND_URGENT 2

/* one message of whole frames: urgent (unordered, ahead of what waits), unordered, or
   plain (KCP fragments it if it is longer than the MSS, and it goes up in order) */
static int send_chunk(ikcpcb *kcp, const unsigned char *p, Py_ssize_t len, int kind,
                      long *n)
{
    (*n)++;
    if (kind == KIND_URGENT)
        return ikcp_send_urgent(kcp, (const char *)p, (int)len) < 0 ? -1 : 0;
    if (kind == KIND_UNORDERED)
        return ikcp_send_unordered(kcp, (const char *)p, (int)len) < 0 ? -1 : 0;
    return ikcp_send(kcp, (const char *)p, (int)len) < 0 ? -1 : 0;
}

static PyObject *Kcp_write_frames(KcpObject *self, PyObject *args)
{
    Py_buffer b;
    int light = 0, urgent = 0;
    if (!PyArg_ParseTuple(args, "y*|pp:write_frames", &b, &light, &urgent))
        return NULL;
    ikcpcb *kcp = self->kcp;
    const unsigned char *p = (const unsigned char *)b.buf;
    const unsigned char *chunk = p;
    Py_ssize_t left = b.len, chunk_len = 0, mss = (Py_ssize_t)kcp->mss;
    long n = 0;
    int aligned = 1, rc = 0, chunk_kind = KIND_UNORDERED;
    while (left > 0 && rc == 0) {
        Py_ssize_t flen;
        unsigned len, cmd;
        int kind;
        if (left < WIRE_HEADER) {
            aligned = 0;
            break;
        }
        len = ((unsigned)p[0] << 8) | p[1];
        cmd = ((unsigned)p[2] << 8) | p[3];
        if (len < WIRE_HEADER) {
            aligned = 0;
            break;
        }
        flen = len;
        if (cmd == WIRE_SUPER && len == WIRE_HEADER)
            flen = WIRE_HEADER + (Py_ssize_t)(((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) |
                                              ((uint32_t)p[6] << 8) | p[7]);
        if (flen > left) {
            aligned = 0;
            break;
        }
        if (urgent && frame_urgent(p, flen))
            kind = KIND_URGENT;
        else
            kind = !light || frame_light(p, flen) ? KIND_UNORDERED : KIND_PLAIN;
        if (chunk_len && (kind != chunk_kind || chunk_len + flen > mss)) {
            rc = send_chunk(kcp, chunk, chunk_len, chunk_kind, &n);
            chunk_len = 0;
        }
        if (rc == 0 && flen > mss) {
            rc = send_chunk(kcp, p, flen, kind, &n);
        } else if (rc == 0) {
            if (!chunk_len) {
                chunk = p;
                chunk_kind = kind;
            }
            chunk_len += flen;
        }
        p += flen;
        left -= flen;
    }
    if (rc == 0 && chunk_len)
        rc = send_chunk(kcp, chunk, chunk_len, chunk_kind, &n);
    if (rc == 0 && left > 0)
        rc = send_plain(kcp, (const char *)p, left, mss, &n);
    PyBuffer_Release(&b);
    if (rc < 0)
        return PyErr_NoMemory();
    return Py_BuildValue("(lO)", n, aligned ? Py_True : Py_False);
}

static PyObject *Kcp_set_unordered(KcpObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    self->kcp->unordered = on;
    Py_RETURN_NONE;
}

static PyObject *Kcp_set_repeat_acks(KcpObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    struct IKCPRATE *r = &self->kcp->rate;
    r->rep_n = 0;
    if (on && r->rep == NULL) {
        r->rep = counted_malloc(sizeof(IUINT32) * 3 * IKCP_REP_MAX);
        if (r->rep == NULL)
            return PyErr_NoMemory();
    } else if (!on && r->rep != NULL) {
        counted_free(r->rep);
        r->rep = NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Kcp_set_urgent_dup(KcpObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < -1 || n > 1000) {
        PyErr_Format(PyExc_ValueError, "bad urgent copy delay %ld ms", n);
        return NULL;
    }
    self->kcp->urgent_dup_ms = n < 0 ? IKCP_URGENT_OFF : (IUINT32)n;
    Py_RETURN_NONE;
}

static PyObject *Kcp_set_minrto(KcpObject *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > IKCP_RTO_MAX) {
        PyErr_Format(PyExc_ValueError, "bad minimum RTO %ld", n);
        return NULL;
    }
    self->kcp->rx_minrto = (IINT32)n;
    if (self->kcp->rx_rto < n)
        self->kcp->rx_rto = (IINT32)n;
    Py_RETURN_NONE;
}

static PyObject *Kcp_pace_wait_us(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(ikcp_pace_wait_us(self->kcp));
}

static PyObject *Kcp_take_rate_sample(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    struct IKCPSAMPLE rs;
    ikcp_rate_take(self->kcp, &rs);
    if (!rs.valid && rs.min_rtt_us < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(LLLLLLii)", rs.delivered, rs.prior_delivered, rs.sample_delivered,
                         rs.interval_us, rs.min_rtt_us, rs.acked, rs.app_limited,
                         rs.retrans);
}

static size_t queue_bytes(const struct IQUEUEHEAD *head)
{
    size_t n = 0;
    const struct IQUEUEHEAD *p;
    for (p = head->next; p != head; p = p->next)
        n += iqueue_entry(p, IKCPSEG, node)->len;
    return n;
}

static PyObject *Kcp_buffered(KcpObject *self, PyObject *Py_UNUSED(ignored))
{
    ikcpcb *k = self->kcp;
    return Py_BuildValue("(nnnn)", (Py_ssize_t)queue_bytes(&k->snd_queue),
                         (Py_ssize_t)queue_bytes(&k->snd_buf),
                         (Py_ssize_t)queue_bytes(&k->rcv_buf),
                         (Py_ssize_t)queue_bytes(&k->rcv_queue));
}

static PyMethodDef Kcp_methods[] = {
    {"reset", (PyCFunction)Kcp_reset, METH_O, "free everything now; a fresh control block"},
    {"set_output", (PyCFunction)Kcp_set_output, METH_O, "output callable(bytes) or None"},
    {"send", (PyCFunction)Kcp_send, METH_O, "ikcp_send: one message"},
    {"write", (PyCFunction)Kcp_write, METH_O, "messages of at most mss bytes each"},
    {"input", (PyCFunction)Kcp_input, METH_O, "ikcp_input; its result"},
    {"update", (PyCFunction)Kcp_update, METH_O, "ikcp_update(ms)"},
    {"check", (PyCFunction)Kcp_check, METH_O, "ikcp_check(ms)"},
    {"flush", (PyCFunction)Kcp_flush, METH_NOARGS, "ikcp_flush"},
    {"peeksize", (PyCFunction)Kcp_peeksize, METH_NOARGS, "ikcp_peeksize"},
    {"recv", (PyCFunction)Kcp_recv, METH_NOARGS, "one message or None"},
    {"recv_all", (PyCFunction)Kcp_recv_all, METH_NOARGS, "every message ready, joined"},
    {"waitsnd", (PyCFunction)Kcp_waitsnd, METH_NOARGS, "ikcp_waitsnd"},
    {"setmtu", (PyCFunction)Kcp_setmtu, METH_O, "ikcp_setmtu"},
    {"wndsize", (PyCFunction)Kcp_wndsize, METH_VARARGS, "ikcp_wndsize(snd, rcv)"},
    {"set_rcv_wnd", (PyCFunction)Kcp_set_rcv_wnd, METH_O, "receive window, any size"},
    {"nodelay", (PyCFunction)Kcp_nodelay, METH_VARARGS, "ikcp_nodelay(nd, iv, resend, nc)"},
    {"ask_tell", (PyCFunction)Kcp_ask_tell, METH_NOARGS, "send our window on next flush"},
    {"clock", (PyCFunction)Kcp_clock, METH_O,
     "the time (us) for what follows: input, flush (the rate sampler's clock)"},
    {"tick", (PyCFunction)Kcp_tick, METH_O, "clock(us), then ikcp_update(us // 1000)"},
    {"set_pacing", (PyCFunction)Kcp_set_pacing, METH_VARARGS,
     "set_pacing(bytes_per_s, burst_bytes); rate 0: unpaced"},
    {"set_cwnd_bytes", (PyCFunction)Kcp_set_cwnd_bytes, METH_O,
     "most payload bytes in flight (0: no cap)"},
    {"pace_debit", (PyCFunction)Kcp_pace_debit, METH_O,
     "take bytes sent outside KCP (FEC parity) from the pacing tokens"},
    {"set_minrto", (PyCFunction)Kcp_set_minrto, METH_O, "the least retransmission timeout (ms)"},
    {"set_urgent_dup", (PyCFunction)Kcp_set_urgent_dup, METH_O,
     "send each urgent segment again this many ms after its first transmission (0: not; "
     "-1, the default: not, and paced data is numbered at once, as KCP does)"},
    {"write_frames", (PyCFunction)Kcp_write_frames, METH_VARARGS,
     "write_frames(buf, light=False, urgent=False): whole frames as unordered messages of at "
     "most one MSS (light: only ICMP, UDP and TCP without payload; urgent: small light ones "
     "go ahead of what waits to be sent) -> (messages, aligned)"},
    {"set_unordered", (PyCFunction)Kcp_set_unordered, METH_O,
     "deliver unordered messages that arrive out of order at once (recv_all)"},
    {"set_repeat_acks", (PyCFunction)Kcp_set_repeat_acks, METH_O,
     "send each acknowledgement of an out-of-order segment twice (in two flushes)"},
    {"pace_wait_us", (PyCFunction)Kcp_pace_wait_us, METH_NOARGS,
     "us until pacing lets a waiting segment go (0: none waits on the pace)"},
    {"take_rate_sample", (PyCFunction)Kcp_take_rate_sample, METH_NOARGS,
     "the rate sample since the last call: (delivered, prior_delivered, sample_delivered, "
     "interval_us, min_rtt_us, acked, app_limited, retrans) or None"},
    {"buffered", (PyCFunction)Kcp_buffered, METH_NOARGS,
     "payload bytes in (snd_queue, snd_buf, rcv_buf, rcv_queue)"},
    {NULL, NULL, 0, NULL},
};

/* read-only control block fields: the closure is the field's offset, the sign its type */
#define U32(f) (void *)(intptr_t)(offsetof(ikcpcb, f) + 1)
#define I32(f) (void *)(intptr_t)(-(intptr_t)offsetof(ikcpcb, f) - 1)
#define R64(f) (void *)(intptr_t)(offsetof(ikcpcb, rate) + offsetof(struct IKCPRATE, f))
#define R32(f) U32(rate.f)

static PyObject *Kcp_field64(KcpObject *self, void *closure)
{
    return PyLong_FromLongLong(*(const IINT64 *)((const char *)self->kcp + (intptr_t)closure));
}

static PyObject *Kcp_field(KcpObject *self, void *closure)
{
    intptr_t c = (intptr_t)closure;
    const char *base = (const char *)self->kcp;
    if (c > 0)
        return PyLong_FromUnsignedLong(*(const IUINT32 *)(base + c - 1));
    return PyLong_FromLong(*(const IINT32 *)(base + (-c - 1)));
}

static PyGetSetDef Kcp_getset[] = {
    {"conv", (getter)Kcp_field, NULL, NULL, U32(conv)},
    {"mtu", (getter)Kcp_field, NULL, NULL, U32(mtu)},
    {"mss", (getter)Kcp_field, NULL, NULL, U32(mss)},
    {"state", (getter)Kcp_field, NULL, "0xFFFFFFFF once dead_link transmissions failed",
     U32(state)},
    {"snd_una", (getter)Kcp_field, NULL, NULL, U32(snd_una)},
    {"snd_nxt", (getter)Kcp_field, NULL, "next sequence number: data segments sent once",
     U32(snd_nxt)},
    {"rcv_nxt", (getter)Kcp_field, NULL, NULL, U32(rcv_nxt)},
    {"srtt", (getter)Kcp_field, NULL, "smoothed RTT (ms)", I32(rx_srtt)},
    {"rttval", (getter)Kcp_field, NULL, NULL, I32(rx_rttval)},
    {"rto", (getter)Kcp_field, NULL, NULL, I32(rx_rto)},
    {"minrto", (getter)Kcp_field, NULL, NULL, I32(rx_minrto)},
    {"snd_wnd", (getter)Kcp_field, NULL, NULL, U32(snd_wnd)},
    {"rcv_wnd", (getter)Kcp_field, NULL, NULL, U32(rcv_wnd)},
    {"rmt_wnd", (getter)Kcp_field, NULL, NULL, U32(rmt_wnd)},
    {"cwnd", (getter)Kcp_field, NULL, NULL, U32(cwnd)},
    {"probe", (getter)Kcp_field, NULL, NULL, U32(probe)},
    {"interval", (getter)Kcp_field, NULL, NULL, U32(interval)},
    {"xmit", (getter)Kcp_field, NULL, "segments resent after their timeout", U32(xmit)},
    {"nrcv_buf", (getter)Kcp_field, NULL, NULL, U32(nrcv_buf)},
    {"nsnd_buf", (getter)Kcp_field, NULL, NULL, U32(nsnd_buf)},
    {"nrcv_que", (getter)Kcp_field, NULL, NULL, U32(nrcv_que)},
    {"nsnd_que", (getter)Kcp_field, NULL, NULL, U32(nsnd_que)},
    {"early_segments", (getter)Kcp_field, NULL,
     "unordered messages delivered ahead of a hole", U32(early_segments)},
    {"urgent_segments", (getter)Kcp_field, NULL,
     "urgent messages that went ahead of queued data", U32(urgent_segments)},
    {"urgent_dups", (getter)Kcp_field, NULL,
     "urgent segments sent a second time (set_urgent_dup)", U32(urgent_dups)},
    {"unordered", (getter)Kcp_field, NULL, NULL, I32(unordered)},
    {"nodelay_mode", (getter)Kcp_field, NULL, NULL, U32(nodelay)},
    {"dead_link", (getter)Kcp_field, NULL, NULL, U32(dead_link)},
    {"snd_bytes", (getter)Kcp_field, NULL, "payload bytes queued or unacknowledged",
     U32(nsnd_bytes)},
    {"ackcount", (getter)Kcp_field, NULL, "ACKs waiting for the next flush", U32(ackcount)},
    {"ackblock", (getter)Kcp_field, NULL, "ACK list capacity (entries)", U32(ackblock)},
    {"inflight", (getter)Kcp_field, NULL, "payload bytes sent and not acknowledged",
     R32(inflight)},
    {"buf_bytes", (getter)Kcp_field, NULL, "payload bytes in snd_buf", R32(buf_bytes)},
    {"cwnd_bytes", (getter)Kcp_field, NULL, "the in-flight cap (0: none)", R32(cwnd_bytes)},
    {"delivered", (getter)Kcp_field64, NULL, "payload bytes acknowledged", R64(delivered)},
    {"sent_bytes", (getter)Kcp_field64, NULL, "payload bytes sent (first times and again)",
     R64(sent_bytes)},
    {"pace_rate", (getter)Kcp_field64, NULL, "pacing rate (bytes/s; 0: unpaced)",
     R64(pace_rate)},
    {"pace_tokens", (getter)Kcp_field64, NULL, NULL, R64(pace_tokens)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject KcpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "polevpn.kcp._ikcp.Kcp",
    .tp_doc = "A KCP control block (ikcp.c)",
    .tp_basicsize = sizeof(KcpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Kcp_new,
    .tp_dealloc = (destructor)Kcp_dealloc,
    .tp_traverse = (traverseproc)Kcp_traverse,
    .tp_clear = (inquiry)Kcp_clear,
    .tp_methods = Kcp_methods,
    .tp_getset = Kcp_getset,
};

static PyObject *mod_allocated(PyObject *m, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(nn)", (Py_ssize_t)alloc_bytes, (Py_ssize_t)alloc_blocks);
}

static PyMethodDef module_methods[] = {
    {"allocated", mod_allocated, METH_NOARGS,
     "(bytes, blocks) held by all KCP control blocks through ikcp's allocator"},
    {"urgent_packet", urgent_packet, METH_O,
     "urgent_packet(ip) -> bool: an IP packet write_frames(urgent=True) sends ahead"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "polevpn.kcp._ikcp", "KCP (ikcp.c) for polevpn", -1, module_methods,
};

PyMODINIT_FUNC PyInit__ikcp(void)
{
    if (PyType_Ready(&KcpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&KcpType);
    if (PyModule_AddObject(m, "Kcp", (PyObject *)&KcpType) < 0) {
        Py_DECREF(&KcpType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "OVERHEAD", 24) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    ikcp_allocator(counted_malloc, counted_free);
    return m;
}
