/*
 * In-kernel ADLER32 of the bytes target processes write into files under watched directories.
 *
 * A file is followed from a successful open for writing (sys_exit_open*) whose dentry lies below
 * a watched directory (matched by device and inode number, so relative paths and symlinks need no
 * string handling). State is kept per inode. Every write, pwrite64, writev, pwritev(2) remembers
 * its arguments at sys_enter and sums the bytes actually written (the return value) from the user
 * buffer at sys_exit. Contiguous writes extend one running segment; a write elsewhere sends the
 * segment to userspace as a range (combined there with adler32_combine). On the last close the
 * final segment, the size and the path go to userspace, which stores the attribute.
 *
 * Never silently wrong: anything that could change the content behind our back (mmap, splice,
 * truncate, hole punching, async I/O, overlapping writes, two writes at the same time, a failed
 * read of the user buffer, a lost record) sets a reason bit in the state; userspace then reads the
 * file itself. Userspace also checks that ranges tile [0, size) exactly.
 */
#include "gridbpf/common.h"
#include "gridbpf/adler32.h"

/* Atomics that return the old value (and 32-bit atomics) need BPF ISA v3; the Makefile builds
 * for clang's default (v1), so this object asks for v3 itself. Kernels >= 5.12 run it. */
#pragma clang attribute push(__attribute__((target("cpu=v3"))), apply_to = function)

char LICENSE[] SEC("license") = "GPL";

#define FMODE_WRITE 0x2
#define O_APPEND 02000
#define O_TRUNC 01000
#define S_IFMT 0170000
#define S_IFREG 0100000
#define MAP_SHARED 0x01
#define GB_MAX_DEPTH 16           /* directory levels between a watched directory and a file */
#define GB_NAME_MAX 256
#define GB_PATH_MAX 4096          /* path components, leaf first, each NUL-terminated */
#define GB_RENAME_MAX 1024
#define GB_MAX_FDS_SCAN 65536     /* fds scanned when a process exits or calls close_range */
#define CK_CHUNK 16384            /* bytes copied from the user buffer per step */

enum filter_mode { CK_BY_ALL = 0, CK_BY_PID = 1, CK_BY_COMM = 2, CK_BY_CGROUP = 3 };

/* Why a file is not followed any more (bits of fstate.flags, reported on close). */
enum unfollowed_reason {
	R_CONCURRENT = 1 << 0,   /* two writes in flight at once: positions/state not trustworthy */
	R_OVERLAP = 1 << 1,      /* a write over bytes already summed */
	R_MMAP = 1 << 2,         /* shared mapping of the file */
	R_TRUNCATE = 1 << 3,     /* ftruncate, or truncate(path) by a target */
	R_FALLOCATE = 1 << 4,    /* punch hole, zero/collapse/insert range */
	R_SPLICE = 1 << 5,       /* sendfile, splice, copy_file_range or a reflink into the file */
	R_READ_FAULT = 1 << 6,   /* the user buffer could not be read */
	R_RANGE_LOST = 1 << 7,   /* a range record did not fit in the ring buffer */
	R_PENDING_FULL = 1 << 8, /* no room to remember a write's arguments */
	R_ASYNC_IO = 1 << 9,     /* io_uring or aio by a target process */
	R_APPEND_PWRITE = 1 << 10, /* pwrite on O_APPEND: Linux appends, the offset is unknown */
	R_CLOBBERED = 1 << 11,   /* the per-CPU buffer was reused under us */
	R_POSITION = 1 << 12,    /* file position moved unexpectedly during a write */
	R_BAD_IOV = 1 << 13,     /* the iovec array could not be walked */
	R_MISSED_EXIT = 1 << 14, /* a write entered but its exit was never seen */
};

enum event_type { EV_RANGE = 1, EV_CLOSE = 2, EV_RENAME = 3, EV_PROGRESS = 4 };

/* Where the bytes are summed (rodata sum_mode). */
enum sum_mode {
	SUM_KERNEL = 0,          /* here, from the user buffer, in the writer's syscall */
	SUM_RANGES = 1,          /* here only the written ranges; userspace sums them from the page cache */
	SUM_COPY_ONLY = 2,       /* benchmark only: copy into the per-CPU buffer, no sum (values wrong) */
};

enum stat_index {
	ST_OPENS = 0,        /* opens of files under watched directories, now followed */
	ST_STATE_FULL,       /* followed files dropped: inode map full (no checksum, not wrong) */
	ST_FILES_FULL,       /* opens dropped: file map full */
	ST_PENDING_FULL,     /* writes not remembered (file marked unfollowed) */
	ST_CLOSE_LOST,       /* close records lost (file gets no attribute) */
	ST_RANGE_LOST,       /* range records lost (file marked unfollowed) */
	ST_RENAME_LOST,      /* rename records lost */
	ST_WRITES,           /* writes summed */
	ST_BYTES,            /* bytes summed */
	ST_UNFOLLOWED,       /* files marked unfollowed */
	ST_CLOSES,           /* close records sent */
	ST_PROGRESS_LOST,    /* progress records lost (userspace sums those bytes at close instead) */
	ST_RENAMES,          /* rename records sent */
	ST_MAX,
};

enum write_kind { K_WRITE = 0, K_PWRITE = 1, K_WRITEV = 2, K_PWRITEV = 3 };

const volatile __u32 filter_mode = CK_BY_ALL;
const volatile char target_comm[16] = {};
const volatile __u64 target_cgroup_id = 0;
const volatile __u32 target_cgroup_level = 0;
const volatile __u64 rename_window_ns = 30000000000ULL; /* report renames this long after a close */
const volatile __u32 sum_mode = SUM_KERNEL;
/* Follow files opened anywhere on the watched directories' filesystems (they may be moved into a
 * watched tree later, before or after close), and report every rename by a target. */
const volatile __u32 follow_renames = 1;
const volatile __u64 progress_bytes = 4 << 20;  /* SUM_RANGES: tell userspace every this many bytes */

__u64 next_session = 0;

