//=====================================================================
// Vendored by polevpn from the `kcp` 0.1.6 PyPI package's copy of
// skywind3000/kcp (https://github.com/skywind3000/kcp), MIT licence: see
// LICENSE next to this file. polevpn's changes are marked "polevpn": a count of
// the payload bytes queued or unacknowledged (nsnd_bytes), and the hooks of a
// sender-side congestion controller (kcp->rate: pacing, a cap on the bytes in
// flight, delivery-rate samples). Nothing on the wire changes.
//=====================================================================
//
// KCP - A Better ARQ Protocol Implementation
// skywind3000 (at) gmail.com, 2010-2011
//
// Features:
// + Average RTT reduce 30% - 40% vs traditional ARQ like tcp.
// + Maximum RTT reduce three times vs tcp.
// + Lightweight, distributed as a single source file.
//
//=====================================================================
#include "ikcp.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <stdio.h>



//=====================================================================
// KCP BASIC
//=====================================================================
const IUINT32 IKCP_RTO_NDL = 30;		// no delay min rto
const IUINT32 IKCP_RTO_MIN = 100;		// normal min rto
const IUINT32 IKCP_RTO_DEF = 200;
const IUINT32 IKCP_RTO_MAX = 60000;
const IUINT32 IKCP_CMD_PUSH = 81;		// cmd: push data
const IUINT32 IKCP_CMD_ACK  = 82;		// cmd: ack
const IUINT32 IKCP_CMD_WASK = 83;		// cmd: window probe (ask)
const IUINT32 IKCP_CMD_WINS = 84;		// cmd: window size (tell)
const IUINT32 IKCP_ASK_SEND = 1;		// need to send IKCP_CMD_WASK
const IUINT32 IKCP_ASK_TELL = 2;		// need to send IKCP_CMD_WINS
const IUINT32 IKCP_WND_SND = 32;
const IUINT32 IKCP_WND_RCV = 128;       // must >= max fragment size
const IUINT32 IKCP_MTU_DEF = 1400;
const IUINT32 IKCP_ACK_FAST	= 3;
const IUINT32 IKCP_INTERVAL	= 100;
const IUINT32 IKCP_OVERHEAD = 24;
const IUINT32 IKCP_DEADLINK = 20;
const IUINT32 IKCP_THRESH_INIT = 2;
const IUINT32 IKCP_THRESH_MIN = 2;
const IUINT32 IKCP_PROBE_INIT = 7000;		// 7 secs to probe window size
const IUINT32 IKCP_PROBE_LIMIT = 120000;	// up to 120 secs to probe window
const IUINT32 IKCP_FASTACK_LIMIT = 5;		// max times to trigger fastack


//---------------------------------------------------------------------
// encode / decode
//---------------------------------------------------------------------

/* encode 8 bits unsigned int */
static inline char *ikcp_encode8u(char *p, unsigned char c)
{
	*(unsigned char*)p++ = c;
	return p;
}

/* decode 8 bits unsigned int */
static inline const char *ikcp_decode8u(const char *p, unsigned char *c)
{
	*c = *(unsigned char*)p++;
	return p;
}

/* encode 16 bits unsigned int (lsb) */
static inline char *ikcp_encode16u(char *p, unsigned short w)
{
#if IWORDS_BIG_ENDIAN || IWORDS_MUST_ALIGN
	*(unsigned char*)(p + 0) = (w & 255);
	*(unsigned char*)(p + 1) = (w >> 8);
#else
	memcpy(p, &w, 2);
#endif
	p += 2;
	return p;
}

/* decode 16 bits unsigned int (lsb) */
static inline const char *ikcp_decode16u(const char *p, unsigned short *w)
{
#if IWORDS_BIG_ENDIAN || IWORDS_MUST_ALIGN
	*w = *(const unsigned char*)(p + 1);
	*w = *(const unsigned char*)(p + 0) + (*w << 8);
#else
	memcpy(w, p, 2);
#endif
	p += 2;
	return p;
}

/* encode 32 bits unsigned int (lsb) */
static inline char *ikcp_encode32u(char *p, IUINT32 l)
{
#if IWORDS_BIG_ENDIAN || IWORDS_MUST_ALIGN
	*(unsigned char*)(p + 0) = (unsigned char)((l >>  0) & 0xff);
	*(unsigned char*)(p + 1) = (unsigned char)((l >>  8) & 0xff);
	*(unsigned char*)(p + 2) = (unsigned char)((l >> 16) & 0xff);
	*(unsigned char*)(p + 3) = (unsigned char)((l >> 24) & 0xff);
#else
	memcpy(p, &l, 4);
#endif
	p += 4;
	return p;
}

/* decode 32 bits unsigned int (lsb) */
static inline const char *ikcp_decode32u(const char *p, IUINT32 *l)
{
#if IWORDS_BIG_ENDIAN || IWORDS_MUST_ALIGN
	*l = *(const unsigned char*)(p + 3);
	*l = *(const unsigned char*)(p + 2) + (*l << 8);
	*l = *(const unsigned char*)(p + 1) + (*l << 8);
	*l = *(const unsigned char*)(p + 0) + (*l << 8);
#else
	memcpy(l, p, 4);
#endif
	p += 4;
	return p;
}

static inline IUINT32 _imin_(IUINT32 a, IUINT32 b) {
	return a <= b ? a : b;
}

static inline IUINT32 _imax_(IUINT32 a, IUINT32 b) {
	return a >= b ? a : b;
}

static inline IUINT32 _ibound_(IUINT32 lower, IUINT32 middle, IUINT32 upper)
{
	return _imin_(_imax_(lower, middle), upper);
}

static inline long _itimediff(IUINT32 later, IUINT32 earlier)
{
	return ((IINT32)(later - earlier));
}

//---------------------------------------------------------------------
// manage segment
//---------------------------------------------------------------------
typedef struct IKCPSEG IKCPSEG;

static void* (*ikcp_malloc_hook)(size_t) = NULL;
static void (*ikcp_free_hook)(void *) = NULL;

// internal malloc
static void* ikcp_malloc(size_t size) {
	if (ikcp_malloc_hook)
		return ikcp_malloc_hook(size);
	return malloc(size);
}

// internal free
static void ikcp_free(void *ptr) {
	if (ikcp_free_hook) {
		ikcp_free_hook(ptr);
	}	else {
		free(ptr);
	}
}

// redefine allocator
void ikcp_allocator(void* (*new_malloc)(size_t), void (*new_free)(void*))
{
	ikcp_malloc_hook = new_malloc;
	ikcp_free_hook = new_free;
}

// allocate a new kcp segment
static IKCPSEG* ikcp_segment_new(ikcpcb *kcp, int size)
{
	return (IKCPSEG*)ikcp_malloc(sizeof(IKCPSEG) + size);
}

// delete a segment
static void ikcp_segment_delete(ikcpcb *kcp, IKCPSEG *seg)
{
	ikcp_free(seg);
}

// write log
void ikcp_log(ikcpcb *kcp, int mask, const char *fmt, ...)
{
	char buffer[1024];
	va_list argptr;
	if ((mask & kcp->logmask) == 0 || kcp->writelog == 0) return;
	va_start(argptr, fmt);
	vsprintf(buffer, fmt, argptr);
	va_end(argptr);
	kcp->writelog(buffer, kcp, kcp->user);
}

// check log mask
static int ikcp_canlog(const ikcpcb *kcp, int mask)
{
	if ((mask & kcp->logmask) == 0 || kcp->writelog == NULL) return 0;
	return 1;
}

// output segment
static int ikcp_output(ikcpcb *kcp, const void *data, int size)
{
	assert(kcp);
	assert(kcp->output);
	if (ikcp_canlog(kcp, IKCP_LOG_OUTPUT)) {
		ikcp_log(kcp, IKCP_LOG_OUTPUT, "[RO] %ld bytes", (long)size);
	}
	if (size == 0) return 0;
	return kcp->output((const char*)data, size, kcp, kcp->user);
}

