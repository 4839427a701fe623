/*
 * gridbpf load balancer: the map layouts shared by lb.bpf.c and (through BTF) the Python
 * control plane. These structs are the single source of truth; Python reads them from BTF.
 */
#ifndef GRIDBPF_LB_H
#define GRIDBPF_LB_H

#define LB_MAX_SERVICES   256
#define LB_MAX_BACKENDS   4096      /* backend id 0 means "no backend" */
/* The Maglev tables of all services live in one array: service id * ring_size + slot.
 * 32 tables of the default prime size 65537 (fewer services if the size is larger). */
#define LB_RING_CAPACITY  (32 * 65537)
#define LB_CONNTRACK_SIZE 262144

/* Forwarding modes of a service. */
enum lb_mode {
	LB_MODE_DSR_L2 = 0,  /* rewrite destination MAC, XDP_TX; VIP on the backend's loopback */
	LB_MODE_IPIP   = 1,  /* IPv4-in-IPv4 / IPv6-in-IPv6 (and mixed) encapsulation */
	LB_MODE_GUE    = 2,  /* IP in UDP (GUE variant 1: the UDP payload is the IP packet) */
};

/* Service flags. */
#define LB_SVC_NO_SPORT  1   /* hash without the client's source port */

/* Backend flags. */
#define LB_BE_DOWN       1   /* failed health checks: even established flows move away */

/* Every pass and drop of the datapath has a reason, counted in lb_reasons (per CPU). */
enum lb_reason {
	LB_FWD = 0,               /* forwarded to a backend (not a pass or drop, for reference) */
	LB_FWD_ICMP,              /* an ICMP/ICMPv6 error forwarded to its flow's backend */
	LB_PASS_NOT_IP,           /* not IPv4/IPv6 (ARP, LLDP...) */
	LB_PASS_NO_SERVICE,       /* IP, but not for a configured (VIP, port, protocol) */
	LB_PASS_MALFORMED,        /* IP header truncated or invalid: the kernel's stack decides */
	LB_DROP_FRAGMENT,         /* a fragment to a VIP: no ports, cannot be placed safely */
	LB_DROP_IP_OPTIONS,       /* IPv4 options to a VIP */
	LB_DROP_IPV6_EXT,         /* IPv6 extension headers to a VIP */
	LB_DROP_TRUNCATED,        /* a packet to a VIP shorter than its headers/length fields */
	LB_DROP_NO_BACKEND,       /* service has no usable backend */
	LB_DROP_ENCAP,            /* could not grow the packet for encapsulation */
	LB_REASON_MAX,
};

/* A virtual service: key of lb_services. Addresses in network byte order, IPv4 in addr[0]. */
struct lb_vip_key {
	__u32 addr[4];
	__u16 port;      /* network byte order */
	__u8  proto;     /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  family;    /* 4 or 6 */
};

struct lb_service {
	__u32 id;        /* index of its Maglev table and of lb_service_stats */
	__u32 flags;     /* LB_SVC_* */
	__u32 mode;      /* enum lb_mode */
	__u32 gen;       /* bumped when the service is redefined */
	__u32 epoch;     /* bumped by the control plane each time it writes this service's Maglev
			  * table: an entry placed under the current epoch points where the hash does */
};

struct lb_backend {
	__u32 addr[4];   /* for encapsulation: outer destination (network byte order) */
	__u8  mac[6];    /* DSR: the backend's MAC; encapsulation: the next hop's MAC */
	__u8  family;    /* 4 or 6: family of addr */
	__u8  flags;     /* LB_BE_* */
	__u32 gen;       /* generation: a reused id gets a new one, stale flows re-pick */
};

/* The 5-tuple of a flow as the client sent it; key of lb_conntrack. */
struct lb_flow {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;     /* network byte order */
	__u16 dport;
	__u8  proto;
	__u8  family;
	__u16 pad;
};

