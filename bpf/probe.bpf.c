/* One tiny program per hook type: `gridbpf doctor` loads and attaches each to learn what works here. */
#include "gridbpf/common.h"

char LICENSE[] SEC("license") = "GPL";

SEC("xdp") int probe_xdp(struct xdp_md *ctx) { return XDP_PASS; }
SEC("tc") int probe_tc(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }
SEC("tracepoint/syscalls/sys_enter_getpid") int probe_tracepoint(void *ctx) { return 0; }
SEC("raw_tp/sched_switch") int probe_raw_tp(void *ctx) { return 0; }
SEC("tp_btf/sched_switch") int probe_tp_btf(u64 *ctx) { return 0; }
SEC("uprobe") int probe_uprobe(void *ctx) { return 0; }
SEC("perf_event") int probe_perf_event(void *ctx) { return 0; }
SEC("kprobe/do_nanosleep") int probe_kprobe(void *ctx) { return 0; }
SEC("fentry/do_nanosleep") int probe_fentry(u64 *ctx) { return 0; }

/* Helper flags that older kernels refuse at run time (EINVAL), not at load: a test run tells.
 * IPv4-in-IPv6 decapsulation needs BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (Linux 6.3). Returns the helper's
 * result: 0 where the flag works. */
SEC("tc") int probe_adjust_room_decap(struct __sk_buff *skb)
{
	return bpf_skb_adjust_room(skb, -40, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
}
