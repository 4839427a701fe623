/* Shared by every gridbpf BPF object: includes, ring buffers that count their losses. */
#ifndef GRIDBPF_COMMON_H
#define GRIDBPF_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

/* uapi constants that vmlinux.h (BTF types only) does not carry */
#ifndef ETH_P_IP
#define ETH_P_IP 0x0800
#endif
#ifndef ETH_P_IPV6
#define ETH_P_IPV6 0x86DD
#endif
#ifndef ETH_P_8021Q
#define ETH_P_8021Q 0x8100
#endif
#ifndef ETH_ALEN
#define ETH_ALEN 6
#endif
#ifndef TC_ACT_OK
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#endif

/*
 * A ring buffer plus a per-CPU counter of the records that did not fit.
 * Userspace (gridbpf.bpf.RingBuffer) finds NAME_lost by name and reports it,
 * so a full buffer is never read as "nothing happened".
 */
#define GB_RINGBUF(NAME, BYTES)                                   \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                       \
		__uint(max_entries, BYTES);                               \
	} NAME SEC(".maps");                                          \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);                  \
		__uint(max_entries, 1);                                   \
		__type(key, __u32);                                       \
		__type(value, __u64);                                     \
	} NAME##_lost SEC(".maps")

/*
 * Put `struct NAME` into the object's BTF even when no map names it (ring-buffer records), so
 * userspace can derive its layout: GB_EXPORT_STRUCT(event);
 */
#define GB_EXPORT_STRUCT(NAME) struct NAME gb_export_##NAME __attribute__((unused))

static __always_inline void gb_count(void *percpu_array, __u32 index)
{
	__u64 *n = bpf_map_lookup_elem(percpu_array, &index);
	if (n)
		*n += 1;
}

/* Reserve SIZE bytes in ring buffer NAME; on failure count the loss and return NULL. */
#define gb_ringbuf_reserve(NAME, SIZE)                            \
	({                                                            \
		void *__r = bpf_ringbuf_reserve(&NAME, SIZE, 0);          \
		if (!__r)                                                 \
			gb_count(&NAME##_lost, 0);                            \
		__r;                                                      \
	})

/* Copy a record into ring buffer NAME; on failure count the loss. */
#define gb_ringbuf_output(NAME, DATA, SIZE, FLAGS)                \
	({                                                            \
		long __e = bpf_ringbuf_output(&NAME, DATA, SIZE, FLAGS);  \
		if (__e)                                                  \
			gb_count(&NAME##_lost, 0);                            \
		__e;                                                      \
	})

#endif
