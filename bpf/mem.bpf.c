/*
 * Memory of target processes: page faults (user and kernel), mmap/munmap/mremap/brk growth, and
 * JVM GC pauses through HotSpot's USDT probes (hotspot:gc__begin / gc__end, uprobes placed by
 * userspace when the process maps a libjvm.so that has them). Counters per process, in the
 * kernel; userspace samples them with RSS from /proc.
 */
#include "gridbpf/stack.h"

char LICENSE[] SEC("license") = "GPL";

#define NR_mmap 9
#define NR_munmap 11
#define NR_brk 12
#define NR_mremap 25

enum mem_stat { MEM_PROCS_FULL, MEM_STAT_MAX };

struct mem_counters {
	__u64 faults_user, faults_kernel;
	__u64 mmap_calls, mmap_bytes;
	__u64 munmap_calls, munmap_bytes;
	__u64 mremap_calls;
	__s64 mremap_growth;
	__u64 brk_calls;
	__s64 brk_growth;
	__u64 last_brk;
	__u64 gc_count, gc_full, gc_total_ns, gc_max_ns;
	__u64 gc_start_ns;    /* of the GC running now, 0 if none */
};

GB_TARGETS(1024)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct mem_counters);
} mem SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MEM_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} mem_stats SEC(".maps");

static __always_inline struct mem_counters *counters(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct mem_counters *c;

	if (!gb_is_target(tgid))
		return NULL;
	c = bpf_map_lookup_elem(&mem, &tgid);
	if (c)
		return c;
	struct mem_counters zero = {};
	bpf_map_update_elem(&mem, &tgid, &zero, BPF_NOEXIST);
	c = bpf_map_lookup_elem(&mem, &tgid);
	if (!c)
		gb_count(&mem_stats, MEM_PROCS_FULL);
	return c;
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(mem_fault_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	struct mem_counters *c = counters();

	if (c)
		__sync_fetch_and_add(&c->faults_user, 1);
	return 0;
}

SEC("tp_btf/page_fault_kernel")
int BPF_PROG(mem_fault_kernel, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	struct mem_counters *c = counters();

	if (c)
		__sync_fetch_and_add(&c->faults_kernel, 1);
	return 0;
}

/* At exit the saved registers still hold the arguments; ret is the result. */
SEC("tp_btf/sys_exit")
int BPF_PROG(mem_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = BPF_CORE_READ(regs, orig_ax);
	struct mem_counters *c;

	if (nr != NR_mmap && nr != NR_munmap && nr != NR_brk && nr != NR_mremap)
		return 0;
	c = counters();
	if (!c)
		return 0;
	if (nr == NR_mmap) {
		if (ret < 0 && ret > -4096)
			return 0;
		__sync_fetch_and_add(&c->mmap_calls, 1);
		__sync_fetch_and_add(&c->mmap_bytes, BPF_CORE_READ(regs, si));
	} else if (nr == NR_munmap) {
		if (ret)
			return 0;
		__sync_fetch_and_add(&c->munmap_calls, 1);
		__sync_fetch_and_add(&c->munmap_bytes, BPF_CORE_READ(regs, si));
	} else if (nr == NR_mremap) {
		if (ret < 0 && ret > -4096)
			return 0;
		__sync_fetch_and_add(&c->mremap_calls, 1);
		__sync_fetch_and_add(&c->mremap_growth,
				     (__s64)BPF_CORE_READ(regs, dx) - (__s64)BPF_CORE_READ(regs, si));
	} else {
		/* brk returns the break after the call; the first one we see is the baseline */
		__sync_fetch_and_add(&c->brk_calls, 1);
		if (c->last_brk)
			__sync_fetch_and_add(&c->brk_growth, (__s64)ret - (__s64)c->last_brk);
		c->last_brk = ret;
	}
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(mem_gc_begin, int full)   /* (BPF_KPROBE: libbpf 1.1 has no BPF_UPROBE; same ABI) */
{
	struct mem_counters *c = counters();

	if (c) {
		c->gc_start_ns = bpf_ktime_get_ns();
		if (full)
			__sync_fetch_and_add(&c->gc_full, 1);
	}
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(mem_gc_end)
{
	struct mem_counters *c = counters();
	__u64 d;

	if (!c || !c->gc_start_ns)
		return 0;
	d = bpf_ktime_get_ns() - c->gc_start_ns;
	c->gc_start_ns = 0;
	__sync_fetch_and_add(&c->gc_count, 1);
	__sync_fetch_and_add(&c->gc_total_ns, d);
	if (d > c->gc_max_ns)
		c->gc_max_ns = d;
	return 0;
}
