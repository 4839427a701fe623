/* Programs the core's tests load: counting XDP, tracepoint and uprobe events into a ring buffer. */
#include "gridbpf/common.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u32 target_tgid = 0;   /* config: set from Python before load */
const volatile __u16 count_udp_port = 0;

struct packet_count {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);   /* 0: all packets, 1: UDP to count_udp_port */
	__type(key, __u32);
	__type(value, struct packet_count);
} xdp_counts SEC(".maps");

struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct flow_key);
	__type(value, __u64);
} flows SEC(".maps");

static __always_inline void add(__u32 index, __u64 len)
{
	struct packet_count *c = bpf_map_lookup_elem(&xdp_counts, &index);
	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

SEC("xdp")
int xdp_count(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	add(0, end - data);
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	if (udp->dest == bpf_htons(count_udp_port)) {
		add(1, end - data);
		struct flow_key k = { .saddr = ip->saddr, .daddr = ip->daddr, .sport = udp->source,
				      .dport = udp->dest, .proto = ip->protocol };
		__u64 one = 1, *n = bpf_map_lookup_elem(&flows, &k);
		if (n)
			__sync_fetch_and_add(n, 1);
		else
			bpf_map_update_elem(&flows, &k, &one, BPF_NOEXIST);
	}
	return XDP_PASS;
}

struct event {
	__u64 time_ns;
	__u32 tgid;
	__u32 tid;
	__u64 arg;
	char comm[16];
	__u8 kind;   /* 1 tracepoint, 2 uprobe */
	__u8 pad[7];
};

GB_EXPORT_STRUCT(event);
GB_RINGBUF(events, 4096 * 4);

static __always_inline int emit(__u8 kind, __u64 arg)
{
	__u64 id = bpf_get_current_pid_tgid();
	if ((__u32)(id >> 32) != target_tgid)
		return 0;
	struct event *e = gb_ringbuf_reserve(events, sizeof(*e));
	if (!e)
		return 0;
	e->time_ns = bpf_ktime_get_ns();
	e->tgid = id >> 32;
	e->tid = (__u32)id;
	e->arg = arg;
	e->kind = kind;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* counted in .bss, read by userspace from the kernel's copy while loaded */
__u64 getppid_calls = 0;

SEC("tracepoint/syscalls/sys_enter_getppid")
int on_getppid(void *ctx)
{
	if ((__u32)(bpf_get_current_pid_tgid() >> 32) == target_tgid)
		__sync_fetch_and_add(&getppid_calls, 1);
	return emit(1, 0);
}

SEC("uprobe")
int BPF_KPROBE(on_marker, __u64 value)   /* uprobes share kprobes' pt_regs context */
{
	return emit(2, value);
}