// output queue
void ikcp_qprint(const char *name, const struct IQUEUEHEAD *head)
{
#if 0
	const struct IQUEUEHEAD *p;
	printf("<%s>: [", name);
	for (p = head->next; p != head; p = p->next) {
		const IKCPSEG *seg = iqueue_entry(p, const IKCPSEG, node);
		printf("(%lu %d)", (unsigned long)seg->sn, (int)(seg->ts % 10000));
		if (p->next != head) printf(",");
	}
	printf("]\n");
#endif
}


//---------------------------------------------------------------------
// create a new kcpcb
//---------------------------------------------------------------------
ikcpcb* ikcp_create(IUINT32 conv, void *user)
{
	ikcpcb *kcp = (ikcpcb*)ikcp_malloc(sizeof(struct IKCPCB));
	if (kcp == NULL) return NULL;
	kcp->conv = conv;
	kcp->user = user;
	kcp->snd_una = 0;
	kcp->snd_nxt = 0;
	kcp->rcv_nxt = 0;
	kcp->ts_recent = 0;
	kcp->ts_lastack = 0;
	kcp->ts_probe = 0;
	kcp->probe_wait = 0;
	kcp->snd_wnd = IKCP_WND_SND;
	kcp->rcv_wnd = IKCP_WND_RCV;
	kcp->rmt_wnd = IKCP_WND_RCV;
	kcp->cwnd = 0;
	kcp->incr = 0;
	kcp->probe = 0;
	kcp->mtu = IKCP_MTU_DEF;
	kcp->mss = kcp->mtu - IKCP_OVERHEAD;
	kcp->stream = 0;

	kcp->buffer = (char*)ikcp_malloc((kcp->mtu + IKCP_OVERHEAD) * 3);
	if (kcp->buffer == NULL) {
		ikcp_free(kcp);
		return NULL;
	}

	iqueue_init(&kcp->snd_queue);
	iqueue_init(&kcp->rcv_queue);
	iqueue_init(&kcp->snd_buf);
	iqueue_init(&kcp->rcv_buf);
	kcp->nrcv_buf = 0;
	kcp->nsnd_buf = 0;
	kcp->nrcv_que = 0;
	kcp->nsnd_que = 0;
	kcp->nsnd_bytes = 0;  /* polevpn */
	memset(&kcp->rate, 0, sizeof(kcp->rate));  /* polevpn */
	kcp->rate.rs_min_rtt = -1;  /* polevpn */
	kcp->unordered = 0;  /* polevpn */
	kcp->early = NULL;
	kcp->early_len = kcp->early_cap = 0;
	kcp->early_segments = 0;
	kcp->snd_msg_open = 0;  /* polevpn */
	kcp->urgent_segments = 0;  /* polevpn */
	kcp->urgent_dup_ms = IKCP_URGENT_OFF;  /* polevpn */
	kcp->urgent_dups = 0;  /* polevpn */
	kcp->state = 0;
	kcp->acklist = NULL;
	kcp->ackblock = 0;
	kcp->ackcount = 0;
	kcp->rx_srtt = 0;
	kcp->rx_rttval = 0;
	kcp->rx_rto = IKCP_RTO_DEF;
	kcp->rx_minrto = IKCP_RTO_MIN;
	kcp->current = 0;
	kcp->interval = IKCP_INTERVAL;
	kcp->ts_flush = IKCP_INTERVAL;
	kcp->nodelay = 0;
	kcp->updated = 0;
	kcp->logmask = 0;
	kcp->ssthresh = IKCP_THRESH_INIT;
	kcp->fastresend = 0;
	kcp->fastlimit = IKCP_FASTACK_LIMIT;
	kcp->nocwnd = 0;
	kcp->xmit = 0;
	kcp->dead_link = IKCP_DEADLINK;
	kcp->output = NULL;
	kcp->writelog = NULL;

	return kcp;
}


//---------------------------------------------------------------------
// release a new kcpcb
//---------------------------------------------------------------------
void ikcp_release(ikcpcb *kcp)
{
	assert(kcp);
	if (kcp) {
		IKCPSEG *seg;
		while (!iqueue_is_empty(&kcp->snd_buf)) {
			seg = iqueue_entry(kcp->snd_buf.next, IKCPSEG, node);
			iqueue_del(&seg->node);
			ikcp_segment_delete(kcp, seg);
		}
		while (!iqueue_is_empty(&kcp->rcv_buf)) {
			seg = iqueue_entry(kcp->rcv_buf.next, IKCPSEG, node);
			iqueue_del(&seg->node);
			ikcp_segment_delete(kcp, seg);
		}
		while (!iqueue_is_empty(&kcp->snd_queue)) {
			seg = iqueue_entry(kcp->snd_queue.next, IKCPSEG, node);
			iqueue_del(&seg->node);
			ikcp_segment_delete(kcp, seg);
		}
		while (!iqueue_is_empty(&kcp->rcv_queue)) {
			seg = iqueue_entry(kcp->rcv_queue.next, IKCPSEG, node);
			iqueue_del(&seg->node);
			ikcp_segment_delete(kcp, seg);
		}
		if (kcp->buffer) {
			ikcp_free(kcp->buffer);
		}
		if (kcp->rate.rep) {  /* polevpn */
			ikcp_free(kcp->rate.rep);
		}
		if (kcp->early) {  /* polevpn */
			ikcp_free(kcp->early);
		}
		if (kcp->acklist) {
			ikcp_free(kcp->acklist);
		}

		kcp->nrcv_buf = 0;
		kcp->nsnd_buf = 0;
		kcp->nrcv_que = 0;
		kcp->nsnd_que = 0;
		kcp->ackcount = 0;
		kcp->buffer = NULL;
		kcp->acklist = NULL;
		ikcp_free(kcp);
	}
}


//---------------------------------------------------------------------
// set output callback, which will be invoked by kcp
//---------------------------------------------------------------------
void ikcp_setoutput(ikcpcb *kcp, int (*output)(const char *buf, int len,
	ikcpcb *kcp, void *user))
{
	kcp->output = output;
}


//---------------------------------------------------------------------
// user/upper level recv: returns size, returns below zero for EAGAIN
//---------------------------------------------------------------------
int ikcp_recv(ikcpcb *kcp, char *buffer, int len)
{
	struct IQUEUEHEAD *p;
	int ispeek = (len < 0)? 1 : 0;
	int peeksize;
	int recover = 0;
	IKCPSEG *seg;
	assert(kcp);

	if (iqueue_is_empty(&kcp->rcv_queue))
		return -1;

	if (len < 0) len = -len;

	peeksize = ikcp_peeksize(kcp);

	if (peeksize < 0)
		return -2;

	if (peeksize > len)
		return -3;

	if (kcp->nrcv_que >= kcp->rcv_wnd)
		recover = 1;

	// merge fragment
	for (len = 0, p = kcp->rcv_queue.next; p != &kcp->rcv_queue; ) {
		int fragment;
		seg = iqueue_entry(p, IKCPSEG, node);
		p = p->next;

		if (buffer) {
			memcpy(buffer, seg->data, seg->len);
			buffer += seg->len;
		}

		len += seg->len;
		fragment = seg->frg;

		if (ikcp_canlog(kcp, IKCP_LOG_RECV)) {
			ikcp_log(kcp, IKCP_LOG_RECV, "recv sn=%lu", (unsigned long)seg->sn);
		}

		if (ispeek == 0) {
			iqueue_del(&seg->node);
			ikcp_segment_delete(kcp, seg);
			kcp->nrcv_que--;
		}

		if (fragment == 0)
			break;
	}

	assert(len == peeksize);

	// move available data from rcv_buf -> rcv_queue
	while (! iqueue_is_empty(&kcp->rcv_buf)) {
		seg = iqueue_entry(kcp->rcv_buf.next, IKCPSEG, node);
		if (seg->sn == kcp->rcv_nxt && kcp->nrcv_que < kcp->rcv_wnd) {
			iqueue_del(&seg->node);
			kcp->nrcv_buf--;
			iqueue_add_tail(&seg->node, &kcp->rcv_queue);
			kcp->nrcv_que++;
			kcp->rcv_nxt++;
		}	else {
			break;
		}
	}

	// fast recover
	if (kcp->nrcv_que < kcp->rcv_wnd && recover) {
		// ready to send back IKCP_CMD_WINS in ikcp_flush
		// tell remote my window size
		kcp->probe |= IKCP_ASK_TELL;
	}

	return len;
}


