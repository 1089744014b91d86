/**
 * io_uring UAPI (include/uapi/linux/io_uring.h), in the kernel's spelling so a grep of the header finds
 * each name. Only what this project uses; every struct layout is pinned by tests/unit/layout.test.ts.
 */
import { struct } from "../layout.ts";

// x86_64 syscall numbers.
export const __NR_io_uring_setup = 425;
export const __NR_io_uring_enter = 426;
export const __NR_io_uring_register = 427;

// io_uring_params.flags
export const IORING_SETUP_IOPOLL = 1 << 0;
export const IORING_SETUP_SQPOLL = 1 << 1;
export const IORING_SETUP_SQ_AFF = 1 << 2;
export const IORING_SETUP_CQSIZE = 1 << 3;
export const IORING_SETUP_CLAMP = 1 << 4;
export const IORING_SETUP_ATTACH_WQ = 1 << 5;
export const IORING_SETUP_R_DISABLED = 1 << 6;
export const IORING_SETUP_SUBMIT_ALL = 1 << 7;
export const IORING_SETUP_COOP_TASKRUN = 1 << 8;
export const IORING_SETUP_TASKRUN_FLAG = 1 << 9;
export const IORING_SETUP_SQE128 = 1 << 10;
export const IORING_SETUP_CQE32 = 1 << 11;
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13;
export const IORING_SETUP_NO_MMAP = 1 << 14;
export const IORING_SETUP_REGISTERED_FD_ONLY = 1 << 15;
export const IORING_SETUP_NO_SQARRAY = 1 << 16;

// io_uring_params.features
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;
export const IORING_FEAT_SUBMIT_STABLE = 1 << 2;
export const IORING_FEAT_RW_CUR_POS = 1 << 3;
export const IORING_FEAT_CUR_PERSONALITY = 1 << 4;
export const IORING_FEAT_FAST_POLL = 1 << 5;
export const IORING_FEAT_POLL_32BITS = 1 << 6;
export const IORING_FEAT_SQPOLL_NONFIXED = 1 << 7;
export const IORING_FEAT_EXT_ARG = 1 << 8;
export const IORING_FEAT_NATIVE_WORKERS = 1 << 9;
export const IORING_FEAT_RSRC_TAGS = 1 << 10;
export const IORING_FEAT_CQE_SKIP = 1 << 11;
export const IORING_FEAT_LINKED_FILE = 1 << 12;
export const IORING_FEAT_REG_REG_RING = 1 << 13;
export const IORING_FEAT_RECVSEND_BUNDLE = 1 << 14;
/** 6.12: io_uring_getevents_arg.min_wait_usec is honoured. */
export const IORING_FEAT_MIN_TIMEOUT = 1 << 15;

// io_uring_enter flags
export const IORING_ENTER_GETEVENTS = 1 << 0;
export const IORING_ENTER_SQ_WAKEUP = 1 << 1;
export const IORING_ENTER_SQ_WAIT = 1 << 2;
export const IORING_ENTER_EXT_ARG = 1 << 3;
export const IORING_ENTER_REGISTERED_RING = 1 << 4;

// sq_ring.flags
export const IORING_SQ_NEED_WAKEUP = 1 << 0;
export const IORING_SQ_CQ_OVERFLOW = 1 << 1;
export const IORING_SQ_TASKRUN = 1 << 2;

// mmap offsets
export const IORING_OFF_SQ_RING = 0;
export const IORING_OFF_CQ_RING = 0x8000000;
export const IORING_OFF_SQES = 0x10000000;

// enum io_uring_op
export const IORING_OP_NOP = 0;
export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_READ_FIXED = 4;
export const IORING_OP_WRITE_FIXED = 5;
export const IORING_OP_POLL_ADD = 6;
export const IORING_OP_POLL_REMOVE = 7;
export const IORING_OP_SENDMSG = 9;
export const IORING_OP_TIMEOUT = 11;
export const IORING_OP_TIMEOUT_REMOVE = 12;
export const IORING_OP_ASYNC_CANCEL = 14;
export const IORING_OP_LINK_TIMEOUT = 15;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
export const IORING_OP_SEND = 26;
export const IORING_OP_RECV = 27;
export const IORING_OP_URING_CMD = 46;
export const IORING_OP_SEND_ZC = 47;

// io_uring_sqe.flags
export const IOSQE_FIXED_FILE = 1 << 0;
export const IOSQE_IO_DRAIN = 1 << 1;
export const IOSQE_IO_LINK = 1 << 2;
export const IOSQE_IO_HARDLINK = 1 << 3;
export const IOSQE_ASYNC = 1 << 4;
/** The request takes a buffer from the provided-buffer group in sqe.buf_group (buf_index). */
export const IOSQE_BUFFER_SELECT = 1 << 5;
export const IOSQE_CQE_SKIP_SUCCESS = 1 << 6;

