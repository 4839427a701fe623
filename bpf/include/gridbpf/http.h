/* HTTP request tracing: the records shared by http.bpf.c and gridbpf.trace (read through BTF). */
#ifndef GRIDBPF_HTTP_H
#define GRIDBPF_HTTP_H

/* Bytes of the request kept per request: request line and the first headers. Power of two. */
#define HTTP_HDR_CAP 256
/* Bytes read from the start of a response write: "HTTP/1.1 200 " (status, pipelining). */
#define HTTP_STATUS_CAP 16
/* A response head up to this size (power of two) is read in one go, for its status and end. */
#define HTTP_RESP_HEAD_CAP 512

enum http_event_kind {
	HTTP_EV_REQUEST = 1,     /* one request and its response */
	HTTP_EV_TLS_CONN = 2,    /* a connection whose bytes on the socket are TLS records */
	/* only with the rodata flag emit_request_start (automatic SciTags tagging): */
	HTTP_EV_REQUEST_START = 3, /* a request line was read: method, path and both endpoints */
	HTTP_EV_CONN_CLOSE = 4,  /* a traced connection closed */
};

enum http_flags {
	HTTP_F_TLS = 1,          /* plaintext seen through the SSL_read/SSL_write uprobes */
	HTTP_F_PIPELINED = 2,    /* not the first request of the read that carried it */
	HTTP_F_CLOSED = 4,       /* emitted because the connection closed */
	HTTP_F_INTERIM = 8,      /* an interim 1xx response (100 Continue) came before the final one */
	HTTP_F_NO_RESPONSE = 16, /* the connection closed before any response byte */
	/* 32 is set by userspace: reported from the connection table of an idle connection */
	HTTP_F_CLIENT = 64,      /* we are the client (JVM outbound TLS): the request was sent */
};

enum http_conn_state {
	HTTP_CS_IDLE = 0,        /* accepted, or nothing read yet */
	HTTP_CS_REQ = 1,         /* reading a request (headers and body) */
	HTTP_CS_RESP = 2,        /* writing its response */
};

/* Counters in the per-CPU `stats` array: every drop or oddity is counted. */
enum http_stat {
	HTTP_ST_CONN_FULL = 0,   /* connection table full: the connection is not traced */
	HTTP_ST_CAPTURE_FAIL,    /* the request bytes could not be read from user memory */
	HTTP_ST_SSL_UNLINKED,    /* SSL_read/SSL_write whose socket was never seen: not traced */
	HTTP_ST_TLS_CONNS,       /* connections carrying TLS records on the socket */
	HTTP_ST_STALE_CONN,      /* accept returned an fd we still tracked (close not seen) */
	HTTP_ST_WRITE_NO_REQ,    /* bytes written on a connection with no request read */
	HTTP_ST_TARGETS_FULL,    /* a new target process could not be added */
	HTTP_ST_REQUESTS,        /* requests completed in the kernel (sent or lost) */
	HTTP_ST_STRAY_READS,     /* reads after a response that start no request (a body the
				    server discards after answering early, e.g. 413 or 401) */
	HTTP_ST_H2_CONNS,        /* HTTP/2 connections (preface seen): counted, not parsed */
	HTTP_ST_JVM_RECORDS,     /* plaintext records from the JVM agent */
	HTTP_ST_JVM_BAD,         /* writes on the agent's bridge fd that are no record */
	HTTP_ST_JVM_UNLINKED,    /* JVM records whose connection could not be found: not traced */
	HTTP_ST_REUSED_FD,       /* socket hook: a followed fd named a new socket (close unseen) */
	HTTP_ST_AGG_FULL,        /* aggregation table full: the request was sent as a record */
	HTTP_ST_MAX,
};

