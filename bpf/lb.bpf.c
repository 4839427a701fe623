/*
 * gridbpf XDP load balancer.
 *
 * For a packet to a virtual service (VIP, port, protocol): find the flow in the per-CPU LRU
 * connection table, or place it with the service's Maglev table (computed in Python, the same
 * on every node), then forward it by L2 direct server return (rewrite the destination MAC,
 * XDP_TX) or encapsulated (IP-in-IP / GUE) toward the backend. ICMP "fragmentation needed"
 * and ICMPv6 "packet too big" about a flow follow that flow. Everything else passes to the
 * kernel; packets to a VIP that cannot be placed safely (fragments, options, truncated) drop.
 * Every outcome is counted by reason in lb_reasons.
 *
 * The connection table matters only for flows that live through a change of the backend set:
 * while the Maglev table is stable, placing by hash gives the same answer (on every node). So a
 * SYN is placed by hash and recorded nowhere (a spoofed SYN never completes a handshake, so a
 * SYN flood neither pays for nor flushes table entries); the flow is recorded at its first
 * packet past the SYN, within a per-CPU budget of new entries per second, and only if this node
 * saw that SYN (the SYN-seen filter: spoofed ACKs take no entries). A SYN does not look the
 * table up: entries of the service's current table epoch agree with the hash. Entries idle
 * past their protocol's timeout count as absent, checked at lookup (no timer walk).
 */
#include "gridbpf/common.h"
#include "gridbpf/packet.h"
#include "gridbpf/lb.h"

char LICENSE[] SEC("license") = "GPL";

/* Enums only the control plane reads by name: put them in the BTF. */
enum lb_reason gb_export_lb_reason __attribute__((unused));
enum lb_mode gb_export_lb_mode __attribute__((unused));
enum lb_backend_state gb_export_lb_backend_state __attribute__((unused));
enum lb_conn_event gb_export_lb_conn_event __attribute__((unused));

/* Slots per Maglev table (a prime); set by the control plane before load. */
const volatile __u32 ring_size = 65537;

/* Connection-table policy, set by the control plane before load (lb.toml [balancer]). */
const volatile __u64 tcp_idle_ns = 900ull * 1000000000;
const volatile __u64 udp_idle_ns = 60ull * 1000000000;
const volatile __u32 new_entry_limit = 20000;   /* new entries per CPU per second; 0: no limit */
const volatile __u32 conntrack_on_syn = 0;      /* 1: record flows at their SYN (flood-prone) */
const volatile __u32 syn_filter = 1;            /* 1: record a TCP flow only if its SYN was seen */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct lb_vip_key);
	__type(value, struct lb_service);
} lb_services SEC(".maps");

/* The VIP addresses alone (port 0, protocol 0): tells "a fragment to a VIP" from other traffic. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, struct lb_vip_key);
	__type(value, __u32);
} lb_vips SEC(".maps");

/* All Maglev tables: backend ids at [service id * ring_size + slot]. Memory-mapped by the
 * control plane, which writes a whole table as one array copy. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_RING_CAPACITY);
	__type(key, __u32);
	__type(value, __u32);
} lb_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend);
} lb_backends SEC(".maps");

/* Connection table: LRU lists per CPU (no shared lock), entries visible to all CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(max_entries, LB_CONNTRACK_SIZE);
	__type(key, struct lb_flow);
	__type(value, struct lb_conn);
} lb_conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_stats);
} lb_service_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_stats);
} lb_backend_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
} lb_reasons SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_CT_EVENT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} lb_conn_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_budget);
} lb_entry_budget SEC(".maps");

/* Which flows this node saw a SYN of, recently (see lb.h). Shared by all CPUs: a flow's SYN and
 * its ACK may arrive on different queues. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_SYN_FILTER_SIZE);
	__type(key, __u32);
	__type(value, struct lb_syn_seen);
} lb_syn_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_encap);
} lb_encap SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_service_ctl);
} lb_service_ctl SEC(".maps");

/* memory-mapped: the control plane scans all 4096 entries as one numpy array */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend_ctl);
} lb_backend_ctl SEC(".maps");

