/*
 * Off-CPU time of target threads: where they block (kernel and user stack, the syscall they are
 * in with its arguments), for how long, and who wakes them.
 *
 * sched_switch (prev blocks): remember start time, stacks and syscall registers in `blocked`.
 * sched_waking (someone wakes a blocked target thread): note the waker, its stacks, the time.
 * sched_switch (next is a target thread back on CPU): add the time to `offcpu` per stack pair,
 * and send one event if it was blocked at least min_event_ns. Userspace reads `blocked` to report
 * threads that are blocked right now ("stuck"), without any per-switch work in Python.
 */
#include "gridbpf/stack.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u64 min_event_ns = 1000000000ULL;  /* send an event for blocks at least this long */
const volatile __u64 min_block_ns = 0;              /* shorter blocks are not aggregated */
const volatile bool user_stacks = true;
const volatile bool want_events = true;
const volatile bool want_waker = true;
/* Follow syscalls (raw_tp sys_enter/sys_exit; `stuck` only): a syscall that blocks many short
 * times (fsync waiting page after page) is reported once, with its whole duration. */
const volatile bool want_syscalls = false;
/* true: blocks in the `blocked` hash, which userspace reads (stuck); false: in task-local
 * storage, reached straight from the task (offcpu: cheaper on every switch, not readable). */
const volatile bool live_map = true;

#define TASK_RUNNING 0
#define TASK_DEAD 0x80

enum offcpu_stat {
	OFFCPU_KSTACK_ERR,    /* kernel stack not captured (map full or collision) */
	OFFCPU_USTACK_ERR,    /* user stack not captured */
	OFFCPU_BLOCKED_FULL,  /* `blocked` full: a block went unrecorded */
	OFFCPU_AGG_FULL,      /* `offcpu` full: time not aggregated */
	OFFCPU_SWITCH_IN_MISSED, /* a thread ran with no sched_switch into it seen: its block was
				    ended from its CPU time (see missed_switch_in) */
	OFFCPU_STAT_MAX,
};

struct blocked {
	__u64 start_ns;
	__u64 end_ns;           /* 0 while off CPU; when it ran again (the entry stays for reuse) */
	__u64 waker_ns;         /* time of the last wakeup, 0 while nobody woke it */
	__s64 syscall;          /* pt_regs->orig_ax: syscall number, or <0 / fault code outside one */
	__u64 args[6];          /* syscall arguments (di si dx r10 r8 r9) */
	__u64 user_ip, user_sp, user_bp;
	__u32 tgid, tid;
	__u32 state;            /* prev_state of sched_switch (TASK_INTERRUPTIBLE=1, UNINTERRUPTIBLE=2...) */
	__s32 kstack, ustack;   /* ids in `stacks`, negative errno if not captured */
	__u32 waker_tid, waker_tgid;
	__s32 waker_kstack, waker_ustack;
	char comm[GB_COMM_LEN];
	char waker_comm[GB_COMM_LEN];
	/* Off-CPU time at this entry's stacks not yet added to `offcpu`: a thread blocking again
	 * and again at the same place adds here, with no map lookup, until its stacks change or it
	 * exits (userspace adds these to the map's totals when it reads them). */
	__u64 acc_ns, acc_count;
	__u64 exec_ns;          /* the thread's CPU time when it blocked (se.sum_exec_runtime) */
};

/*
 * The top of the waker's user stack. Frame pointers miss the caller of a leaf function built
 * without them (glibc's write() wrapper, say); its return address is here, between sp and bp.
 * Captured only for blocks long enough to be reported.
 */
#define WAKER_WORDS 32
struct waker_mem {
	__u64 sp, bp;
	__u64 words[WAKER_WORDS];
};

/* The same for user stacks captured at a block, by stack id: the aggregated stacks of `offcpu`
 * get their missing frame back from it in userspace (first capture of each id kept). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);                 /* user stack id */
	__type(value, struct waker_mem);
} stack_top SEC(".maps");

/* an all-zero value to insert from (too big for the BPF stack next to struct blocked) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct waker_mem);
} zero_mem SEC(".maps");

static __always_inline void save_stack_top(__u32 id, __u64 sp, __u64 bp)
{
	struct waker_mem *m, *zero;
	__u32 k0 = 0;

	if (bpf_map_lookup_elem(&stack_top, &id) || !sp || bp <= sp)
		return;
	zero = bpf_map_lookup_elem(&zero_mem, &k0);
	if (!zero || bpf_map_update_elem(&stack_top, &id, zero, BPF_NOEXIST))
		return;
	m = bpf_map_lookup_elem(&stack_top, &id);
	if (!m)
		return;
	m->sp = sp;
	m->bp = bp;
	if (bpf_probe_read_user(m->words, sizeof(m->words), (void *)sp))
		m->sp = 0;
}

/* The syscall a target thread is in (want_syscalls). */
struct insys {
	__u64 start_ns;
	__u64 offcpu_ns;        /* off-CPU time inside it so far */
	__u64 nr;
	__u32 blocks;           /* times it blocked inside it */
	__u32 pad;
};