struct dir_key {
	__u64 ino;
	__u32 dev;
	__u32 pad;
};

/* One followed inode. Updated only by the one write in flight (see R_CONCURRENT). */
struct fstate {
	__u64 session;           /* unique per followed lifetime, ties ranges to their close */
	__u64 ino;
	__u32 dev;
	__u32 dir_index;
	__u64 seg_start;         /* the running segment [seg_start, seg_end) ... */
	__u64 seg_end;
	__u32 seg_adler;         /* ... and its ADLER32 */
	__u32 pad0;
	__u64 flags;             /* enum unfollowed_reason bits (64-bit: atomics) */
	__s64 opens;             /* followed struct files open on this inode */
	__s64 inflight;          /* writes between sys_enter and sys_exit */
	__u64 enters;            /* writes entered so far: detects a write started meanwhile */
	__u64 writes;
	__u64 bytes;
	__u64 ranges;
	__u64 open_ns;
	__u64 first_write_ns;
	__u64 last_write_ns;
	__u64 size_at_open;
	__u32 opener_tgid;
	__u32 last_tgid;         /* the last writer and its descriptor (SUM_RANGES: userspace reads */
	__s32 last_fd;           /* the file through /proc/TGID/fd/FD while it is written) */
	__u32 pad;
	__u64 progress_end;      /* SUM_RANGES: segment end last reported */
};

struct tracked_file {
	__u64 inode;             /* key of the fstate */
	__u64 session;
};

struct pending_write {
	__u64 inode;
	__u64 file;
	__u64 buf;               /* user buffer, or user iovec array */
	__u64 count;             /* bytes, or iovec count */
	__s64 pos;               /* explicit offset, or f_pos at entry */
	__u64 seq;               /* fstate.enters after our entry */
	__u32 kind;
	__u32 fpos;              /* position comes from f_pos (write, writev, O_APPEND) */
	__u32 append;
	__s32 nr;                /* syscall number: the exit must be of the same syscall */
	__u32 concurrent;        /* overlapped another write in time: sent as its own range */
	__s32 fd;
};

struct pending_rename {
	__u64 newname;
	__s32 newdfd;
	__u32 pad;
};

struct range_event {
	__u32 type;              /* EV_RANGE, or EV_PROGRESS: the running segment so far */
	__u32 adler;             /* SUM_KERNEL only */
	__u64 session;
	__u64 start;
	__u64 len;
	__u32 tgid;              /* a writer of the file and its descriptor */
	__s32 fd;
	__u64 ino;               /* the file (userspace checks the descriptor is still it) */
	__u32 dev;
	__u32 pad;
};

struct close_event {
	__u32 type;              /* EV_CLOSE */
	__u32 flags;
	__u64 session;
	__u64 ino;
	__u32 dev;
	__u32 dir_index;
	__u64 size;              /* i_size at the last close */
	__u64 seg_start;
	__u64 seg_end;
	__u32 seg_adler;
	__u32 nlink;
	__u64 writes;
	__u64 bytes;
	__u64 ranges;
	__u64 open_ns;
	__u64 first_write_ns;
	__u64 last_write_ns;
	__u64 close_ns;
	__s64 mtime_sec;
	__u32 mtime_nsec;
	__u32 tgid;
	__u32 path_len;          /* bytes used in path */
	__u32 path_complete;     /* 1 if the walk reached a watched directory ... */
	__u32 path_dir;          /* ... this one (index) */
	__u32 path_outside;      /* 1 if the walk reached the filesystem's root instead */
	__u64 size_at_open;
	char comm[16];
	char path[GB_PATH_MAX + GB_NAME_MAX];
};

struct rename_event {
	__u32 type;              /* EV_RENAME */
	__u32 tgid;
	__s32 newdfd;
	__u32 len;
	char newname[GB_RENAME_MAX];
};

struct sum_ctx {
	struct gb_adler s;
	__u64 remaining;         /* bytes still to sum */
	__u64 base;              /* user address of the current piece */
	__u64 piece_left;        /* bytes left in the current piece */
	__u64 iov;               /* user address of the next struct iovec, 0 for a plain buffer */
	__u64 iov_left;          /* iovecs not yet taken */
	__u32 err;               /* enum unfollowed_reason */
};

/* Userspace decodes ring-buffer records with these BTF types: keep them in the object. */
struct range_event *_range_event_type;
struct close_event *_close_event_type;
struct rename_event *_rename_event_type;
/* ... and name reasons, counters and record kinds from these enums. */
enum unfollowed_reason *_reason_type;
enum stat_index *_stat_type;
enum event_type *_event_type;
enum sum_mode *_sum_mode_type;

/*
 * Per-CPU work area of one write's sum. The loop state lives here, not on the stack: map memory
 * is opaque to the verifier, so every bpf_loop step looks the same to it and verifies once.
 */
struct scratch {
	__u64 owner;             /* who uses the area now: detects reuse under us */
	__u64 len;
	struct sum_ctx c;
	__u8 buf[CK_CHUNK + GB_ADLER_BLOCK];  /* room to zero-pad the last block */
};

static const char zeros[GB_ADLER_BLOCK];

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct dir_key);
	__type(value, __u32);
} dirs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);       /* s_dev of a watched directory's filesystem */
	__type(value, __u8);
} watched_devs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} target_pids SEC(".maps");

/* The inodes followed now, by device and number: userspace asks whether a file moved into a
 * watched tree is still open (its close will report it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct dir_key);
	__type(value, __u64);     /* session */
} followed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);       /* struct inode * */
	__type(value, struct fstate);
} inodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);       /* struct file * */
	__type(value, struct tracked_file);
} files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);       /* thread id */
	__type(value, struct pending_write);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct pending_rename);
} pending_renames SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);       /* thread id */
	__type(value, __u8);
} truncating SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);       /* tgid */
	__type(value, __u8);
} async_tgids SEC(".maps");   /* processes that used io_uring or aio */    /* opens with O_TRUNC between their enter and exit */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);       /* tgid */
	__type(value, __u64);     /* time of its last followed close */
} recent_close SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct close_event);
} close_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rename_event);
} rename_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