/* What parsing learned about a packet. */
struct lb_pkt {
	struct lb_flow flow;  /* the client's 5-tuple (rebuilt from the quoted packet for ICMP) */
	__u32 l3_len;         /* length of the IP packet from its header */
	__u8 tos;             /* IPv4 TOS / IPv6 traffic class, copied to an outer header */
	__u8 icmp;            /* an ICMP error about the flow: never creates a connection */
	__u8 syn;             /* a TCP SYN without ACK: a new connection, placed by the table */
	__u8 rst;             /* a TCP reset: never creates an entry (it ends what it belongs to) */
};

/*
 * A byte-swapped 16-bit length, with its bound made visible to the verifier: Linux 6.1's
 * verifier does not track bounds through a byte swap, and refuses packet-pointer math with it.
 */
static __always_inline __u32 u16_bounded(__u32 v)
{
	barrier_var(v);
	return v & 0xffff;
}

static __always_inline int verdict(__u32 reason, int action)
{
	gb_count(&lb_reasons, reason);
	return action;
}

/*
 * Ports of a TCP or UDP header at L4. The header must fit in the frame (end) and in the IP
 * packet's own length (l4_len: Ethernet padding is not part of the packet).
 */
static __always_inline int read_ports(void *l4, void *end, __u32 l4_len, __u8 proto,
				      struct lb_pkt *p)
{
	struct lb_flow *f = &p->flow;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end || l4_len < sizeof(struct tcphdr))
			return -1;
		p->syn = th->syn && !th->ack;
		p->rst = th->rst;
	} else {
		if (l4 + sizeof(struct udphdr) > end || l4_len < sizeof(struct udphdr))
			return -1;
	}
	f->sport = ((struct udphdr *)l4)->source;
	f->dport = ((struct udphdr *)l4)->dest;
	return 0;
}

/*
 * An ICMP error quotes the packet that caused it: a reply the backend sent from VIP:port to
 * the client. The flow it belongs to is that packet reversed.
 */
static __always_inline int parse_icmp4_inner(void *l4, void *end, struct lb_pkt *p)
{
	struct iphdr *in = l4 + sizeof(struct icmphdr);
	struct lb_flow f = {};

	if ((void *)(in + 1) > end)
		return LB_DROP_TRUNCATED;
	if (in->version != 4 || in->ihl != 5)
		return LB_DROP_TRUNCATED;
	/* a quoted non-first fragment has no ports where we would read them */
	if (in->frag_off & bpf_htons(GB_IP_OFFSET))
		return LB_DROP_FRAGMENT;
	if (in->protocol != IPPROTO_TCP && in->protocol != IPPROTO_UDP)
		return LB_PASS_NO_SERVICE;
	/* Only the first 8 bytes of the quoted L4 header are guaranteed: the ports. */
	if ((void *)(in + 1) + 8 > end)
		return LB_DROP_TRUNCATED;
	f.family = 4;
	f.proto = in->protocol;
	f.src[0] = in->daddr;
	f.dst[0] = in->saddr;
	f.sport = ((struct udphdr *)(in + 1))->dest;
	f.dport = ((struct udphdr *)(in + 1))->source;
	p->flow = f;
	p->icmp = 1;
	return LB_FWD_ICMP;
}