struct offcpu_event {
	struct blocked b;       /* the (last) block */
	__u64 end_ns;           /* when that block ended */
	__u64 sys_start_ns;     /* the syscall around it (0: not followed) */
	__u64 sys_end_ns;
	__u64 sys_offcpu_ns;
	__u32 sys_blocks;
	__u32 pad;
	struct waker_mem waker;
};
GB_EXPORT_STRUCT(offcpu_event);

struct offcpu_key {
	__u32 tgid, tid;
	__s32 kstack, ustack;
};

struct offcpu_val {
	__u64 total_ns;
	__u64 count;
	char comm[GB_COMM_LEN];
};

GB_TARGETS(1024)
GB_STACK_MAP(stacks, 16384);
GB_RINGBUF(events, 256 * 1024);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);                 /* tid */
	__type(value, struct blocked);
} blocked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__type(key, struct offcpu_key);
	__type(value, struct offcpu_val);
} offcpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct blocked);
} tblocked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);                 /* tid */
	__type(value, struct insys);
} insys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);                 /* tid of the woken thread */
	__type(value, struct waker_mem);
} waker_mem SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OFFCPU_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void flush_acc(struct blocked *b)
{
	struct offcpu_key key = {};
	struct offcpu_val *v;

	if (!b->acc_count)
		return;
	key.tgid = b->tgid;
	key.tid = b->tid;
	key.kstack = b->kstack;
	key.ustack = b->ustack;
	v = bpf_map_lookup_elem(&offcpu, &key);
	if (!v) {
		struct offcpu_val zero = {};
		__builtin_memcpy(zero.comm, b->comm, sizeof(zero.comm));
		bpf_map_update_elem(&offcpu, &key, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&offcpu, &key);
	}
	if (v) {
		__sync_fetch_and_add(&v->total_ns, b->acc_ns);
		__sync_fetch_and_add(&v->count, b->acc_count);
	} else {
		gb_count(&stats, OFFCPU_AGG_FULL);
	}
	b->acc_ns = b->acc_count = 0;
}

/* Capture the stacks of PREV (current here) into D. */
static __always_inline void capture_stacks(void *ctx, struct task_struct *prev, struct blocked *d)
{
	d->kstack = bpf_get_stackid(ctx, &stacks, 0);
	if (d->kstack < 0)
		gb_count(&stats, OFFCPU_KSTACK_ERR);
	d->ustack = -1;
	if (user_stacks && !(prev->flags & 0x00200000 /* PF_KTHREAD */)) {
		d->ustack = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		if (d->ustack < 0)
			gb_count(&stats, OFFCPU_USTACK_ERR);
		else
			save_stack_top(d->ustack, d->user_sp, d->user_bp);
	}
}

/*
 * The block's own fields (not the thread's identity, stacks or accumulated time). The user
 * registers saved at kernel entry give the syscall (orig_ax) and its arguments; direct loads from
 * the BTF pointer are far cheaper than a probe-read helper call each.
 */
static __always_inline void fill_block(struct blocked *d, struct pt_regs *regs, __u32 state, __u64 now)
{
	d->start_ns = now;
	d->end_ns = 0;
	d->waker_ns = 0;
	d->state = state;
	d->waker_tid = d->waker_tgid = 0;
	d->waker_kstack = d->waker_ustack = -1;
	if (regs) {
		d->syscall = regs->orig_ax;
		d->args[0] = regs->di;
		d->args[1] = regs->si;
		d->args[2] = regs->dx;
		d->args[3] = regs->r10;
		d->args[4] = regs->r8;
		d->args[5] = regs->r9;
		d->user_ip = regs->ip;
		d->user_sp = regs->sp;
		d->user_bp = regs->bp;
	} else {
		d->syscall = -1;
		d->user_ip = d->user_sp = d->user_bp = 0;
	}
}

