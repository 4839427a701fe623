/*
 * Per-request HTTP/1.x tracing of unmodified servers, from socket syscalls and OpenSSL uprobes.
 *
 * Cost is what matters: one tp_btf program at sys_exit sees every syscall, so it rejects on the
 * syscall number and result (registers) and then with one hash lookup: the connection table,
 * which only holds connections that target processes accepted, is also the target filter. The
 * syscall arguments are still in pt_regs at exit, so no per-thread enter/exit state is kept.
 * Only connections seen at accept are followed (server side); the request is built in the
 * connection's map entry and sent as ONE ring-buffer record when it is complete (the next
 * request starts on the connection, a pipelined response begins, or the connection closes).
 * Records are sent without waking userspace, which drains the ring on a timer.
 *
 * Framing: a read after the response started begins a new request; a write beginning with
 * "HTTP/1." while a response is already under way begins the response of the next pipelined
 * request. Body bytes are only counted (syscall return values), never copied.
 */
#include "gridbpf/common.h"
#include "gridbpf/http.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define MSG_PEEK 2
#define AF_INET6 10

/* x86_64 syscall numbers */
#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_readv 19
#define NR_writev 20
#define NR_sendfile 40
#define NR_accept 43
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#define NR_splice 275
#define NR_accept4 288

#define EAGAIN 11
#define SOCK_DGRAM 2

/*
 * Set by userspace before load for automatic SciTags tagging: also send a record when a
 * request line is read (woken at once, so the flow is tagged while the response flows) and
 * when a connection closes, and learn the server's own address at accept. Off: plain tracing
 * pays nothing for it.
 */
const volatile __u8 emit_request_start = 0;

/*
 * Set by userspace once it has followed the connections that existed when the hooks were
 * attached (from /proc). Until then a socket's first write makes no entry: it may be the
 * response of an accepted connection to a request read before we started, not an outbound one
 * (measured: a keep-alive HTTPS connection under load, ignored for its whole life).
 */
volatile __u8 seeded = 0;

/* 4 MB: ~11900 records; its pages count (twice) in the reader's RSS */
GB_RINGBUF(events, 4 << 20);

/* Target processes (tgid -> 1), filled by userspace and by fork/exec below. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} targets SEC(".maps");

/*
 * A first, exact-when-negative filter in front of `targets`, for the programs every process's
 * socket I/O (or syscall) runs: slot tgid % TARGET_SLOTS holds 0 (no target maps here: not a
 * target), the one target mapping here (a target), or TARGET_SLOT_SHARED (ask `targets`). An
 * array lookup is inlined by the verifier: other processes pay one load instead of a hash
 * lookup (measured ~65 ns a run here). Targets added here (forks, execs) take a free slot by
 * compare-and-swap and free it at exit; userspace marks its slots shared (it cannot
 * compare-and-swap against us), so its few seeds stay on the hash path. The slot count is a
 * power of two.
 */
#define TARGET_SLOTS (1 << 15)          /* resized at load: tracer.py's TARGET_SLOTS */
#define TARGET_SLOT_SHARED ((__u64)-1)
const volatile __u32 target_slot_mask = TARGET_SLOTS - 1;
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TARGET_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} target_slots SEC(".maps");

/* 0: not a target; 1: a target; 2: maybe (look in `targets`). */
static __always_inline int target_slot(__u32 tgid)
{
	__u32 i = tgid & target_slot_mask;
	__u64 *v = bpf_map_lookup_elem(&target_slots, &i);

	if (!v || *v == TARGET_SLOT_SHARED)
		return 2;
	return *v == tgid ? 1 : 0;
}

static __always_inline int is_target(__u32 tgid)
{
	int s = target_slot(tgid);

	return s == 2 ? bpf_map_lookup_elem(&targets, &tgid) != NULL : s;
}

/* Command names (16 bytes, NUL padded) whose new processes become targets at exec. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, char[16]);
	__type(value, __u8);
} target_comms SEC(".maps");

/* cgroup v2 ids whose processes become targets at exec. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, __u8);
} target_cgroups SEC(".maps");

/* Not LRU: evicting a live connection would lose its requests silently; a full table is counted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct http_conn_key);
	__type(value, struct http_conn);
} conns SEC(".maps");

/*
 * Socket hook: what a target's socket is to us, kept on the socket itself. A socket without it
 * is not one we follow, whatever process does I/O on it: then only the target filter is paid
 * (no syscall registers, no connection lookup), as in the pid-only floor. Freed with the socket.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct http_sk);
} sk_conns SEC(".maps");

/* A request's response head read in one go (up to HTTP_RESP_HEAD_CAP bytes, and 4 to spare). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, char[HTTP_RESP_HEAD_CAP + 4]);
} resp_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);                 /* tid */
	__type(value, struct http_ssl_call);
} ssl_calls SEC(".maps");

/* SSL object -> socket fd, learnt from the syscalls an SSL call makes. A cache: LRU is fine. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} ssl_fds SEC(".maps");

/*
 * The TLS connection each thread touched last (fd and accept time): a JVM record from a stream
 * read/write, or the first plaintext an engine unwraps, belongs to the socket the thread just
 * read or wrote. Kept on the thread itself (task local storage): a plain store per TLS socket
 * I/O, where an LRU hash paid a locked update whenever the thread changed connection (at
 * every request of a thread pool).
 */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct http_jvm_bind);
} jvm_last_conn SEC(".maps");

/* JVM engine (or socket) -> its connection, learnt from the first record (LRU: a cache). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct http_jvm_key);
	__type(value, struct http_jvm_bind);
} jvm_binds SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HTTP_ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* A zeroed connection to insert from (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_conn);
} zero_conn SEC(".maps");

struct iovec_u {
	__u64 base;
	__u64 len;
};

static __always_inline int is_traced_nr(long nr)
{
	switch (nr) {
	case NR_read: case NR_write: case NR_close: case NR_readv: case NR_writev:
	case NR_sendfile: case NR_accept: case NR_sendto: case NR_recvfrom:
	case NR_sendmsg: case NR_recvmsg: case NR_accept4:
		return 1;
	}
	return 0;
}

/* --- The agent's metrics, aggregated here (see struct http_agg) ------------------------------ */

const volatile __u8 aggregate = 0;
/*
 * Requests whose response ended longer ago than this are sent as records even when simple:
 * userspace may have reported them from the connection table already (idle reports), and
 * only a record can be matched against that report.
 */
const volatile __u64 agg_max_age_ns = 0;
const volatile __u32 route_count = 0;
const volatile struct http_route routes[HTTP_AGG_ROUTES] = {};
const volatile __u64 dur_bounds_ns[HTTP_AGG_DUR_BOUNDS] = {};
const volatile __u64 size_bounds[HTTP_AGG_SIZE_BOUNDS] = {};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct http_agg_key);
	__type(value, struct http_agg);
} aggs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_agg);
} agg_zero SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_path_segs);
} path_scratch SEC(".maps");

#define FNV64_OFFSET 0xcbf29ce484222325ULL
#define FNV64_PRIME 0x100000001b3ULL

/* Does route template T match the path's K segments (their first ones in SEGS)? */
static __always_inline int route_matches(const volatile struct http_route *t,
					 struct http_path_segs *segs, __u32 k)
{
	__u32 m = t->nseg, s;

	if (m == 0 || m > HTTP_AGG_SEGS)
		return 0;
	if (t->rest ? k < m : k != m)
		return 0;
	for (s = 0; s < HTTP_AGG_SEGS; s++) {
		if (s >= m)
			break;
		if (t->rest && s == m - 1)       /* the rest of the path: at least one byte */
			return k > m || segs->len[s] > 0;
		if (t->literal & (1 << s)) {
			if (segs->len[s] != t->seg_len[s] || segs->hash[s] != t->seg_hash[s])
				return 0;
		} else if (segs->len[s] == 0) {
			return 0;
		}
	}
	return 1;
}