//---------------------------------------------------------------------
// peek data size
//---------------------------------------------------------------------
int ikcp_peeksize(const ikcpcb *kcp)
{
	struct IQUEUEHEAD *p;
	IKCPSEG *seg;
	int length = 0;

	assert(kcp);

	if (iqueue_is_empty(&kcp->rcv_queue)) return -1;

	seg = iqueue_entry(kcp->rcv_queue.next, IKCPSEG, node);
	if (seg->frg == 0) return seg->len;

	if (kcp->nrcv_que < seg->frg + 1) return -1;

	for (p = kcp->rcv_queue.next; p != &kcp->rcv_queue; p = p->next) {
		seg = iqueue_entry(p, IKCPSEG, node);
		length += seg->len;
		if (seg->frg == 0) break;
	}

	return length;
}


//---------------------------------------------------------------------
// user/upper level send, returns below zero for error
//---------------------------------------------------------------------
int ikcp_send(ikcpcb *kcp, const char *buffer, int len)
{
	IKCPSEG *seg;
	int count, i;

	assert(kcp->mss > 0);
	if (len < 0) return -1;

	// append to previous segment in streaming mode (if possible)
	if (kcp->stream != 0) {
		if (!iqueue_is_empty(&kcp->snd_queue)) {
			IKCPSEG *old = iqueue_entry(kcp->snd_queue.prev, IKCPSEG, node);
			if (old->len < kcp->mss) {
				int capacity = kcp->mss - old->len;
				int extend = (len < capacity)? len : capacity;
				seg = ikcp_segment_new(kcp, old->len + extend);
				assert(seg);
				if (seg == NULL) {
					return -2;
				}
				iqueue_add_tail(&seg->node, &kcp->snd_queue);
				memcpy(seg->data, old->data, old->len);
				if (buffer) {
					memcpy(seg->data + old->len, buffer, extend);
					buffer += extend;
				}
				seg->len = old->len + extend;
				seg->frg = 0;
				seg->urgent = 0;  /* polevpn */
				len -= extend;
				iqueue_del_init(&old->node);
				ikcp_segment_delete(kcp, old);
				kcp->nsnd_bytes += extend;  /* polevpn */
			}
		}
		if (len <= 0) {
			return 0;
		}
	}

	if (len <= (int)kcp->mss) count = 1;
	else count = (len + kcp->mss - 1) / kcp->mss;

	if (count >= (int)IKCP_WND_RCV) return -2;

	if (count == 0) count = 1;

	// fragment
	for (i = 0; i < count; i++) {
		int size = len > (int)kcp->mss ? (int)kcp->mss : len;
		seg = ikcp_segment_new(kcp, size);
		assert(seg);
		if (seg == NULL) {
			return -2;
		}
		if (buffer && len > 0) {
			memcpy(seg->data, buffer, size);
		}
		seg->len = size;
		seg->frg = (kcp->stream == 0)? (count - i - 1) : 0;
		seg->urgent = 0;  /* polevpn: see ikcp_send_urgent */
		iqueue_init(&seg->node);
		iqueue_add_tail(&seg->node, &kcp->snd_queue);
		kcp->nsnd_que++;
		kcp->nsnd_bytes += size;  /* polevpn */
		if (buffer) {
			buffer += size;
		}
		len -= size;
	}

	return 0;
}


//---------------------------------------------------------------------
// parse ack
//---------------------------------------------------------------------
/* polevpn: one message that holds whole frames: the peer may deliver it out of order.
   frg on the wire: IKCP_FRG_UNORDERED for a single segment; for several, the first
   IKCP_FRG_FIRST | (count - 1), the others IKCP_FRG_NEXT | (fragments after it), so that a
   receiver can tell where a message begins and whether it has all of it. Only to a peer
   that agreed to it (none of these is a frg KCP itself sends: it stops at 127). */
int ikcp_send_unordered(ikcpcb *kcp, const char *buffer, int len)
{
	int rc, count, i;
	struct IQUEUEHEAD *p;
	if (len <= 0 || kcp->stream != 0) return -1;
	count = (len + (int)kcp->mss - 1) / (int)kcp->mss;
	if (count > IKCP_FRG_MAX_UNORDERED) return ikcp_send(kcp, buffer, len);  /* in order */
	rc = ikcp_send(kcp, buffer, len);
	if (rc < 0) return rc;
	p = kcp->snd_queue.prev;
	for (i = count - 1; i >= 0; i--, p = p->prev) {
		IKCPSEG *seg = iqueue_entry(p, IKCPSEG, node);
		if (count == 1) seg->frg = IKCP_FRG_UNORDERED;
		else if (i == 0) seg->frg = IKCP_FRG_FIRST | (count - 1);
		else seg->frg = IKCP_FRG_NEXT | (count - 1 - i);
	}
	return rc;
}

/* polevpn: does this segment end its message (plain, unordered single, or the last
   fragment of an unordered message: IKCP_FRG_NEXT | 0)? */
static int ikcp_ends_message(const IKCPSEG *seg)
{
	return seg->frg == 0 || seg->frg == IKCP_FRG_UNORDERED || seg->frg == IKCP_FRG_NEXT;
}

/* polevpn: an unordered message of one segment that goes ahead of what waits in
   snd_queue: behind the urgent segments already there, at the first message boundary
   (never between the fragments of a message, part of which may have gone already). A
   ping or a TCP ACK otherwise waits behind up to a queue budget of bulk data (and a
   burst of them would be dropped with it). At most IKCP_URGENT_MAX_AHEAD segments are
   passed over: beyond that, a flood of small packets goes at the tail like the rest,
   and cannot hold bulk data back for more than that many segments' time.
   With urgent_dup_ms, an urgent segment goes a second time that long after its first
   transmission (in another datagram, since a later flush sends it): a lost ping or ACK
   otherwise waits a round trip or more for its resend, and those few were the ping's
   p99 on a lossy line. Costs the bytes of small packets only. */
int ikcp_send_urgent(ikcpcb *kcp, const char *buffer, int len)
{
	struct IQUEUEHEAD *p, *tail;
	IKCPSEG *seg;
	int boundary, scanned = 0, rc;
	if (len <= 0 || len > (int)kcp->mss) return ikcp_send_unordered(kcp, buffer, len);
	rc = ikcp_send_unordered(kcp, buffer, len);
	if (rc < 0) return rc;
	tail = kcp->snd_queue.prev;
	seg = iqueue_entry(tail, IKCPSEG, node);
	boundary = !kcp->snd_msg_open;
	for (p = kcp->snd_queue.next; p != tail; p = p->next) {
		IKCPSEG *s = iqueue_entry(p, IKCPSEG, node);
		if (boundary && !s->urgent) break;
		if (++scanned > IKCP_URGENT_MAX_AHEAD) return rc;  /* stays at the tail */
		boundary = ikcp_ends_message(s);
	}
	seg->urgent = IKCP_URGENT;
	if (p != tail) {
		iqueue_del(tail);
		iqueue_add_tail(&seg->node, p);  /* before p */
		kcp->urgent_segments++;
	}
	return rc;
}

/* polevpn: the segments of an unordered message of several fragments that `seg` belongs
   to, once all are in rcv_buf: their bytes go to `early` and they stay, emptied */
