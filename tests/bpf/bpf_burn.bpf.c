/*
 * Calibration for bench/bench_http.py: socket-tracepoint programs that spend a chosen number of
 * loop iterations of pure arithmetic (no memory) in one target process's context, so that the
 * bench can measure how that process's CPU per request grows with BPF run time alone.
 */
#include "gridbpf/common.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u32 target_tgid = 0;
const volatile __u32 iterations = 0;

volatile __u64 burn_sink;

static __always_inline int burn(void)
{
	__u64 acc = 0;
	__u32 i;

	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	for (i = 0; i < 100000; i++) {
		if (i >= iterations)
			break;
		acc = acc * 6364136223846793005ULL + i;   /* a dependent chain: no overlap */
	}
	burn_sink = acc;
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(burn_recv, struct sock *sk, int ret, int flags) { return burn(); }

SEC("tp_btf/sock_send_length")
int BPF_PROG(burn_send, struct sock *sk, int ret, int flags) { return burn(); }