GB_RINGBUF(events, 8 << 20);

/* Kernels before 6.13 count file references in f_count, before 6.7 keep i_mtime as a timespec. */
struct file___old {
	atomic_long_t f_count;
} __attribute__((preserve_access_index));

struct inode___old {
	struct timespec64 i_mtime;
} __attribute__((preserve_access_index));

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += n;
}

static __always_inline void mark(struct fstate *st, __u64 reason)
{
	if (!(st->flags & reason) && !st->flags)
		stat_add(ST_UNFOLLOWED, 1);
	__sync_fetch_and_or(&st->flags, reason);
}

static __always_inline bool is_target(void)
{
	__u32 mode = filter_mode;

	if (mode == CK_BY_ALL)
		return true;
	if (mode == CK_BY_PID) {
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		return bpf_map_lookup_elem(&target_pids, &tgid) != NULL;
	}
	if (mode == CK_BY_COMM) {
		/* The process's name (its leader's), not the thread's: JVM threads rename themselves. */
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		__u64 comm[2] = {};
		bpf_probe_read_kernel(comm, sizeof(comm), BPF_CORE_READ(task, group_leader, comm));
		const volatile __u64 *want = (const volatile __u64 *)target_comm;
		return comm[0] == want[0] && comm[1] == want[1];
	}
	if (mode == CK_BY_CGROUP)
		return bpf_get_current_ancestor_cgroup_id(target_cgroup_level) == target_cgroup_id;
	return false;
}

static __always_inline struct file *fd_file(struct task_struct *task, __s64 fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **arr;
	struct file *f = NULL;

	if (!fdt || fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	arr = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &arr[fd]);
	return f;
}

static __always_inline struct file *current_fd_file(__s64 fd)
{
	return fd_file((struct task_struct *)bpf_get_current_task(), fd);
}

/* The state of the inode behind FD of the current task, if it is followed. */
static __always_inline struct fstate *fd_state(__s64 fd, __u64 *inode_key)
{
	struct file *f = current_fd_file(fd);
	__u64 key;

	if (!f)
		return NULL;
	key = (__u64)BPF_CORE_READ(f, f_inode);
	if (inode_key)
		*inode_key = key;
	return bpf_map_lookup_elem(&inodes, &key);
}

/* True if F is held only by the descriptor being closed now. */
static __always_inline bool file_last_ref(struct file *f)
{
	if (bpf_core_field_exists(f->f_ref))
		return BPF_CORE_READ(f, f_ref.refcnt.counter) == 0; /* FILE_REF_ONEREF */
	struct file___old *o = (void *)f;
	return BPF_CORE_READ(o, f_count.counter) == 1;
}

/* Index of the watched directory above DENTRY (at most GB_MAX_DEPTH levels up), or -1. */
static __always_inline int watched_dir(struct dentry *dentry, __u32 dev)
{
	struct dir_key k = { .dev = dev };
	struct dentry *parent;
	__u32 *idx;

	for (int i = 0; i < GB_MAX_DEPTH; i++) {
		parent = BPF_CORE_READ(dentry, d_parent);
		if (!parent || parent == dentry)
			return -1;
		k.ino = BPF_CORE_READ(parent, d_inode, i_ino);
		idx = bpf_map_lookup_elem(&dirs, &k);
		if (idx)
			return *idx;
		dentry = parent;
	}
	return -1;
}