static void ikcp_early_message(ikcpcb *kcp, IKCPSEG *seg)
{
	struct IQUEUEHEAD *p = &seg->node, *q;
	IKCPSEG *first = seg, *s;
	int count, i, total = 0;
	/* back to the first fragment */
	while (first->fastack == IKCP_MARK_NEXT) {
		IKCPSEG *prev;
		if (p->prev == &kcp->rcv_buf) return;
		prev = iqueue_entry(p->prev, IKCPSEG, node);
		if (prev->sn + 1 != first->sn) return;
		if (prev->fastack != IKCP_MARK_NEXT && prev->fastack != IKCP_MARK_FIRST) return;
		first = prev;
		p = p->prev;
	}
	if (first->fastack != IKCP_MARK_FIRST || first->sn == kcp->rcv_nxt) return;
	count = (int)first->frg + 1;
	/* all of it there, in sequence? */
	for (i = 0, q = &first->node, s = first; i < count; i++) {
		if (q == &kcp->rcv_buf) return;
		s = iqueue_entry(q, IKCPSEG, node);
		if (s->sn != first->sn + (IUINT32)i) return;
		if (s->fastack != (i == 0 ? IKCP_MARK_FIRST : IKCP_MARK_NEXT)) return;
		if ((int)s->frg != count - 1 - i) return;
		total += (int)s->len;
		q = q->next;
	}
	if (total == 0) return;  /* delivered already */
	if (kcp->early_len + total > kcp->early_cap) {
		int cap = kcp->early_cap ? kcp->early_cap : 16384;
		char *grown;
		while (cap < kcp->early_len + total) cap *= 2;
		grown = (char*)ikcp_malloc(cap);
		if (grown == NULL) return;  /* in order, as before */
		if (kcp->early_len) memcpy(grown, kcp->early, kcp->early_len);
		if (kcp->early) ikcp_free(kcp->early);
		kcp->early = grown;
		kcp->early_cap = cap;
	}
	for (i = 0, q = &first->node; i < count; i++, q = q->next) {
		s = iqueue_entry(q, IKCPSEG, node);
		memcpy(kcp->early + kcp->early_len, s->data, s->len);
		kcp->early_len += (int)s->len;
		s->len = 0;
	}
	kcp->early_segments++;
}


static void ikcp_update_ack(ikcpcb *kcp, IINT32 rtt)
{
	IINT32 rto = 0;
	if (kcp->rx_srtt == 0) {
		kcp->rx_srtt = rtt;
		kcp->rx_rttval = rtt / 2;
	}	else {
		long delta = rtt - kcp->rx_srtt;
		if (delta < 0) delta = -delta;
		kcp->rx_rttval = (3 * kcp->rx_rttval + delta) / 4;
		kcp->rx_srtt = (7 * kcp->rx_srtt + rtt) / 8;
		if (kcp->rx_srtt < 1) kcp->rx_srtt = 1;
	}
	rto = kcp->rx_srtt + _imax_(kcp->interval, 4 * kcp->rx_rttval);
	kcp->rx_rto = _ibound_(kcp->rx_minrto, rto, IKCP_RTO_MAX);
}

/* polevpn: a segment of snd_buf was acknowledged (exact: by its own ACK, not by una):
   account it and fold it into the rate sample being built */
static void ikcp_rate_acked(ikcpcb *kcp, const IKCPSEG *seg, int exact)
{
	struct IKCPRATE *r = &kcp->rate;
	r->buf_bytes -= seg->len;
	if (seg->xmit == 0) return;  /* never sent: nothing was delivered by the network */
	r->inflight -= seg->len;
	r->delivered += seg->len;
	r->delivered_us = r->now_us;
	r->rs_acked += seg->len;
	/* a first transmission's record beats a resent one's: a resent segment's ACK may
	   be for its first copy (Karn), and its record, taken at the resend, then makes a
	   round trip look a few ms long */
	if (!r->rs_valid || (seg->xmit == 1 && r->rs_retrans) ||
		((seg->xmit == 1 || r->rs_retrans) && seg->tx_delivered >= r->rs_prior_delivered)) {
		r->rs_valid = 1;
		r->rs_prior_delivered = seg->tx_delivered;
		r->rs_app_limited = seg->tx_app_limited;
		r->rs_retrans = seg->xmit > 1;
		r->rs_send_elapsed = seg->sent_us - seg->tx_first_sent_us;
		r->rs_ack_elapsed = r->delivered_us - seg->tx_delivered_us;
		r->first_sent_us = seg->sent_us;
	}
	if (exact && seg->xmit == 1) {  /* Karn: a resent segment's ACK is ambiguous */
		IINT64 rtt = r->now_us - seg->sent_us;
		if (rtt >= 0 && (r->rs_min_rtt < 0 || rtt < r->rs_min_rtt)) r->rs_min_rtt = rtt;
	}
	if (r->app_limited && r->delivered > r->app_limited) r->app_limited = 0;
}

/* polevpn: the sample built since the last call, then start a new one */
void ikcp_rate_take(ikcpcb *kcp, struct IKCPSAMPLE *out)
{
	struct IKCPRATE *r = &kcp->rate;
	out->delivered = r->delivered;
	out->valid = r->rs_valid;
	out->prior_delivered = r->rs_prior_delivered;
	out->sample_delivered = r->delivered - r->rs_prior_delivered;
	out->interval_us = _imax_(r->rs_send_elapsed, r->rs_ack_elapsed);
	out->min_rtt_us = r->rs_min_rtt;
	out->acked = r->rs_acked;
	out->app_limited = r->rs_app_limited;
	out->retrans = r->rs_retrans;
	r->rs_valid = 0;
	r->rs_min_rtt = -1;
	r->rs_acked = 0;
}

/* polevpn: how long until pacing lets the next segment go, when one is waiting to be
   sent and only the pacing holds it (0: nothing waits on the pace) */
IINT64 ikcp_pace_wait_us(const ikcpcb *kcp)
{
	const struct IKCPRATE *r = &kcp->rate;
	IINT64 deficit, waited;
	if (r->pace_rate <= 0) return 0;
	if (r->buf_bytes == r->inflight && (kcp->nsnd_que == 0 ||
		(r->cwnd_bytes && r->buf_bytes >= r->cwnd_bytes)))
		return 0;
	waited = r->now_us - r->pace_ts;
	deficit = 1 - r->pace_tokens - (waited > 0 ? r->pace_rate * waited / 1000000 : 0);
	if (deficit <= 0) return 0;
	return deficit * 1000000 / r->pace_rate + 1;
}

static void ikcp_shrink_buf(ikcpcb *kcp)
{
	struct IQUEUEHEAD *p = kcp->snd_buf.next;
	if (p != &kcp->snd_buf) {
		IKCPSEG *seg = iqueue_entry(p, IKCPSEG, node);
		kcp->snd_una = seg->sn;
	}	else {
		kcp->snd_una = kcp->snd_nxt;
	}
}

static void ikcp_parse_ack(ikcpcb *kcp, IUINT32 sn)
{
	struct IQUEUEHEAD *p, *next;

	if (_itimediff(sn, kcp->snd_una) < 0 || _itimediff(sn, kcp->snd_nxt) >= 0)
		return;

	for (p = kcp->snd_buf.next; p != &kcp->snd_buf; p = next) {
		IKCPSEG *seg = iqueue_entry(p, IKCPSEG, node);
		next = p->next;
		if (sn == seg->sn) {
			kcp->nsnd_bytes -= seg->len;  /* polevpn */
			ikcp_rate_acked(kcp, seg, 1);  /* polevpn */
			iqueue_del(p);
			ikcp_segment_delete(kcp, seg);
			kcp->nsnd_buf--;
			break;
		}
		if (_itimediff(sn, seg->sn) < 0) {
			break;
		}
	}
}

