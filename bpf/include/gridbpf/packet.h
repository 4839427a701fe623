/* Packet helpers shared by the XDP and tc programs: protocol numbers, checksums, flow hashing. */
#ifndef GRIDBPF_PACKET_H
#define GRIDBPF_PACKET_H

#include "gridbpf/common.h"

#define GB_ETH_P_IP     0x0800
#define GB_ETH_P_IPV6   0x86DD
#define GB_ETH_HLEN     14

#define GB_IP_MF        0x2000
#define GB_IP_OFFSET    0x1FFF

#define GB_ICMP_DEST_UNREACH   3
#define GB_ICMP_FRAG_NEEDED    4
#define GB_ICMPV6_PKT_TOOBIG   2

#define GB_IPPROTO_ICMPV6    58
#define GB_NEXTHDR_HOP       0
#define GB_NEXTHDR_ROUTING   43
#define GB_NEXTHDR_FRAGMENT  44
#define GB_NEXTHDR_ESP       50
#define GB_NEXTHDR_AUTH      51
#define GB_NEXTHDR_DEST      60
#define GB_NEXTHDR_MOBILITY  135
#define GB_NEXTHDR_HIP       139
#define GB_NEXTHDR_SHIM6     140

/* Is this IPv6 next header an extension header (as opposed to an upper-layer protocol)? */
static __always_inline int gb_ipv6_is_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case GB_NEXTHDR_HOP: case GB_NEXTHDR_ROUTING: case GB_NEXTHDR_FRAGMENT:
	case GB_NEXTHDR_ESP: case GB_NEXTHDR_AUTH: case GB_NEXTHDR_DEST:
	case GB_NEXTHDR_MOBILITY: case GB_NEXTHDR_HIP: case GB_NEXTHDR_SHIM6:
		return 1;
	}
	return 0;
}

/* Header checksum of a 20-byte IPv4 header (options not supported), check field zeroed first. */
static __always_inline __u16 gb_ipv4_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * MurmurHash3 (x86_32) over 32-bit words: the flow hash. Deterministic and seeded with a
 * constant, so every balancer node computes the same value for the same packet. The Python
 * side (gridbpf.lb.flowhash) implements the same function and a test checks both agree.
 */
static __always_inline __u32 gb_rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 gb_mm3_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51u;
	k = gb_rotl32(k, 15);
	k *= 0x1b873593u;
	h ^= k;
	h = gb_rotl32(h, 13);
	return h * 5 + 0xe6546b64u;
}

static __always_inline __u32 gb_mm3_final(__u32 h, __u32 len)
{
	h ^= len;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

#endif
