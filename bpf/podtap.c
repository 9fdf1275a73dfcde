/* podtap — capture what watched containers write to their stdout/stderr.
 *
 * Attached to syscall exit tracepoints only (no kprobes, no enter programs:
 * each attached tracepoint costs every write on the node).  At sys_exit_* a
 * failed call or a writer outside the watched cgroups returns after one map
 * lookup; otherwise the syscall's arguments are read from the task's saved
 * registers (still intact at syscall exit), the file behind the fd is compared
 * with the container's stdout/stderr file, and exactly the bytes the kernel
 * accepted (the return value) are copied into the ring buffer, in
 * variable-size records of at most CHUNK bytes.
 *
 * Kernel struct offsets come from the running kernel's BTF as -D defines
 * (agent/capture/btf.py): no layout is taken from the headers bcc compiles
 * against.  Defines supplied by the agent: OFF_*, MAX_WRITE, CHUNK (power of
 * two), MAX_ITERS, NCPUS (the *possible* CPU count: CPU ids index the scratch
 * array), RINGBUF_PAGES, MAX_CONTAINERS, SELF_TGID and,
 * OFF_ARG0..2 (syscall arguments in struct pt_regs), and optionally
 * PODS_ROOT_ID / PODS_ROOT_LEVEL with the offsets of the
 * cgroup_mkdir tracepoint's fields (TP_MKDIR_*, read from its tracefs format),
 * TP_EXIT_GROUP_DEAD (offset of sched_process_exit's group_dead field, kernels
 * >= 6.16) or else OFF_TASK_SIGNAL / OFF_SIGNAL_LIVE (task_struct.signal,
 * signal_struct.live), and OFF_REGS_CS (pt_regs.cs, x86_64: 32-bit programs).
 *
 * Gaps: every byte of a watched stream that is not put in the ring buffer
 * (dropped, not readable, moved in the kernel, a failed tail call) is counted
 * and marks its (process, stream) in `lost`; the next record of that pair that
 * makes it into the ring buffer carries F_LOSS, exactly once per gap, so the
 * agent ends the pending line there instead of joining bytes across the gap.
 */
#include "podtap.h"

#define K_WRITE 1  /* one buffer: ptr, count */
#define K_VEC 2    /* an iovec array: ptr, vlen */
#define K_UNCAPT 3 /* data moved in the kernel: only the byte count is known */

struct sys_exit_ctx {
    u64 common;
    s32 nr;
    u32 pad;
    s64 ret;
};

struct pending {
    u64 cgroup_id;
    u64 ptr;
    u64 vlen; /* iovec count for K_VEC */
    u8 kind;
    u8 stream;
    u8 flags;
    u8 pad[5];
};

struct user_iovec {
    u64 base;
    u64 len;
};

/* Per-CPU copy state.  The loop keeps everything it needs here, in map
 * memory, so that the verifier sees the same state at every iteration and
 * prunes: the loop costs it one pass per iteration, not one per path.  */
struct copy_state {
    u64 left;     /* bytes still to copy for this write */
    u64 seg_left; /* bytes left in the current buffer */
    u64 base;     /* user address of the next byte of the current buffer */
    u64 iov;      /* user address of the iovec array */
    u64 idx;      /* next iovec */
    u64 vlen;
    u64 fill;     /* bytes in data[] not yet sent */
    u64 missing;  /* bytes beyond MAX_WRITE */
    struct event_hdr hdr;
    u8 data[2 * CHUNK]; /* 2x so that fill + n is provably in bounds */
};

BPF_HASH(containers, u64, struct container, MAX_CONTAINERS);
BPF_ARRAY(watch_filter, u8, FILTER_SLOTS);
BPF_ARRAY(outside_pods, u64, OUTSIDE_SLOTS); /* used by `podtap run` only */
/* Stream identities taken in the kernel at the first exec inside a cgroup (see
 * on_process_exec), for containers whose identities userspace does not know yet. */