static __always_inline __u32 bucket_of(const volatile __u64 *bounds, __u32 n, __u64 v)
{
	__u32 i, idx = 0;

	for (i = 0; i < n; i++)             /* as numpy's searchsorted(side="left"): bounds < v */
		idx += v > bounds[i];
	return idx;
}

/* simple_request's second half: the request line's end, the header block's, the route. */
static __always_inline int simple_request_tail(struct http_event *ev, struct http_path_segs *segs,
					       struct http_agg_key *key)
{
	const char *h = ev->hdr;
	__u32 len = *(volatile __u16 *)&ev->hdr_len;
	__u32 end = *(volatile __u32 *)&segs->end;
	__u32 k = *(volatile __u32 *)&segs->k;
	__u32 i, tail;

	if (len > HTTP_HDR_CAP || len < 4)
		return 0;
	/* " HTTP/1.x\r\n" after the path */
	if (end + 11 > len || end > HTTP_HDR_CAP - 11)
		return 0;
	if (h[end + 1] != 'H' || h[end + 2] != 'T' || h[end + 3] != 'T' || h[end + 4] != 'P' ||
	    h[end + 5] != '/' || h[end + 6] != '1' || h[end + 7] != '.' || h[end + 8] < '0' ||
	    h[end + 8] > '9' || h[end + 9] != '\r' || h[end + 10] != '\n')
		return 0;
	/* the first header block's end is the capture's end: "\r\n\r\n" there, no "\n\r" before */
	i = len - 4;
	if (i > HTTP_HDR_CAP - 4)
		return 0;
	__builtin_memcpy(&tail, h + i, 4);
	if (tail != 0x0a0d0a0d)
		return 0;
	/* 8 bytes a step, 7 apart: every pair of neighbours lies whole in some step's word */
	for (i = 0; i < HTTP_HDR_CAP - 8; i += 7) {    /* (the request line has no '\n') */
		__u64 w, lf, cr, pairs;

		if (i + 3 >= len)
			break;
		__builtin_memcpy(&w, h + i, 8);
		lf = w ^ 0x0a0a0a0a0a0a0a0aULL;
		cr = w ^ 0x0d0d0d0d0d0d0d0dULL;
		/* bit 7 of each byte that is zero, exactly (no borrow between bytes) */
		lf = ~(((lf & 0x7f7f7f7f7f7f7f7fULL) + 0x7f7f7f7f7f7f7f7fULL) | lf | 0x7f7f7f7f7f7f7f7fULL);
		cr = ~(((cr & 0x7f7f7f7f7f7f7f7fULL) + 0x7f7f7f7f7f7f7f7fULL) | cr | 0x7f7f7f7f7f7f7f7fULL);
		pairs = lf & (cr >> 8) & 0x0080808080808080ULL;  /* '\n' at byte j, '\r' at j + 1 */
		if (i + 10 > len)         /* pairs from len - 3 on are the capture's own end */
			pairs &= (1ULL << (((len - 3 - i) & 7) * 8)) - 1;
		if (pairs)
			return 0;
	}
	key->route = 0;
	if (*(volatile __u32 *)&segs->abs) {
		for (i = 0; i < HTTP_AGG_ROUTES; i++) {
			if (i >= route_count)
				break;
			if (route_matches(&routes[i], segs, k)) {
				key->route = i + 1;
				break;
			}
		}
	}
	return 1;
}

/*
 * The labels of a simple request, from its capture: method (GET or HEAD), the route its path
 * matches; and whether the capture is exactly one head with no body, as userspace would read
 * it (the request line "METHOD PATH HTTP/1.x", the first CRLF CRLF at the capture's end).
 * Returns 0 when the request is not simple: it is sent as a record.
 */
static __always_inline int simple_request(struct http_event *ev, struct http_agg_key *key)
{
	struct http_path_segs *segs;
	const char *h = ev->hdr;
	volatile __u32 *nseg;
	__u32 len = ev->hdr_len, i, p, k, seglen = 0, zero = 0;
	__u64 hash = FNV64_OFFSET;
	int abs, query = 0;

	if (len < 18 || len > HTTP_HDR_CAP || ev->req_bytes != len)
		return 0;
	if (h[0] == 'G' && h[1] == 'E' && h[2] == 'T' && h[3] == ' ') {
		key->method = HTTP_AGG_GET;
		p = 4;
	} else if (h[0] == 'H' && h[1] == 'E' && h[2] == 'A' && h[3] == 'D' && h[4] == ' ') {
		key->method = HTTP_AGG_HEAD;
		p = 5;
	} else {
		return 0;
	}
	segs = bpf_map_lookup_elem(&path_scratch, &zero);
	if (!segs)
		return 0;
	abs = h[p] == '/';
	/*
	 * The path: up to the space, segments up to '?'. The segment count goes through memory
	 * (volatile): read back, the verifier knows only its range; kept in a register, it is an
	 * index the verifier tracks exactly, and the ways through the loop multiply past its limit.
	 */
	nseg = &segs->k;
	*nseg = 0;
	for (i = p + abs; i < HTTP_HDR_CAP; i++) {
		char ch;

		if (i >= len)
			return 0;
		ch = h[i];
		if (ch == ' ')
			break;
		if (ch == '\r' || ch == '\n')
			return 0;
		if (query)
			continue;
		if (ch == '?') {
			query = 1;
		} else if (ch == '/') {
			k = *nseg;
			if (k < HTTP_AGG_SEGS) {
				segs->hash[k] = hash;
				segs->len[k] = seglen;
			}
			*nseg = k + 1;
			hash = FNV64_OFFSET;
			seglen = 0;
		} else {
			hash = (hash ^ (__u8)ch) * FNV64_PRIME;
			seglen++;
		}
	}
	if (i >= len)
		return 0;
	k = *nseg;
	if (k < HTTP_AGG_SEGS) {
		segs->hash[k] = hash;
		segs->len[k] = seglen;
	}
	*nseg = k + 1;
	segs->end = i;
	segs->abs = abs;
	/*
	 * From here on only what is read back from memory: the verifier knows its range only,
	 * and checks the rest once, not once per way the loop above ended.
	 */
	return simple_request_tail(ev, segs, key);
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_event);
} agg_event SEC(".maps");

/*
 * The request in agg_event to its labels' histograms if it is simple; 1 if it was. A global
 * function: the verifier checks it once on its own, not once per inlined caller and way there
 * (its loops over the capture made those too many). Its argument is a scalar (Linux 5.6+).
 */
