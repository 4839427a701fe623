/*
 * File I/O latency of target processes, per file and operation: read, write, pread64, pwrite64,
 * fsync, fdatasync, openat, close. sys_enter notes the start and which file the fd is; sys_exit
 * adds the latency to a log2 histogram of (process, file, operation). Operations slower than
 * slow_ns are sent as events (the "slowest operations"); every openat sends its path once, so
 * userspace can name files by inode. Nothing per syscall reaches userspace otherwise.
 */
#include "gridbpf/stack.h"

char LICENSE[] SEC("license") = "GPL";

const volatile __u64 slow_ns = 10000000ULL;  /* operations at least this slow become events */
const volatile bool regular_only = true;     /* regular files and block devices only */

/* x86_64 syscall numbers */
#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_pread64 17
#define NR_pwrite64 18
#define NR_fsync 74
#define NR_fdatasync 75
#define NR_openat 257

enum io_op { IO_READ, IO_WRITE, IO_PREAD, IO_PWRITE, IO_FSYNC, IO_FDATASYNC, IO_OPENAT, IO_CLOSE,
	     IO_MAX };

#define IO_SLOTS 32   /* log2 buckets of nanoseconds: slot i counts [2^i, 2^(i+1)) ns */
#define IO_NAME 32
#define IO_PATH 160

enum io_stat { IO_INFLIGHT_FULL, IO_FILES_FULL, IO_STAT_MAX };

struct io_file_key {
	__u32 tgid;
	__u32 op;
	__u64 dev;
	__u64 ino;
};

struct io_file_val {
	__u64 count;
	__u64 total_ns;
	__u64 max_ns;
	__u64 bytes;
	__u64 errors;
	__u64 slots[IO_SLOTS];
	char name[IO_NAME];   /* the file's last path component */
};

struct io_inflight {
	__u64 start_ns;
	__u64 dev, ino;
	__u32 op;
	__s32 fd;
	__u32 mode;
	__u32 pad;
	char name[IO_NAME];
	char path[IO_PATH];   /* openat: the path asked for */
};

#define IO_EV_SLOW 1
#define IO_EV_OPEN 2

struct gbio_event {
	__u32 kind;           /* IO_EV_SLOW or IO_EV_OPEN */
	__u32 op;
	__u32 tgid, tid;
	__u64 dev, ino;
	__u64 start_ns, latency_ns;
	__s64 ret;
	__s32 fd;
	__u32 pad;
	char name[IO_NAME];
	char path[IO_PATH];
};
GB_EXPORT_STRUCT(gbio_event);

GB_TARGETS(1024)
GB_RINGBUF(io_events, 256 * 1024);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct io_inflight);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct io_file_key);
	__type(value, struct io_file_val);
} files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, IO_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} io_stats SEC(".maps");

/* scratch (too big for the BPF stack) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct io_inflight);
} scratch SEC(".maps");

static __always_inline int op_of(long nr)
{
	switch (nr) {
	case NR_read: return IO_READ;
	case NR_write: return IO_WRITE;
	case NR_pread64: return IO_PREAD;
	case NR_pwrite64: return IO_PWRITE;
	case NR_fsync: return IO_FSYNC;
	case NR_fdatasync: return IO_FDATASYNC;
	case NR_openat: return IO_OPENAT;
	case NR_close: return IO_CLOSE;
	}
	return -1;
}

/* The struct file of FD in the current task, or NULL. */
static __always_inline struct file *fd_file(int fd)
{
	struct task_struct *t = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(t, files, fdt);
	struct file **arr;
	struct file *f = NULL;

	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	arr = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), &arr[fd]);
	return f;
}

/* Fill dev, ino, mode, name of the file; false if there is none. */
static __always_inline bool describe(struct io_inflight *in, struct file *f)
{
	struct inode *inode;
	const unsigned char *name;

	if (!f)
		return false;
	inode = BPF_CORE_READ(f, f_inode);
	if (!inode)
		return false;
	in->ino = BPF_CORE_READ(inode, i_ino);
	in->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	in->mode = BPF_CORE_READ(inode, i_mode);
	name = BPF_CORE_READ(f, f_path.dentry, d_name.name);
	bpf_probe_read_kernel_str(in->name, sizeof(in->name), name);
	return true;
}