BPF_TABLE("lru_hash", u64, struct container, learned_idents, 4096);
/* (tgid << 32 | stream) -> 1: bytes of that pair were lost since its last record. */
BPF_TABLE("lru_hash", u64, u8, lost, 65536);
BPF_ARRAY(scratch, struct copy_state, NCPUS);
BPF_PERCPU_ARRAY(counters, u64, NCOUNTERS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PROG_ARRAY(tails, 1); /* [0] = copy_more: the copy loop, continued */

static __always_inline void count(u32 idx, u64 n)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline u64 lost_key(u32 tgid, u8 stream)
{
    return ((u64)tgid << 32) | stream;
}

static __always_inline void mark_lost(u32 tgid, u8 stream)
{
    u64 key = lost_key(tgid, stream);
    u8 one = 1;
    lost.update(&key, &one);
}

/* Whether a gap of (tgid, stream) is still to be told; told once. */
static __always_inline int take_lost(u32 tgid, u8 stream)
{
    u64 key = lost_key(tgid, stream);
    if (!lost.lookup(&key))
        return 0;
    lost.delete(&key);
    return 1;
}

static __always_inline void forget_lost(u32 tgid)
{
    u64 key = lost_key(tgid, STREAM_STDOUT);
    lost.delete(&key);
    key = lost_key(tgid, STREAM_STDERR);
    lost.delete(&key);
}

static __always_inline u64 read_ptr(u64 addr)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

/* (superblock dev, inode number) of the file behind `fd` of the current task. */
static __always_inline int fd_ident(u64 fd, u32 *dev, u64 *ino)
{
    u64 task = bpf_get_current_task();
    u64 files = read_ptr(task + OFF_TASK_FILES);
    if (!files)
        return -1;
    u64 fdt = read_ptr(files + OFF_FILES_FDT);
    if (!fdt)
        return -1;
    u32 max_fds = 0;
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + OFF_FDT_MAX_FDS));
    if (fd >= max_fds)
        return -1;
    u64 fdarr = read_ptr(fdt + OFF_FDT_FD);
    u64 file = read_ptr(fdarr + fd * 8);
    if (!file)
        return -1;
    u64 inode = read_ptr(file + OFF_FILE_F_INODE);
    if (!inode)
        return -1;
    *ino = read_ptr(inode + OFF_INODE_I_INO);
    u64 sb = read_ptr(inode + OFF_INODE_I_SB);
    if (!sb)
        return -1;
    bpf_probe_read_kernel(dev, sizeof(*dev), (void *)(sb + OFF_SB_S_DEV));
    return 0;
}

static __always_inline u8 stream_by_fd(u64 fd)
{
    if (fd == 1)
        return STREAM_STDOUT;
    if (fd == 2)
        return STREAM_STDERR;
    return 0;
}

static __always_inline int under_pods_root(void)
{
#ifdef PODS_ROOT_ID
    return bpf_get_current_ancestor_cgroup_id(PODS_ROOT_LEVEL) == PODS_ROOT_ID &&
           (bpf_get_current_pid_tgid() >> 32) != SELF_TGID;
#else
    return 0;
#endif
}

#ifdef PODS_ROOT_ID
/* Whether cgroup `cgid` (the current task's) is outside the pods' subtree, from the
 * outside_pods cache when it knows, else from the ancestor helper (and then remembered). */
static __always_inline int outside_pods_root(u64 cgid)
{
    u32 slot = (u32)cgid & (OUTSIDE_SLOTS - 1);
    u64 *known = outside_pods.lookup(&slot);
    if (known && *known == cgid)
        return 1;
    if (bpf_get_current_ancestor_cgroup_id(PODS_ROOT_LEVEL) == PODS_ROOT_ID)
        return 0;
    if (known)
        *known = cgid;
    return 1;
}
#endif

/* The current task's container, if it is watched: 1 for a container in the map,
 * 2 for one under the pods' subtree not in the map yet (its first lines are
 * kept), 0 otherwise.  *cp / *cflags get its entry (NULL when its stream
 * identities are not known).  This is the only work done for every other
 * write on the node. */