__noinline int http_aggregate(__u64 now)
{
	struct http_agg_key key = {};
	struct http_event *ev;
	struct http_agg *a;
	__u64 dur, body;
	__u32 zero = 0, b;

	ev = bpf_map_lookup_elem(&agg_event, &zero);
	if (!ev || !simple_request(ev, &key))
		return 0;
	if (!now)
		now = bpf_ktime_get_ns();
	if (now - ev->end_ns >= agg_max_age_ns)
		return 0;
	key.status = ev->status;
	a = bpf_map_lookup_elem(&aggs, &key);
	if (!a) {
		struct http_agg *z = bpf_map_lookup_elem(&agg_zero, &zero);

		if (!z)
			return 0;
		bpf_map_update_elem(&aggs, &key, z, BPF_NOEXIST);
		a = bpf_map_lookup_elem(&aggs, &key);
		if (!a) {
			gb_count(&stats, HTTP_ST_AGG_FULL);
			return 0;
		}
	}
	dur = ev->end_ns - ev->start_ns;
	if (!a->count || dur < a->dur_min_ns)
		a->dur_min_ns = dur;
	if (dur > a->dur_max_ns)
		a->dur_max_ns = dur;
	a->count++;
	a->dur_sum_ns += dur;
	b = bucket_of(dur_bounds_ns, HTTP_AGG_DUR_BOUNDS, dur);
	if (b <= HTTP_AGG_DUR_BOUNDS)
		a->dur_buckets[b]++;
	if (ev->resp_head_len) {
		__u64 spent = (__u64)ev->interim_bytes + ev->resp_head_len;

		body = ev->resp_bytes > spent ? ev->resp_bytes - spent : 0;
		if (!a->resp_count || body < a->resp_min)
			a->resp_min = body;
		if (body > a->resp_max)
			a->resp_max = body;
		a->resp_count++;
		a->resp_sum += body;
		b = bucket_of(size_bounds, HTTP_AGG_SIZE_BOUNDS, body);
		if (b <= HTTP_AGG_SIZE_BOUNDS)
			a->resp_buckets[b]++;
	}
	return 1;
}

/* The cheap checks of a simple request, inline: only candidates pay the copy and the call. */
static __always_inline int aggregated(struct http_event *ev, __u64 now)
{
	struct http_event *copy;
	__u32 zero = 0;

	if (ev->pipe_idx || (ev->flags & ~(HTTP_F_TLS | HTTP_F_CLOSED)) || !ev->status ||
	    ev->req_bytes != ev->hdr_len || ev->hdr[0] < 'G' || ev->hdr[0] > 'H')
		return 0;
	copy = bpf_map_lookup_elem(&agg_event, &zero);
	if (!copy)
		return 0;
	__builtin_memcpy(copy, ev, sizeof(*ev));
	return http_aggregate(now);
}

/* NOW: the caller's clock reading, or 0 (read here if needed). */
static __always_inline void emit(struct http_conn *c, __u16 extra_flags, __u64 now)
{
	struct http_event *ev = &c->ev;

	ev->kind = HTTP_EV_REQUEST;
	ev->flags |= extra_flags;
	if (!ev->end_ns)
		ev->end_ns = ev->start_ns;
	gb_count(&stats, HTTP_ST_REQUESTS);
	if (aggregate && aggregated(ev, now))
		return;
	/*
	 * Never wake the reader: it drains on a timer. (A forced wakeup above some fill level
	 * costs an irq_work per record once the level is passed: measured, it tripled the
	 * per-request cost at 20k requests/s with 100 ms drains.) 4 MB hold ~11900 records.
	 */
	gb_ringbuf_output(events, ev, sizeof(*ev), BPF_RB_NO_WAKEUP);
}

/* First segment of a read/write: (buffer, length) from the syscall's arguments. */
static __always_inline int first_segment(long nr, __u64 arg1, __u64 arg2, __u64 *buf, __u64 *len)
{
	struct iovec_u iov;
	__u64 p;

	switch (nr) {
	case NR_read: case NR_write: case NR_recvfrom: case NR_sendto:
		*buf = arg1;
		*len = arg2;
		return 0;
	case NR_readv: case NR_writev:
		p = arg1;
		break;
	case NR_recvmsg: case NR_sendmsg: {
		struct user_msghdr *msg = (void *)arg1;
		if (bpf_probe_read_user(&p, sizeof(p), &msg->msg_iov))
			return -1;
		break;
	}
	default:
		return -1;
	}
	if (bpf_probe_read_user(&iov, sizeof(iov), (void *)p))
		return -1;
	*buf = iov.base;
	*len = iov.len;
	return 0;
}

static __always_inline void start_request(struct http_conn *c, __u32 tid, __u64 buf,
					  __u64 seglen, long n, __u64 now, const char *kdata)
{
	struct http_event *ev = &c->ev;
	__u64 cap = (__u64)n < seglen ? (__u64)n : seglen;

	/* clamp where the verifier sees it (clang would fold a C clamp into something it can't) */
	asm volatile("if %0 <= %1 goto +1; %0 = %1" : "+r"(cap) : "i"(HTTP_HDR_CAP));
	ev->start_ns = now;
	ev->ttfb_ns = 0;
	ev->end_ns = 0;
	ev->req_bytes = n;
	ev->resp_bytes = 0;
	ev->tid = tid;
	ev->status = 0;
	ev->flags = (c->tls ? HTTP_F_TLS : 0) | (c->client ? HTTP_F_CLIENT : 0);
	ev->pipe_idx = 0;
	ev->hdr_len = 0;
	ev->resp_head_len = 0;
	ev->interim_bytes = 0;
	if (kdata) {
		/* already read (a JVM record): a fixed copy, hdr_len says what is valid */
		__builtin_memcpy(ev->hdr, kdata, HTTP_HDR_CAP);
		ev->hdr_len = cap;
	} else if (bpf_probe_read_user(ev->hdr, cap, (void *)buf) == 0) {
		ev->hdr_len = cap;
	} else {
		gb_count(&stats, HTTP_ST_CAPTURE_FAIL);
	}
	c->state = HTTP_CS_REQ;
}

/*
 * Does the capture start like a request line: a method token (upper-case letters, '-', '_',
 * 3 to 31 of them: BASELINE-CONTROL has 16) and a space? Bytes read after a response that do not are the rest of a
 * body the server chose not to read before answering (413, 401 before the upload...).
 */
static __always_inline int starts_request(const char *h, __u16 len)
{
	int i;

	for (i = 0; i < 32; i++) {
		char ch = h[i];

		if (i >= len)
			return 0;
		if (ch == ' ')
			return i >= 3;
		if ((ch < 'A' || ch > 'Z') && ch != '-' && ch != '_')
			return 0;
	}
	return 0;
}

/* "PRI * HTTP/2.0": the HTTP/2 connection preface (prior knowledge, or h2 over TLS). */
static __always_inline int is_h2_preface(const char *h, __u16 len)
{
	return len >= 14 && h[0] == 'P' && h[1] == 'R' && h[2] == 'I' && h[3] == ' ' &&
	       h[4] == '*' && h[5] == ' ' && h[6] == 'H' && h[11] == '2' && h[12] == '.' &&
	       h[13] == '0';
}

/* KDATA: the bytes are already in kernel memory (a JVM record), else NULL: read BUF. */
static __always_inline void on_read(struct http_conn *c, __u32 tid, __u64 buf, __u64 seglen,
				    long n, __u64 now, const char *kdata)
{
	if (c->h2)
		return;
	if (c->state == HTTP_CS_REQ) {
		c->ev.req_bytes += n;
		return;
	}
	if (c->state == HTTP_CS_RESP) {
		emit(c, 0, now);
		c->state = HTTP_CS_IDLE;
	}
	start_request(c, tid, buf, seglen, n, now, kdata);
	if (!starts_request(c->ev.hdr, c->ev.hdr_len)) {
		c->state = HTTP_CS_IDLE;
		gb_count(&stats, HTTP_ST_STRAY_READS);
		return;
	}
	if (is_h2_preface(c->ev.hdr, c->ev.hdr_len)) {
		/* binary frames follow: counted once, never parsed as HTTP/1 */
		c->h2 = 1;
		c->state = HTTP_CS_IDLE;
		gb_count(&stats, HTTP_ST_H2_CONNS);
		return;
	}
	if (emit_request_start) {
		/* the request line is in the capture: say so now, waking the reader */
		c->ev.kind = HTTP_EV_REQUEST_START;
		gb_ringbuf_output(events, &c->ev, sizeof(c->ev), 0);
		c->ev.kind = HTTP_EV_REQUEST;
	}
}