static __always_inline bool wanted(__u32 mode)
{
	__u32 fmt = mode & 0170000;
	return !regular_only || fmt == 0100000 /* S_IFREG */ || fmt == 0060000 /* S_IFBLK */;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(io_sys_enter, struct pt_regs *regs, long id)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid, zero = 0;
	struct io_inflight *in;
	int op = op_of(id);

	if (op < 0 || !gb_is_target(pid_tgid >> 32))
		return 0;
	in = bpf_map_lookup_elem(&scratch, &zero);
	if (!in)
		return 0;
	__builtin_memset(in, 0, sizeof(*in));
	in->op = op;
	if (op == IO_OPENAT) {
		const char *path = (const char *)BPF_CORE_READ(regs, si);
		bpf_probe_read_user_str(in->path, sizeof(in->path), path);
		in->fd = -1;
	} else {
		in->fd = (int)BPF_CORE_READ(regs, di);
		if (!describe(in, fd_file(in->fd)) || !wanted(in->mode))
			return 0;
	}
	in->start_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&inflight, &tid, in, BPF_ANY))
		gb_count(&io_stats, IO_INFLIGHT_FULL);
	return 0;
}

static __always_inline __u32 log2_slot(__u64 v)
{
	__u32 r = 0;

	/* bounded: 64 bits at most */
#pragma unroll
	for (int shift = 32; shift > 0; shift >>= 1) {
		if (v >> shift) {
			v >>= shift;
			r += shift;
		}
	}
	return r < IO_SLOTS ? r : IO_SLOTS - 1;
}

/* One record for userspace: a file opened (with its path) or a slow operation (path from the
 * open record or /proc, not copied again). */
static __always_inline void emit_event(__u32 kind, const struct io_inflight *in, __u64 pid_tgid,
				       __u64 lat, long ret)
{
	struct gbio_event *e = gb_ringbuf_reserve(io_events, sizeof(*e));

	if (!e)
		return;
	e->kind = kind;
	e->op = in->op;
	e->tgid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->dev = in->dev;
	e->ino = in->ino;
	e->start_ns = in->start_ns;
	e->latency_ns = lat;
	e->ret = ret;
	e->fd = in->fd;
	e->pad = 0;
	__builtin_memcpy(e->name, in->name, sizeof(e->name));
	if (kind == IO_EV_OPEN)
		__builtin_memcpy(e->path, in->path, sizeof(e->path));
	else
		e->path[0] = 0;
	bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(io_sys_exit, struct pt_regs *regs, long ret)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct io_inflight *in = bpf_map_lookup_elem(&inflight, &tid);
	struct io_file_key key = {};
	struct io_file_val *v;
	__u64 lat;

	if (!in)
		return 0;
	lat = bpf_ktime_get_ns() - in->start_ns;
	if (in->op == IO_OPENAT) {
		if (ret < 0 || !describe(in, fd_file((int)ret)) || !wanted(in->mode))
			goto out;
		in->fd = (int)ret;
		emit_event(IO_EV_OPEN, in, pid_tgid, lat, ret);
	}
	key.tgid = pid_tgid >> 32;
	key.op = in->op;
	key.dev = in->dev;
	key.ino = in->ino;
	v = bpf_map_lookup_elem(&files, &key);
	if (!v) {
		struct io_file_val init = {};

		__builtin_memcpy(init.name, in->name, sizeof(init.name));
		bpf_map_update_elem(&files, &key, &init, BPF_NOEXIST);   /* EEXIST: another CPU won */
		v = bpf_map_lookup_elem(&files, &key);
		if (!v) {
			gb_count(&io_stats, IO_FILES_FULL);
			goto slow;
		}
	}
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->total_ns, lat);
	if (lat > v->max_ns)
		v->max_ns = lat;   /* racy max: good enough for a report */
	if (ret < 0)
		__sync_fetch_and_add(&v->errors, 1);
	else if (in->op <= IO_PWRITE)
		__sync_fetch_and_add(&v->bytes, ret);
	__sync_fetch_and_add(&v->slots[log2_slot(lat)], 1);
slow:
	if (lat >= slow_ns && in->op != IO_OPENAT) {
		emit_event(IO_EV_SLOW, in, pid_tgid, lat, ret);
	}
out:
	bpf_map_delete_elem(&inflight, &tid);
	return 0;
}