static __always_inline int writer_watched(u64 *cgid, u32 *cflags, struct container **cp)
{
    *cgid = bpf_get_current_cgroup_id();
    u32 slot = (u32)*cgid & (FILTER_SLOTS - 1);
    u8 *maybe = watch_filter.lookup(&slot);
    struct container *c = maybe && *maybe ? containers.lookup(cgid) : 0;
    if (!c) {
#ifdef PODS_ROOT_ID
        if (outside_pods_root(*cgid) || (bpf_get_current_pid_tgid() >> 32) == SELF_TGID)
            return 0;
        c = learned_idents.lookup(cgid);
        *cp = c;
        *cflags = c ? c->flags : C_CAPTURE_STDOUT | C_CAPTURE_STDERR;
        return 2;
#else
        return 0;
#endif
    }
    if (!(c->flags & (C_CAPTURE_STDOUT | C_CAPTURE_STDERR)))
        return 0; /* excluded container */
    if ((bpf_get_current_pid_tgid() >> 32) == SELF_TGID)
        return 0;
    *cflags = c->flags;
    *cp = c;
    if (!(c->flags & C_IDENT_KNOWN)) {
        struct container *learned = learned_idents.lookup(cgid);
        if (learned) {
            *cflags = (c->flags & (C_CAPTURE_STDOUT | C_CAPTURE_STDERR)) | C_IDENT_KNOWN;
            *cp = learned;
        }
    }
    return 1;
}

/* Which stream of the container `fd` writes to (0: none).  By file identity when
 * the container's stdout/stderr are known, else by fd number (flagged). */
static __always_inline u8 stream_of(struct container *c, u32 cflags, u64 fd, u8 *flags)
{
    u8 stream = 0;
    if (c && (cflags & C_IDENT_KNOWN)) {
        u32 dev = 0;
        u64 ino = 0;
        if (fd_ident(fd, &dev, &ino))
            return 0;
        if (ino == c->out_ino && dev == c->out_dev)
            stream = STREAM_STDOUT;
        else if (ino == c->err_ino && dev == c->err_dev)
            stream = STREAM_STDERR;
    } else {
        stream = stream_by_fd(fd);
        *flags |= F_FD_FALLBACK;
    }
    if (stream == STREAM_STDOUT && !(cflags & C_CAPTURE_STDOUT))
        return 0;
    if (stream == STREAM_STDERR && !(cflags & C_CAPTURE_STDERR))
        return 0;
    return stream;
}

/* A syscall argument, from the registers saved at syscall entry. */
static __always_inline u64 syscall_arg(void *regs, u32 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)regs + off);
    return v;
}

static __always_inline void *current_regs(void)
{
    return (void *)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
}

/* Send data[0..fill) as one record.  F_LOSS stays set in the header while no
 * record made it since a gap: the next record of the write tells it, or
 * finish_write leaves it in `lost` for the next write. */
static __always_inline void send_chunk(struct copy_state *st)
{
    u64 n = st->fill;
    if (n > CHUNK)
        n = CHUNK;
    st->hdr.len = n;
    if (events.ringbuf_output(&st->hdr, EVENT_HDR_SIZE + n, 0)) {
        count(CNT_DROP_RECORDS, 1);
        count(CNT_DROP_BYTES, n);
        st->hdr.flags |= F_LOSS;
    } else {
        count(CNT_RECORDS, 1);
        count(CNT_BYTES, n);
        st->hdr.flags &= ~F_LOSS;
    }
    st->hdr.flags |= F_CONTINUATION;
    st->fill = 0;
}

/* Copy up to MAX_ITERS pieces: each iteration takes the next iovec if the
 * current buffer is done, then copies what fits in the chunk. */