static __always_inline int parse_ipv4(void *data, void *end, struct lb_pkt *p)
{
	struct iphdr *ip = data + GB_ETH_HLEN;
	__u32 l4_len;
	void *l4;

	if ((void *)(ip + 1) > end)
		return LB_PASS_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return LB_PASS_MALFORMED;
	p->flow.family = 4;
	p->flow.proto = ip->protocol;
	p->flow.src[0] = ip->saddr;
	p->flow.dst[0] = ip->daddr;
	p->tos = ip->tos;
	p->l3_len = u16_bounded(bpf_ntohs(ip->tot_len));
	if (ip->frag_off & bpf_htons(GB_IP_MF | GB_IP_OFFSET))
		return LB_DROP_FRAGMENT;
	if (ip->ihl != 5)
		return LB_DROP_IP_OPTIONS;
	if (p->l3_len < sizeof(*ip) || (void *)ip + p->l3_len > end)
		return LB_DROP_TRUNCATED;
	l4 = ip + 1;
	l4_len = p->l3_len - sizeof(*ip);
	switch (ip->protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		return read_ports(l4, end, l4_len, ip->protocol, p) ? LB_DROP_TRUNCATED : LB_FWD;
	case IPPROTO_ICMP: {
		struct icmphdr *ic = l4;

		if ((void *)(ic + 1) > end || l4_len < sizeof(*ic))
			return LB_DROP_TRUNCATED;
		if (ic->type != GB_ICMP_DEST_UNREACH || ic->code != GB_ICMP_FRAG_NEEDED)
			return LB_PASS_NO_SERVICE;
		/* the quoted IPv4 header and 8 bytes of ports must be inside the packet too */
		if (l4_len < sizeof(*ic) + sizeof(struct iphdr) + 8)
			return LB_DROP_TRUNCATED;
		return parse_icmp4_inner(l4, end, p);
	}
	}
	return LB_PASS_NO_SERVICE;
}

static __always_inline int parse_icmp6_inner(void *l4, void *end, struct lb_pkt *p)
{
	struct ipv6hdr *in = l4 + sizeof(struct icmp6hdr);
	struct lb_flow f = {};

	if ((void *)(in + 1) + 8 > end)
		return LB_DROP_TRUNCATED;
	if (in->version != 6)
		return LB_DROP_TRUNCATED;
	if (in->nexthdr != IPPROTO_TCP && in->nexthdr != IPPROTO_UDP)
		return LB_PASS_NO_SERVICE;
	f.family = 6;
	f.proto = in->nexthdr;
	__builtin_memcpy(f.src, &in->daddr, 16);
	__builtin_memcpy(f.dst, &in->saddr, 16);
	f.sport = ((struct udphdr *)(in + 1))->dest;
	f.dport = ((struct udphdr *)(in + 1))->source;
	p->flow = f;
	p->icmp = 1;
	return LB_FWD_ICMP;
}

static __always_inline int parse_ipv6(void *data, void *end, struct lb_pkt *p)
{
	struct ipv6hdr *ip6 = data + GB_ETH_HLEN;
	__u32 l4_len;
	void *l4;

	if ((void *)(ip6 + 1) > end)
		return LB_PASS_MALFORMED;
	if (ip6->version != 6)
		return LB_PASS_MALFORMED;
	p->flow.family = 6;
	p->flow.proto = ip6->nexthdr;
	__builtin_memcpy(p->flow.src, &ip6->saddr, 16);
	__builtin_memcpy(p->flow.dst, &ip6->daddr, 16);
	p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	p->l3_len = sizeof(*ip6) + u16_bounded(bpf_ntohs(ip6->payload_len));
	if (ip6->nexthdr == GB_NEXTHDR_FRAGMENT)
		return LB_DROP_FRAGMENT;
	if (gb_ipv6_is_ext(ip6->nexthdr))
		return LB_DROP_IPV6_EXT;
	if ((void *)ip6 + p->l3_len > end)
		return LB_DROP_TRUNCATED;
	l4 = ip6 + 1;
	l4_len = p->l3_len - sizeof(*ip6);
	switch (ip6->nexthdr) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		return read_ports(l4, end, l4_len, ip6->nexthdr, p) ? LB_DROP_TRUNCATED : LB_FWD;
	case GB_IPPROTO_ICMPV6: {
		struct icmp6hdr *ic = l4;

		if ((void *)(ic + 1) > end || l4_len < sizeof(*ic))
			return LB_DROP_TRUNCATED;
		if (ic->icmp6_type != GB_ICMPV6_PKT_TOOBIG)
			return LB_PASS_NO_SERVICE;
		if (l4_len < sizeof(*ic) + sizeof(struct ipv6hdr) + 8)
			return LB_DROP_TRUNCATED;
		return parse_icmp6_inner(l4, end, p);
	}
	}
	return LB_PASS_NO_SERVICE;
}