struct http_event {
	__u64 start_ns;          /* first request byte read (CLOCK_MONOTONIC) */
	__u64 ttfb_ns;           /* first byte of the final response written, 0 if none */
	__u64 end_ns;            /* last response byte written */
	__u64 req_bytes;
	__u64 resp_bytes;
	__u32 kind;              /* enum http_event_kind */
	__u32 pid;               /* tgid */
	__u32 tid;               /* thread that read the first request byte */
	__u32 fd;
	__u8 caddr[16];          /* client address: IPv4 in the first 4 bytes, or IPv6 */
	__u16 cport;             /* client port, host order */
	__u16 family;            /* AF_INET / AF_INET6, 0 if unknown */
	__u16 status;            /* final response status, 0 if not parsed */
	__u16 flags;             /* enum http_flags */
	__u16 hdr_len;           /* valid bytes in hdr */
	__u16 pipe_idx;          /* index of the request within a pipelined read */
	/*
	 * Response head length: the first write's first segment when it ends with CRLF CRLF
	 * (servers write the head as one buffer: nginx's first iovec, the JDK, Python), else 0
	 * (unknown). The body size is then resp_bytes - interim_bytes - resp_head_len, without
	 * copying the head anywhere.
	 */
	__u32 resp_head_len;
	__u32 interim_bytes;     /* bytes of interim 1xx responses (100 Continue) */
	__u16 sport;             /* server (local) port, host order: only with emit_request_start */
	__u16 _pad;
	__u8 saddr[16];          /* server (local) address, as caddr: only with emit_request_start */
	char hdr[HTTP_HDR_CAP];  /* the request's first bytes */
};

struct http_conn_key {
	__u32 tgid;
	__u32 fd;
};

struct http_conn {
	struct http_event ev;    /* the request being built; sent as is */
	__u8 state;              /* enum http_conn_state */
	__u8 tls;                /* socket carries TLS records: only the SSL uprobes are believed */
	__u8 seen;               /* bytes were read: the TLS check is done on the first read only */
	__u8 h2;                 /* HTTP/2 preface seen: nothing more is parsed */
	__u8 bridge;             /* not a connection: the JVM agent's record fd (set by userspace) */
	__u8 client;             /* a JVM's outbound connection: requests are sent, not received */
	__u8 ignored;            /* socket hook: a socket of a target we do not follow (it spoke
				    first: an outbound connection); its socket storage says so too */
	__u8 engine_bound;       /* a JVM engine's records name this connection (jvm_binds): its
				    socket I/O has nothing more to tell, and is skipped */
	/*
	 * Accept time (syscall hook) or first I/O (socket hook): tells a reused fd number from the
	 * connection (the JVM binds check it).
	 */
	__u64 born_ns;
	/*
	 * Socket hook: the struct sock the entry follows (0: not known yet, e.g. taken from /proc).
	 * I/O on the same fd with another sock means the connection was closed unseen.
	 */
	__u64 sk;
	__u32 engine_id;         /* that engine (record conn_id): its bind goes with this entry */
	__u32 _pad;
};

/* Socket hook: kept on a target's socket (socket local storage) once its entry is made. */
struct http_sk {
	__u32 tgid;
	__u32 fd;                /* the entry's key in `conns` */
	__u8 ignored;            /* an outbound connection: nothing to do */
	__u8 _pad[7];
};

/*
 * JVM TLS bridge. The Java agent (java/) hooks the JDK's SSLEngine wrap/unwrap and SSLSocket
 * streams and hands their records to the kernel on its bridge fd (alone, or server engines'
 * in batches of up to HTTP_JVM_BATCH_MAX a call), which userspace enters in `conns` as a
 * bridge entry; each record's plaintext is fed to the request state machine of the
 * connection it belongs to. No kprobe, no native code. Two transports, the same record:
 *  - write: write(2) of the record to /dev/null, seen by the syscall hook (sys_exit) only;
 *  - recv: a recvfrom(2)/read(2) on an empty non-blocking UDP socket with the record in the
 *    buffer (arg 1) and its length as the size (arg 2): it fails with EAGAIN copying nothing,
 *    and sock_recv_length (Linux 6.3+) sees it. Used wherever the kernel has that tracepoint,
 *    whichever hook the connections use.
 */
#define HTTP_JVM_MAGIC 0x314d564a42524700ULL   /* bytes "\0GRBJVM1" */
#define HTTP_JVM_DATA_CAP 256
#define HTTP_JVM_BATCH_MAX 16    /* records one system call carries at most (the agent's batch) */

enum http_jvm_dir {
	HTTP_JVM_RECV = 0,       /* the application received plaintext (unwrap, input stream) */
	HTTP_JVM_SEND = 1,       /* the application sent plaintext (wrap, output stream) */
	HTTP_JVM_CLOSE = 2,      /* a client-side connection closed */
};

