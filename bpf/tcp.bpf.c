/*
 * TCP per peer of target processes: bytes each way, smoothed RTT, retransmits, resets, state
 * changes, connections opened and closed.
 *
 * Retransmits and resets happen in softirq or timer context, where the current task is not the
 * socket's owner: we learn which sockets belong to a target when it sends, receives or connects
 * (sock_send_length / sock_recv_length / inet_sock_set_state in process context) and keep
 * sk -> tgid in `socks`. Aggregation is all in the kernel; userspace reads `peers`.
 */
#include "gridbpf/stack.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7
#define TCP_STATES 13

enum tcp_stat { TCP_SOCKS_FULL, TCP_PEERS_FULL, TCP_STAT_MAX };

struct peer_key {
	__u32 tgid;
	__u16 family;
	__u16 rport;          /* host order */
	__u8 raddr[16];       /* IPv4 in the first 4 bytes */
};

struct peer_val {
	__u64 bytes_sent, bytes_received;
	__u64 retransmits;
	__u64 resets_sent, resets_received;
	__u64 opened, closed;
	__u64 srtt_us;        /* last smoothed RTT seen */
	__u64 srtt_sum_us, srtt_samples;
	__u64 to_state[TCP_STATES];   /* state changes, by new state */
};

GB_TARGETS(1024)

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);                 /* struct sock * */
	__type(value, __u32);               /* tgid */
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct peer_key);
	__type(value, struct peer_val);
} peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tcp_stats SEC(".maps");

static __always_inline bool is_tcp(const struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	return (family == AF_INET || family == AF_INET6) &&
	       BPF_CORE_READ(sk, sk_protocol) == IPPROTO_TCP;
}

/* The owner of SK if it is a target's: known already, or the current task (process context). */
static __always_inline __u32 owner(const struct sock *sk, bool may_learn)
{
	__u64 key = (__u64)sk;
	__u32 *t = bpf_map_lookup_elem(&socks, &key);
	__u32 tgid;

	if (t)
		return *t;
	if (!may_learn)
		return 0;
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (!gb_is_target(tgid))
		return 0;
	if (bpf_map_update_elem(&socks, &key, &tgid, BPF_ANY))
		gb_count(&tcp_stats, TCP_SOCKS_FULL);
	return tgid;
}

static __always_inline struct peer_val *peer(const struct sock *sk, __u32 tgid)
{
	struct peer_key k = {};
	struct peer_val *v;

	k.tgid = tgid;
	k.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	k.rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (k.family == AF_INET) {
		__u32 a = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(k.raddr, &a, 4);
	} else {
		BPF_CORE_READ_INTO(&k.raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	v = bpf_map_lookup_elem(&peers, &k);
	if (v)
		return v;
	struct peer_val zero = {};
	bpf_map_update_elem(&peers, &k, &zero, BPF_NOEXIST);
	v = bpf_map_lookup_elem(&peers, &k);
	if (!v)
		gb_count(&tcp_stats, TCP_PEERS_FULL);
	return v;
}

static __always_inline void account(struct sock *sk, int ret, bool sent)
{
	struct peer_val *v;
	struct tcp_sock *tp;
	__u32 tgid, srtt;

	if (ret <= 0 || !is_tcp(sk))
		return;
	tgid = owner(sk, true);
	if (!tgid)
		return;
	v = peer(sk, tgid);
	if (!v)
		return;
	if (sent)
		__sync_fetch_and_add(&v->bytes_sent, ret);
	else
		__sync_fetch_and_add(&v->bytes_received, ret);
	tp = (struct tcp_sock *)sk;
	srtt = BPF_CORE_READ(tp, srtt_us) >> 3;   /* stored << 3 */
	if (srtt) {
		v->srtt_us = srtt;
		__sync_fetch_and_add(&v->srtt_sum_us, srtt);
		__sync_fetch_and_add(&v->srtt_samples, 1);
	}
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(tcp_send_len, struct sock *sk, int ret, int flags)
{
	account(sk, ret, true);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(tcp_recv_len, struct sock *sk, int ret, int flags)
{
	account(sk, ret, false);
	return 0;
}

/* One more of a per-peer event counter (the field at OFFSET of the peer's value). */
static __always_inline void count_peer(const struct sock *sk, __u32 offset)
{
	__u32 tgid = sk ? owner(sk, false) : 0;
	struct peer_val *v;

	if (!tgid)
		return;
	v = peer(sk, tgid);
	if (v)
		__sync_fetch_and_add((__u64 *)((char *)v + offset), 1);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(tcp_retransmit, const struct sock *sk, const struct sk_buff *skb, int err)
{
	count_peer(sk, offsetof(struct peer_val, retransmits));
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(tcp_send_rst, const struct sock *sk, const struct sk_buff *skb, int reason)
{
	count_peer(sk, offsetof(struct peer_val, resets_sent));
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(tcp_recv_rst, struct sock *sk)
{
	count_peer(sk, offsetof(struct peer_val, resets_received));
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tcp_state, const struct sock *sk, const int oldstate, const int newstate)
{
	struct peer_val *v;
	__u32 tgid;

	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	/* connect() moves to SYN_SENT in the owner's context: learn the socket there */
	tgid = owner(sk, newstate == TCP_SYN_SENT);
	if (!tgid)
		return 0;
	v = peer(sk, tgid);
	if (v) {
		if (newstate >= 0 && newstate < TCP_STATES)
			__sync_fetch_and_add(&v->to_state[newstate], 1);
		if (newstate == TCP_ESTABLISHED)
			__sync_fetch_and_add(&v->opened, 1);
		if (newstate == TCP_CLOSE)
			__sync_fetch_and_add(&v->closed, 1);
	}
	if (newstate == TCP_CLOSE) {
		__u64 key = (__u64)sk;
		bpf_map_delete_elem(&socks, &key);
	}
	return 0;
}
