/**
 * ublk UAPI (include/uapi/linux/ublk_cmd.h), checked against Linux 6.12, kernel spelling throughout.
 * Every struct layout and opcode is pinned by tests/unit/layout.test.ts.
 */
import { ior, iowr, struct } from "../layout.ts";

export const ublksrv_ctrl_cmd = struct("ublksrv_ctrl_cmd", 32, {
  dev_id: [0, 4], queue_id: [4, 2], len: [6, 2], addr: [8, 8], data: [16, 8], dev_path_len: [24, 2],
  pad: [26, 2], reserved: [28, 4],
});

export const ublksrv_ctrl_dev_info = struct("ublksrv_ctrl_dev_info", 64, {
  nr_hw_queues: [0, 2], queue_depth: [2, 2], state: [4, 2], pad0: [6, 2], max_io_buf_bytes: [8, 4],
  dev_id: [12, 4], ublksrv_pid: [16, 4], pad1: [20, 4], flags: [24, 8], ublksrv_flags: [32, 8],
  owner_uid: [40, 4], owner_gid: [44, 4], reserved1: [48, 8], reserved2: [56, 8],
});

export const ublksrv_io_desc = struct("ublksrv_io_desc", 24, {
  op_flags: [0, 4], nr_sectors: [4, 4], start_sector: [8, 8], addr: [16, 8],
});

export const ublksrv_io_cmd = struct("ublksrv_io_cmd", 16, { q_id: [0, 2], tag: [2, 2], result: [4, 4], addr: [8, 8] });
/** What an AUTO_BUF_REG device's FETCH / COMMIT_AND_FETCH carries in ublksrv_io_cmd.addr: the ring's buffer-table
 * slot the kernel registers the request's pages in. */
export const ublk_auto_buf_reg = struct("ublk_auto_buf_reg", 8, { index: [0, 2], flags: [2, 1], reserved0: [3, 1], reserved1: [4, 4] });
export const UBLK_AUTO_BUF_REG_FALLBACK = 1 << 0;

export const ublk_param_basic = struct("ublk_param_basic", 32, {
  attrs: [0, 4], logical_bs_shift: [4, 1], physical_bs_shift: [5, 1], io_opt_shift: [6, 1], io_min_shift: [7, 1],
  max_sectors: [8, 4], chunk_sectors: [12, 4], dev_sectors: [16, 8], virt_boundary_mask: [24, 8],
});

export const ublk_param_discard = struct("ublk_param_discard", 20, {
  discard_alignment: [0, 4], discard_granularity: [4, 4], max_discard_sectors: [8, 4],
  max_write_zeroes_sectors: [12, 4], max_discard_segments: [16, 2], reserved0: [18, 2],
});

export const ublk_param_devt = struct("ublk_param_devt", 16, {
  char_major: [0, 4], char_minor: [4, 4], disk_major: [8, 4], disk_minor: [12, 4],
});

export const ublk_param_zoned = struct("ublk_param_zoned", 32, {
  max_open_zones: [0, 4], max_active_zones: [4, 4], max_zone_append_sectors: [8, 4], reserved: [12, 20],
});

/** struct ublk_params up to its dma part (6.14: ublk_param_dma_align, whose one field, alignment, fits in 6.12's
 * tail padding); later kernels append segment/integrity, and `len` says how much we send. */
export const ublk_params = struct("ublk_params", 112, {
  len: [0, 4], types: [4, 4], basic: [8, 32], discard: [40, 20], devt: [60, 16], zoned: [76, 32], dma_alignment: [108, 4],
});

// Legacy command numbers; the ioctl-encoded UBLK_U_* forms below are what we send.
export const UBLK_CMD_GET_QUEUE_AFFINITY = 0x01;
export const UBLK_CMD_GET_DEV_INFO = 0x02;
export const UBLK_CMD_ADD_DEV = 0x04;
export const UBLK_CMD_DEL_DEV = 0x05;
export const UBLK_CMD_START_DEV = 0x06;
export const UBLK_CMD_STOP_DEV = 0x07;
export const UBLK_CMD_SET_PARAMS = 0x08;
export const UBLK_CMD_GET_PARAMS = 0x09;
export const UBLK_CMD_START_USER_RECOVERY = 0x10;
export const UBLK_CMD_END_USER_RECOVERY = 0x11;
export const UBLK_CMD_GET_DEV_INFO2 = 0x12;