static void ikcp_parse_una(ikcpcb *kcp, IUINT32 una)
{
	struct IQUEUEHEAD *p, *next;
	for (p = kcp->snd_buf.next; p != &kcp->snd_buf; p = next) {
		IKCPSEG *seg = iqueue_entry(p, IKCPSEG, node);
		next = p->next;
		if (_itimediff(una, seg->sn) > 0) {
			kcp->nsnd_bytes -= seg->len;  /* polevpn */
			ikcp_rate_acked(kcp, seg, kcp->rate.ack_valid && seg->sn == kcp->rate.ack_sn);
			iqueue_del(p);
			ikcp_segment_delete(kcp, seg);
			kcp->nsnd_buf--;
		}	else {
			break;
		}
	}
}

static void ikcp_parse_fastack(ikcpcb *kcp, IUINT32 sn, IUINT32 ts)
{
	struct IQUEUEHEAD *p, *next;

	if (_itimediff(sn, kcp->snd_una) < 0 || _itimediff(sn, kcp->snd_nxt) >= 0)
		return;

	for (p = kcp->snd_buf.next; p != &kcp->snd_buf; p = next) {
		IKCPSEG *seg = iqueue_entry(p, IKCPSEG, node);
		next = p->next;
		if (_itimediff(sn, seg->sn) < 0) {
			break;
		}
		else if (sn != seg->sn) {
		#ifndef IKCP_FASTACK_CONSERVE
			seg->fastack++;
		#else
			if (_itimediff(ts, seg->ts) >= 0)
				seg->fastack++;
		#endif
		}
	}
}


//---------------------------------------------------------------------
// ack append
//---------------------------------------------------------------------
static void ikcp_ack_push(ikcpcb *kcp, IUINT32 sn, IUINT32 ts)
{
	IUINT32 newsize = kcp->ackcount + 1;
	IUINT32 *ptr;

	if (newsize > kcp->ackblock) {
		IUINT32 *acklist;
		IUINT32 newblock;

		for (newblock = 8; newblock < newsize; newblock <<= 1);
		acklist = (IUINT32*)ikcp_malloc(newblock * sizeof(IUINT32) * 2);

		if (acklist == NULL) {
			assert(acklist != NULL);
			abort();
		}

		if (kcp->acklist != NULL) {
			IUINT32 x;
			for (x = 0; x < kcp->ackcount; x++) {
				acklist[x * 2 + 0] = kcp->acklist[x * 2 + 0];
				acklist[x * 2 + 1] = kcp->acklist[x * 2 + 1];
			}
			ikcp_free(kcp->acklist);
		}

		kcp->acklist = acklist;
		kcp->ackblock = newblock;
	}

	ptr = &kcp->acklist[kcp->ackcount * 2];
	ptr[0] = sn;
	ptr[1] = ts;
	kcp->ackcount++;
}

static void ikcp_ack_get(const ikcpcb *kcp, int p, IUINT32 *sn, IUINT32 *ts)
{
	if (sn) sn[0] = kcp->acklist[p * 2 + 0];
	if (ts) ts[0] = kcp->acklist[p * 2 + 1];
}


//---------------------------------------------------------------------
// parse data
//---------------------------------------------------------------------
void ikcp_parse_data(ikcpcb *kcp, IKCPSEG *newseg)
{
	struct IQUEUEHEAD *p, *prev;
	IUINT32 sn = newseg->sn;
	int repeat = 0;

	if (_itimediff(sn, kcp->rcv_nxt + kcp->rcv_wnd) >= 0 ||
		_itimediff(sn, kcp->rcv_nxt) < 0) {
		ikcp_segment_delete(kcp, newseg);
		return;
	}

	for (p = kcp->rcv_buf.prev; p != &kcp->rcv_buf; p = prev) {
		IKCPSEG *seg = iqueue_entry(p, IKCPSEG, node);
		prev = p->prev;
		if (seg->sn == sn) {
			repeat = 1;
			break;
		}
		if (_itimediff(sn, seg->sn) > 0) {
			break;
		}
	}

	if (repeat == 0) {
		/* polevpn: whole frames, out of order: up at once (see `early`). The marks go
		   back to KCP's own frg numbering, which the in-order path reads */
		int mark = IKCP_MARK_NONE;
		if (newseg->frg == IKCP_FRG_UNORDERED) {
			newseg->frg = 0;
			mark = IKCP_MARK_SINGLE;
		} else if ((newseg->frg & IKCP_FRG_FIRST) == IKCP_FRG_FIRST) {
			newseg->frg &= 0x3F;
			mark = IKCP_MARK_FIRST;
		} else if (newseg->frg & IKCP_FRG_NEXT) {
			newseg->frg &= 0x3F;
			mark = IKCP_MARK_NEXT;
		}
		newseg->fastack = mark;  /* unused on a received segment */
		if (mark == IKCP_MARK_SINGLE && kcp->unordered && sn != kcp->rcv_nxt &&
			newseg->len > 0) {
			int need = kcp->early_len + (int)newseg->len;
			if (need > kcp->early_cap) {
				int cap = kcp->early_cap ? kcp->early_cap : 16384;
				char *grown;
				while (cap < need) cap *= 2;
				grown = (char*)ikcp_malloc(cap);
				if (grown != NULL) {
					if (kcp->early_len) memcpy(grown, kcp->early, kcp->early_len);
					if (kcp->early) ikcp_free(kcp->early);
					kcp->early = grown;
					kcp->early_cap = cap;
				}
			}
			if (need <= kcp->early_cap) {  /* else (no memory): in order, as before */
				memcpy(kcp->early + kcp->early_len, newseg->data, newseg->len);
				kcp->early_len = need;
				kcp->early_segments++;
				newseg->len = 0;
			}
		}
		iqueue_init(&newseg->node);
		iqueue_add(&newseg->node, p);
		kcp->nrcv_buf++;
		if (kcp->unordered && (mark == IKCP_MARK_FIRST || mark == IKCP_MARK_NEXT))
			ikcp_early_message(kcp, newseg);
	}	else {
		ikcp_segment_delete(kcp, newseg);
	}

#if 0
	ikcp_qprint("rcvbuf", &kcp->rcv_buf);
	printf("rcv_nxt=%lu\n", kcp->rcv_nxt);
#endif

	// move available data from rcv_buf -> rcv_queue
	while (! iqueue_is_empty(&kcp->rcv_buf)) {
		IKCPSEG *seg = iqueue_entry(kcp->rcv_buf.next, IKCPSEG, node);
		if (seg->sn == kcp->rcv_nxt && kcp->nrcv_que < kcp->rcv_wnd) {
			iqueue_del(&seg->node);
			kcp->nrcv_buf--;
			iqueue_add_tail(&seg->node, &kcp->rcv_queue);
			kcp->nrcv_que++;
			kcp->rcv_nxt++;
		}	else {
			break;
		}
	}

#if 0
	ikcp_qprint("queue", &kcp->rcv_queue);
	printf("rcv_nxt=%lu\n", kcp->rcv_nxt);
#endif

#if 1
//	printf("snd(buf=%d, queue=%d)\n", kcp->nsnd_buf, kcp->nsnd_que);
//	printf("rcv(buf=%d, queue=%d)\n", kcp->nrcv_buf, kcp->nrcv_que);
#endif
}


