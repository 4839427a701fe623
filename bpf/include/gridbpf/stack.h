/* Stack traces and target selection shared by the "why is it stuck" objects (offcpu, io, tcp, mem). */
#ifndef GRIDBPF_STACK_H
#define GRIDBPF_STACK_H

#include "gridbpf/common.h"

/* perf's default kernel.perf_event_max_stack; deeper stacks are cut (the root frames are lost). */
#define GB_STACK_DEPTH 127
#define GB_COMM_LEN 16

/*
 * A stack-trace map: id -> GB_STACK_DEPTH instruction pointers (zero-terminated).
 * No BPF_F_REUSE_STACKID: an id still referenced by a blocked thread must keep its stack, so a
 * full map or a hash collision fails the new capture instead, and that failure is counted.
 */
#define GB_STACK_MAP(NAME, ENTRIES)                              \
	struct {                                                     \
		__uint(type, BPF_MAP_TYPE_STACK_TRACE);                  \
		__uint(max_entries, ENTRIES);                            \
		__uint(key_size, sizeof(__u32));                         \
		__uint(value_size, GB_STACK_DEPTH * sizeof(__u64));      \
	} NAME SEC(".maps")

/* Processes traced: tgid -> 1 (filled by userspace from --pid), and gb_is_target(tgid). */
#define GB_TARGETS(ENTRIES)                                      \
	struct {                                                     \
		__uint(type, BPF_MAP_TYPE_HASH);                         \
		__uint(max_entries, ENTRIES);                            \
		__type(key, __u32);                                      \
		__type(value, __u8);                                     \
	} targets SEC(".maps");                                      \
	static __always_inline bool gb_is_target(__u32 tgid)         \
	{                                                            \
		return tgid && bpf_map_lookup_elem(&targets, &tgid);     \
	}

#endif