const CTRL = ublksrv_ctrl_cmd.SIZE;
export const UBLK_U_CMD_GET_QUEUE_AFFINITY = ior("u", UBLK_CMD_GET_QUEUE_AFFINITY, CTRL);
export const UBLK_U_CMD_GET_DEV_INFO = ior("u", UBLK_CMD_GET_DEV_INFO, CTRL);
export const UBLK_U_CMD_ADD_DEV = iowr("u", UBLK_CMD_ADD_DEV, CTRL);
export const UBLK_U_CMD_DEL_DEV = iowr("u", UBLK_CMD_DEL_DEV, CTRL);
export const UBLK_U_CMD_START_DEV = iowr("u", UBLK_CMD_START_DEV, CTRL);
export const UBLK_U_CMD_STOP_DEV = iowr("u", UBLK_CMD_STOP_DEV, CTRL);
export const UBLK_U_CMD_SET_PARAMS = iowr("u", UBLK_CMD_SET_PARAMS, CTRL);
export const UBLK_U_CMD_GET_PARAMS = ior("u", UBLK_CMD_GET_PARAMS, CTRL);
export const UBLK_U_CMD_START_USER_RECOVERY = iowr("u", UBLK_CMD_START_USER_RECOVERY, CTRL);
export const UBLK_U_CMD_END_USER_RECOVERY = iowr("u", UBLK_CMD_END_USER_RECOVERY, CTRL);
export const UBLK_U_CMD_GET_DEV_INFO2 = ior("u", UBLK_CMD_GET_DEV_INFO2, CTRL);
export const UBLK_U_CMD_GET_FEATURES = ior("u", 0x13, CTRL);
export const UBLK_U_CMD_DEL_DEV_ASYNC = ior("u", 0x14, CTRL);
export const UBLK_U_CMD_UPDATE_SIZE = iowr("u", 0x15, CTRL);
export const UBLK_U_CMD_QUIESCE_DEV = iowr("u", 0x16, CTRL);
export const UBLK_U_CMD_TRY_STOP_DEV = iowr("u", 0x17, CTRL);

const IOCMD = ublksrv_io_cmd.SIZE;
export const UBLK_U_IO_FETCH_REQ = iowr("u", 0x20, IOCMD);
export const UBLK_U_IO_COMMIT_AND_FETCH_REQ = iowr("u", 0x21, IOCMD);
export const UBLK_U_IO_NEED_GET_DATA = iowr("u", 0x22, IOCMD);

/** BATCH_IO (UBLK_F_BATCH_IO, 7.0): one command for many tags. Its header sits in the SQE's cmd area; PREP and
 * COMMIT read an array of `nr_elem` elements of `elem_bytes` each from the SQE's addr; FETCH is a multishot command
 * that writes the tags of new requests (u16 each, elem_bytes 2) into buffers of a provided-buffer group. */
export const ublk_batch_io = struct("ublk_batch_io", 16, {
  q_id: [0, 2], flags: [2, 2], nr_elem: [4, 2], elem_bytes: [6, 1], reserved: [7, 1], reserved2: [8, 8],
});
/** The start of every PREP / COMMIT element; with UBLK_BATCH_F_HAS_BUF_ADDR a u64 buffer address follows (at 8). */
export const ublk_elem_header = struct("ublk_elem_header", 8, { tag: [0, 2], buf_index: [2, 2], result: [4, 4] });
export const UBLK_BATCH_F_HAS_ZONE_LBA = 1 << 0;
export const UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1;
export const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK = 1 << 2;
const BATCH = ublk_batch_io.SIZE;
export const UBLK_U_IO_PREP_IO_CMDS = iowr("u", 0x25, BATCH);
export const UBLK_U_IO_COMMIT_IO_CMDS = iowr("u", 0x26, BATCH);
export const UBLK_U_IO_FETCH_IO_CMDS = iowr("u", 0x27, BATCH);

// Results of FETCH / COMMIT_AND_FETCH in the CQE.
export const UBLK_IO_RES_OK = 0;
export const UBLK_IO_RES_NEED_GET_DATA = 1;
/** The kernel's -ENODEV: the queue is being torn down and this tag's command will not be served. */
export const UBLK_IO_RES_ABORT = -19;

export const UBLKSRV_CMD_BUF_OFFSET = 0;
export const UBLKSRV_IO_BUF_OFFSET = 0x80000000;
export const UBLK_MAX_QUEUE_DEPTH = 4096;
export const UBLK_MAX_NR_QUEUES = 4096;
export const UBLK_IO_BUF_BITS = 25;
export const UBLK_TAG_OFF = UBLK_IO_BUF_BITS;
export const UBLK_TAG_BITS = 16;
export const UBLK_QID_OFF = UBLK_TAG_OFF + UBLK_TAG_BITS;
export const UBLK_FEATURES_LEN = 8;

// dev_info.flags (feature bits). Bits above 31 do not exist on 6.12; numbers stay exact up to 2^53.
export const UBLK_F_SUPPORT_ZERO_COPY = 1 << 0;
export const UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1;
export const UBLK_F_NEED_GET_DATA = 1 << 2;
export const UBLK_F_USER_RECOVERY = 1 << 3;
export const UBLK_F_USER_RECOVERY_REISSUE = 1 << 4;
export const UBLK_F_UNPRIVILEGED_DEV = 1 << 5;
export const UBLK_F_CMD_IOCTL_ENCODE = 1 << 6;
export const UBLK_F_USER_COPY = 1 << 7;
export const UBLK_F_ZONED = 1 << 8;
export const UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9;
export const UBLK_F_UPDATE_SIZE = 1 << 10;
export const UBLK_F_AUTO_BUF_REG = 1 << 11;
export const UBLK_F_QUIESCE = 1 << 12;
export const UBLK_F_PER_IO_DAEMON = 1 << 13;
export const UBLK_F_BUF_REG_OFF_DAEMON = 1 << 14;
export const UBLK_F_BATCH_IO = 1 << 15;
export const UBLK_F_INTEGRITY = 1 << 16;
export const UBLK_F_SAFE_STOP_DEV = 1 << 17;
export const UBLK_F_NO_AUTO_PART_SCAN = 1 << 18;
export const UBLK_F_SHMEM_ZC = 1 << 19;
export const UBLK_F_IO_DESC_SIZE = 1 << 20;