enum http_jvm_flags {
	HTTP_JVM_F_CLIENT = 1,   /* the JVM is the TLS client */
	HTTP_JVM_F_SOCKET = 2,   /* an SSLSocket stream (the socket syscall is inside the call) */
	HTTP_JVM_F_HELD = 4,     /* batched by the agent: sent with later records, age_us old */
};

struct http_jvm_record {
	__u64 magic;
	__u32 conn_id;           /* identity hash of the engine or socket */
	__u32 age_us;            /* batched records: microseconds since the call, else 0 */
	__u32 len;               /* plaintext bytes of this call */
	__u16 copied;            /* valid bytes in data: the first min(len, HTTP_JVM_DATA_CAP) */
	__u16 head_len;          /* sent response heads: length through CRLF CRLF, else 0 */
	__u8 dir;                /* enum http_jvm_dir */
	__u8 flags;              /* enum http_jvm_flags */
	__u16 peer_port;         /* host order, 0 if unknown */
	__u16 family;            /* AF_INET / AF_INET6, 0 if unknown */
	__u16 _pad;
	__u8 peer_addr[16];
	__u8 data[HTTP_JVM_DATA_CAP];
};

/* Which connection an engine (or socket) of a JVM writes to. */
struct http_jvm_key {
	__u32 tgid;
	__u32 conn_id;
};

struct http_jvm_bind {
	__u32 fd;
	__u32 _pad;
	__u64 born_ns;
};

/* An SSL_read/SSL_write call in flight on a thread. */
struct http_ssl_call {
	__u64 ssl;
	__u64 buf;
	__u64 len_ptr;           /* size_t * of the _ex forms, 0 for the plain ones */
	__u32 fd;                /* socket the call touched (set by the syscall hook), or -1 */
	__u8 is_write;
	__u8 _pad[3];
};

/*
 * The agent's metrics aggregated in the kernel (rodata `aggregate`): a request of the simple
 * kind (GET or HEAD, its whole head in the first read and the capture, no body, status known,
 * not pipelined, not a client's) adds to the histograms of its labels here instead of being
 * sent; every other request is sent as a record, as without aggregation.
 */
#define HTTP_AGG_ROUTES 8        /* route templates matched here */
#define HTTP_AGG_SEGS 8          /* path segments a template may have */
#define HTTP_AGG_DUR_BOUNDS 14   /* export.metrics.DURATION_BUCKETS */
#define HTTP_AGG_SIZE_BOUNDS 10  /* export.metrics.SIZE_BUCKETS */

enum http_agg_method {
	HTTP_AGG_GET = 0,
	HTTP_AGG_HEAD = 1,
};

struct http_agg_key {
	__u16 status;
	__u8 method;             /* enum http_agg_method */
	__u8 route;              /* 0: no template matched, else template index + 1 */
};

/* Per CPU, cumulative since load (userspace adds up the CPUs and takes differences). */
struct http_agg {
	__u64 count;
	__u64 dur_sum_ns;
	__u64 dur_min_ns;
	__u64 dur_max_ns;
	__u64 dur_buckets[HTTP_AGG_DUR_BOUNDS + 1];   /* the last one is +Inf */
	__u64 resp_count;        /* requests whose response body size is known */
	__u64 resp_sum;
	__u64 resp_min;
	__u64 resp_max;
	__u64 resp_buckets[HTTP_AGG_SIZE_BOUNDS + 1];
};

/*
 * A route template whose placeholders are whole segments ("/{vo}/{path}"): per segment after
 * the leading '/', a literal (its FNV-1a 64 hash and length) or a placeholder (one segment of
 * at least one byte; the last one, if the template ends with it, takes the rest of the path).
 */
struct http_route {
	__u8 nseg;
	__u8 rest;               /* the last segment is a final placeholder */
	__u8 literal;            /* bit i: segment i is literal */
	__u8 _pad[5];
	__u8 seg_len[HTTP_AGG_SEGS];
	__u64 seg_hash[HTTP_AGG_SEGS];
};

/* A path's first segments, as the route match reads them (per-CPU scratch). */
struct http_path_segs {
	__u64 hash[HTTP_AGG_SEGS];
	__u32 len[HTTP_AGG_SEGS];
	/*
	 * Where the path ends, passed through memory: read back, the verifier knows only its
	 * range, and checks what follows once instead of once per possible value.
	 */
	__u32 end;
	__u32 k;                 /* segments in the path (so far, while it is read) */
	__u32 abs;               /* the path starts with '/' */
	__u32 _pad;
};

#endif