static __always_inline void copy_loop(struct copy_state *st)
{
    for (int i = 0; i < MAX_ITERS; i++) {
        if (st->left == 0)
            break;
        if (st->seg_left == 0) {
            if (st->idx >= st->vlen)
                break;
            struct user_iovec v = {};
            if (bpf_probe_read_user(&v, sizeof(v), (void *)(st->iov + st->idx * sizeof(v)))) {
                count(CNT_FAULT_BYTES, st->left);
                st->left = 0;
                st->hdr.flags |= F_TRUNCATED;
                break;
            }
            st->idx++;
            st->base = v.base;
            st->seg_left = v.len;
        }
        u64 fill = st->fill & (CHUNK - 1);
        u64 n = st->seg_left;
        if (n > st->left)
            n = st->left;
        if (n > CHUNK - fill)
            n = CHUNK - fill;
        if (n > CHUNK)
            n = CHUNK;
        if (bpf_probe_read_user(&st->data[fill], n, (void *)st->base)) {
            count(CNT_FAULT_BYTES, st->left);
            st->left = 0;
            st->hdr.flags |= F_TRUNCATED;
            break;
        }
        st->fill = fill + n;
        st->base += n;
        st->seg_left -= n;
        st->left -= n;
        if (st->fill >= CHUNK)
            send_chunk(st);
    }
}

static __always_inline int copy_unfinished(struct copy_state *st)
{
    return st->left && (st->seg_left || st->idx < st->vlen);
}

/* Account what was not copied and send the last record of the write (empty
 * when only its F_TRUNCATED is left to tell); a gap not told yet goes to `lost`. */
static __always_inline void finish_write(struct copy_state *st)
{
    u64 missing = st->left + st->missing;
    if (missing) {
        count(CNT_TRUNC_BYTES, missing);
        st->hdr.flags |= F_TRUNCATED;
    }
    if (st->fill || (st->hdr.flags & F_TRUNCATED))
        send_chunk(st);
    if (st->hdr.flags & F_LOSS)
        mark_lost(st->hdr.pid, st->hdr.stream);
}

/* Copy the first `ret` bytes of the call's buffer(s) into the ring buffer. */
static __always_inline int emit(void *ctx, struct pending *p, s64 ret)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 cpu = bpf_get_smp_processor_id();
    struct copy_state *st = scratch.lookup(&cpu);
    if (!st) {
        count(CNT_SCRATCH_MISS, 1);
        count(CNT_SCRATCH_MISS_BYTES, ret);
        mark_lost(tgid, p->stream);
        return 0;
    }

    u64 total = ret;
    u64 limit = total > MAX_WRITE ? MAX_WRITE : total;
    u8 flags = p->flags;
    if (take_lost(tgid, p->stream))
        flags |= F_LOSS;

    st->left = limit;
    st->fill = 0;
    st->idx = 0;
    if (p->kind == K_WRITE) {
        st->base = p->ptr;
        st->seg_left = limit;
        st->vlen = 0;
    } else {
        st->iov = p->ptr;
        st->vlen = p->vlen;
        st->seg_left = 0;
    }
    st->hdr.ts_ns = bpf_ktime_get_boot_ns();
    st->hdr.cgroup_id = p->cgroup_id;
    st->hdr.pid = tgid;
    st->hdr.tid = (u32)bpf_get_current_pid_tgid();
    st->hdr.type = EV_DATA;
    st->hdr.stream = p->stream;
    st->hdr.flags = flags;
    bpf_get_current_comm(&st->hdr.comm, sizeof(st->hdr.comm));
    count(CNT_WRITES, 1);
    if (flags & F_UNKNOWN)
        count(CNT_UNKNOWN_RECORDS, 1);

    st->missing = total - limit;
    /* The copy loop lives in one program (verified once), reached by tail call. */
    tails.call(ctx, 0);
    /* Only if the tail call failed: nothing of the write was sent. */
    count(CNT_TAIL_FAIL_BYTES, total);
    mark_lost(tgid, p->stream);
    return 0;
}

#define ARG_NONE 255
#define ARG_MSGHDR 254 /* sendmsg: the buffers are the iovecs of the msghdr in arg 1 */

/* A write-like call returned `ret` > 0: capture it if it went to a watched
 * stream.  fd_arg / ptr_arg / vlen_arg say which syscall argument is which
 * (constants: the branches fold away in each program). */