//---------------------------------------------------------------------
// input data
//---------------------------------------------------------------------
int ikcp_input(ikcpcb *kcp, const char *data, long size)
{
	IUINT32 prev_una = kcp->snd_una;
	IUINT32 maxack = 0, latest_ts = 0;
	int flag = 0;

	if (ikcp_canlog(kcp, IKCP_LOG_INPUT)) {
		ikcp_log(kcp, IKCP_LOG_INPUT, "[RI] %d bytes", (int)size);
	}

	if (data == NULL || (int)size < (int)IKCP_OVERHEAD) return -1;

	while (1) {
		IUINT32 ts, sn, len, una, conv;
		IUINT16 wnd;
		IUINT8 cmd, frg;
		IKCPSEG *seg;

		if (size < (int)IKCP_OVERHEAD) break;

		data = ikcp_decode32u(data, &conv);
		if (conv != kcp->conv) return -1;

		data = ikcp_decode8u(data, &cmd);
		data = ikcp_decode8u(data, &frg);
		data = ikcp_decode16u(data, &wnd);
		data = ikcp_decode32u(data, &ts);
		data = ikcp_decode32u(data, &sn);
		data = ikcp_decode32u(data, &una);
		data = ikcp_decode32u(data, &len);

		size -= IKCP_OVERHEAD;

		if ((long)size < (long)len || (int)len < 0) return -2;

		if (cmd != IKCP_CMD_PUSH && cmd != IKCP_CMD_ACK &&
			cmd != IKCP_CMD_WASK && cmd != IKCP_CMD_WINS)
			return -3;

		kcp->rmt_wnd = wnd;
		kcp->rate.ack_sn = sn;  /* polevpn */
		kcp->rate.ack_valid = cmd == IKCP_CMD_ACK;  /* polevpn */
		ikcp_parse_una(kcp, una);
		kcp->rate.ack_valid = 0;  /* polevpn */
		ikcp_shrink_buf(kcp);

		if (cmd == IKCP_CMD_ACK) {
			if (_itimediff(kcp->current, ts) >= 0) {
				ikcp_update_ack(kcp, _itimediff(kcp->current, ts));
			}
			ikcp_parse_ack(kcp, sn);
			ikcp_shrink_buf(kcp);
			if (flag == 0) {
				flag = 1;
				maxack = sn;
				latest_ts = ts;
			}	else {
				if (_itimediff(sn, maxack) > 0) {
				#ifndef IKCP_FASTACK_CONSERVE
					maxack = sn;
					latest_ts = ts;
				#else
					if (_itimediff(ts, latest_ts) > 0) {
						maxack = sn;
						latest_ts = ts;
					}
				#endif
				}
			}
			if (ikcp_canlog(kcp, IKCP_LOG_IN_ACK)) {
				ikcp_log(kcp, IKCP_LOG_IN_ACK,
					"input ack: sn=%lu rtt=%ld rto=%ld", (unsigned long)sn,
					(long)_itimediff(kcp->current, ts),
					(long)kcp->rx_rto);
			}
		}
		else if (cmd == IKCP_CMD_PUSH) {
			if (ikcp_canlog(kcp, IKCP_LOG_IN_DATA)) {
				ikcp_log(kcp, IKCP_LOG_IN_DATA,
					"input psh: sn=%lu ts=%lu", (unsigned long)sn, (unsigned long)ts);
			}
			if (_itimediff(sn, kcp->rcv_nxt + kcp->rcv_wnd) < 0) {
				ikcp_ack_push(kcp, sn, ts);
				if (_itimediff(sn, kcp->rcv_nxt) >= 0) {
					seg = ikcp_segment_new(kcp, len);
					seg->conv = conv;
					seg->cmd = cmd;
					seg->frg = frg;
					seg->wnd = wnd;
					seg->ts = ts;
					seg->sn = sn;
					seg->una = una;
					seg->len = len;

					if (len > 0) {
						memcpy(seg->data, data, len);
					}

					ikcp_parse_data(kcp, seg);
				}
			}
		}
		else if (cmd == IKCP_CMD_WASK) {
			// ready to send back IKCP_CMD_WINS in ikcp_flush
			// tell remote my window size
			kcp->probe |= IKCP_ASK_TELL;
			if (ikcp_canlog(kcp, IKCP_LOG_IN_PROBE)) {
				ikcp_log(kcp, IKCP_LOG_IN_PROBE, "input probe");
			}
		}
		else if (cmd == IKCP_CMD_WINS) {
			// do nothing
			if (ikcp_canlog(kcp, IKCP_LOG_IN_WINS)) {
				ikcp_log(kcp, IKCP_LOG_IN_WINS,
					"input wins: %lu", (unsigned long)(wnd));
			}
		}
		else {
			return -3;
		}

		data += len;
		size -= len;
	}

	if (flag != 0) {
		ikcp_parse_fastack(kcp, maxack, latest_ts);
	}

	if (_itimediff(kcp->snd_una, prev_una) > 0) {
		if (kcp->cwnd < kcp->rmt_wnd) {
			IUINT32 mss = kcp->mss;
			if (kcp->cwnd < kcp->ssthresh) {
				kcp->cwnd++;
				kcp->incr += mss;
			}	else {
				if (kcp->incr < mss) kcp->incr = mss;
				kcp->incr += (mss * mss) / kcp->incr + (mss / 16);
				if ((kcp->cwnd + 1) * mss <= kcp->incr) {
				#if 1
					kcp->cwnd = (kcp->incr + mss - 1) / ((mss > 0)? mss : 1);
				#else
					kcp->cwnd++;
				#endif
				}
			}
			if (kcp->cwnd > kcp->rmt_wnd) {
				kcp->cwnd = kcp->rmt_wnd;
				kcp->incr = kcp->rmt_wnd * mss;
			}
		}
	}

	return 0;
}


//---------------------------------------------------------------------
// ikcp_encode_seg
//---------------------------------------------------------------------
static char *ikcp_encode_seg(char *ptr, const IKCPSEG *seg)
{
	ptr = ikcp_encode32u(ptr, seg->conv);
	ptr = ikcp_encode8u(ptr, (IUINT8)seg->cmd);
	ptr = ikcp_encode8u(ptr, (IUINT8)seg->frg);
	ptr = ikcp_encode16u(ptr, (IUINT16)seg->wnd);
	ptr = ikcp_encode32u(ptr, seg->ts);
	ptr = ikcp_encode32u(ptr, seg->sn);
	ptr = ikcp_encode32u(ptr, seg->una);
	ptr = ikcp_encode32u(ptr, seg->len);
	return ptr;
}

static int ikcp_wnd_unused(const ikcpcb *kcp)
{
	if (kcp->nrcv_que < kcp->rcv_wnd) {
		return kcp->rcv_wnd - kcp->nrcv_que;
	}
	return 0;
}


