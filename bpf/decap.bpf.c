/*
 * gridbpf decapsulation, tc ingress on backends: removes the outer IP (IPv4 or IPv6) header, and
 * the UDP header for GUE, that the balancer (lb.bpf.c, ipip/gue modes) put in front of a
 * client's packet. The kernel here has no ipip/ip6_tunnel/fou modules, so this is the decap.
 * The inner packet goes on up the stack unchanged, to the VIP held on the backend's loopback.
 *
 * Also two tiny XDP programs used around the balancer: xdp_pass for the lab's veth peers
 * (native XDP_TX on veth reaches a peer only if it runs an XDP program) and xdp_macswap,
 * the bare baseline of the benchmark.
 */
#include "gridbpf/common.h"
#include "gridbpf/packet.h"

char LICENSE[] SEC("license") = "GPL";

#define TC_ACT_OK   0
#define TC_ACT_SHOT 2

/* UDP port of GUE (network byte order); 0 disables GUE decapsulation. */
const volatile __u16 gue_port = 0;

enum decap_reason {
	DECAP_IPIP = 0,        /* IP-in-IP (4in4, 6in6, 4in6, 6in4) removed */
	DECAP_GUE,             /* IP-in-UDP removed */
	DECAP_PASS,            /* not encapsulated: left alone */
	DECAP_DROP_MALFORMED,  /* encapsulated but the inner packet is not IPv4/IPv6 or is cut */
	DECAP_DROP_ERROR,      /* the kernel refused to shrink the packet */
	DECAP_REASON_MAX,
};

enum decap_reason gb_export_decap_reason __attribute__((unused));   /* names for userspace */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
} decap_reasons SEC(".maps");

static __always_inline int count(__u32 reason, int action)
{
	gb_count(&decap_reasons, reason);
	return action;
}

/* Is the first byte of the payload an IP header of the family the outer header announced? */
static __always_inline int inner_family(void *inner, void *end)
{
	__u8 *v = inner;

	if ((void *)(v + 1) > end)
		return 0;
	return *v >> 4;
}

SEC("tc")
int tc_decap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 outer_len, reason = DECAP_IPIP;
	__u8 proto;
	int outer_family, family;
	void *l4;

	if ((void *)(eth + 1) > end)
		return count(DECAP_PASS, TC_ACT_OK);
	if (eth->h_proto == bpf_htons(GB_ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(GB_IP_MF | GB_IP_OFFSET)))
			return count(DECAP_PASS, TC_ACT_OK);
		outer_family = 4;
		proto = ip->protocol;
		outer_len = sizeof(*ip);
		l4 = ip + 1;
	} else if (eth->h_proto == bpf_htons(GB_ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return count(DECAP_PASS, TC_ACT_OK);
		outer_family = 6;
		proto = ip6->nexthdr;
		outer_len = sizeof(*ip6);
		l4 = ip6 + 1;
	} else {
		return count(DECAP_PASS, TC_ACT_OK);
	}

	if (proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if (!gue_port || (void *)(udp + 1) > end || udp->dest != gue_port)
			return count(DECAP_PASS, TC_ACT_OK);
		outer_len += sizeof(*udp);
		l4 = udp + 1;
		reason = DECAP_GUE;
		family = inner_family(l4, end);
	} else if (proto == IPPROTO_IPIP) {
		family = inner_family(l4, end) == 4 ? 4 : 0;
	} else if (proto == IPPROTO_IPV6) {
		family = inner_family(l4, end) == 6 ? 6 : 0;
	} else {
		return count(DECAP_PASS, TC_ACT_OK);
	}
	if (family != 4 && family != 6)
		return count(DECAP_DROP_MALFORMED, TC_ACT_SHOT);

	__u64 flags = 0;
	if (family != outer_family)
		flags = family == 4 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4 : BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
	if (bpf_skb_adjust_room(skb, -(__s32)outer_len, BPF_ADJ_ROOM_MAC, flags))
		return count(DECAP_DROP_ERROR, TC_ACT_SHOT);
	if (family != outer_family) {
		__u16 h_proto = bpf_htons(family == 4 ? GB_ETH_P_IP : GB_ETH_P_IPV6);

		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &h_proto, 2, 0))
			return count(DECAP_DROP_ERROR, TC_ACT_SHOT);
	}
	return count(reason, TC_ACT_OK);
}

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* Benchmark baseline: the least an XDP forwarder does, swap the MACs and send it back. */
SEC("xdp")
int xdp_macswap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 tmp[6];

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, tmp, 6);
	return XDP_TX;
}