/* "HTTP/1.x NNN" -> NNN, or 0. */
static __always_inline __u16 parse_status(const char *s)
{
	if (s[0] != 'H' || s[1] != 'T' || s[2] != 'T' || s[3] != 'P' || s[4] != '/' ||
	    s[5] != '1' || s[6] != '.' || s[8] != ' ')
		return 0;
	if (s[9] < '0' || s[9] > '9' || s[10] < '0' || s[10] > '9' || s[11] < '0' || s[11] > '9')
		return 0;
	return (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
}

/*
 * The first write of a response: its status, and the head's length when the write's first
 * segment is exactly the head (it ends with CRLF CRLF and was written whole). Two small reads
 * instead of copying the head: the body size follows from the byte count.
 */
static __always_inline __u16 read_response_start(struct http_conn *c, __u64 buf, __u64 seglen,
						 long n, int head_hint, const char *kdata)
{
	char head[HTTP_STATUS_CAP] = {};
	__u32 tail = 0, zero = 0;
	char *h;

	c->ev.resp_head_len = 0;
	if (seglen < 12)
		return 0;
	if (head_hint < 0 && seglen <= (__u64)n && seglen <= HTTP_RESP_HEAD_CAP &&
	    (h = bpf_map_lookup_elem(&resp_scratch, &zero))) {
		/*
		 * A head of usual size, written whole: one read of it all costs less than two
		 * small ones (status, then its last 4 bytes), each paying the user-access setup.
		 */
		__u64 len = seglen, end;

		asm volatile("if %0 <= %1 goto +1; %0 = %1" : "+r"(len) : "i"(HTTP_RESP_HEAD_CAP));
		if (bpf_probe_read_user(h, len, (void *)buf))
			return 0;
		end = (seglen - 4) & (HTTP_RESP_HEAD_CAP - 1);
		__builtin_memcpy(&tail, h + end, 4);
		if (tail == 0x0a0d0a0d)       /* "\r\n\r\n" as a little-endian u32 */
			c->ev.resp_head_len = seglen;
		return parse_status(h);
	}
	if (kdata)
		__builtin_memcpy(head, kdata, sizeof(head));
	else if (bpf_probe_read_user(head, sizeof(head), (void *)buf))
		return 0;
	if (head_hint >= 0)               /* the JVM agent found the head's end itself */
		c->ev.resp_head_len = head_hint;
	else if (seglen <= (__u64)n && seglen <= 0xffffffff &&
	    bpf_probe_read_user(&tail, 4, (void *)(buf + seglen - 4)) == 0 &&
	    tail == 0x0a0d0a0d)           /* "\r\n\r\n" as a little-endian u32 */
		c->ev.resp_head_len = seglen;
	return parse_status(head);
}

static __always_inline void on_write(struct http_conn *c, __u64 buf, __u64 seglen, long n,
				     __u64 now, int head_hint, const char *kdata)
{
	char head[HTTP_STATUS_CAP] = {};
	__u16 status = 0;

	if (c->h2)
		return;
	if (c->state == HTTP_CS_IDLE) {
		gb_count(&stats, HTTP_ST_WRITE_NO_REQ);
		return;
	}
	if (c->state == HTTP_CS_REQ) {
		status = read_response_start(c, buf, seglen, n, head_hint, kdata);
		if (status >= 100 && status < 200 && status != 101) {
			/* 100 Continue: the body is still to be read; the final response comes later */
			c->ev.flags |= HTTP_F_INTERIM;
			c->ev.resp_bytes += n;
			c->ev.interim_bytes += n;
			c->ev.resp_head_len = 0;
			return;
		}
		c->state = HTTP_CS_RESP;
		c->ev.ttfb_ns = now;
		c->ev.status = status;
	} else {
		if (seglen >= 12 && kdata) {
			__builtin_memcpy(head, kdata, sizeof(head));
			status = parse_status(head);
		} else if (seglen >= 12 && bpf_probe_read_user(head, sizeof(head), (void *)buf) == 0) {
			status = parse_status(head);
		}
		if (status && c->ev.resp_bytes) {
			/* a second status line while responding: the next pipelined request's response */
			emit(c, 0, now);
			c->ev.flags = (c->ev.flags & (HTTP_F_TLS | HTTP_F_CLIENT)) | HTTP_F_PIPELINED;
			c->ev.pipe_idx += 1;
			c->ev.req_bytes = 0;
			c->ev.resp_bytes = 0;
			c->ev.ttfb_ns = now;
			c->ev.interim_bytes = 0;
			c->ev.status = read_response_start(c, buf, seglen, n, head_hint, kdata);
		}
	}
	c->ev.resp_bytes += n;
	c->ev.end_ns = now;
}

static __always_inline void peer_from_fd(struct http_conn *c, long fd, int peer);

static __always_inline void on_accept(__u32 tgid, long fd, __u64 sockaddr)
{
	struct http_conn_key key = {.tgid = tgid, .fd = fd};
	struct http_conn *c;
	__u32 zero = 0;
	struct {
		__u16 family;
		__u16 port;
		__u32 flowinfo_or_v4;
		__u8 v6[16];
	} sa = {};

	c = bpf_map_lookup_elem(&zero_conn, &zero);
	if (!c)
		return;
	if (bpf_map_lookup_elem(&conns, &key))
		gb_count(&stats, HTTP_ST_STALE_CONN);
	if (bpf_map_update_elem(&conns, &key, c, BPF_ANY)) {
		gb_count(&stats, HTTP_ST_CONN_FULL);
		return;
	}
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c)
		return;
	c->ev.pid = tgid;
	c->ev.fd = fd;
	c->born_ns = bpf_ktime_get_ns();
	if (sockaddr && bpf_probe_read_user(&sa, sizeof(sa), (void *)sockaddr) == 0 &&
	    (sa.family == AF_INET || sa.family == AF_INET6)) {
		c->ev.family = sa.family;
		c->ev.cport = bpf_ntohs(sa.port);
		if (sa.family == AF_INET)
			__builtin_memcpy(c->ev.caddr, &sa.flowinfo_or_v4, 4);
		else
			__builtin_memcpy(c->ev.caddr, sa.v6, 16);
		if (emit_request_start)
			peer_from_fd(c, fd, 0);
		return;
	}
	peer_from_fd(c, fd, 1);
	if (emit_request_start)
		peer_from_fd(c, fd, 0);
}

/*
 * From the new socket itself (task -> fd table -> sock): the peer when accept(fd, NULL, NULL)
 * gave no address (PEER), or our own address and port (!PEER, for tagging).
 */
