// SPDX-License-Identifier: GPL-2.0
/* Receivers of the JVM record transports compared by bench/bench_jvm.py: each reads the
 * 48-byte record header from user memory and counts it, as the tracer's bridge does. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define MAGIC 0x314d564a42524700ULL

const volatile __u32 target_tgid = 0;
const volatile __u32 bridge_fd = 0;
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} records SEC(".maps");

static __always_inline void take(__u64 buf)
{
	__u64 hdr[6] = {}, *n;
	__u32 zero = 0;

	n = bpf_map_lookup_elem(&records, &zero);
	if (n && bpf_probe_read_user(hdr, sizeof(hdr), (void *)buf) == 0 && hdr[0] == MAGIC)
		__sync_fetch_and_add(n, 1);
}

/* the tracer's way: one hook on every syscall exit (the write's args are still in pt_regs) */
SEC("tp_btf/sys_exit")
int BPF_PROG(via_write, struct pt_regs *regs, long ret)
{
	if (regs->orig_ax != 1 || (bpf_get_current_pid_tgid() >> 32) != target_tgid ||
	    regs->di != bridge_fd)
		return 0;
	take(regs->si);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_ioctl")
int via_ioctl(struct trace_event_raw_sys_enter *ctx)
{
	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid || (__u32)ctx->args[1] != (__u32)MAGIC)
		return 0;
	take(ctx->args[2]);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(via_uprobe, void *rec)
{
	take((__u64)rec);
	return 0;
}

/* the socket layer's tracepoint (6.3+): fires for socket reads only, the failed one included */
SEC("tp_btf/sock_recv_length")
int BPF_PROG(via_recv, struct sock *sk, int ret, int flags)
{
	struct pt_regs *regs;

	if (ret != -11 || (bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	if (regs->di != bridge_fd)
		return 0;
	take(regs->si);
	return 0;
}