//---------------------------------------------------------------------
// ikcp_flush
//---------------------------------------------------------------------
void ikcp_flush(ikcpcb *kcp)
{
	IUINT32 current = kcp->current;
	char *buffer = kcp->buffer;
	char *ptr = buffer;
	int count, size, i;
	IUINT32 resent, cwnd;
	IUINT32 rtomin;
	struct IQUEUEHEAD *p;
	int change = 0;
	int lost = 0;
	IKCPSEG seg;

	// 'ikcp_update' haven't been called.
	if (kcp->updated == 0) return;

	seg.conv = kcp->conv;
	seg.cmd = IKCP_CMD_ACK;
	seg.frg = 0;
	seg.wnd = ikcp_wnd_unused(kcp);
	seg.una = kcp->rcv_nxt;
	seg.len = 0;
	seg.sn = 0;
	seg.ts = 0;

	// polevpn: out-of-order acknowledgements sent IKCP_REP_GAP ago or more, once more
	// (ikcp.h); the younger ones wait for a later flush
	if (kcp->rate.rep != NULL) {
		IUINT32 kept = 0;
		count = (int)kcp->rate.rep_n;
		for (i = 0; i < count; i++) {
			IUINT32 *e = kcp->rate.rep[i];
			if (_itimediff(e[0], kcp->rcv_nxt) < 0) continue;  /* una covers it now */
			if (_itimediff(current, e[2]) < IKCP_REP_GAP) {
				IUINT32 *k = kcp->rate.rep[kept++];
				k[0] = e[0]; k[1] = e[1]; k[2] = e[2];
				continue;
			}
			seg.sn = e[0];
			seg.ts = e[1];
			size = (int)(ptr - buffer);
			if (size + (int)IKCP_OVERHEAD > (int)kcp->mtu) {
				ikcp_output(kcp, buffer, size);
				ptr = buffer;
			}
			ptr = ikcp_encode_seg(ptr, &seg);
		}
		kcp->rate.rep_n = kept;
	}

	// flush acknowledges
	count = kcp->ackcount;
	for (i = 0; i < count; i++) {
		size = (int)(ptr - buffer);
		if (size + (int)IKCP_OVERHEAD > (int)kcp->mtu) {
			ikcp_output(kcp, buffer, size);
			ptr = buffer;
		}
		ikcp_ack_get(kcp, i, &seg.sn, &seg.ts);
		ptr = ikcp_encode_seg(ptr, &seg);
		/* polevpn: remember it for once more if it is beyond a hole */
		if (kcp->rate.rep != NULL && _itimediff(seg.sn, kcp->rcv_nxt) >= 0 &&
			kcp->rate.rep_n < IKCP_REP_MAX) {
			kcp->rate.rep[kcp->rate.rep_n][0] = seg.sn;
			kcp->rate.rep[kcp->rate.rep_n][1] = seg.ts;
			kcp->rate.rep[kcp->rate.rep_n][2] = current;
			kcp->rate.rep_n++;
		}
	}

	kcp->ackcount = 0;

	// probe window size (if remote window size equals zero)
	if (kcp->rmt_wnd == 0) {
		if (kcp->probe_wait == 0) {
			kcp->probe_wait = IKCP_PROBE_INIT;
			kcp->ts_probe = kcp->current + kcp->probe_wait;
		}
		else {
			if (_itimediff(kcp->current, kcp->ts_probe) >= 0) {
				if (kcp->probe_wait < IKCP_PROBE_INIT)
					kcp->probe_wait = IKCP_PROBE_INIT;
				kcp->probe_wait += kcp->probe_wait / 2;
				if (kcp->probe_wait > IKCP_PROBE_LIMIT)
					kcp->probe_wait = IKCP_PROBE_LIMIT;
				kcp->ts_probe = kcp->current + kcp->probe_wait;
				kcp->probe |= IKCP_ASK_SEND;
			}
		}
	}	else {
		kcp->ts_probe = 0;
		kcp->probe_wait = 0;
	}

	// flush window probing commands
	if (kcp->probe & IKCP_ASK_SEND) {
		seg.cmd = IKCP_CMD_WASK;
		size = (int)(ptr - buffer);
		if (size + (int)IKCP_OVERHEAD > (int)kcp->mtu) {
			ikcp_output(kcp, buffer, size);
			ptr = buffer;
		}
		ptr = ikcp_encode_seg(ptr, &seg);
	}

	// flush window probing commands
	if (kcp->probe & IKCP_ASK_TELL) {
		seg.cmd = IKCP_CMD_WINS;
		size = (int)(ptr - buffer);
		if (size + (int)IKCP_OVERHEAD > (int)kcp->mtu) {
			ikcp_output(kcp, buffer, size);
			ptr = buffer;
		}
		ptr = ikcp_encode_seg(ptr, &seg);
	}

	kcp->probe = 0;

	// calculate window size
	cwnd = _imin_(kcp->snd_wnd, kcp->rmt_wnd);
	if (kcp->nocwnd == 0) cwnd = _imin_(kcp->cwnd, cwnd);

	// polevpn: top the pacing tokens up for the time gone by
	if (kcp->rate.pace_rate > 0) {
		struct IKCPRATE *r = &kcp->rate;
		IINT64 gone = r->now_us - r->pace_ts;
		if (gone > 0) {
			r->pace_tokens += r->pace_rate * gone / 1000000;
			r->pace_ts = r->now_us;
		}	else if (gone < 0) {
			r->pace_ts = r->now_us;
		}
		if (r->pace_tokens > r->pace_burst) r->pace_tokens = r->pace_burst;
	}

	// move data from snd_queue to snd_buf
	while (_itimediff(kcp->snd_nxt, kcp->snd_una + cwnd) < 0) {
		IKCPSEG *newseg;
		if (iqueue_is_empty(&kcp->snd_queue)) break;
		/* polevpn: the controller's cap on bytes in flight */
		if (kcp->rate.cwnd_bytes && kcp->rate.buf_bytes >= kcp->rate.cwnd_bytes) break;
		/* polevpn: paced, no more than the tokens let go now: what waits for the pace
		   waits in snd_queue, where an urgent segment can go ahead of it
		   (ikcp_send_urgent); moved at once, up to a bandwidth-delay product waited in
		   snd_buf, in sequence, and a ping behind it took 15-20 ms more on a full line */
		if (kcp->urgent_dup_ms != IKCP_URGENT_OFF && kcp->rate.pace_rate > 0 &&
			(IINT64)(kcp->rate.buf_bytes - kcp->rate.inflight) >= kcp->rate.pace_tokens) break;

		newseg = iqueue_entry(kcp->snd_queue.next, IKCPSEG, node);
		kcp->rate.buf_bytes += newseg->len;  /* polevpn */

		iqueue_del(&newseg->node);
		iqueue_add_tail(&newseg->node, &kcp->snd_buf);
		kcp->nsnd_que--;
		kcp->nsnd_buf++;
		kcp->snd_msg_open = !ikcp_ends_message(newseg);  /* polevpn */

		newseg->conv = kcp->conv;
		newseg->cmd = IKCP_CMD_PUSH;
		newseg->wnd = seg.wnd;
		newseg->ts = current;
		newseg->sn = kcp->snd_nxt++;
		newseg->una = kcp->rcv_nxt;
		newseg->resendts = current;
		newseg->rto = kcp->rx_rto;
		newseg->fastack = 0;
		newseg->xmit = 0;
	}

	// calculate resent
	resent = (kcp->fastresend > 0)? (IUINT32)kcp->fastresend : 0xffffffff;
	rtomin = (kcp->nodelay == 0)? (kcp->rx_rto >> 3) : 0;

	// flush data segments
	for (p = kcp->snd_buf.next; p != &kcp->snd_buf; p = p->next) {
		IKCPSEG *segment = iqueue_entry(p, IKCPSEG, node);
		int needsend = 0;
		/* polevpn: paced out: what is left goes when the tokens allow (oldest first) */
		if (kcp->rate.pace_rate > 0 && kcp->rate.pace_tokens <= 0) break;
		int dup = 0;  /* polevpn */
		if (segment->xmit == 0) {
			needsend = 1;
			segment->xmit++;
			kcp->rate.inflight += segment->len;  /* polevpn */
			segment->rto = kcp->rx_rto;
			segment->resendts = current + segment->rto + rtomin;
			if (segment->urgent && kcp->urgent_dup_ms &&  /* polevpn */
				kcp->urgent_dup_ms != IKCP_URGENT_OFF) {
				segment->urgent = IKCP_URGENT_DUP;
				segment->dupts = current + kcp->urgent_dup_ms;
			}
		}
		else if (_itimediff(current, segment->resendts) >= 0) {
			needsend = 1;
			segment->xmit++;
			kcp->xmit++;
			if (kcp->nodelay == 0) {
				segment->rto += _imax_(segment->rto, (IUINT32)kcp->rx_rto);
			}	else {
				IINT32 step = (kcp->nodelay < 2)?
					((IINT32)(segment->rto)) : kcp->rx_rto;
				segment->rto += step / 2;
			}
			segment->resendts = current + segment->rto;
			lost = 1;
		}
		/* polevpn: an urgent segment's copy (ikcp_send_urgent): not a resend, so neither
		   xmit nor the rate sampler's record changes (its ACK stays a first
		   transmission's for the controller; a copy that got through alone makes the
		   RTT sample dupts later, which a minimum filter ignores) */
		else if (segment->urgent == IKCP_URGENT_DUP &&
			_itimediff(current, segment->dupts) >= 0) {
			dup = 1;
			segment->urgent = IKCP_URGENT;
			kcp->urgent_dups++;
		}
		else if (segment->fastack >= resent) {
			if ((int)segment->xmit <= kcp->fastlimit ||
				kcp->fastlimit <= 0) {
				needsend = 1;
				segment->xmit++;
				segment->fastack = 0;
				segment->resendts = current + segment->rto;
				change++;
			}
		}

		if (needsend || dup) {
			int need;
			struct IKCPRATE *r = &kcp->rate;  /* polevpn: the rate sampler's record */
			if (!dup) {
				if (r->inflight == segment->len && segment->xmit == 1) {
					/* the first in flight: a new sample window starts now */
					r->first_sent_us = r->now_us;
					r->delivered_us = r->now_us;
				}
				segment->sent_us = r->now_us;
				segment->tx_delivered = r->delivered;
				segment->tx_delivered_us = r->delivered_us;
				segment->tx_first_sent_us = r->first_sent_us;
				segment->tx_app_limited = r->app_limited != 0;
			}
			r->pace_tokens -= segment->len;
			r->sent_bytes += segment->len;
			segment->ts = current;
			segment->wnd = seg.wnd;
			segment->una = kcp->rcv_nxt;

			size = (int)(ptr - buffer);
			need = IKCP_OVERHEAD + segment->len;

			if (size + need > (int)kcp->mtu) {
				ikcp_output(kcp, buffer, size);
				ptr = buffer;
			}

			ptr = ikcp_encode_seg(ptr, segment);

			if (segment->len > 0) {
				memcpy(ptr, segment->data, segment->len);
				ptr += segment->len;
			}

			if (segment->xmit >= kcp->dead_link) {
				kcp->state = (IUINT32)-1;
			}
		}
	}

	// flash remain segments
	size = (int)(ptr - buffer);
	if (size > 0) {
		ikcp_output(kcp, buffer, size);
	}

	/* polevpn: nothing waits to be sent and the cap is not reached: the application is
	   what limits the rate, so the samples until this data is delivered say nothing
	   about the path's capacity */
	if (iqueue_is_empty(&kcp->snd_queue) && kcp->rate.buf_bytes == kcp->rate.inflight &&
		(kcp->rate.cwnd_bytes == 0 || kcp->rate.inflight < kcp->rate.cwnd_bytes)) {
		IINT64 mark = kcp->rate.delivered + kcp->rate.inflight;
		kcp->rate.app_limited = mark > 0 ? mark : 1;
	}

	// update ssthresh
	if (change) {
		IUINT32 inflight = kcp->snd_nxt - kcp->snd_una;
		kcp->ssthresh = inflight / 2;
		if (kcp->ssthresh < IKCP_THRESH_MIN)
			kcp->ssthresh = IKCP_THRESH_MIN;
		kcp->cwnd = kcp->ssthresh + resent;
		kcp->incr = kcp->cwnd * kcp->mss;
	}

	if (lost) {
		kcp->ssthresh = cwnd / 2;
		if (kcp->ssthresh < IKCP_THRESH_MIN)
			kcp->ssthresh = IKCP_THRESH_MIN;
		kcp->cwnd = 1;
		kcp->incr = kcp->mss;
	}

	if (kcp->cwnd < 1) {
		kcp->cwnd = 1;
		kcp->incr = kcp->mss;
	}
}