static __always_inline void peer_from_fd(struct http_conn *c, long fd, int peer)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	struct file *file = NULL;
	struct socket *sock;
	struct sock *sk;
	__u16 family;

	if (!fds || bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return;
	sock = BPF_CORE_READ(file, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	c->ev.family = family;
	if (!peer) {
		c->ev.sport = BPF_CORE_READ(sk, __sk_common.skc_num);    /* host order already */
		if (family == AF_INET)
			bpf_core_read(c->ev.saddr, 4, &sk->__sk_common.skc_rcv_saddr);
		else if (family == AF_INET6)
			bpf_core_read(c->ev.saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		return;
	}
	c->ev.cport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET)
		bpf_core_read(c->ev.caddr, 4, &sk->__sk_common.skc_daddr);
	else if (family == AF_INET6)
		bpf_core_read(c->ev.caddr, 16, &sk->__sk_common.skc_v6_daddr);
}

static __always_inline void on_close(struct http_conn_key *key, struct http_conn *c)
{
	if (c->state == HTTP_CS_RESP)
		emit(c, HTTP_F_CLOSED, 0);
	else if (c->state == HTTP_CS_REQ)
		emit(c, HTTP_F_CLOSED | HTTP_F_NO_RESPONSE, 0);
	if (c->engine_bound) {
		struct http_jvm_key jk = {.tgid = key->tgid, .conn_id = c->engine_id};

		bpf_map_delete_elem(&jvm_binds, &jk);
	}
	if (emit_request_start && !c->ignored) {
		c->ev.kind = HTTP_EV_CONN_CLOSE;
		c->ev.start_ns = bpf_ktime_get_ns();     /* the entry goes away: reuse it */
		gb_ringbuf_output(events, &c->ev, sizeof(c->ev), BPF_RB_NO_WAKEUP);
	}
	bpf_map_delete_elem(&conns, key);
}

/*
 * The first byte a client sends on a TLS connection: a handshake record, 0x16; on a connection
 * that was open before we started, any record type (0x14-0x17: change cipher spec, alert,
 * handshake, application data). Never the first byte of an HTTP/1 request line (a method is
 * a token of letters). One byte is enough.
 */
static __always_inline int looks_like_tls(__u64 buf)
{
	__u8 b = 0;

	return bpf_probe_read_user(&b, 1, (void *)buf) == 0 && b >= 0x14 && b <= 0x17;
}

static __always_inline void note_last_conn(struct http_conn_key *key, struct http_conn *c)
{
	struct http_jvm_bind *last = bpf_task_storage_get(&jvm_last_conn,
							   bpf_get_current_task_btf(), 0,
							   BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (last) {
		last->fd = key->fd;
		last->born_ns = c->born_ns;
	}
}

static __always_inline int on_jvm_records(__u64 pid_tgid, __u64 buf, long n);

/*
 * A read or write of NR on a followed connection, after the hook found its entry: the part
 * shared by the syscall hook and the socket hook. RET > 0 (bytes moved); ARG1/ARG2 are the
 * syscall's second and third arguments (buffer or iovec, length).
 */
static __always_inline void on_io(struct http_conn_key *key, struct http_conn *c, __u64 pid_tgid,
				  long nr, long ret, __u64 arg1, __u64 arg2, int peek)
{
	__u64 buf = 0, seglen = 0, now;
	__u32 tid = pid_tgid;

	if (c->tls) {
		if (c->engine_bound)
			return;
		/* ciphertext: only note which socket an SSL call in flight on this thread uses */
		struct http_ssl_call *call = bpf_map_lookup_elem(&ssl_calls, &tid);
		if (call)
			call->fd = key->fd;
		note_last_conn(key, c);
		return;
	}
	now = bpf_ktime_get_ns();
	if (nr == NR_sendfile || nr == NR_splice) {
		if (c->state == HTTP_CS_REQ) {
			c->state = HTTP_CS_RESP;
			c->ev.ttfb_ns = now;
		}
		if (c->state == HTTP_CS_RESP) {
			c->ev.resp_bytes += ret;
			c->ev.end_ns = now;
		}
		return;
	}
	/* MSG_PEEK (nginx peeks at the first byte to tell TLS from plain HTTP): read again later */
	if (peek)
		return;
	if (first_segment(nr, arg1, arg2, &buf, &seglen))
		return;
	if (nr == NR_read || nr == NR_readv || nr == NR_recvfrom || nr == NR_recvmsg) {
		if (!c->seen && looks_like_tls(buf)) {
			c->tls = 1;
			gb_count(&stats, HTTP_ST_TLS_CONNS);
			c->ev.kind = HTTP_EV_TLS_CONN;
			c->ev.start_ns = now;
			c->ev.tid = tid;
			gb_ringbuf_output(events, &c->ev, sizeof(c->ev), BPF_RB_NO_WAKEUP);
			struct http_ssl_call *call = bpf_map_lookup_elem(&ssl_calls, &tid);
			if (call)
				call->fd = key->fd;
			note_last_conn(key, c);
			return;
		}
		c->seen = 1;
		on_read(c, pid_tgid, buf, seglen, ret, now, NULL);
	} else {
		on_write(c, buf, seglen, ret, now, -1, NULL);
	}
}

/*
 * The syscall hook, for kernels without the socket tracepoints (before 6.3): sys_exit of every
 * syscall of every task (the tracepoint puts them all on the slow path).
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(http_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = regs->orig_ax;
	struct http_conn_key key;
	struct http_conn *c;
	__u64 pid_tgid, arg0, arg1, arg2;
	__u32 tgid;
	int peek;

	/* failed calls (EAGAIN reads of non-blocking servers) change nothing: no lookup at all */
	if (!is_traced_nr(nr) || ret < 0)
		return 0;
	pid_tgid = bpf_get_current_pid_tgid();
	tgid = pid_tgid >> 32;
	/* read the arguments once: the pt_regs pointer must not reach shared helper code */
	arg0 = regs->di;
	arg1 = regs->si;
	arg2 = regs->dx;
	/* every syscall of every process comes here: others stop at one load */
	if (!target_slot(tgid))
		return 0;
	if (nr == NR_accept || nr == NR_accept4) {
		if (is_target(tgid))
			on_accept(tgid, ret, arg1);
		return 0;
	}
	/* only targets have connections here, so the connection lookup is the rest of the filter */
	key.tgid = tgid;
	key.fd = arg0;
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c)
		return 0;
	if (c->bridge) {
		if (nr != NR_write)
			return 0;
		if (!on_jvm_records(pid_tgid, arg1, ret))
			gb_count(&stats, HTTP_ST_JVM_BAD);
		return 0;
	}
	if (nr == NR_close) {
		on_close(&key, c);
		return 0;
	}
	if (ret == 0)
		return 0;
	peek = (nr == NR_recvfrom && (regs->r10 & MSG_PEEK)) ||
	       (nr == NR_recvmsg && (arg2 & MSG_PEEK));
	on_io(&key, c, pid_tgid, nr, ret, arg1, arg2, peek);
	return 0;
}

/* --- the socket hook (Linux 6.3+): sock_recv_length / sock_send_length ---------------------- */

/*
 * These fire in sock_recvmsg/sock_sendmsg only, so nothing but socket I/O pays for them (any
 * syscall tracepoint puts every syscall of every task on the slow path). The syscall that got
 * there, and its arguments, are in the task's user registers (bpf_task_pt_regs). There is no
 * socket tracepoint at accept or close, so:
 *  - an entry is made at a target's first I/O on a TCP socket: a read makes a followed
 *    connection (an HTTP client speaks first: we are its server), a write an ignored one;
 *  - the socket's own storage (sk_conns) says it is followed or ignored, and under which fd:
 *    sockets without it (other processes') pay the target filter only;
 *  - the entry keeps its struct sock: I/O on the same fd with another sock means the connection
 *    was closed unseen (it is finished then); a close(2) that ends the TCP connection is seen
 *    at inet_sock_set_state, in the closing task (per connection, not per syscall).
 */
static __always_inline int is_sock_nr(long nr)
{
	switch (nr) {
	case NR_read: case NR_write: case NR_readv: case NR_writev: case NR_sendfile:
	case NR_sendto: case NR_recvfrom: case NR_sendmsg: case NR_recvmsg: case NR_splice:
		return 1;
	}
	return 0;
}