static __always_inline int capture(void *ctx, s64 ret, u8 kind, u32 fd_arg, u32 ptr_arg,
                                   u32 vlen_arg)
{
    u64 cgid = 0;
    u32 cflags = 0;
    struct container *c = 0;
    int watched = writer_watched(&cgid, &cflags, &c);
    if (!watched)
        return 0;
    void *regs = current_regs();
    u8 flags = watched == 2 ? F_UNKNOWN : 0;
    u8 stream = stream_of(c, cflags, syscall_arg(regs, fd_arg), &flags);
    if (!stream)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (kind == K_UNCAPT) {
        count(CNT_UNCAPT_BYTES, ret);
        count(CNT_UNCAPT_CALLS, 1);
        mark_lost(tgid, stream); /* a gap in the stream all the same */
        return 0;
    }
    struct pending p = {};
    p.cgroup_id = cgid;
    p.kind = kind;
    p.stream = stream;
    p.flags = flags;
    if (ptr_arg == ARG_MSGHDR) {
        u64 hdr[4] = {};
        if (bpf_probe_read_user(&hdr, sizeof(hdr), (void *)syscall_arg(regs, OFF_ARG1))) {
            count(CNT_FAULT_BYTES, ret);
            mark_lost(tgid, stream);
            return 0;
        }
        p.ptr = hdr[2];
        p.vlen = hdr[3];
    } else {
        p.ptr = syscall_arg(regs, ptr_arg);
        p.vlen = vlen_arg == ARG_NONE ? 0 : syscall_arg(regs, vlen_arg);
    }
    return emit(ctx, &p, ret);
}

/* Tail-called by emit() to copy a write, and by itself while the write needs
 * more than MAX_ITERS pieces (up to the kernel's limit of 33 tail calls). */
int copy_more(void *ctx)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct copy_state *st = scratch.lookup(&cpu);
    if (!st) { /* emit() found it on this CPU: not expected */
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        count(CNT_SCRATCH_MISS, 1);
        mark_lost(tgid, STREAM_STDOUT);
        mark_lost(tgid, STREAM_STDERR);
        return 0;
    }
    copy_loop(st);
    if (copy_unfinished(st))
        tails.call(ctx, 0);
    finish_write(st);
    return 0;
}

#define EXIT_PROGRAM(name, kind, fd_arg, ptr_arg, vlen_arg)                  \
    int name(struct sys_exit_ctx *ctx)                                         \
    {                                                                          \
        s64 ret = ctx->ret;                                                    \
        if (ret <= 0)                                                          \
            return 0;                                                          \
        return capture(ctx, ret, kind, fd_arg, ptr_arg, vlen_arg);             \
    }

/* write(fd, buf, count), sendto(fd, buf, len, ...) */
EXIT_PROGRAM(exit_write, K_WRITE, OFF_ARG0, OFF_ARG1, ARG_NONE)
/* writev(fd, iov, vlen), pwritev2(fd, iov, vlen, pos_l, pos_h, flags) */
EXIT_PROGRAM(exit_writev, K_VEC, OFF_ARG0, OFF_ARG1, OFF_ARG2)
/* sendmsg(fd, msghdr, flags): msg_iov at offset 16, msg_iovlen at 24 (user ABI) */
EXIT_PROGRAM(exit_sendmsg, K_VEC, OFF_ARG0, ARG_MSGHDR, ARG_NONE)
/* Data moved in the kernel: the output fd is argument 0 (sendfile64, vmsplice),
 * 1 (tee) or 2 (splice, copy_file_range). */
EXIT_PROGRAM(exit_uncapt_arg0, K_UNCAPT, OFF_ARG0, ARG_NONE, ARG_NONE)
EXIT_PROGRAM(exit_uncapt_arg1, K_UNCAPT, OFF_ARG1, ARG_NONE, ARG_NONE)
EXIT_PROGRAM(exit_uncapt_arg2, K_UNCAPT, OFF_ARG2, ARG_NONE, ARG_NONE)