/* The flow hash (see packet.h); without the source port if the service asks so. */
static __always_inline __u32 flow_hash(const struct lb_flow *f, __u32 svc_flags)
{
	__u32 h = LB_HASH_SEED;
	__u32 ports = (__u32)f->dport << 16 | f->sport;

	if (svc_flags & LB_SVC_NO_SPORT)
		ports = (__u32)f->dport << 16;
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = gb_mm3_mix(h, f->src[i]);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = gb_mm3_mix(h, f->dst[i]);
	h = gb_mm3_mix(h, ports);
	h = gb_mm3_mix(h, f->proto);
	return gb_mm3_final(h, 40);
}

/* One more new entry within this CPU's budget of the current second? */
static __always_inline int take_entry_budget(__u64 now)
{
	__u32 zero = 0;
	struct lb_budget *b;

	if (!new_entry_limit)
		return 1;
	b = bpf_map_lookup_elem(&lb_entry_budget, &zero);
	if (!b)
		return 1;
	if (now - b->window_ns >= 1000000000ull) {
		b->window_ns = now;
		b->used = 0;
	}
	if (b->used >= new_entry_limit)
		return 0;
	b->used++;
	return 1;
}

static __always_inline struct lb_syn_seen *syn_slot(__u32 hash)
{
	__u32 idx = hash & (LB_SYN_FILTER_SIZE - 1);

	return bpf_map_lookup_elem(&lb_syn_seen, &idx);
}

/* Did this node see a SYN of the flow with this hash within LB_SYN_SEEN_UNITS? */
static __always_inline int syn_seen_recently(__u32 hash, __u64 now)
{
	struct lb_syn_seen *s = syn_slot(hash);

	return s && s->tag == hash &&
	       (__u32)(now >> LB_SYN_TIME_SHIFT) - s->when <= LB_SYN_SEEN_UNITS;
}

/*
 * Was a SYN of this entry's 5-tuple seen after the entry's last packet (a new connection)?
 * seen_ns lags the last packet by up to LB_SEEN_REFRESH_NS (a hit refreshes it at most once a
 * second), so only a SYN later than that counts: a connection's own SYN retried within a
 * second (a client that met a stale socket on its backend resets and retries) is not taken
 * for a new one. A 5-tuple reused within that second across a table change is missed.
 */
static __always_inline int syn_after(struct lb_conn *ct)
{
	struct lb_syn_seen *s = syn_slot(ct->hash);

	return s && s->tag == ct->hash &&
	       (__s32)(s->when - (__u32)(ct->seen_ns >> LB_SYN_TIME_SHIFT)) >
		       (__s32)(LB_SEEN_REFRESH_NS >> LB_SYN_TIME_SHIFT) + 1;
}

static __always_inline void add_stats(void *map, __u32 id, __u64 bytes, __u64 new_flow)
{
	struct lb_stats *s = bpf_map_lookup_elem(map, &id);

	if (s) {
		s->packets += 1;
		s->bytes += bytes;
		s->new_flows += new_flow;
	}
}

/* Prepend Ethernet + outer IP (+ UDP for GUE) toward the backend. */
static __always_inline int encapsulate(struct xdp_md *ctx, struct lb_pkt *p,
				       struct lb_backend *be, __u32 mode, __u32 hash)
{
	__u32 zero = 0;
	struct lb_encap *enc = bpf_map_lookup_elem(&lb_encap, &zero);
	__u32 udp_len = mode == LB_MODE_GUE ? sizeof(struct udphdr) : 0;
	__u32 ip_len = be->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u8 inner = p->flow.family == 4 ? IPPROTO_IPIP : IPPROTO_IPV6;
	__u8 old_dst[6];
	void *data, *end;
	struct ethhdr *eth;
	struct udphdr *udp;