/* A new entry for the socket SK behind KEY, in a target: followed unless it is an outbound one. */
static __always_inline struct http_conn *sock_adopt(struct http_conn_key *key, struct sock *sk,
						    int is_send)
{
	struct http_conn *c;
	__u32 zero = 0;
	__u16 family = sk->__sk_common.skc_family;

	if ((family != AF_INET && family != AF_INET6) || sk->sk_protocol != IPPROTO_TCP)
		return NULL;
	if (is_send && !seeded)
		return NULL;
	if (!is_target(key->tgid))
		return NULL;
	c = bpf_map_lookup_elem(&zero_conn, &zero);
	if (!c)
		return NULL;
	if (bpf_map_update_elem(&conns, key, c, BPF_ANY)) {
		gb_count(&stats, HTTP_ST_CONN_FULL);
		return NULL;
	}
	c = bpf_map_lookup_elem(&conns, key);
	if (!c)
		return NULL;
	c->sk = (__u64)sk;
	c->born_ns = bpf_ktime_get_ns();
	c->ignored = is_send;
	c->ev.pid = key->tgid;
	c->ev.fd = key->fd;
	c->ev.family = family;
	c->ev.cport = bpf_ntohs(sk->__sk_common.skc_dport);
	if (family == AF_INET)
		bpf_probe_read_kernel(c->ev.caddr, 4, &sk->__sk_common.skc_daddr);
	else
		bpf_probe_read_kernel(c->ev.caddr, 16, &sk->__sk_common.skc_v6_daddr);
	if (emit_request_start) {
		c->ev.sport = sk->__sk_common.skc_num;    /* host order already */
		if (family == AF_INET)
			bpf_probe_read_kernel(c->ev.saddr, 4, &sk->__sk_common.skc_rcv_saddr);
		else
			bpf_probe_read_kernel(c->ev.saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
	}
	return c;
}

/*
 * The JVM agent's recv transport: a read of an empty UDP socket that fails with EAGAIN, the
 * record in its buffer. Told by the record's magic in a target process (not by the fd: the
 * agent may replace a channel that an interrupted thread closed).
 */
static __always_inline void sock_bridge_record(__u64 pid_tgid, long nr, __u64 buf, __u64 len)
{
	__u32 tgid = pid_tgid >> 32;

	if (nr != NR_recvfrom && nr != NR_read)
		return;
	if (!is_target(tgid))
		return;
	on_jvm_records(pid_tgid, buf, len);
}

static __always_inline int on_sock_io(struct sock *sk, long ret, int flags, int is_send)
{
	struct task_struct *task;
	struct pt_regs *regs;
	struct http_conn_key key;
	struct http_conn *c;
	struct http_sk *st = NULL;
	__u64 pid_tgid, arg1, arg2;
	__u32 tgid;
	long nr;

	pid_tgid = bpf_get_current_pid_tgid();
	tgid = pid_tgid >> 32;
	if (ret >= 0) {
		/*
		 * Other processes stop at their target slot; the socket's own storage says whether
		 * we follow it (ignored ones stop here), else the rest of the target filter.
		 */
		int slot = target_slot(tgid);

		if (!slot)
			return 0;
		st = bpf_sk_storage_get(&sk_conns, sk, 0, 0);
		if (st && st->tgid == tgid) {
			if (st->ignored)
				return 0;
		} else if (slot == 2 && !bpf_map_lookup_elem(&targets, &tgid)) {
			return 0;
		}
	} else {
		/* failures change nothing, except the JVM bridge's EAGAIN reads of a UDP socket */
		if (ret != -EAGAIN || is_send || sk->sk_type != SOCK_DGRAM)
			return 0;
	}
	task = bpf_get_current_task_btf();
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	nr = regs->orig_ax;
	if (!is_sock_nr(nr))
		return 0;       /* not a syscall we know the arguments of (io_uring, the kernel's own) */
	arg1 = regs->si;
	arg2 = regs->dx;
	if (ret < 0) {
		sock_bridge_record(pid_tgid, nr, arg1, arg2);
		return 0;
	}
	key.tgid = tgid;
	/* splice(fd_in, off_in, fd_out, ...): the socket is fd_out when it sends */
	key.fd = nr == NR_splice ? (is_send ? (__u32)regs->dx : (__u32)-1) : regs->di;
	c = bpf_map_lookup_elem(&conns, &key);
	if (c && c->sk == (__u64)sk && st && st->tgid == tgid && st->fd == key.fd)
		goto known;
	if (c && c->sk != (__u64)sk) {
		if (c->bridge)
			return 0;
		if (!c->sk) {
			c->sk = (__u64)sk;        /* taken from /proc before we started: now known */
		} else {
			/* the fd names another socket: the connection we followed was closed unseen */
			gb_count(&stats, HTTP_ST_REUSED_FD);
			on_close(&key, c);
			c = NULL;
		}
	}
	if (!c) {
		/* a read of 0 (peer closed) or a peek makes no connection */
		if (!is_send && ret == 0)
			return 0;
		c = sock_adopt(&key, sk, is_send);
		if (!c)
			return 0;
	}
	/* remember on the socket that it is followed (or ignored), and under which fd */
	st = bpf_sk_storage_get(&sk_conns, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (st) {
		st->tgid = tgid;
		st->fd = key.fd;
		st->ignored = c->ignored;
	}
known:
	if (c->ignored || ret == 0)
		return 0;
	if (c->engine_bound) {
		/* a JVM engine's ciphertext: the socket's later I/O stops at its storage */
		if (st)
			st->ignored = 1;
		return 0;
	}
	on_io(&key, c, pid_tgid, nr, ret, arg1, arg2, !is_send && (flags & MSG_PEEK));
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(http_sock_recv, struct sock *sk, int ret, int flags)
{
	return on_sock_io(sk, ret, flags, 0);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(http_sock_send, struct sock *sk, int ret, int flags)
{
	return on_sock_io(sk, ret, flags, 1);
}

/*
 * close(2) of a followed connection, in the closing task (the deferred fput runs before the
 * return to user space, with the close's registers): its TCP state changes there
 * (inet_sock_set_state), or, if a reset already closed it, the socket is destroyed there
 * (tcp_destroy_sock). Both fire per connection, not per syscall; in any other task or in
 * softirq the registers are not a close of ours and the sock does not match.
 */
static __always_inline void sock_closed(struct sock *sk)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	struct http_conn_key key;
	struct http_conn *c;

	if (regs->orig_ax != NR_close)
		return;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.fd = regs->di;
	c = bpf_map_lookup_elem(&conns, &key);
	if (c && c->sk == (__u64)sk)
		on_close(&key, c);
}

/*
 * Any state change inside the close(2) is the close: after shutdown(2) the socket may be in
 * FIN_WAIT1/2, LAST_ACK or CLOSING there (CLOSING when the two FINs crossed on the wire:
 * measured one close in ten missed behind a router with Python's http.server).
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(http_sock_state, struct sock *sk, int oldstate, int newstate)
{
	sock_closed(sk);
	return 0;
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(http_sock_destroy, struct sock *sk)
{
	sock_closed(sk);
	return 0;
}

/*
 * The JVM bridge alone on the socket tracepoint: beside the syscall hook on kernels that have
 * it (the agent's transport follows the kernel, not the hook).
 */
SEC("tp_btf/sock_recv_length")
int BPF_PROG(http_sock_bridge, struct sock *sk, int ret, int flags)
{
	struct pt_regs *regs;

	if (ret != -EAGAIN || sk->sk_type != SOCK_DGRAM)
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	sock_bridge_record(bpf_get_current_pid_tgid(), regs->orig_ax, regs->si, regs->dx);
	return 0;
}

/* --- OpenSSL: SSL_read/SSL_write(ssl, buf, num) and the _ex forms (…, size_t *done) ---------- */

static __always_inline int ssl_enter(struct pt_regs *ctx, int is_write, int ex)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, tid = pid_tgid;
	struct http_ssl_call call = {};

	if (!is_target(tgid))
		return 0;
	call.ssl = PT_REGS_PARM1(ctx);
	call.buf = PT_REGS_PARM2(ctx);
	call.len_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
	call.fd = (__u32)-1;
	call.is_write = is_write;
	bpf_map_update_elem(&ssl_calls, &tid, &call, BPF_ANY);
	return 0;
}

static __always_inline int ssl_exit(struct pt_regs *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = pid_tgid;
	struct http_ssl_call *call = bpf_map_lookup_elem(&ssl_calls, &tid);
	struct http_conn_key key;
	struct http_conn *c;
	/* SSL_read/SSL_write return an int: -1 arrives as 0xffffffff in the 64-bit register */
	long ret = (int)PT_REGS_RC(ctx), n = ret;
	__u32 *fdp;

	if (!call)
		return 0;
	if (call->len_ptr) {
		__u64 done = 0;
		if (ret != 1 || bpf_probe_read_user(&done, sizeof(done), (void *)call->len_ptr))
			goto out;
		n = done;
	}
	if (n <= 0)
		goto out;
	key.tgid = pid_tgid >> 32;
	if (call->fd != (__u32)-1) {
		key.fd = call->fd;
		bpf_map_update_elem(&ssl_fds, &call->ssl, &key.fd, BPF_ANY);
	} else {
		fdp = bpf_map_lookup_elem(&ssl_fds, &call->ssl);
		if (!fdp) {
			gb_count(&stats, HTTP_ST_SSL_UNLINKED);
			goto out;
		}
		key.fd = *fdp;
	}
	c = bpf_map_lookup_elem(&conns, &key);
	if (!c) {
		gb_count(&stats, HTTP_ST_SSL_UNLINKED);
		goto out;
	}
	c->tls = 1;
	if (call->is_write)
		on_write(c, call->buf, n, n, bpf_ktime_get_ns(), -1, NULL);
	else
		on_read(c, tid, call->buf, n, n, bpf_ktime_get_ns(), NULL);
out:
	bpf_map_delete_elem(&ssl_calls, &tid);
	return 0;
}

SEC("uprobe") int BPF_KPROBE(http_ssl_read) { return ssl_enter(ctx, 0, 0); }
SEC("uprobe") int BPF_KPROBE(http_ssl_write) { return ssl_enter(ctx, 1, 0); }
SEC("uprobe") int BPF_KPROBE(http_ssl_read_ex) { return ssl_enter(ctx, 0, 1); }
SEC("uprobe") int BPF_KPROBE(http_ssl_write_ex) { return ssl_enter(ctx, 1, 1); }
SEC("uretprobe") int BPF_KRETPROBE(http_ssl_ret) { return ssl_exit(ctx); }

/* --- JVM: plaintext records written by the Java agent (java/) ------------------------------ */

#define JVM_HDR_SIZE __builtin_offsetof(struct http_jvm_record, data)

/*
 * The records of one system call, read here (too big for the stack): the agent sends one, or a
 * batch of up to HTTP_JVM_BATCH_MAX back to back. The tail leaves room for a whole record at
 * any offset the walk reaches, so that the verifier sees every record's read in bounds.
 */
#define JVM_BATCH_BYTES (HTTP_JVM_BATCH_MAX * sizeof(struct http_jvm_record))

struct http_jvm_records {
	__u8 bytes[JVM_BATCH_BYTES];
	struct http_jvm_record tail;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_jvm_records);
} jvm_scratch SEC(".maps");

/*
 * An accepted connection of the JVM. A stream's socket syscall happens inside the hooked call,
 * so the thread's last TLS connection is the stream's. An engine is bound to a connection at
 * its first record (its first plaintext follows the read that carried it, on the same thread)
 * and keeps it: it may unwrap bytes that an earlier read left in its buffer.
 */
static __always_inline struct http_conn *jvm_server_conn(__u32 tgid,
							 struct http_jvm_record *r,
							 struct http_conn_key *key)
{
	struct http_jvm_key jk = {.tgid = tgid, .conn_id = (__u32)r->conn_id};
	struct http_jvm_bind *b, *last;
	struct http_conn *c;

	key->tgid = tgid;
	if (!(r->flags & HTTP_JVM_F_SOCKET)) {
		b = bpf_map_lookup_elem(&jvm_binds, &jk);
		if (b) {
			key->fd = b->fd;
			c = bpf_map_lookup_elem(&conns, key);
			if (c && c->born_ns == b->born_ns)
				return c;
		}
	}
	/* a held record comes from whichever thread sent the next one: never a bind */
	if (r->flags & HTTP_JVM_F_HELD)
		return NULL;
	last = bpf_task_storage_get(&jvm_last_conn, bpf_get_current_task_btf(), 0, 0);
	if (!last)
		return NULL;
	key->fd = last->fd;
	c = bpf_map_lookup_elem(&conns, key);
	if (!c || c->born_ns != last->born_ns)
		return NULL;
	if (!(r->flags & HTTP_JVM_F_SOCKET)) {
		/* while the entry lives (the bind is deleted with it: no LRU eviction of a live
		 * engine, whose socket I/O no longer names it the thread's last connection) */
		bpf_map_update_elem(&jvm_binds, &jk, last, BPF_ANY);
		c->engine_bound = 1;
		c->engine_id = jk.conn_id;
	}
	return c;
}

/* An outbound connection of the JVM: keyed by the socket's identity, its peer from the record. */
static __always_inline struct http_conn *jvm_client_conn(__u32 tgid, struct http_jvm_record *r,
							 struct http_conn_key *key)
{
	struct http_conn *c;
	__u32 zero = 0;

	key->tgid = tgid;
	key->fd = 0x80000000 | (__u32)r->conn_id;   /* above any fd: not a socket we follow */
	c = bpf_map_lookup_elem(&conns, key);
	if (c || r->dir == HTTP_JVM_CLOSE)
		return c;
	c = bpf_map_lookup_elem(&zero_conn, &zero);
	if (!c)
		return NULL;
	if (bpf_map_update_elem(&conns, key, c, BPF_NOEXIST)) {
		gb_count(&stats, HTTP_ST_CONN_FULL);
		return NULL;
	}
	c = bpf_map_lookup_elem(&conns, key);
	if (!c)
		return NULL;
	c->ev.pid = tgid;
	c->ev.fd = key->fd;
	c->ev.family = r->family;
	c->ev.cport = r->peer_port;
	__builtin_memcpy(c->ev.caddr, r->peer_addr, 16);
	c->tls = 1;
	c->client = 1;
	c->seen = 1;
	c->born_ns = bpf_ktime_get_ns();
	return c;
}

/*
 * The records at BUF (N bytes long), headers and data of all in ONE read into the per-CPU
 * scratch, or NULL if the first is no record. A user-memory read is the dearest step here
 * (80-100 ns on the dev VM whatever its size or destination, a kernel read 35).
 */
static __always_inline struct http_jvm_records *read_jvm_records(__u64 buf, long n)
{
	__u32 zero = 0;
	struct http_jvm_records *rs = bpf_map_lookup_elem(&jvm_scratch, &zero);
	__u64 len = n;

	if (!rs || n < (long)JVM_HDR_SIZE)
		return NULL;
	asm volatile("if %0 <= %1 goto +1; %0 = %1" : "+r"(len) : "i"(JVM_BATCH_BYTES));
	if (bpf_probe_read_user(rs, len, (void *)buf) ||
	    ((struct http_jvm_record *)rs)->magic != HTTP_JVM_MAGIC)
		return NULL;
	return rs;
}

/*
 * A record R of N bytes, already read: its plaintext goes to the connection's request (found
 * and left in KEY).
 */
static __always_inline void on_jvm_record(__u64 pid_tgid, struct http_jvm_record *r, long n,
					  struct http_conn_key *key)
{
	__u32 tid = pid_tgid, tgid = pid_tgid >> 32;
	struct http_conn *c;
	__u64 copied, now;
	int client;

	gb_count(&stats, HTTP_ST_JVM_RECORDS);
	copied = r->copied;
	if (copied > (__u64)(n - JVM_HDR_SIZE))
		copied = n - JVM_HDR_SIZE;
	client = r->flags & HTTP_JVM_F_CLIENT;
	c = client ? jvm_client_conn(tgid, r, key) : jvm_server_conn(tgid, r, key);
	if (!c) {
		if (r->dir != HTTP_JVM_CLOSE)
			gb_count(&stats, HTTP_ST_JVM_UNLINKED);
		return;
	}
	if (r->dir == HTTP_JVM_CLOSE) {
		if (client)
			on_close(key, c);
		return;
	}
	c->tls = 1;
	/* a batched record is dated to its call */
	now = bpf_ktime_get_ns() - (__u64)r->age_us * 1000;
	/* a client sends the request and receives the response: the directions swap */
	if ((r->dir == HTTP_JVM_RECV) != !!client)
		on_read(c, tid, 0, copied, r->len, now, (const char *)r->data);
	else
		on_write(c, 0, copied, r->len, now, r->head_len, (const char *)r->data);
}

/*
 * The record at offset OFF of the scratch, N bytes long. A global function: the verifier checks
 * it once on its own, not once per record of the walk (its arguments are scalars, Linux 5.6+).
 */
__noinline int http_jvm_record(__u64 pid_tgid, __u32 off, __u32 n)
{
	__u32 zero = 0;
	struct http_jvm_records *rs = bpf_map_lookup_elem(&jvm_scratch, &zero);
	struct http_conn_key key;
	__u64 at = off;

	if (!rs || n < JVM_HDR_SIZE)
		return 0;
	asm volatile("if %0 <= %1 goto +1; %0 = %1" : "+r"(at) : "i"(JVM_BATCH_BYTES));
	on_jvm_record(pid_tgid, (void *)rs->bytes + at, n, &key);
	return 0;
}

/*
 * The records of one system call at BUF (N bytes), each JVM_HDR_SIZE + copied bytes long, back
 * to back, at most HTTP_JVM_BATCH_MAX. Returns 0 if BUF holds no record; anything else that is
 * not a record is counted as bad, and stops the walk.
 */
static __always_inline int on_jvm_records(__u64 pid_tgid, __u64 buf, long n)
{
	struct http_jvm_records *rs = read_jvm_records(buf, n);
	struct http_jvm_record *r;
	__u64 off = 0, len;
	int i;

	if (!rs)
		return 0;
	if (n > (long)JVM_BATCH_BYTES) {
		gb_count(&stats, HTTP_ST_JVM_BAD);      /* more than a batch: the rest is not read */
		n = JVM_BATCH_BYTES;
	}
	for (i = 0; i < HTTP_JVM_BATCH_MAX; i++) {
		asm volatile("if %0 <= %1 goto +1; %0 = %1" : "+r"(off) : "i"(JVM_BATCH_BYTES));
		r = (void *)rs->bytes + off;
		if (n - off < JVM_HDR_SIZE || r->magic != HTTP_JVM_MAGIC ||
		    r->copied > HTTP_JVM_DATA_CAP) {
			gb_count(&stats, HTTP_ST_JVM_BAD);
			return 1;
		}
		len = JVM_HDR_SIZE + r->copied;
		if (len > n - off)
			len = n - off;              /* cut short: what there is of its data */
		http_jvm_record(pid_tgid, off, len);
		off += len;
		if (off >= (__u64)n)
			return 1;
	}
	gb_count(&stats, HTTP_ST_JVM_BAD);              /* more records than a batch holds */
	return 1;
}

/* --- target processes that appear later ---------------------------------------------------- */

static __always_inline void add_target(__u32 tgid)
{
	__u32 i = tgid & target_slot_mask;
	__u8 one = 1;
	__u64 *v, was;

	if (bpf_map_update_elem(&targets, &tgid, &one, BPF_ANY)) {
		gb_count(&stats, HTTP_ST_TARGETS_FULL);
		return;
	}
	v = bpf_map_lookup_elem(&target_slots, &i);
	if (!v)
		return;
	was = __sync_val_compare_and_swap(v, 0, (__u64)tgid);
	if (was && was != tgid)
		__sync_lock_test_and_set(v, TARGET_SLOT_SHARED);   /* two targets here: ask the hash */
}

static __always_inline void forget_target(__u32 tgid)
{
	__u32 i = tgid & target_slot_mask;
	__u64 *v = bpf_map_lookup_elem(&target_slots, &i);

	bpf_map_delete_elem(&targets, &tgid);
	if (v)
		__sync_val_compare_and_swap(v, (__u64)tgid, 0);    /* a shared slot stays shared */
}

/* Children of targets are targets (nginx's workers are forked by its master). */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(http_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid, ctgid = child->tgid;

	if (ptgid != ctgid && is_target(ptgid))
		add_target(ctgid);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(http_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	char comm[16] = {};
	__u64 cg;

	bpf_get_current_comm(comm, sizeof(comm));
	cg = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&target_comms, comm) || bpf_map_lookup_elem(&target_cgroups, &cg))
		add_target(p->tgid);
	return 0;
}

