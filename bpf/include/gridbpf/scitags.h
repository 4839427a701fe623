/*
 * SciTags flow-label marking: the map layouts shared by bpf/scitags.bpf.c and userspace.
 * Userspace (gridbpf.scitags.marker) reads these structs from the object's BTF; this file is
 * their only definition.
 */
#ifndef GRIDBPF_SCITAGS_H
#define GRIDBPF_SCITAGS_H

/*
 * One direction of a flow, exactly as its packets carry it. A registered flow has two
 * entries: its forward direction (source -> destination, the one that is marked) and its
 * reverse direction (acknowledgements, replies), so each packet needs a single lookup of its
 * own tuple and each direction has its own counters. IPv4 addresses are stored v4-mapped
 * (::ffff:a.b.c.d) so both families share one key type.
 */
struct st_flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* network byte order, as on the wire */
	__u16 dport; /* network byte order */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[3];
};

enum st_flow_flags {
	ST_F_MARK = 1,    /* write `label` into the IPv6 flow label of this direction at egress */
	ST_F_REVERSE = 2, /* this entry is the reverse direction of the registered flow */
	ST_F_IPV4 = 4,    /* IPv4 flow: counted, never marked (IPv4 has no flow label) */
};

struct st_flow_val {
	__u32 label;    /* the 20-bit flow label, entropy bits included (drawn once per flow) */
	__u32 flags;    /* enum st_flow_flags */
	__u64 packets;  /* wire packets (GSO super-packets count their segments) */
	__u64 bytes;    /* IP bytes (L3 header and payload) seen at tc */
	__u64 first_ns; /* bpf_ktime_get_coarse_ns() of the first packet, 0 if none yet */
	__u64 last_ns;  /* of the latest packet */
};

/* Per-CPU counters of the program; a packet of a registered flow that is not marked as asked
 * is never silent: it lands in one of these. */
enum st_stat {
	ST_STAT_MATCHED = 0,      /* packets (skbs) that belonged to a registered flow direction */
	ST_STAT_MARKED = 1,       /* skbs whose flow label was written */
	ST_STAT_V4_UNMARKABLE = 2,/* skbs of IPv4 flows asked to be marked: counted, not marked */
	ST_STAT_STORE_FAILED = 3, /* bpf_skb_store_bytes failed: a registered packet left unmarked */
	ST_STAT_UNPARSED = 4,     /* IPv4/IPv6 packets whose ports we could not reach (fragments,
	                             unknown extension headers, truncated): not looked up */
	ST_STAT_MAX = 5,
};

#define ST_FLOW_ENTRIES 65536 /* directions; two per registered flow */

#endif