	if (!enc)
		return verdict(LB_DROP_ENCAP, XDP_DROP);
	eth = (void *)(long)ctx->data;
	if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
		return verdict(LB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(old_dst, eth->h_dest, 6);   /* our own MAC: the new source */
	if (bpf_xdp_adjust_head(ctx, -(int)(ip_len + udp_len)))
		return verdict(LB_DROP_ENCAP, XDP_DROP);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return verdict(LB_DROP_ENCAP, XDP_DROP);
	__builtin_memcpy(eth->h_dest, be->mac, 6);
	__builtin_memcpy(eth->h_source, old_dst, 6);

	if (be->family == 4) {
		struct iphdr *ip = data + GB_ETH_HLEN;

		if ((void *)(ip + 1) + sizeof(struct udphdr) > end)
			return verdict(LB_DROP_ENCAP, XDP_DROP);
		eth->h_proto = bpf_htons(GB_ETH_P_IP);
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = p->tos;
		ip->tot_len = bpf_htons(p->l3_len + ip_len + udp_len);
		ip->id = 0;
		ip->frag_off = 0;
		ip->ttl = 64;
		ip->protocol = udp_len ? IPPROTO_UDP : inner;
		ip->saddr = enc->v4_src | bpf_htonl(hash & enc->v4_hash_mask);
		ip->daddr = be->addr[0];
		ip->check = gb_ipv4_csum(ip);
		udp = (void *)(ip + 1);
	} else {
		struct ipv6hdr *ip6 = data + GB_ETH_HLEN;

		if ((void *)(ip6 + 1) + sizeof(struct udphdr) > end)
			return verdict(LB_DROP_ENCAP, XDP_DROP);
		eth->h_proto = bpf_htons(GB_ETH_P_IPV6);
		ip6->version = 6;
		ip6->priority = p->tos >> 4;
		/* the flow label carries the flow hash: receivers and ECMP paths spread by it */
		ip6->flow_lbl[0] = (p->tos << 4) | ((hash >> 16) & 0x0f);
		ip6->flow_lbl[1] = hash >> 8;
		ip6->flow_lbl[2] = hash;
		ip6->payload_len = bpf_htons(p->l3_len + udp_len);
		ip6->nexthdr = udp_len ? IPPROTO_UDP : inner;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, enc->v6_src, 16);
		ip6->saddr.in6_u.u6_addr32[3] |= bpf_htonl(hash & enc->v6_hash_mask);
		__builtin_memcpy(&ip6->daddr, be->addr, 16);
		udp = (void *)(ip6 + 1);
	}
	if (udp_len) {
		/* GUE variant 1: the UDP payload is the inner IP packet. The source port is
		 * hash-derived so the backend's NIC (RSS) spreads flows over its queues. The UDP
		 * checksum is 0 (allowed for tunnels over IPv6 by RFC 6935): the inner packet
		 * carries its own checksums. */
		udp->source = bpf_htons(0xc000 | (hash & 0x3fff));
		udp->dest = enc->gue_port;
		udp->len = bpf_htons(p->l3_len + udp_len);
		udp->check = 0;
	}
	return XDP_TX;
}