static long drop_conn_of(struct bpf_map *map, struct http_conn_key *key, struct http_conn *c,
			 __u32 *tgid)
{
	if (key->tgid == *tgid)
		bpf_map_delete_elem(map, key);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(http_exit, struct task_struct *p)
{
	__u32 tgid = p->tgid;
	/* group_dead is not an argument on older kernels (6.1): do_exit() dropped signal->live before */
	bool group_dead = BPF_CORE_READ(p, signal, live.counter) == 0;

	/*
	 * When the last thread of a target exits, forget it and its connections now (rare, so
	 * walking the table is fine): a later process reusing the pid never meets them -- the
	 * connection table is the syscall hook's only filter.
	 */
	if (!group_dead || !is_target(tgid))
		return 0;
	forget_target(tgid);
	bpf_for_each_map_elem(&conns, drop_conn_of, &tgid, 0);
	return 0;
}

/*
 * The cost floor for benchmarks: the same hook, rejecting on syscall number and target pid only
 * (with the tracer's own target filter: its slot, then the hash).
 */
SEC("tp_btf/sys_exit")
int BPF_PROG(http_floor_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = regs->orig_ax;
	__u32 tgid;

	if (!is_traced_nr(nr))
		return 0;
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (!is_target(tgid))
		return 0;
	return 0;
}

/*
 * A second floor, for the benchmark only (autoload off unless asked): the socket-layer
 * tracepoints sock_send_length/sock_recv_length (Linux 6.3+) fire in sock_sendmsg/recvmsg
 * only, so they do not put every task's syscalls on the slow path as any syscall tracepoint
 * does. They filter by pid and read the syscall's registers (bpf_task_pt_regs), which is what
 * a tracer built on them would need. Measured against the sys_exit floor to decide whether
 * the tracer should move there.
 */
static __always_inline int sock_floor(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct pt_regs *regs;

	if (!is_target(tgid))
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	return regs->orig_ax == NR_read ? 1 : 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(http_sockfloor_recv, struct sock *sk, int ret, int flags) { return sock_floor(); }

SEC("tp_btf/sock_send_length")
int BPF_PROG(http_sockfloor_send, struct sock *sk, int ret, int flags) { return sock_floor(); }