/* O_TRUNC empties a file we may already follow: remember it for the exit. */
static __always_inline int on_open_enter(__u64 flags)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u8 one = 1;

	if ((flags & O_TRUNC) && is_target())
		bpf_map_update_elem(&truncating, &tid, &one, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int ck_enter_openat(struct trace_event_raw_sys_enter *ctx) { return on_open_enter(ctx->args[2]); }
SEC("tracepoint/syscalls/sys_enter_open")
int ck_enter_open(struct trace_event_raw_sys_enter *ctx) { return on_open_enter(ctx->args[1]); }
SEC("tracepoint/syscalls/sys_enter_creat")
int ck_enter_creat(struct trace_event_raw_sys_enter *ctx) { return on_open_enter(O_TRUNC); }
SEC("tracepoint/syscalls/sys_enter_openat2")
int ck_enter_openat2(struct trace_event_raw_sys_enter *ctx)
{
	__u64 flags = 0;   /* struct open_how starts with the flags */

	bpf_probe_read_user(&flags, sizeof(flags), (void *)ctx->args[2]);
	return on_open_enter(flags);
}

static __always_inline int on_open_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct file *f;
	struct inode *inode;
	struct fstate *st;
	__u64 fkey, ikey;
	bool truncated = false;
	__u32 dev;
	int dir;

	if (bpf_map_lookup_elem(&truncating, &tid)) {
		truncated = true;
		bpf_map_delete_elem(&truncating, &tid);
	}
	if (ret < 0 || !is_target())
		return 0;
	f = current_fd_file(ret);
	if (!f || !(BPF_CORE_READ(f, f_mode) & FMODE_WRITE))
		return 0;
	inode = BPF_CORE_READ(f, f_inode);
	if ((BPF_CORE_READ(inode, i_mode) & S_IFMT) != S_IFREG)
		return 0;
	dev = BPF_CORE_READ(inode, i_sb, s_dev);
	dir = watched_dir(BPF_CORE_READ(f, f_path.dentry), dev);
	/* Elsewhere on a watched filesystem: it may be moved into a watched tree later. */
	if (dir < 0 && !(follow_renames && bpf_map_lookup_elem(&watched_devs, &dev)))
		return 0;

	fkey = (__u64)f;
	ikey = (__u64)inode;
	st = bpf_map_lookup_elem(&inodes, &ikey);
	if (st && truncated)
		mark(st, R_TRUNCATE);   /* the bytes summed so far are gone */
	if (!st) {
		struct fstate init = {
			.session = __sync_fetch_and_add(&next_session, 1) + 1,
			.ino = BPF_CORE_READ(inode, i_ino),
			.dev = dev,
			.dir_index = dir,
			.seg_adler = 1,
			.opens = 0,
			.open_ns = bpf_ktime_get_ns(),
			.size_at_open = BPF_CORE_READ(inode, i_size),
			.opener_tgid = bpf_get_current_pid_tgid() >> 32,
		};
		/* NOEXIST: a concurrent open of the same inode may have created it first. */
		bpf_map_update_elem(&inodes, &ikey, &init, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&inodes, &ikey);
		if (!st) {
			stat_add(ST_STATE_FULL, 1);
			return 0;
		}
		struct dir_key id = { .ino = st->ino, .dev = dev };
		bpf_map_update_elem(&followed, &id, &st->session, BPF_ANY);
	}
	struct tracked_file tf = { .inode = ikey, .session = st->session };
	if (bpf_map_update_elem(&files, &fkey, &tf, BPF_ANY)) {
		/* Writes through this file would be summed into the state, but its close
		 * would never be seen: do not trust the state. */
		stat_add(ST_FILES_FULL, 1);
		mark(st, R_PENDING_FULL);
		return 0;
	}
	__sync_fetch_and_add(&st->opens, 1);
	stat_add(ST_OPENS, 1);
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (bpf_map_lookup_elem(&async_tgids, &tgid))
		mark(st, R_ASYNC_IO);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_openat")
int ck_exit_openat(struct trace_event_raw_sys_exit *ctx) { return on_open_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_openat2")
int ck_exit_openat2(struct trace_event_raw_sys_exit *ctx) { return on_open_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_open")
int ck_exit_open(struct trace_event_raw_sys_exit *ctx) { return on_open_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_creat")
int ck_exit_creat(struct trace_event_raw_sys_exit *ctx) { return on_open_exit(ctx->ret); }

/* ---- writes ------------------------------------------------------------------------------- */

/* A thread's previous write never reached its exit (we were not attached, or the kernel skipped
 * our program): its bytes are not in the sum, so its file cannot be trusted. */
static __always_inline void stale_exit(__u32 tid)
{
	struct pending_write *old = bpf_map_lookup_elem(&pending, &tid);
	struct fstate *st;

	if (!old)
		return;
	st = bpf_map_lookup_elem(&inodes, &old->inode);
	if (st) {
		mark(st, R_MISSED_EXIT);
		__sync_fetch_and_add(&st->inflight, -1);
	}
	bpf_map_delete_elem(&pending, &tid);
}

static __always_inline int on_write_enter(struct trace_event_raw_sys_enter *ctx, __s64 pos, __u32 kind,
					  bool rwf_append)
{
	struct pending_write p = {};
	struct fstate *st;
	struct file *f;
	__u32 tid;

	if (!is_target())
		return 0;
	f = current_fd_file(ctx->args[0]);
	if (!f)
		return 0;
	p.inode = (__u64)BPF_CORE_READ(f, f_inode);
	st = bpf_map_lookup_elem(&inodes, &p.inode);
	if (!st)
		return 0;

	p.file = (__u64)f;
	p.fd = ctx->args[0];
	p.buf = ctx->args[1];
	p.count = ctx->args[2];
	p.kind = kind;
	p.nr = (__s32)ctx->id;   /* __syscall_nr is an int; the upper half is padding */
	p.append = rwf_append || (BPF_CORE_READ(f, f_flags) & O_APPEND) != 0;
	/* write/writev, and pwritev2 with offset -1, use and move the file position. */
	p.fpos = kind == K_WRITE || kind == K_WRITEV || pos < 0;
	if (p.append && !p.fpos) {
		mark(st, R_APPEND_PWRITE);
		return 0;
	}
	p.pos = p.fpos ? BPF_CORE_READ(f, f_pos) : pos;

	/* The running segment is updated without a lock (tracing programs cannot take
	 * bpf_spin_lock): only a write that overlaps no other in time may touch it. A pwrite that
	 * does overlap is sent as a range of its own; a write at the file position is not followed
	 * (another writer could have moved the position under it). */
	if (__sync_fetch_and_add(&st->inflight, 1) > 0) {
		if (p.fpos)
			mark(st, R_CONCURRENT);
		else
			p.concurrent = 1;
	}
	p.seq = __sync_fetch_and_add(&st->enters, 1) + 1;

	tid = (__u32)bpf_get_current_pid_tgid();
	stale_exit(tid);
	if (bpf_map_update_elem(&pending, &tid, &p, BPF_ANY)) {
		stat_add(ST_PENDING_FULL, 1);
		mark(st, R_PENDING_FULL);
		__sync_fetch_and_add(&st->inflight, -1);
	}
	return 0;
}


static long block_step(__u32 i, void *data)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	/* Never more than CK_CHUNK / GB_ADLER_BLOCK steps; the mask is for the verifier. */
	__u64 off = ((__u64)i * GB_ADLER_BLOCK) & (CK_CHUNK - 1);

	if (!sc)
		return 1;
	gb_adler_block(&sc->c.s, (const __u64 *)&sc->buf[off]);
	return 0;
}

static long sum_step(__u32 i, void *data)
{
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);
	struct sum_ctx *c;
	__u64 n, pad;

	if (!sc)
		return 1;
	c = &sc->c;
	if (c->remaining == 0)
		return 1;
	if (c->piece_left == 0) {
		struct iovec v;
		if (!c->iov || c->iov_left == 0 ||
		    bpf_probe_read_user(&v, sizeof(v), (void *)c->iov)) {
			c->err = R_BAD_IOV;
			return 1;
		}
		c->iov += sizeof(v);
		c->iov_left--;
		c->base = (__u64)v.iov_base;
		c->piece_left = v.iov_len;
		return 0;
	}
	n = c->piece_left;
	if (n > c->remaining)
		n = c->remaining;
	if (n > CK_CHUNK)
		n = CK_CHUNK;
	if (bpf_probe_read_user(sc->buf, n, (void *)c->base)) {
		c->err = R_READ_FAULT;
		return 1;
	}
	/* Zero-pad to whole blocks, sum them, then take the padding back out. */
	pad = (GB_ADLER_BLOCK - (n & (GB_ADLER_BLOCK - 1))) & (GB_ADLER_BLOCK - 1);
	if (pad)
		bpf_probe_read_kernel(&sc->buf[n], pad, zeros);
	if (sum_mode != SUM_COPY_ONLY)
		bpf_loop((n + pad) / GB_ADLER_BLOCK, block_step, NULL, 0);
	gb_adler_unpad(&c->s, pad);
	gb_adler_reduce(&c->s);
	c->base += n;
	c->piece_left -= n;
	c->remaining -= n;
	return 0;
}

/* One range record of ST: [START, START + LEN) with its ADLER (sum mode kernel), and a writer's
 * descriptor on the file (sum mode page-cache reads it through /proc/TGID/fd/FD). */
static __always_inline bool send_range(struct fstate *st, __u32 type, __u64 start, __u64 len,
				       __u32 adler, __u32 tgid, __s32 fd)
{
	struct range_event *r = gb_ringbuf_reserve(events, sizeof(*r));

	if (!r)
		return false;
	r->type = type;
	r->adler = adler;
	r->session = st->session;
	r->start = start;
	r->len = len;
	r->tgid = tgid;
	r->fd = fd;
	r->ino = st->ino;
	r->dev = st->dev;
	bpf_ringbuf_submit(r, 0);
	return true;
}

static __always_inline void range_sent(struct fstate *st, bool sent)
{
	if (sent) {
		__sync_fetch_and_add(&st->ranges, 1);
	} else {
		stat_add(ST_RANGE_LOST, 1);
		mark(st, R_RANGE_LOST);
	}
}

/* The running segment is left for a write elsewhere. */
static __always_inline void emit_range(struct fstate *st)
{
	if (st->seg_end == st->seg_start)
		return;
	range_sent(st, send_range(st, EV_RANGE, st->seg_start, st->seg_end - st->seg_start,
				  st->seg_adler, st->last_tgid, st->last_fd));
}

/* A write that overlapped others in time: its own range, the shared segment untouched. */
static __always_inline void emit_write(struct fstate *st, __u64 off, __u64 len, __u32 adler,
				       __s32 fd)
{
	range_sent(st, send_range(st, EV_RANGE, off, len, adler, bpf_get_current_pid_tgid() >> 32, fd));
}

/* SUM_RANGES: the running segment has grown; userspace can sum it while it is cached. */
static __always_inline void emit_progress(struct fstate *st)
{
	if (!send_range(st, EV_PROGRESS, st->seg_start, st->seg_end - st->seg_start, 0,
			st->last_tgid, st->last_fd)) {
		stat_add(ST_PROGRESS_LOST, 1);   /* not fatal: the bytes are read at close */
		return;
	}
	st->progress_end = st->seg_end;
}

static __always_inline int on_write_exit(struct trace_event_raw_sys_exit *ctx)
{
	long ret = ctx->ret;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending_write *pp, p;
	struct fstate *st;
	struct scratch *sc;
	struct sum_ctx *c;
	__u64 owner, steps;
	__u32 zero = 0, adler;
	__s64 off;

	pp = bpf_map_lookup_elem(&pending, &tid);
	if (!pp)
		return 0;
	if (pp->nr != (__s32)ctx->id) {
		stale_exit(tid);
		return 0;
	}
	p = *pp;
	bpf_map_delete_elem(&pending, &tid);
	st = bpf_map_lookup_elem(&inodes, &p.inode);
	if (!st)
		return 0;
	if (ret <= 0)
		goto done;
	if (st->enters != p.seq) {       /* another write entered while we were in flight */
		if (p.fpos)
			mark(st, R_CONCURRENT);
		else
			p.concurrent = 1;
	}
	if (st->flags)
		goto done; /* userspace will read the file: summing would be wasted */

	if (p.fpos) {
		struct file *f = (struct file *)p.file;
		__s64 now = BPF_CORE_READ(f, f_pos);
		off = now - ret;
		if (!p.append && off != p.pos) {
			mark(st, R_POSITION);
			goto done;
		}
	} else {
		off = p.pos;
	}

	if (sum_mode == SUM_RANGES) {
		adler = 0;         /* userspace sums the range from the page cache */
		goto summed;
	}
	sc = bpf_map_lookup_elem(&scratch, &zero);
	if (!sc) {
		mark(st, R_CLOBBERED);
		goto done;
	}
	owner = bpf_ktime_get_ns() ^ ((__u64)tid << 40);
	sc->owner = owner;
	c = &sc->c;
	__builtin_memset(c, 0, sizeof(*c));
	c->s.a = 1;
	c->remaining = ret;
	if (p.kind == K_WRITEV || p.kind == K_PWRITEV) {
		c->iov = p.buf;
		c->iov_left = p.count;
	} else {
		c->base = p.buf;
		c->piece_left = ret;
	}
	/* Each chunk takes one step, each iovec at most one more. */
	steps = (__u64)ret / CK_CHUNK + 2 + (p.kind == K_WRITEV || p.kind == K_PWRITEV ? 2 * p.count : 0);
	if (steps > (1 << 23))
		steps = 1 << 23;
	bpf_loop(steps, sum_step, NULL, 0);
	if (sc->owner != owner) {
		mark(st, R_CLOBBERED);
		goto done;
	}
	if (!c->err && c->remaining)
		c->err = R_BAD_IOV;
	if (c->err) {
		mark(st, c->err);
		goto done;
	}
	adler = (__u32)(c->s.b << 16 | c->s.a);
summed:
	if (p.concurrent) {
		emit_write(st, off, ret, adler, p.fd);   /* overlaps are found in userspace */
	} else if ((__u64)off == st->seg_end) {
		if (sum_mode == SUM_KERNEL)
			st->seg_adler = gb_adler_combine(st->seg_adler, adler, ret);
		st->seg_end += ret;
	} else if ((__u64)off < st->seg_end && (__u64)off + ret > st->seg_start) {
		mark(st, R_OVERLAP);
		goto done;
	} else {
		emit_range(st);
		st->seg_start = off;
		st->seg_end = off + ret;
		st->seg_adler = adler;
		st->progress_end = off;
	}
	if (!p.concurrent) {
		st->last_tgid = bpf_get_current_pid_tgid() >> 32;
		st->last_fd = p.fd;
		if (sum_mode == SUM_RANGES && st->seg_end - st->progress_end >= progress_bytes)
			emit_progress(st);
	}
	__sync_fetch_and_add(&st->writes, 1);
	__sync_fetch_and_add(&st->bytes, ret);
	st->last_write_ns = bpf_ktime_get_ns();
	if (!st->first_write_ns)
		st->first_write_ns = st->last_write_ns;
	stat_add(ST_WRITES, 1);
	stat_add(ST_BYTES, ret);
done:
	__sync_fetch_and_add(&st->inflight, -1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_write")
int ck_enter_write(struct trace_event_raw_sys_enter *ctx)
{
	return on_write_enter(ctx, 0, K_WRITE, false);
}
SEC("tracepoint/syscalls/sys_enter_pwrite64")
int ck_enter_pwrite64(struct trace_event_raw_sys_enter *ctx)
{
	return on_write_enter(ctx, ctx->args[3], K_PWRITE, false);
}
SEC("tracepoint/syscalls/sys_enter_writev")
int ck_enter_writev(struct trace_event_raw_sys_enter *ctx)
{
	return on_write_enter(ctx, 0, K_WRITEV, false);
}
SEC("tracepoint/syscalls/sys_enter_pwritev")
int ck_enter_pwritev(struct trace_event_raw_sys_enter *ctx)
{
	return on_write_enter(ctx, ctx->args[3], K_PWRITEV, false);
}
SEC("tracepoint/syscalls/sys_enter_pwritev2")
int ck_enter_pwritev2(struct trace_event_raw_sys_enter *ctx)
{
	/* RWF_APPEND (0x10) appends whatever the offset, like O_APPEND. */
	return on_write_enter(ctx, ctx->args[3], K_PWRITEV, ctx->args[5] & 0x10);
}
SEC("tracepoint/syscalls/sys_exit_write")
int ck_exit_write(struct trace_event_raw_sys_exit *ctx) { return on_write_exit(ctx); }
SEC("tracepoint/syscalls/sys_exit_pwrite64")
int ck_exit_pwrite64(struct trace_event_raw_sys_exit *ctx) { return on_write_exit(ctx); }
SEC("tracepoint/syscalls/sys_exit_writev")
int ck_exit_writev(struct trace_event_raw_sys_exit *ctx) { return on_write_exit(ctx); }
SEC("tracepoint/syscalls/sys_exit_pwritev")
int ck_exit_pwritev(struct trace_event_raw_sys_exit *ctx) { return on_write_exit(ctx); }
SEC("tracepoint/syscalls/sys_exit_pwritev2")
int ck_exit_pwritev2(struct trace_event_raw_sys_exit *ctx) { return on_write_exit(ctx); }

/* ---- closes --------------------------------------------------------------------------------- */

/* Rebuild the path below the watched directory, leaf first; returns bytes used. */
static __always_inline __u32 build_path(struct close_event *ev, struct dentry *d, __u32 dev)
{
	struct dir_key k = { .dev = dev };
	struct dentry *parent;
	__u32 off = 0;
	long n;

	__u32 *idx;

	ev->path_complete = 0;
	ev->path_outside = 0;
	ev->path_dir = ~0U;
	for (int i = 0; i < GB_MAX_DEPTH; i++) {
		n = bpf_probe_read_kernel_str(&ev->path[off & (GB_PATH_MAX - 1)], GB_NAME_MAX,
					      BPF_CORE_READ(d, d_name.name));
		if (n <= 0)
			break;
		off += n;
		parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d) {
			ev->path_outside = 1;   /* the filesystem's root: not in a watched tree */
			break;
		}
		k.ino = BPF_CORE_READ(parent, d_inode, i_ino);
		idx = bpf_map_lookup_elem(&dirs, &k);
		if (idx) {
			ev->path_complete = 1;
			ev->path_dir = *idx;
			break;
		}
		if (off > GB_PATH_MAX - GB_NAME_MAX)
			break;
		d = parent;
	}
	return off;
}

/* The file F (key FKEY) lost its last descriptor: account the close, report the last one. */
static __always_inline void file_released(struct file *f)
{
	__u64 fkey = (__u64)f, ikey;
	struct tracked_file *tf;
	struct close_event *ev;
	struct fstate *st;
	struct inode *inode;
	__u32 zero = 0, len, tgid;

	tf = bpf_map_lookup_elem(&files, &fkey);
	if (!tf)
		return;
	ikey = tf->inode;
	bpf_map_delete_elem(&files, &fkey);
	/* An entry left by a file released unseen (exec) whose memory now holds another file. */
	if ((__u64)BPF_CORE_READ(f, f_inode) != ikey)
		return;
	st = bpf_map_lookup_elem(&inodes, &ikey);
	if (!st || __sync_fetch_and_add(&st->opens, -1) != 1)
		return;

	ev = bpf_map_lookup_elem(&close_scratch, &zero);
	if (!ev)
		goto out;
	inode = (struct inode *)ikey;
	ev->type = EV_CLOSE;
	ev->flags = st->flags;
	ev->session = st->session;
	ev->ino = st->ino;
	ev->dev = st->dev;
	ev->dir_index = st->dir_index;
	ev->size = BPF_CORE_READ(inode, i_size);
	ev->seg_start = st->seg_start;
	ev->seg_end = st->seg_end;
	ev->seg_adler = st->seg_adler;
	ev->nlink = BPF_CORE_READ(inode, __i_nlink);
	ev->writes = st->writes;
	ev->bytes = st->bytes;
	ev->ranges = st->ranges;
	ev->open_ns = st->open_ns;
	ev->first_write_ns = st->first_write_ns;
	ev->last_write_ns = st->last_write_ns;
	ev->size_at_open = st->size_at_open;
	ev->close_ns = bpf_ktime_get_ns();
	if (bpf_core_field_exists(inode->i_mtime_sec)) {
		ev->mtime_sec = BPF_CORE_READ(inode, i_mtime_sec);
		ev->mtime_nsec = BPF_CORE_READ(inode, i_mtime_nsec);
	} else {
		struct inode___old *o = (void *)inode;
		ev->mtime_sec = BPF_CORE_READ(o, i_mtime.tv_sec);
		ev->mtime_nsec = BPF_CORE_READ(o, i_mtime.tv_nsec);
	}
	tgid = bpf_get_current_pid_tgid() >> 32;
	ev->tgid = tgid;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	len = build_path(ev, BPF_CORE_READ(f, f_path.dentry), st->dev);
	ev->path_len = len;
	len = offsetof(struct close_event, path) + (len & (GB_PATH_MAX - 1)) + GB_NAME_MAX;
	if (len > sizeof(*ev))
		len = sizeof(*ev);
	if (gb_ringbuf_output(events, ev, len, 0))
		stat_add(ST_CLOSE_LOST, 1);
	else
		stat_add(ST_CLOSES, 1);
	bpf_map_update_elem(&recent_close, &tgid, &ev->close_ns, BPF_ANY);
out:
	{
		struct dir_key id = { .ino = st->ino, .dev = st->dev };
		bpf_map_delete_elem(&followed, &id);
	}
	bpf_map_delete_elem(&inodes, &ikey);
}

SEC("tracepoint/syscalls/sys_enter_close")
int ck_enter_close(struct trace_event_raw_sys_enter *ctx)
{
	struct file *f;

	if (!is_target())
		return 0;
	f = current_fd_file(ctx->args[0]);
	if (f && file_last_ref(f))
		file_released(f);
	return 0;
}

/* dup2/dup3 onto a descriptor close what it held, without close(2). */
static __always_inline int on_dup_enter(__s64 oldfd, __s64 newfd)
{
	struct file *f;

	if (oldfd == newfd || !is_target() || !current_fd_file(oldfd))
		return 0; /* only a dup that will succeed closes anything */
	f = current_fd_file(newfd);
	if (f && file_last_ref(f))
		file_released(f);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_dup2")
int ck_enter_dup2(struct trace_event_raw_sys_enter *ctx)
{
	return on_dup_enter(ctx->args[0], ctx->args[1]);
}
SEC("tracepoint/syscalls/sys_enter_dup3")
int ck_enter_dup3(struct trace_event_raw_sys_enter *ctx)
{
	return on_dup_enter(ctx->args[0], ctx->args[1]);
}

struct scan_ctx {
	struct task_struct *task;
	__u32 first;
};

static long scan_fd(__u32 i, void *data)
{
	struct scan_ctx *s = data;
	struct file *f = fd_file(s->task, (__s64)s->first + i);
	__u64 fkey = (__u64)f;

	if (f && bpf_map_lookup_elem(&files, &fkey) && file_last_ref(f))
		file_released(f);
	return 0;
}

/* Descriptors FIRST..LAST of TASK are about to be closed without a close(2) each. */
static __always_inline void scan_fds(struct task_struct *task, __u32 first, __u32 last)
{
	struct scan_ctx s = { .task = task, .first = first };
	__u32 max = BPF_CORE_READ(task, files, fdt, max_fds);

	if (last >= max)
		last = max ? max - 1 : 0;
	if (first > last)
		return;
	__u32 n = last - first + 1;
	if (n > GB_MAX_FDS_SCAN)
		n = GB_MAX_FDS_SCAN;
	bpf_loop(n, scan_fd, &s, 0);
}

SEC("tracepoint/syscalls/sys_enter_close_range")
int ck_enter_close_range(struct trace_event_raw_sys_enter *ctx)
{
	/* CLOSE_RANGE_CLOEXEC (4) only marks descriptors. */
	if (!is_target() || (ctx->args[2] & 4))
		return 0;
	scan_fds((struct task_struct *)bpf_get_current_task(), ctx->args[0], ctx->args[1]);
	return 0;
}

struct sched_exit_args {
	__u64 common;
	char comm[16];
	__s32 pid;
	__s32 prio;
	/* newer kernels add bool group_dead: not read, 6.1 refuses the access (EACCES at attach) */
};

/* A dying process closes its files in exit_files(), after this tracepoint, with no close(2). */
SEC("tracepoint/sched/sched_process_exit")
int ck_process_exit(struct sched_exit_args *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	/* group_dead: do_exit() dropped signal->live before this tracepoint */
	if (BPF_CORE_READ(task, signal, live.counter) != 0 || !is_target())
		return 0;
	if (filter_mode == CK_BY_PID)
		bpf_map_delete_elem(&target_pids, &tgid);
	if (BPF_CORE_READ(task, files, count.counter) != 1)
		return 0; /* the descriptor table lives on in another process */
	scan_fds(task, 0, ~0U);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ck_process_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid, ctgid = child->tgid;
	__u8 one = 1;

	/* --pid follows the children of the target (nginx workers, forked helpers). */
	if (filter_mode != CK_BY_PID || ptgid == ctgid)
		return 0;
	if (bpf_map_lookup_elem(&target_pids, &ptgid))
		bpf_map_update_elem(&target_pids, &ctgid, &one, BPF_ANY);
	return 0;
}

/* ---- everything else that can change a followed file ------------------------------------- */

static __always_inline void mark_fd(__s64 fd, __u32 reason)
{
	struct fstate *st;

	if (!is_target())
		return;
	st = fd_state(fd, NULL);
	if (st)
		mark(st, reason);
}

SEC("tracepoint/syscalls/sys_enter_mmap")
int ck_enter_mmap(struct trace_event_raw_sys_enter *ctx)
{
	/* Any shared mapping: a read-only one can be made writable later with mprotect. */
	if (ctx->args[3] & MAP_SHARED)
		mark_fd(ctx->args[4], R_MMAP);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_ftruncate")
int ck_enter_ftruncate(struct trace_event_raw_sys_enter *ctx)
{
	mark_fd(ctx->args[0], R_TRUNCATE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_fallocate")
int ck_enter_fallocate(struct trace_event_raw_sys_enter *ctx)
{
	/* Plain allocation (0), KEEP_SIZE (1) and UNSHARE_RANGE (0x40) leave the content as is. */
	if (ctx->args[1] & ~0x41UL)
		mark_fd(ctx->args[0], R_FALLOCATE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendfile64")
int ck_enter_sendfile64(struct trace_event_raw_sys_enter *ctx)
{
	mark_fd(ctx->args[0], R_SPLICE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_splice")
int ck_enter_splice(struct trace_event_raw_sys_enter *ctx)
{
	mark_fd(ctx->args[2], R_SPLICE);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_copy_file_range")
int ck_enter_copy_file_range(struct trace_event_raw_sys_enter *ctx)
{
	mark_fd(ctx->args[2], R_SPLICE);
	return 0;
}

static long mark_one(void *map, __u64 *key, struct fstate *st, __u64 *reason)
{
	mark(st, *reason);
	return 0;
}

/* Changes we cannot tie to one inode: every followed file is marked. */
static __always_inline void mark_all(__u64 reason)
{
	if (is_target())
		bpf_for_each_map_elem(&inodes, mark_one, &reason, 0);
}

SEC("tracepoint/syscalls/sys_enter_truncate")
int ck_enter_truncate(void *ctx) { mark_all(R_TRUNCATE); return 0; }
/* Asynchronous I/O writes without write syscalls (with SQPOLL, without any syscall at all): every
 * followed file is marked, and so is every file the process opens from now on. */
static __always_inline int async_io(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u8 one = 1;

	if (!is_target())
		return 0;
	bpf_map_update_elem(&async_tgids, &tgid, &one, BPF_ANY);
	mark_all(R_ASYNC_IO);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_io_uring_setup")
int ck_enter_io_uring_setup(void *ctx) { return async_io(); }
SEC("tracepoint/syscalls/sys_enter_io_uring_enter")
int ck_enter_io_uring_enter(void *ctx) { return async_io(); }
SEC("tracepoint/syscalls/sys_enter_io_setup")
int ck_enter_io_setup(void *ctx) { return async_io(); }
SEC("tracepoint/syscalls/sys_enter_io_submit")
int ck_enter_io_submit(void *ctx) { return async_io(); }

#define FICLONE 0x40049409
#define FICLONERANGE 0x4020940d

SEC("tracepoint/syscalls/sys_enter_ioctl")
int ck_enter_ioctl(struct trace_event_raw_sys_enter *ctx)
{
	/* Reflinks replace the content of the file the ioctl is made on. */
	__u32 cmd = ctx->args[1];

	if (cmd == FICLONE || cmd == FICLONERANGE)
		mark_fd(ctx->args[0], R_SPLICE);
	return 0;
}

/* ---- renames after close (write to a temporary name, close, rename) ----------------------- */

static __always_inline int on_rename_enter(__s64 newdfd, __u64 newname)
{
	struct pending_rename r = { .newname = newname, .newdfd = newdfd };
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 *t;

	if (!is_target())
		return 0;
	/* Only processes that closed a followed file lately: userspace may still look for it.
	 * Following renames, every rename by a target: a file moved into a watched tree. */
	t = bpf_map_lookup_elem(&recent_close, &tgid);
	if (!follow_renames && (!t || bpf_ktime_get_ns() - *t > rename_window_ns))
		return 0;
	bpf_map_update_elem(&pending_renames, &tid, &r, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_rename")
int ck_enter_rename(struct trace_event_raw_sys_enter *ctx)
{
	return on_rename_enter(-100 /* AT_FDCWD */, ctx->args[1]);
}
SEC("tracepoint/syscalls/sys_enter_renameat")
int ck_enter_renameat(struct trace_event_raw_sys_enter *ctx)
{
	return on_rename_enter(ctx->args[2], ctx->args[3]);
}
SEC("tracepoint/syscalls/sys_enter_renameat2")
int ck_enter_renameat2(struct trace_event_raw_sys_enter *ctx)
{
	return on_rename_enter(ctx->args[2], ctx->args[3]);
}

static __always_inline int on_rename_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid(), zero = 0;
	struct pending_rename *r = bpf_map_lookup_elem(&pending_renames, &tid);
	struct rename_event *ev;
	long n;

	if (!r)
		return 0;
	ev = bpf_map_lookup_elem(&rename_scratch, &zero);
	if (ev && ret == 0) {
		ev->type = EV_RENAME;
		ev->tgid = bpf_get_current_pid_tgid() >> 32;
		ev->newdfd = r->newdfd;
		n = bpf_probe_read_user_str(ev->newname, sizeof(ev->newname), (void *)r->newname);
		if (n > 0) {
			if (n > GB_RENAME_MAX)
				n = GB_RENAME_MAX;
			ev->len = n;
			if (gb_ringbuf_output(events, ev, offsetof(struct rename_event, newname) + n, 0))
				stat_add(ST_RENAME_LOST, 1);
			else
				stat_add(ST_RENAMES, 1);
		}
	}
	bpf_map_delete_elem(&pending_renames, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_rename")
int ck_exit_rename(struct trace_event_raw_sys_exit *ctx) { return on_rename_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_renameat")
int ck_exit_renameat(struct trace_event_raw_sys_exit *ctx) { return on_rename_exit(ctx->ret); }
SEC("tracepoint/syscalls/sys_exit_renameat2")
int ck_exit_renameat2(struct trace_event_raw_sys_exit *ctx) { return on_rename_exit(ctx->ret); }

#pragma clang attribute pop