static __always_inline int lb_process(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct lb_pkt p = {};
	struct lb_vip_key vk = {};
	struct lb_service *svc;
	struct lb_backend *be = NULL;
	struct lb_conn *ct = NULL;
	int skip_lookup;
	__u64 bytes = end - data;
	__u32 id = 0, hash = 0, new_flow = 0;
	__u64 now;
	int r;

	if ((void *)(eth + 1) > end)
		return verdict(LB_PASS_MALFORMED, XDP_PASS);
	if (eth->h_proto == bpf_htons(GB_ETH_P_IP))
		r = parse_ipv4(data, end, &p);
	else if (eth->h_proto == bpf_htons(GB_ETH_P_IPV6))
		r = parse_ipv6(data, end, &p);
	else
		return verdict(LB_PASS_NOT_IP, XDP_PASS);

	if (r >= LB_DROP_FRAGMENT) {
		/* cannot be placed: drop it if it was for a VIP, else it is none of our business */
		__builtin_memcpy(vk.addr, p.flow.dst, 16);
		vk.family = p.flow.family;
		if (bpf_map_lookup_elem(&lb_vips, &vk))
			return verdict(r, XDP_DROP);
		return verdict(LB_PASS_NO_SERVICE, XDP_PASS);
	}
	if (r != LB_FWD && r != LB_FWD_ICMP)
		return verdict(r, XDP_PASS);

	__builtin_memcpy(vk.addr, p.flow.dst, 16);
	vk.port = p.flow.dport;
	vk.proto = p.flow.proto;
	vk.family = p.flow.family;
	svc = bpf_map_lookup_elem(&lb_services, &vk);
	if (!svc)
		return verdict(LB_PASS_NO_SERVICE, XDP_PASS);

	/*
	 * A SYN opens a new connection: the table places it, whatever an entry says (an entry for
	 * the same 5-tuple is an earlier connection's). Everything else follows its entry unless
	 * the entry is idle past its protocol's timeout.
	 *
	 * With the SYN filter the SYN does not even look: an entry placed under the service's
	 * current table epoch points where the hash does (or at a backend that is down or gone,
	 * which the next packet's lookup sees anyway). An entry of an older epoch may not: that
	 * is an earlier connection's only if this SYN came after its last packet, which the first
	 * packets after the SYN tell from the SYN-seen filter (syn_after).
	 */
	now = bpf_ktime_get_coarse_ns();
	skip_lookup = syn_filter && p.syn && !conntrack_on_syn;
	if (!skip_lookup)
		ct = bpf_map_lookup_elem(&lb_conntrack, &p.flow);
	if (ct) {
		__u64 idle = p.flow.proto == IPPROTO_TCP ? tcp_idle_ns : udp_idle_ns;
		__s64 age = now - ct->seen_ns;

		if (age > (__s64)idle) {
			gb_count(&lb_conn_events, LB_CT_EXPIRED);
		} else if (p.syn) {
			/* the old path: rewritten below */
		} else if (syn_filter && ct->epoch != svc->epoch && !p.icmp &&
			   p.flow.proto == IPPROTO_TCP && syn_after(ct)) {
			gb_count(&lb_conn_events, LB_CT_REUSED);
		} else {
			id = ct->backend;
			be = bpf_map_lookup_elem(&lb_backends, &id);
			/* a removed (generation changed) or failed backend: place the flow again */
			if (be && (be->gen != ct->gen || (be->flags & LB_BE_DOWN)))
				be = NULL;
			else if (be && age > (__s64)LB_SEEN_REFRESH_NS && !p.icmp)
				ct->seen_ns = now;
		}
	}
	if (!be) {
		__u32 idx;
		__u32 *slot;

		hash = flow_hash(&p.flow, svc->flags);
		idx = svc->id * ring_size + hash % ring_size;
		slot = bpf_map_lookup_elem(&lb_ring, &idx);
		if (!slot || !*slot)
			return verdict(LB_DROP_NO_BACKEND, XDP_DROP);
		id = *slot;
		be = bpf_map_lookup_elem(&lb_backends, &id);
		if (!be || (be->flags & LB_BE_DOWN))
			return verdict(LB_DROP_NO_BACKEND, XDP_DROP);
		if (p.icmp || (p.rst && !ct)) {
			/* errors and resets never create entries, nor do errors change them */
		} else if (ct) {
			/* a stale entry of this 5-tuple: rewritten in place, no insertion */
			ct->backend = id;
			ct->gen = be->gen;
			ct->epoch = svc->epoch;
			ct->hash = hash;
			ct->seen_ns = now;
			new_flow = 1;
		} else if (p.syn && !conntrack_on_syn) {
			gb_count(&lb_conn_events, LB_CT_SYN_UNTRACKED);
			if (syn_filter) {
				struct lb_syn_seen *s = syn_slot(hash);

				if (s) {
					s->tag = hash;
					s->when = now >> LB_SYN_TIME_SHIFT;
				}
			}
		} else if (syn_filter && !conntrack_on_syn && p.flow.proto == IPPROTO_TCP &&
			   !syn_seen_recently(hash, now)) {
			/* no SYN seen here: a spoofed packet, or a flow from another node or from
			 * before a restart. The hash places it (the same on every node). */
			gb_count(&lb_conn_events, LB_CT_NO_SYN);
		} else {
			new_flow = 1;
			if (take_entry_budget(now)) {
				struct lb_conn c = { .backend = id, .gen = be->gen, .epoch = svc->epoch,
						     .hash = hash, .seen_ns = now };

				bpf_map_update_elem(&lb_conntrack, &p.flow, &c, BPF_ANY);
				gb_count(&lb_conn_events, LB_CT_INSERTED);
			} else {
				gb_count(&lb_conn_events, LB_CT_OVER_LIMIT);
			}
		}
	}
	add_stats(&lb_service_stats, svc->id, bytes, new_flow);
	add_stats(&lb_backend_stats, id, bytes, new_flow);
	gb_count(&lb_reasons, r);

	if (svc->mode == LB_MODE_DSR_L2) {
		__builtin_memcpy(eth->h_source, eth->h_dest, 6);
		__builtin_memcpy(eth->h_dest, be->mac, 6);
		return XDP_TX;
	}
	if (!hash)
		hash = flow_hash(&p.flow, svc->flags);
	return encapsulate(ctx, &p, be, svc->mode, hash);
}

SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	return lb_process(ctx);
}

/*
 * Benchmark wrappers (never attached; the daemon does not even load them). BPF_PROG_TEST_RUN
 * with repeat does not restore the packet between runs, so a program that rewrites or
 * encapsulates would see its own output from the second run on. These restore the packet from
 * lb_bench's template first (and, for "new flow" runs, give each run its own source address),
 * then run the real datapath, inlined. xdp_restore_bench (restore only) is the cost to
 * subtract; xdp_macswap_bench is the baseline with the same restore.
 */
struct lb_bench {
	__u32 len;          /* template length, < 128 */
	__u32 vary_off;     /* 0: same flow every run; else where a run counter goes (a new flow each run) */
	__u32 counter;
	__u32 pad;
	__u8  data[128];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_bench);
} lb_bench SEC(".maps");

static __always_inline int bench_restore(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct lb_bench *t = bpf_map_lookup_elem(&lb_bench, &zero);
	int cur = ctx->data_end - ctx->data;
	__u32 len;

	if (!t)
		return -1;
	len = t->len & 0x7f;          /* a mask the verifier can follow: at most 127 bytes */
	if (len < GB_ETH_HLEN)
		return -1;
	if (cur != (int)len && bpf_xdp_adjust_head(ctx, cur - (int)len))
		return -1;
	if (bpf_xdp_store_bytes(ctx, 0, t->data, len))
		return -1;
	if (t->vary_off && t->vary_off < len - 3) {
		__u32 n = t->counter++;

		bpf_xdp_store_bytes(ctx, t->vary_off, &n, 4);
	}
	return 0;
}

SEC("xdp")
int xdp_lb_bench(struct xdp_md *ctx)
{
	if (bench_restore(ctx))
		return XDP_ABORTED;
	return lb_process(ctx);
}

SEC("xdp")
int xdp_restore_bench(struct xdp_md *ctx)
{
	if (bench_restore(ctx))
		return XDP_ABORTED;
	return XDP_TX;
}

SEC("xdp")
int xdp_macswap_bench(struct xdp_md *ctx)
{
	void *data, *end;
	struct ethhdr *eth;
	__u8 tmp[6];

	if (bench_restore(ctx))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, tmp, 6);
	return XDP_TX;
}