struct lb_conn {
	__u32 backend;   /* backend id */
	__u32 gen;       /* the backend's generation when the flow was placed */
	__u32 epoch;     /* the service's table epoch when the flow was placed */
	__u32 hash;      /* the flow hash (its lb_syn_seen slot) */
	__u64 seen_ns;   /* last packet (coarse clock), refreshed at most once per LB_SEEN_REFRESH_NS */
};

/* An entry idle for longer than its protocol's timeout counts as absent (checked at lookup: no
 * timer walks the table). A hit rewrites seen_ns only when it is this old, so a busy flow costs
 * one write per second, not one per packet. */
#define LB_SEEN_REFRESH_NS 1000000000ull

/* What happened to the connection table, per CPU (lb_conn_events). */
enum lb_conn_event {
	LB_CT_INSERTED = 0,       /* an entry recorded for a new flow */
	LB_CT_SYN_UNTRACKED,      /* a SYN placed by the Maglev table alone, nothing recorded */
	LB_CT_OVER_LIMIT,         /* a new flow placed by the table alone: over new_entry_limit */
	LB_CT_EXPIRED,            /* an entry found idle past its timeout, placed again */
	LB_CT_NO_SYN,             /* a TCP packet of an unknown flow whose SYN this node did not see
				   * (a spoofed ACK, a flow moved from another node): placed by hash,
				   * not recorded */
	LB_CT_REUSED,             /* an earlier connection's entry met by a new connection of the
				   * same 5-tuple (its SYN seen after the entry's last packet): rewritten */
	LB_CT_EVENT_MAX,
};

/*
 * SYN-seen filter (lb_syn_seen): direct-mapped by the flow hash, written by every SYN (no
 * allocation, no lock: a lost race only costs a flow its entry), read when a TCP packet of an
 * unknown flow arrives: only a flow whose SYN this node saw within LB_SYN_SEEN_UNITS is recorded.
 * Times are in units of 2^20 ns (about 1 ms) of the coarse clock, compared modulo 2^32.
 */
#define LB_SYN_FILTER_SIZE (1u << 18)
#define LB_SYN_TIME_SHIFT  20
#define LB_SYN_SEEN_UNITS  9537   /* 10 s: the handshake's ACK (or a retransmission) is due */

struct lb_syn_seen {
	__u32 tag;        /* the flow hash */
	__u32 when;       /* coarse ns >> LB_SYN_TIME_SHIFT of the last SYN */
};

/* Per-CPU budget of new entries (lb_entry_budget[0]): at most new_entry_limit per second. */
struct lb_budget {
	__u64 window_ns;  /* start of the current one-second window */
	__u64 used;       /* entries recorded in it */
};

struct lb_stats {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;
};

/* Settings of the encapsulating modes (lb_encap[0]). */
struct lb_encap {
	__u32 v4_src;        /* outer IPv4 source: v4_src | (hash & v4_hash_mask) */
	__u32 v4_hash_mask;  /* host byte order mask, applied then converted */
	__u32 v6_src[4];     /* outer IPv6 source: last word ORed with hash & v6_hash_mask */
	__u32 v6_hash_mask;
	__u16 gue_port;      /* network byte order */
	__u16 pad;
	__u32 table_size;    /* for the commands only: the datapath uses its rodata ring_size */
};

/*
 * Control-plane state, kept in pinned maps so that the daemon and `gridbpf lb` commands share it
 * (the datapath never reads these). Indexed by service id / backend id.
 */
struct lb_service_ctl {
	char  name[32];
	__u32 used;
	__u32 pad;
};

enum lb_backend_state {
	LB_STATE_ACTIVE   = 0,  /* in the Maglev table */
	LB_STATE_DRAINING = 1,  /* out of the table, established flows stay */
};

struct lb_backend_ctl {
	__u32 service;   /* service id */
	__u32 weight;
	__u32 state;     /* enum lb_backend_state */
	__u32 used;      /* 1: this backend id is allocated */
};

#define LB_HASH_SEED 0x67726964u  /* "grid": the same on every node */

#endif