/** Feature bit names in bit order (bit 0 first), as ublk_cmd.h of Linux 7.3 spells them without `UBLK_F_`. */
export const UBLK_F_NAMES: readonly string[] = [
  "SUPPORT_ZERO_COPY", "URING_CMD_COMP_IN_TASK", "NEED_GET_DATA", "USER_RECOVERY", "USER_RECOVERY_REISSUE",
  "UNPRIVILEGED_DEV", "CMD_IOCTL_ENCODE", "USER_COPY", "ZONED", "USER_RECOVERY_FAIL_IO", "UPDATE_SIZE",
  "AUTO_BUF_REG", "QUIESCE", "PER_IO_DAEMON", "BUF_REG_OFF_DAEMON", "BATCH_IO", "INTEGRITY", "SAFE_STOP_DEV",
  "NO_AUTO_PART_SCAN", "SHMEM_ZC", "IO_DESC_SIZE",
];

/** Names of the bits set in a feature mask, lowest first; a bit this table does not know shows as `bit N`. */
export function ublkFeatureNames(mask: number): string[] {
  const names: string[] = [];
  for (let bit = 0; bit < 53; bit++) {
    if (Math.floor(mask / 2 ** bit) % 2 === 1) names.push(UBLK_F_NAMES[bit] ?? `bit ${bit}`);
  }
  return names;
}

export const UBLK_S_DEV_DEAD = 0;
export const UBLK_S_DEV_LIVE = 1;
export const UBLK_S_DEV_QUIESCED = 2;
export const UBLK_S_DEV_FAIL_IO = 3;
export const UBLK_S_NAMES: readonly string[] = ["DEAD", "LIVE", "QUIESCED", "FAIL_IO"];

export const UBLK_IO_OP_READ = 0;
export const UBLK_IO_OP_WRITE = 1;
export const UBLK_IO_OP_FLUSH = 2;
export const UBLK_IO_OP_DISCARD = 3;
export const UBLK_IO_OP_WRITE_SAME = 4;
export const UBLK_IO_OP_WRITE_ZEROES = 5;

export const UBLK_IO_F_FAILFAST_DEV = 1 << 8;
export const UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9;
export const UBLK_IO_F_FAILFAST_DRIVER = 1 << 10;
export const UBLK_IO_F_META = 1 << 11;
export const UBLK_IO_F_FUA = 1 << 13;
export const UBLK_IO_F_NOUNMAP = 1 << 15;
export const UBLK_IO_F_SWAP = 1 << 16;
/** AUTO_BUF_REG with FALLBACK: the kernel could not register this request's buffer; the daemon must do without. */
export const UBLK_IO_F_NEED_REG_BUF = 1 << 17;

export const UBLK_ATTR_READ_ONLY = 1 << 0;
export const UBLK_ATTR_ROTATIONAL = 1 << 1;
export const UBLK_ATTR_VOLATILE_CACHE = 1 << 2;
export const UBLK_ATTR_FUA = 1 << 3;

export const UBLK_PARAM_TYPE_BASIC = 1 << 0;
export const UBLK_PARAM_TYPE_DISCARD = 1 << 1;
export const UBLK_PARAM_TYPE_DEVT = 1 << 2;
export const UBLK_PARAM_TYPE_ZONED = 1 << 3;
export const UBLK_PARAM_TYPE_DMA_ALIGN = 1 << 4;

/** Byte size of one queue's descriptor mapping: depth × 24, page-rounded (the kernel rejects other lengths). */
export function ublkDescAreaBytes(queueDepth: number, pageBytes = 4096): number {
  const raw = queueDepth * ublksrv_io_desc.SIZE;
  return Math.ceil(raw / pageBytes) * pageBytes;
}

/** mmap offset of queue `qId`'s descriptors on /dev/ublkcN: queues are spaced by the largest possible area. */
export function ublkDescMmapOffset(qId: number, pageBytes = 4096): number {
  return UBLKSRV_CMD_BUF_OFFSET + qId * ublkDescAreaBytes(UBLK_MAX_QUEUE_DEPTH, pageBytes);
}

/** pread/pwrite offset on /dev/ublkcN of a request's data in USER_COPY mode (exact below 2^53). */
export function ublkUserCopyOffset(qId: number, tag: number, byteOffset: number): number {
  return UBLKSRV_IO_BUF_OFFSET + qId * 2 ** UBLK_QID_OFF + tag * 2 ** UBLK_TAG_OFF + byteOffset;
}
