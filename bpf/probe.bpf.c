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
