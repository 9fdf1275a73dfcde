/* podtap — the record format shared by the BPF program and the agent.
 *
 * agent/capture/events.py reads the `#define`s of this file at import, so a
 * constant has one definition.  Keep each define on one line as `NAME value`.
 */
#ifndef PODTAP_H
#define PODTAP_H

/* Record types (event_hdr.type). */
#define EV_DATA 1 /* bytes a watched process wrote to its stdout/stderr */
#define EV_EXIT 2 /* the process exited (its last thread): flush its partial lines */
#define EV_CGROUP 3 /* a cgroup v2 directory was created under the pods' subtree; data = its path */
#define EV_THREAD_EXIT 4 /* a thread (tid) exited, its process lives on: flush the lines it wrote last */

/* Streams (event_hdr.stream). */
#define STREAM_STDOUT 1
#define STREAM_STDERR 2

/* Record flags (event_hdr.flags). */
#define F_FD_FALLBACK 1  /* stream chosen by fd number: the pipe identity was not known yet */
#define F_TRUNCATED 2    /* bytes of this write beyond the maximum (or the copy budget) are missing */
#define F_CONTINUATION 4 /* not the first record of its write */
#define F_UNKNOWN 8      /* cgroup under the pods' subtree but not (yet) in the containers map */
#define F_LOSS 16        /* bytes of this (process, stream) were lost before this record */

/* Container flags (struct container.flags). */
#define C_CAPTURE_STDOUT 1
#define C_CAPTURE_STDERR 2
#define C_IDENT_KNOWN 4 /* the out and err fields hold the identities of the container's stdout/stderr */

/* Per-CPU counters (index into the `counters` map). */
#define CNT_RECORDS 0        /* data records put in the ring buffer */
#define CNT_BYTES 1          /* data bytes put in the ring buffer */
#define CNT_DROP_RECORDS 2   /* records lost: ring buffer full */
#define CNT_DROP_BYTES 3     /* data bytes lost: ring buffer full */
#define CNT_TRUNC_BYTES 4    /* bytes beyond the per-write maximum or the copy budget */
#define CNT_UNCAPT_BYTES 5   /* bytes written to a watched stream by splice/sendfile/tee/vmsplice/copy_file_range */
#define CNT_UNCAPT_CALLS 6   /* such calls, plus io_uring_enter / io_submit / sendmmsg calls to watched streams or of watched processes */
#define CNT_FAULT_BYTES 7    /* bytes the kernel accepted but the probe could not read (user memory, msghdr) */
#define CNT_UNKNOWN_RECORDS 8 /* records of cgroups under the pods' subtree not in the map */
#define CNT_WRITES 9        /* write calls to a watched stream that returned > 0 */
#define CNT_EXITS 10         /* exit records put in the ring buffer */
#define CNT_DROP_EXITS 11    /* exit records lost: ring buffer full (the pid's next records then carry F_LOSS) */

#define CNT_DROP_CGROUPS 12  /* cgroup-creation records lost: ring buffer full */
#define CNT_SCRATCH_MISS 13  /* writes lost whole: no per-CPU copy state for this CPU (NCPUS too small) */
#define CNT_SCRATCH_MISS_BYTES 14 /* their bytes */
#define CNT_TAIL_FAIL_BYTES 15 /* bytes of writes lost whole: the tail call into the copy loop failed */
#define CNT_UNCAPT_MSGS 16   /* sendmmsg messages sent to a watched stream (bytes in uncapt_bytes) */
#define CNT_COMPAT_EXECS 17  /* 32-bit (compat) programs started in watched containers: their writes are invisible */
#define CNT_THREAD_EXITS 18  /* thread-exit records put in the ring buffer */
#define NCOUNTERS 19

/* watch_filter: slot (cgroup id & (FILTER_SLOTS - 1)) -> 1 when a cgroup of that slot may
 * be in the containers map.  An array lookup the kernel inlines, in front of the hash
 * lookup that every other write on the node would pay for. */
#define FILTER_SLOTS 65536

/* outside_pods: slot (cgroup id & (OUTSIDE_SLOTS - 1)) -> a cgroup id known not to be under
 * the pods' subtree (`podtap run` only).  A cgroup never moves and its id is never reused, so
 * the answer holds forever: the host's writers pay an inlined array lookup instead of the
 * ancestor helper.  A collision only costs the helper again. */
#define OUTSIDE_SLOTS 4096

#define EVENT_HDR_SIZE 48
#define CGROUP_PATH_MAX 512
#define COMM_LEN 16

struct event_hdr {
    u64 ts_ns;     /* CLOCK_BOOTTIME of the write's return */
    u64 cgroup_id; /* cgroup v2 id of the writer */
    u32 pid;       /* thread group id */
    u32 tid;
    u32 len;       /* bytes of data after the header */
    u16 type;
    u8 stream;
    u8 flags;
    char comm[COMM_LEN];
};

struct container {
    u64 out_ino;
    u64 err_ino;
    u32 out_dev; /* kernel dev_t of the stdout file's superblock */
    u32 err_dev;
    u32 flags;
    u32 pad;
};

#endif /* PODTAP_H */