#define MMSG_MAX 1024     /* UIO_MAXIOV: sendmmsg sends at most this many messages */
#define MMSGHDR_SIZE 64   /* struct mmsghdr: msghdr (56), msg_len (4), padding */
#define MMSG_LEN_OFF 56

/* sendmmsg(fd, mmsghdr *vec, vlen, flags) returned the number of messages
 * sent; each one's msg_len says its bytes.  Not copied (datagrams to a
 * container's stdout socket are rare): counted, and a gap in the stream. */
int exit_sendmmsg(struct sys_exit_ctx *ctx)
{
    s64 ret = ctx->ret;
    if (ret <= 0)
        return 0;
    u64 cgid = 0;
    u32 cflags = 0;
    struct container *c = 0;
    if (!writer_watched(&cgid, &cflags, &c))
        return 0;
    void *regs = current_regs();
    u8 flags = 0;
    u8 stream = stream_of(c, cflags, syscall_arg(regs, OFF_ARG0), &flags);
    if (!stream)
        return 0;
    u64 vec = syscall_arg(regs, OFF_ARG1);
    u64 bytes = 0;
    for (int i = 0; i < MMSG_MAX && i < ret; i++) {
        u32 len = 0;
        if (bpf_probe_read_user(&len, sizeof(len), (void *)(vec + i * MMSGHDR_SIZE + MMSG_LEN_OFF)))
            break;
        bytes += len;
    }
    count(CNT_UNCAPT_BYTES, bytes);
    count(CNT_UNCAPT_CALLS, 1);
    count(CNT_UNCAPT_MSGS, ret);
    mark_lost(bpf_get_current_pid_tgid() >> 32, stream);
    return 0;
}

/* io_uring (io_uring_enter) and Linux AIO (io_submit) can write to a pipe
 * without any write syscall: the bytes are not visible here, so count the
 * calls of watched processes. */
int exit_io_uring(struct sys_exit_ctx *ctx)
{
    u64 cgid = bpf_get_current_cgroup_id();
    struct container *c = containers.lookup(&cgid);
    if (c && (c->flags & (C_CAPTURE_STDOUT | C_CAPTURE_STDERR)))
        count(CNT_UNCAPT_CALLS, 1);
    return 0;
}

/* Whether the exiting task is the last of its thread group (the process ends). */
static __always_inline int group_dead(void *ctx, u32 tgid, u32 tid)
{
#if defined(TP_EXIT_GROUP_DEAD)
    return *(u8 *)((char *)ctx + TP_EXIT_GROUP_DEAD) != 0;
#elif defined(OFF_TASK_SIGNAL) && defined(OFF_SIGNAL_LIVE)
    /* do_exit() decrements signal->live before this tracepoint. */
    u64 signal = read_ptr(bpf_get_current_task() + OFF_TASK_SIGNAL);
    int live = 1;
    bpf_probe_read_kernel(&live, sizeof(live), (void *)(signal + OFF_SIGNAL_LIVE));
    return live == 0;
#else
    return tid == tgid; /* approximation: the main thread */
#endif
}

/* sched:sched_process_exit, for every exiting task: EV_EXIT when the process
 * ends (its last thread), EV_THREAD_EXIT for a thread of a process that lives
 * on.  A lost EV_EXIT marks both streams of the pid lost, so that a process
 * that reuses the pid never continues the old one's lines. */
int on_process_exit(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u64 cgid = bpf_get_current_cgroup_id();
    struct container *c = containers.lookup(&cgid);
    if (!c) {
#ifdef PODS_ROOT_ID
        if (bpf_get_current_ancestor_cgroup_id(PODS_ROOT_LEVEL) != PODS_ROOT_ID)
            return 0;
#else
        return 0;
#endif
    }
    int dead = group_dead(ctx, tgid, (u32)id);
    if (dead)
        forget_lost(tgid);
    struct event_hdr *e = events.ringbuf_reserve(sizeof(struct event_hdr));
    if (!e) {
        count(CNT_DROP_EXITS, 1);
        if (dead) {
            mark_lost(tgid, STREAM_STDOUT);
            mark_lost(tgid, STREAM_STDERR);
        }
        return 0;
    }
    e->ts_ns = bpf_ktime_get_boot_ns();
    e->cgroup_id = cgid;
    e->pid = tgid;
    e->tid = (u32)id;
    e->len = 0;
    e->type = dead ? EV_EXIT : EV_THREAD_EXIT;
    e->stream = 0;
    e->flags = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    events.ringbuf_submit(e, 0);
    count(dead ? CNT_EXITS : CNT_THREAD_EXITS, 1);
    return 0;
}