/* OLD: the thread's entry from its previous block, or NULL */
static __always_inline void record_block(void *ctx, struct task_struct *prev, __u32 state, __u64 now,
					 struct blocked *old)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(prev);

	if (old) {
		/*
		 * Written in place: much cheaper than a hash update, which allocates and frees an
		 * element. Walking two stacks is most of the cost of a block; a thread that blocks
		 * again in the same syscall from the same user ip, sp and bp (a server's event loop, a
		 * worker waiting for its queue) has the same frames: keep the ids captured last time.
		 */
		bool same = old->end_ns && regs && regs->ip && old->user_ip == regs->ip &&
			    old->user_sp == regs->sp && old->user_bp == regs->bp &&
			    old->syscall == (__s64)regs->orig_ax && old->kstack >= 0 &&
			    (old->ustack >= 0 || !user_stacks);

		fill_block(old, regs, state, now);
		old->exec_ns = prev->se.sum_exec_runtime;
		if (!same) {
			flush_acc(old);   /* other stacks from now on */
			__builtin_memcpy(old->comm, prev->comm, sizeof(old->comm));
			capture_stacks(ctx, prev, old);
		}
		return;
	}

	struct blocked b = {};

	b.tgid = prev->tgid;
	b.tid = prev->pid;
	__builtin_memcpy(b.comm, prev->comm, sizeof(b.comm));
	fill_block(&b, regs, state, now);
	b.exec_ns = prev->se.sum_exec_runtime;
	capture_stacks(ctx, prev, &b);
	if (live_map ? bpf_map_update_elem(&blocked, &b.tid, &b, BPF_ANY) != 0 :
	    !bpf_task_storage_get(&tblocked, prev, &b, BPF_LOCAL_STORAGE_GET_F_CREATE))
		gb_count(&stats, OFFCPU_BLOCKED_FULL);
}

static __always_inline void emit(struct blocked *b, __u64 end, struct insys *in, __u64 sys_end)
{
	struct offcpu_event *e = gb_ringbuf_reserve(events, sizeof(*e));
	__u32 tid = b->tid;

	if (e) {
		struct waker_mem *w = bpf_map_lookup_elem(&waker_mem, &tid);

		__builtin_memcpy(&e->b, b, sizeof(*b));
		e->end_ns = end;
		e->sys_start_ns = in ? in->start_ns : 0;
		e->sys_end_ns = sys_end;
		e->sys_offcpu_ns = in ? in->offcpu_ns : 0;
		e->sys_blocks = in ? in->blocks : 0;
		e->pad = 0;
		if (w)
			__builtin_memcpy(&e->waker, w, sizeof(*w));
		else
			__builtin_memset(&e->waker, 0, sizeof(e->waker));
		bpf_ringbuf_submit(e, 0);
	}
	bpf_map_delete_elem(&waker_mem, &tid);
}

static __always_inline void finish_block(struct blocked *b, __u64 now)
{
	__u32 tid = b->tid;
	__u64 dur;

	if (b->end_ns)
		return;
	dur = now - b->start_ns;
	if (dur >= min_block_ns) {
		b->acc_ns += dur;
		b->acc_count += 1;
		if (!live_map)   /* userspace cannot read task storage: add to `offcpu` now */
			flush_acc(b);
	}
	if (want_syscalls) {
		struct insys *in = bpf_map_lookup_elem(&insys, &tid);
		if (in) {
			/* keep the block as the syscall's last one; sys_exit reports the syscall */
			in->offcpu_ns += dur;
			in->blocks += 1;
			b->end_ns = now;
			return;
		}
	}
	if (want_events && dur >= min_event_ns)
		emit(b, now, NULL, 0);
	b->end_ns = now;   /* no longer off CPU (the entry is reused by its next block) */
}

/*
 * T is running (it is switching out, or leaving a syscall) while its entry B says it is off
 * CPU: the sched_switch into it was never delivered to us. Seen on a 6.18 guest under load,
 * about once in 1,000-2,000 switches of a test program, by this program and a minimal one alike
 * (no recursion miss counted). Its CPU time since it blocked is the time it has run since it
 * came back (any switch-out in between would have been seen here), so the block ended that
 * long before NOW. Counted: the end is an estimate.
 */
