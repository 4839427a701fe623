/* A program whose verifier log runs far past 8 KiB before the verdict: the error must still
 * carry the verdict (the log's last lines), not a truncated beginning. */
#include "gridbpf/common.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counter SEC(".maps");

SEC("xdp")
int long_then_unchecked(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 acc = ctx->data_end - ctx->data;
#pragma unroll
	for (int i = 0; i < 400; i++) {   /* hundreds of logged instructions first */
		acc = acc * 31 + i;
		asm volatile("" : "+r"(acc));   /* keep clang from folding the loop */
	}
	__u64 *value = bpf_map_lookup_elem(&counter, &key);
	*value += acc;   /* no NULL check */
	return XDP_PASS;
}