export const IORING_FSYNC_DATASYNC = 1 << 0;
export const IORING_TIMEOUT_ABS = 1 << 0;
export const IORING_ASYNC_CANCEL_ALL = 1 << 0;
/** sqe.ioprio of SEND_ZC: the data is registered buffer sqe.buf_index, from sqe.addr within it. */
export const IORING_RECVSEND_FIXED_BUF = 1 << 2;
/** cqe.flags: a provided buffer was used; its id is in flags >>> IORING_CQE_BUFFER_SHIFT. */
export const IORING_CQE_F_BUFFER = 1 << 0;
export const IORING_CQE_F_MORE = 1 << 1;
export const IORING_CQE_BUFFER_SHIFT = 16;
/** sqe.uring_cmd_flags (rw_flags): a multishot uring_cmd, which needs IOSQE_BUFFER_SELECT. */
export const IORING_URING_CMD_MULTISHOT = 1 << 1;

// io_uring_register opcodes
export const IORING_REGISTER_FILES = 2;
export const IORING_UNREGISTER_FILES = 3;
export const IORING_REGISTER_PROBE = 8;
export const IORING_REGISTER_BUFFERS2 = 15;
export const IORING_UNREGISTER_RING_FDS = 21;
export const IORING_REGISTER_PBUF_RING = 22;
export const IORING_UNREGISTER_PBUF_RING = 23;
/** Or-ed into io_uring_register's opcode: its fd is an index of the calling thread's registered rings. */
export const IORING_REGISTER_USE_REGISTERED_RING = 0x80000000;
/** io_uring_rsrc_register.flags: a table of `nr` empty slots (filled later, e.g. by ublk's AUTO_BUF_REG). */
export const IORING_RSRC_REGISTER_SPARSE = 1 << 0;

export const io_sqring_offsets = struct("io_sqring_offsets", 40, {
  head: [0, 4], tail: [4, 4], ring_mask: [8, 4], ring_entries: [12, 4], flags: [16, 4], dropped: [20, 4],
  array: [24, 4], resv1: [28, 4], user_addr: [32, 8],
});

export const io_cqring_offsets = struct("io_cqring_offsets", 40, {
  head: [0, 4], tail: [4, 4], ring_mask: [8, 4], ring_entries: [12, 4], overflow: [16, 4], cqes: [20, 4],
  flags: [24, 4], resv1: [28, 4], user_addr: [32, 8],
});

export const io_uring_params = struct("io_uring_params", 120, {
  sq_entries: [0, 4], cq_entries: [4, 4], flags: [8, 4], sq_thread_cpu: [12, 4], sq_thread_idle: [16, 4],
  features: [20, 4], wq_fd: [24, 4], resv: [28, 12], sq_off: [40, 40], cq_off: [80, 40],
});

/** A 64-byte SQE; with IORING_SETUP_SQE128 the `cmd` area grows from 16 to 80 bytes. */
export const io_uring_sqe = struct("io_uring_sqe", 64, {
  opcode: [0, 1], flags: [1, 1], ioprio: [2, 2], fd: [4, 4],
  off: [8, 8], // also addr2, and cmd_op (u32 @8) for URING_CMD
  addr: [16, 8], len: [24, 4],
  rw_flags: [28, 4], // also fsync_flags, poll32_events, timeout_flags, cancel_flags, uring_cmd_flags
  user_data: [32, 8], buf_index: [40, 2], personality: [42, 2], file_index: [44, 4],
  addr3: [48, 8], // also the start of cmd[]
  __pad2: [56, 8],
});
export const SQE_cmd_op = 8;
export const SQE_cmd = 48;
export const SQE_CMD_BYTES = 16;
export const SQE128_CMD_BYTES = 80;

export const io_uring_cqe = struct("io_uring_cqe", 16, { user_data: [0, 8], res: [8, 4], flags: [12, 4] });

export const io_uring_getevents_arg = struct("io_uring_getevents_arg", 24, {
  sigmask: [0, 8], sigmask_sz: [8, 4], min_wait_usec: [12, 4], ts: [16, 8],
});

export const io_uring_rsrc_register = struct("io_uring_rsrc_register", 32, {
  nr: [0, 4], flags: [4, 4], resv2: [8, 8], data: [16, 8], tags: [24, 8],
});
/** IORING_REGISTER_PBUF_RING's argument: a ring of `ring_entries` io_uring_buf (a power of two) for group `bgid`. */
export const io_uring_buf_reg = struct("io_uring_buf_reg", 40, {
  ring_addr: [0, 8], ring_entries: [8, 4], bgid: [12, 2], flags: [14, 2], resv: [16, 24],
});
/** One provided buffer; the ring's tail is the u16 in entry 0's `resv` (offset 14). */
export const io_uring_buf = struct("io_uring_buf", 16, { addr: [0, 8], len: [8, 4], bid: [12, 2], resv: [14, 2] });
export const io_uring_rsrc_update = struct("io_uring_rsrc_update", 16, { offset: [0, 4], resv: [4, 4], data: [8, 8] });
export const __kernel_timespec = struct("__kernel_timespec", 16, { tv_sec: [0, 8], tv_nsec: [8, 8] });

export const POLLIN = 0x001;
