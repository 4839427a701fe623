/* A program the verifier must refuse: it reads a map value without checking for NULL. */
#include "gridbpf/common.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);   /* an array with a constant key would be proven non-NULL */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counter SEC(".maps");

SEC("xdp")
int unchecked_lookup(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u64 *value = bpf_map_lookup_elem(&counter, &key);
	*value += 1;   /* no NULL check: "invalid mem access 'map_value_or_null'" */
	return XDP_PASS;
}