//---------------------------------------------------------------------
// update state (call it repeatedly, every 10ms-100ms), or you can ask
// ikcp_check when to call it again (without ikcp_input/_send calling).
// 'current' - current timestamp in millisec.
//---------------------------------------------------------------------
void ikcp_update(ikcpcb *kcp, IUINT32 current)
{
	IINT32 slap;

	kcp->current = current;

	if (kcp->updated == 0) {
		kcp->updated = 1;
		kcp->ts_flush = kcp->current;
	}

	slap = _itimediff(kcp->current, kcp->ts_flush);

	if (slap >= 10000 || slap < -10000) {
		kcp->ts_flush = kcp->current;
		slap = 0;
	}

	if (slap >= 0) {
		kcp->ts_flush += kcp->interval;
		if (_itimediff(kcp->current, kcp->ts_flush) >= 0) {
			kcp->ts_flush = kcp->current + kcp->interval;
		}
		ikcp_flush(kcp);
	}
}


//---------------------------------------------------------------------
// Determine when should you invoke ikcp_update:
// returns when you should invoke ikcp_update in millisec, if there
// is no ikcp_input/_send calling. you can call ikcp_update in that
// time, instead of call update repeatly.
// Important to reduce unnacessary ikcp_update invoking. use it to
// schedule ikcp_update (eg. implementing an epoll-like mechanism,
// or optimize ikcp_update when handling massive kcp connections)
//---------------------------------------------------------------------
IUINT32 ikcp_check(const ikcpcb *kcp, IUINT32 current)
{
	IUINT32 ts_flush = kcp->ts_flush;
	IINT32 tm_flush = 0x7fffffff;
	IINT32 tm_packet = 0x7fffffff;
	IUINT32 minimal = 0;
	struct IQUEUEHEAD *p;

	if (kcp->updated == 0) {
		return current;
	}

	if (_itimediff(current, ts_flush) >= 10000 ||
		_itimediff(current, ts_flush) < -10000) {
		ts_flush = current;
	}

	if (_itimediff(current, ts_flush) >= 0) {
		return current;
	}

	tm_flush = _itimediff(ts_flush, current);

	for (p = kcp->snd_buf.next; p != &kcp->snd_buf; p = p->next) {
		const IKCPSEG *seg = iqueue_entry(p, const IKCPSEG, node);
		IINT32 diff = _itimediff(seg->resendts, current);
		if (diff <= 0) {
			return current;
		}
		if (diff < tm_packet) tm_packet = diff;
	}

	minimal = (IUINT32)(tm_packet < tm_flush ? tm_packet : tm_flush);
	if (minimal >= kcp->interval) minimal = kcp->interval;

	return current + minimal;
}



int ikcp_setmtu(ikcpcb *kcp, int mtu)
{
	char *buffer;
	if (mtu < 50 || mtu < (int)IKCP_OVERHEAD)
		return -1;
	buffer = (char*)ikcp_malloc((mtu + IKCP_OVERHEAD) * 3);
	if (buffer == NULL)
		return -2;
	kcp->mtu = mtu;
	kcp->mss = kcp->mtu - IKCP_OVERHEAD;
	ikcp_free(kcp->buffer);
	kcp->buffer = buffer;
	return 0;
}

int ikcp_interval(ikcpcb *kcp, int interval)
{
	if (interval > 5000) interval = 5000;
	else if (interval < 10) interval = 10;
	kcp->interval = interval;
	return 0;
}

int ikcp_nodelay(ikcpcb *kcp, int nodelay, int interval, int resend, int nc)
{
	if (nodelay >= 0) {
		kcp->nodelay = nodelay;
		if (nodelay) {
			kcp->rx_minrto = IKCP_RTO_NDL;
		}
		else {
			kcp->rx_minrto = IKCP_RTO_MIN;
		}
	}
	if (interval >= 0) {
		if (interval > 5000) interval = 5000;
		else if (interval < 10) interval = 10;
		kcp->interval = interval;
	}
	if (resend >= 0) {
		kcp->fastresend = resend;
	}
	if (nc >= 0) {
		kcp->nocwnd = nc;
	}
	return 0;
}


int ikcp_wndsize(ikcpcb *kcp, int sndwnd, int rcvwnd)
{
	if (kcp) {
		if (sndwnd > 0) {
			kcp->snd_wnd = sndwnd;
		}
		if (rcvwnd > 0) {   // must >= max fragment size
			kcp->rcv_wnd = _imax_(rcvwnd, IKCP_WND_RCV);
		}
	}
	return 0;
}

int ikcp_waitsnd(const ikcpcb *kcp)
{
	return kcp->nsnd_buf + kcp->nsnd_que;
}


// read conv
IUINT32 ikcp_getconv(const void *ptr)
{
	IUINT32 conv;
	ikcp_decode32u((const char*)ptr, &conv);
	return conv;
}
