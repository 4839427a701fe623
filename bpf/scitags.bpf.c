/*
 * SciTags: write a registered flow's experiment/activity pattern into the IPv6 flow label at
 * tc egress (clsact, direct action), and count every registered flow's packets and bytes.
 *
 * The same code runs as two programs: st_egress marks and counts, st_ingress (optional) only
 * counts, so a flow's bytes are known in both directions on the host that runs the daemon.
 * Flows are registered by userspace only; the kernel never inserts, so the LRU only evicts
 * when userspace registers more directions than ST_FLOW_ENTRIES (userspace refuses before).
 */
#include "gridbpf/common.h"
#include "gridbpf/scitags.h"

char LICENSE[] SEC("license") = "GPL";

#define TC_ACT_OK 0
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
/* IPv6 extension headers we step over; anything else that is not TCP/UDP ends the walk. */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
#define MAX_EXT_HEADERS 4

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ST_FLOW_ENTRIES);
	__type(key, struct st_flow_key);
	__type(value, struct st_flow_val);
} st_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} st_stats SEC(".maps");

static __always_inline int is_ext_header(__u8 nh)
{
	return nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST ||
	       nh == NEXTHDR_FRAGMENT || nh == NEXTHDR_AUTH;
}

/*
 * Headers are read with bpf_skb_load_bytes rather than direct packet access on purpose:
 * a program that writes packet data directly gets a prologue that un-clones every cloned
 * skb it sees, and TCP hands tc a clone of each segment it keeps for retransmission. That
 * would copy the headers of every packet of every flow; bpf_skb_store_bytes un-clones only
 * the packets we actually mark.
 */
static __always_inline int handle(struct __sk_buff *skb, const int egress)
{
	struct st_flow_key key = {};
	__u32 off = ETH_HLEN;
	__u32 word0 = 0; /* version | traffic class | flow label, network order */
	int v6 = 0;
	__u8 proto;

	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		/* Fast path, the usual case: TCP/UDP right after the IPv6 header, all in the
		 * linear area. Direct reads (no helper calls); direct *reads* add no prologue. */
		void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
		struct ipv6hdr *hdr = data + ETH_HLEN;

		if ((void *)(hdr + 1) + 4 <= end &&
		    (hdr->nexthdr == IPPROTO_TCP || hdr->nexthdr == IPPROTO_UDP)) {
			__builtin_memcpy(&word0, hdr, 4);
			__builtin_memcpy(key.saddr, &hdr->saddr, 16);
			__builtin_memcpy(key.daddr, &hdr->daddr, 16);
			__builtin_memcpy(&key.sport, (void *)(hdr + 1), 4);
			key.proto = hdr->nexthdr;
			v6 = 1;
			goto lookup;
		}

		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
			goto unparsed;
		__builtin_memcpy(&word0, &ip6, 4);
		__builtin_memcpy(key.saddr, &ip6.saddr, 16);
		__builtin_memcpy(key.daddr, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		off += sizeof(ip6);
		v6 = 1;
#pragma unroll
		for (int i = 0; i < MAX_EXT_HEADERS; i++) {
			__u8 ext[2]; /* next header, length */

			/* Fragments and AH have other length rules; later fragments carry no ports. */
			if (proto != NEXTHDR_HOP && proto != NEXTHDR_ROUTING && proto != NEXTHDR_DEST)
				break;
			if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)))
				goto unparsed;
			proto = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
		}
		if (is_ext_header(proto))
			goto unparsed;
	} else if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip4;

		if (bpf_skb_load_bytes(skb, off, &ip4, sizeof(ip4)))
			goto unparsed;
		if (ip4.ihl < 5)
			goto unparsed;
		proto = ip4.protocol;
		if ((proto == IPPROTO_TCP || proto == IPPROTO_UDP) && (ip4.frag_off & bpf_htons(0x1fff)))
			goto unparsed; /* a later fragment: no ports */
		key.saddr[10] = key.saddr[11] = 0xff;
		key.daddr[10] = key.daddr[11] = 0xff;
		__builtin_memcpy(&key.saddr[12], &ip4.saddr, 4);
		__builtin_memcpy(&key.daddr[12], &ip4.daddr, 4);
		off += ip4.ihl * 4;
	} else {
		return TC_ACT_OK;
	}

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return TC_ACT_OK;
	/* Source and destination port are the first 4 bytes of both TCP and UDP headers. */
	if (bpf_skb_load_bytes(skb, off, &key.sport, 4))
		goto unparsed;
	key.proto = proto;

lookup:;
	struct st_flow_val *val = bpf_map_lookup_elem(&st_flows, &key);
	if (!val)
		return TC_ACT_OK;

	gb_count(&st_stats, ST_STAT_MATCHED);
	/* The entry is shared by both CPUs: atomic adds keep the counters exact. */
	__sync_fetch_and_add(&val->packets, skb->gso_segs ? skb->gso_segs : 1);
	__sync_fetch_and_add(&val->bytes, skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0);
	__u64 now = bpf_ktime_get_coarse_ns(); /* per-flow times need no ns precision */
	if (!val->first_ns)
		val->first_ns = now;
	val->last_ns = now;

	if (!egress || !(val->flags & ST_F_MARK))
		return TC_ACT_OK;
	if (!v6) {
		gb_count(&st_stats, ST_STAT_V4_UNMARKABLE);
		return TC_ACT_OK;
	}
	__u32 marked = (word0 & bpf_htonl(0xfff00000)) | bpf_htonl(val->label & 0xfffff);
	if (marked != word0 && bpf_skb_store_bytes(skb, ETH_HLEN, &marked, 4, 0)) {
		gb_count(&st_stats, ST_STAT_STORE_FAILED);
		return TC_ACT_OK;
	}
	gb_count(&st_stats, ST_STAT_MARKED);
	return TC_ACT_OK;

unparsed:
	gb_count(&st_stats, ST_STAT_UNPARSED);
	return TC_ACT_OK;
}

SEC("tc")
int st_egress(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

SEC("tc")
int st_ingress(struct __sk_buff *skb)
{
	return handle(skb, 0);
}