#ifdef PODS_ROOT_ID
/* cgroup:cgroup_mkdir.  A container's cgroup may be gone (runc removes it at
 * exit) before the agent asks the kubelet about it: its path, which names the
 * container, is sent when it is created.  Only cgroup v2 (hierarchy 0), only
 * below the pods' root level; the agent filters by path. */
int on_cgroup_mkdir(void *ctx)
{
    int root = *(int *)((char *)ctx + TP_MKDIR_ROOT);
    int level = *(int *)((char *)ctx + TP_MKDIR_LEVEL);
    if (root != 0 || level <= PODS_ROOT_LEVEL)
        return 0;
    u64 id = *(u64 *)((char *)ctx + TP_MKDIR_ID);
    u32 loc = *(u32 *)((char *)ctx + TP_MKDIR_PATH);
    struct event_hdr *e = events.ringbuf_reserve(EVENT_HDR_SIZE + CGROUP_PATH_MAX);
    if (!e) {
        count(CNT_DROP_CGROUPS, 1);
        return 0;
    }
    char *path = (char *)e + EVENT_HDR_SIZE;
    long n = bpf_probe_read_kernel_str(path, CGROUP_PATH_MAX, (char *)ctx + (loc & 0xffff));
    e->ts_ns = bpf_ktime_get_boot_ns();
    e->cgroup_id = id;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->tid = (u32)bpf_get_current_pid_tgid();
    e->len = n > 0 ? n - 1 : 0; /* without the NUL */
    e->type = EV_CGROUP;
    e->stream = 0;
    e->flags = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    events.ringbuf_submit(e, 0);
    return 0;
}
#endif

/* sched:sched_process_exec.  The first exec inside a container's cgroup is the
 * runtime starting the container's entrypoint: its fds 1 and 2 are the
 * container's stdout and stderr.  Their identities are kept for the
 * container's writes until userspace knows them (a container not in the map
 * yet, or one put in the map before it had a process), so its stderr is not
 * taken for stdout after a dup2. */
static __always_inline void count_compat_exec(void)
{
#ifdef OFF_REGS_CS
    /* The new program runs in 32-bit mode (cs = __USER32_CS): the syscall
     * tracepoints never see its writes (x86 ignores compat syscalls there). */
    u64 cs = 0;
    bpf_probe_read_kernel(&cs, sizeof(cs), (char *)current_regs() + OFF_REGS_CS);
    if ((cs & 0xffff) == 0x23)
        count(CNT_COMPAT_EXECS, 1);
#endif
}

int on_process_exec(void *ctx)
{
    u64 cgid = bpf_get_current_cgroup_id();
    struct container *c = containers.lookup(&cgid);
    if (c) {
        if ((bpf_get_current_pid_tgid() >> 32) == SELF_TGID)
            return 0;
        if (c->flags & (C_CAPTURE_STDOUT | C_CAPTURE_STDERR))
            count_compat_exec();
        if (c->flags & C_IDENT_KNOWN)
            return 0;
    } else if (!under_pods_root()) {
        return 0;
    } else {
        count_compat_exec();
    }
    struct container v = {};
    if (fd_ident(1, &v.out_dev, &v.out_ino) || fd_ident(2, &v.err_dev, &v.err_ino))
        return 0;
    v.flags = C_CAPTURE_STDOUT | C_CAPTURE_STDERR | C_IDENT_KNOWN;
    learned_idents.insert(&cgid, &v); /* the first exec wins */
    return 0;
}