static __always_inline void missed_switch_in(struct task_struct *t, struct blocked *b, __u64 now)
{
	__u64 ran = t->se.sum_exec_runtime - b->exec_ns;

	gb_count(&stats, OFFCPU_SWITCH_IN_MISSED);
	finish_block(b, ran < now - b->start_ns ? now - ran : b->start_ns);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(offcpu_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	__u64 now = 0;   /* read the clock only for targets: this runs on every switch */
	struct blocked *b;

	if (live_map) {
		__u32 tid = prev->pid;

		b = gb_is_target(prev->tgid) ? bpf_map_lookup_elem(&blocked, &tid) : NULL;
	} else {
		/* a task with storage is a target seen before: no hash lookup */
		b = bpf_task_storage_get(&tblocked, prev, 0, 0);
	}
	if (b && !b->end_ns) {
		now = bpf_ktime_get_ns();
		missed_switch_in(prev, b, now);
	}
	/* A preempted task stays runnable: that is run-queue wait, not blocking. */
	if (!preempt && prev_state != TASK_RUNNING && !(prev_state & TASK_DEAD) &&
	    (b || gb_is_target(prev->tgid))) {
		if (!now)
			now = bpf_ktime_get_ns();
		record_block(ctx, prev, prev_state, now, b);
	}
	if (live_map) {
		__u32 tid = next->pid;

		b = gb_is_target(next->tgid) ? bpf_map_lookup_elem(&blocked, &tid) : NULL;
	} else {
		b = bpf_task_storage_get(&tblocked, next, 0, 0);
	}
	if (b)
		finish_block(b, now ? now : bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_waking")
int BPF_PROG(offcpu_waking, struct task_struct *p)
{
	__u32 tid = p->pid;
	struct blocked *b;
	__u64 id;

	__u64 now;

	if (!want_waker)
		return 0;
	b = live_map ? bpf_map_lookup_elem(&blocked, &tid) : bpf_task_storage_get(&tblocked, p, 0, 0);
	if (!b || b->end_ns)
		return 0;
	/* Only blocks that will be reported need a waker: short ones stay cheap. */
	now = bpf_ktime_get_ns();
	if (now - b->start_ns < min_event_ns) {
		struct insys *in = want_syscalls ? bpf_map_lookup_elem(&insys, &tid) : NULL;
		if (!in || now - in->start_ns < min_event_ns)
			return 0;
	}
	/* Runs in the waker's context (or an interrupt on top of whatever ran). */
	id = bpf_get_current_pid_tgid();
	b->waker_ns = now;
	b->waker_tid = (__u32)id;
	b->waker_tgid = id >> 32;
	bpf_get_current_comm(b->waker_comm, sizeof(b->waker_comm));
	b->waker_kstack = bpf_get_stackid(ctx, &stacks, 0);
	if (b->waker_kstack < 0)
		gb_count(&stats, OFFCPU_KSTACK_ERR);
	b->waker_ustack = -1;
	if (user_stacks && b->waker_tgid) {
		struct task_struct *cur = bpf_get_current_task_btf();
		struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(cur);
		struct waker_mem *w;

		b->waker_ustack = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK);
		if (b->waker_ustack < 0)      /* a bucket taken by another stack: counted, never wrong */
			gb_count(&stats, OFFCPU_USTACK_ERR);
		if (!regs || (cur->flags & 0x00200000 /* PF_KTHREAD */))
			return 0;
		w = bpf_map_lookup_elem(&waker_mem, &tid);
		if (!w) {
			struct waker_mem zero = {};
			bpf_map_update_elem(&waker_mem, &tid, &zero, BPF_ANY);
			w = bpf_map_lookup_elem(&waker_mem, &tid);
			if (!w)
				return 0;
		}
		w->sp = BPF_CORE_READ(regs, sp);
		w->bp = BPF_CORE_READ(regs, bp);
		if (bpf_probe_read_user(w->words, sizeof(w->words), (void *)w->sp))
			w->sp = 0;
	}
	return 0;
}

/* A target process's threads are created and reaped while we trace: forget exited ones. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(offcpu_exit, struct task_struct *p)
{
	__u32 tid = p->pid;
	struct blocked *b;

	if (!live_map)
		return 0;   /* task storage goes with the task; its time is in `offcpu` already */
	b = bpf_map_lookup_elem(&blocked, &tid);
	if (b)
		flush_acc(b);
	bpf_map_delete_elem(&blocked, &tid);
	bpf_map_delete_elem(&waker_mem, &tid);
	bpf_map_delete_elem(&insys, &tid);
	return 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(stuck_sys_enter, struct pt_regs *regs, long id)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct insys in = {};

	if (!gb_is_target(pid_tgid >> 32))
		return 0;
	in.start_ns = bpf_ktime_get_ns();
	in.nr = id;
	bpf_map_update_elem(&insys, &tid, &in, BPF_ANY);
	return 0;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(stuck_sys_exit, struct pt_regs *regs, long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct insys *in = bpf_map_lookup_elem(&insys, &tid);
	struct blocked *b;
	__u64 now;

	if (!in)
		return 0;
	b = bpf_map_lookup_elem(&blocked, &tid);
	now = bpf_ktime_get_ns();
	if (b) {
		if (!b->end_ns)       /* running here: its switch-in was not seen */
			missed_switch_in(bpf_get_current_task_btf(), b, now);
		if (want_events && b->end_ns && b->start_ns >= in->start_ns &&
		    now - in->start_ns >= min_event_ns)
			emit(b, b->end_ns, in, now);
		flush_acc(b);
		bpf_map_delete_elem(&blocked, &tid);
	}
	bpf_map_delete_elem(&insys, &tid);
	return 0;
}

/*
 * The floor for benchmarks (bench/bench_offcpu.py): a sched_switch program that only asks
 * whether the tasks are targets. Loaded instead of the others with `floor` set.
 */
__u64 floor_hits;

SEC("tp_btf/sched_switch")
int BPF_PROG(offcpu_floor, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	if (gb_is_target(prev->tgid) || gb_is_target(next->tgid))
		__sync_fetch_and_add(&floor_hits, 1);
	return 0;
}
