// Pins every kernel struct and opcode to literals copied from the 6.12 UAPI headers
// (include/uapi/linux/io_uring.h, include/uapi/linux/ublk_cmd.h). A wrong offset must fail here, not corrupt a disk.
import { describe, expect, test } from "bun:test";
import { ioc, ior, iowr, struct } from "../../ffi/layout.ts";
import * as uring from "../../ffi/uapi/io_uring.ts";
import * as ublk from "../../ffi/uapi/ublk_cmd.ts";
import { iovec, msghdr, rusage, threadPreemptions } from "../../ffi/libc.ts";
import { readFileSync } from "node:fs";

function plain(layout: object): Record<string, number> {
  return { ...(layout as Record<string, number>) };
}

describe("libc layouts (x86_64 glibc)", () => {
  test("msghdr and iovec, as sendmsg reads them", () => {
    expect(plain(msghdr)).toEqual({
      SIZE: 56, msg_name: 0, msg_namelen: 8, msg_iov: 16, msg_iovlen: 24, msg_control: 32, msg_controllen: 40, msg_flags: 48,
    });
    expect(plain(iovec)).toEqual({ SIZE: 16, iov_base: 0, iov_len: 8 });
  });
});

describe("io_uring layouts", () => {
  test("io_uring_params", () => {
    expect(plain(uring.io_uring_params)).toEqual({
      SIZE: 120, sq_entries: 0, cq_entries: 4, flags: 8, sq_thread_cpu: 12, sq_thread_idle: 16, features: 20,
      wq_fd: 24, resv: 28, sq_off: 40, cq_off: 80,
    });
  });
  test("io_sqring_offsets / io_cqring_offsets", () => {
    expect(plain(uring.io_sqring_offsets)).toEqual({
      SIZE: 40, head: 0, tail: 4, ring_mask: 8, ring_entries: 12, flags: 16, dropped: 20, array: 24, resv1: 28, user_addr: 32,
    });
    expect(plain(uring.io_cqring_offsets)).toEqual({
      SIZE: 40, head: 0, tail: 4, ring_mask: 8, ring_entries: 12, overflow: 16, cqes: 20, flags: 24, resv1: 28, user_addr: 32,
    });
  });
  test("io_uring_sqe", () => {
    expect(plain(uring.io_uring_sqe)).toEqual({
      SIZE: 64, opcode: 0, flags: 1, ioprio: 2, fd: 4, off: 8, addr: 16, len: 24, rw_flags: 28, user_data: 32,
      buf_index: 40, personality: 42, file_index: 44, addr3: 48, __pad2: 56,
    });
    expect([uring.SQE_cmd_op, uring.SQE_cmd, uring.SQE_CMD_BYTES, uring.SQE128_CMD_BYTES]).toEqual([8, 48, 16, 80]);
  });
  test("io_uring_cqe, getevents_arg, timespec", () => {
    expect(plain(uring.io_uring_cqe)).toEqual({ SIZE: 16, user_data: 0, res: 8, flags: 12 });
    expect(plain(uring.io_uring_getevents_arg)).toEqual({ SIZE: 24, sigmask: 0, sigmask_sz: 8, min_wait_usec: 12, ts: 16 });
    expect(plain(uring.__kernel_timespec)).toEqual({ SIZE: 16, tv_sec: 0, tv_nsec: 8 });
    expect(plain(uring.io_uring_rsrc_register)).toEqual({ SIZE: 32, nr: 0, flags: 4, resv2: 8, data: 16, tags: 24 });
    expect(plain(uring.io_uring_rsrc_update)).toEqual({ SIZE: 16, offset: 0, resv: 4, data: 8 });
    expect(plain(uring.io_uring_buf_reg)).toEqual({ SIZE: 40, ring_addr: 0, ring_entries: 8, bgid: 12, flags: 14, resv: 16 });
    expect(plain(uring.io_uring_buf)).toEqual({ SIZE: 16, addr: 0, len: 8, bid: 12, resv: 14 });
    expect([uring.IOSQE_BUFFER_SELECT, uring.IORING_CQE_F_BUFFER, uring.IORING_CQE_BUFFER_SHIFT, uring.IORING_URING_CMD_MULTISHOT,
      uring.IORING_REGISTER_PBUF_RING, uring.IORING_UNREGISTER_PBUF_RING]).toEqual([32, 1, 16, 2, 22, 23]);
  });
  test("constants", () => {
    expect([uring.__NR_io_uring_setup, uring.__NR_io_uring_enter, uring.__NR_io_uring_register]).toEqual([425, 426, 427]);
    expect([uring.IORING_OFF_SQ_RING, uring.IORING_OFF_CQ_RING, uring.IORING_OFF_SQES]).toEqual([0, 0x8000000, 0x10000000]);
    expect([uring.IORING_SETUP_SQE128, uring.IORING_SETUP_CQE32, uring.IORING_SETUP_SINGLE_ISSUER, uring.IORING_SETUP_DEFER_TASKRUN,
      uring.IORING_SETUP_COOP_TASKRUN, uring.IORING_SETUP_TASKRUN_FLAG, uring.IORING_SETUP_SUBMIT_ALL]).toEqual([1024, 2048, 4096, 8192, 256, 512, 128]);
    expect([uring.IORING_OP_NOP, uring.IORING_OP_FSYNC, uring.IORING_OP_POLL_ADD, uring.IORING_OP_TIMEOUT, uring.IORING_OP_ASYNC_CANCEL,
      uring.IORING_OP_FALLOCATE, uring.IORING_OP_READ, uring.IORING_OP_WRITE, uring.IORING_OP_URING_CMD]).toEqual([0, 3, 6, 11, 14, 17, 22, 23, 46]);
    expect([uring.IORING_OP_SENDMSG, uring.IORING_OP_SEND, uring.IORING_OP_RECV, uring.IORING_OP_SEND_ZC, uring.IORING_RECVSEND_FIXED_BUF])
      .toEqual([9, 26, 27, 47, 4]);
    expect([uring.IORING_ENTER_GETEVENTS, uring.IORING_ENTER_EXT_ARG, uring.IORING_SQ_CQ_OVERFLOW, uring.IORING_SQ_TASKRUN]).toEqual([1, 8, 2, 4]);
    expect([uring.IORING_ENTER_REGISTERED_RING, uring.IORING_SETUP_NO_MMAP, uring.IORING_SETUP_REGISTERED_FD_ONLY, uring.IORING_UNREGISTER_RING_FDS,
      uring.IORING_REGISTER_USE_REGISTERED_RING]).toEqual([16, 0x4000, 0x8000, 21, 0x80000000]);
    expect([uring.IORING_FEAT_SINGLE_MMAP, uring.IORING_FEAT_NODROP, uring.IORING_FEAT_EXT_ARG, uring.IORING_FEAT_MIN_TIMEOUT])
      .toEqual([1, 2, 256, 32768]);
  });
});

describe("ublk layouts", () => {
  test("ublksrv_ctrl_cmd", () => {
    expect(plain(ublk.ublksrv_ctrl_cmd)).toEqual({
      SIZE: 32, dev_id: 0, queue_id: 4, len: 6, addr: 8, data: 16, dev_path_len: 24, pad: 26, reserved: 28,
    });
  });
  test("ublksrv_ctrl_dev_info", () => {
    expect(plain(ublk.ublksrv_ctrl_dev_info)).toEqual({
      SIZE: 64, nr_hw_queues: 0, queue_depth: 2, state: 4, pad0: 6, max_io_buf_bytes: 8, dev_id: 12, ublksrv_pid: 16,
      pad1: 20, flags: 24, ublksrv_flags: 32, owner_uid: 40, owner_gid: 44, reserved1: 48, reserved2: 56,
    });
  });
  test("ublksrv_io_desc / ublksrv_io_cmd", () => {
    expect(plain(ublk.ublksrv_io_desc)).toEqual({ SIZE: 24, op_flags: 0, nr_sectors: 4, start_sector: 8, addr: 16 });
    expect(plain(ublk.ublksrv_io_cmd)).toEqual({ SIZE: 16, q_id: 0, tag: 2, result: 4, addr: 8 });
    expect(plain(ublk.ublk_auto_buf_reg)).toEqual({ SIZE: 8, index: 0, flags: 2, reserved0: 3, reserved1: 4 });
  });
  test("BATCH_IO: ublk_batch_io, ublk_elem_header, opcodes, flags", () => {
    expect(plain(ublk.ublk_batch_io)).toEqual({ SIZE: 16, q_id: 0, flags: 2, nr_elem: 4, elem_bytes: 6, reserved: 7, reserved2: 8 });
    expect(plain(ublk.ublk_elem_header)).toEqual({ SIZE: 8, tag: 0, buf_index: 2, result: 4 });
    expect([ublk.UBLK_U_IO_PREP_IO_CMDS, ublk.UBLK_U_IO_COMMIT_IO_CMDS, ublk.UBLK_U_IO_FETCH_IO_CMDS]).toEqual([0xc0107525, 0xc0107526, 0xc0107527]);
    expect([ublk.UBLK_BATCH_F_HAS_ZONE_LBA, ublk.UBLK_BATCH_F_HAS_BUF_ADDR, ublk.UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK]).toEqual([1, 2, 4]);
  });
  test("ublk_params and its parts", () => {
    expect(plain(ublk.ublk_params)).toEqual({ SIZE: 112, len: 0, types: 4, basic: 8, discard: 40, devt: 60, zoned: 76, dma_alignment: 108 });
    expect(plain(ublk.ublk_param_basic)).toEqual({
      SIZE: 32, attrs: 0, logical_bs_shift: 4, physical_bs_shift: 5, io_opt_shift: 6, io_min_shift: 7, max_sectors: 8,
      chunk_sectors: 12, dev_sectors: 16, virt_boundary_mask: 24,
    });
    expect(plain(ublk.ublk_param_discard)).toEqual({
      SIZE: 20, discard_alignment: 0, discard_granularity: 4, max_discard_sectors: 8, max_write_zeroes_sectors: 12,
      max_discard_segments: 16, reserved0: 18,
    });
    expect(plain(ublk.ublk_param_devt)).toEqual({ SIZE: 16, char_major: 0, char_minor: 4, disk_major: 8, disk_minor: 12 });
    expect(plain(ublk.ublk_param_zoned)).toEqual({ SIZE: 32, max_open_zones: 0, max_active_zones: 4, max_zone_append_sectors: 8, reserved: 12 });
  });
  test("ioctl-encoded opcodes", () => {
    expect(ublk.UBLK_U_CMD_GET_QUEUE_AFFINITY).toBe(0x80207501);
    expect(ublk.UBLK_U_CMD_GET_DEV_INFO).toBe(0x80207502);
    expect(ublk.UBLK_U_CMD_ADD_DEV).toBe(0xc0207504);
    expect(ublk.UBLK_U_CMD_DEL_DEV).toBe(0xc0207505);
    expect(ublk.UBLK_U_CMD_START_DEV).toBe(0xc0207506);
    expect(ublk.UBLK_U_CMD_STOP_DEV).toBe(0xc0207507);
    expect(ublk.UBLK_U_CMD_SET_PARAMS).toBe(0xc0207508);
    expect(ublk.UBLK_U_CMD_GET_PARAMS).toBe(0x80207509);
    expect(ublk.UBLK_U_CMD_START_USER_RECOVERY).toBe(0xc0207510);
    expect(ublk.UBLK_U_CMD_END_USER_RECOVERY).toBe(0xc0207511);
    expect(ublk.UBLK_U_CMD_GET_DEV_INFO2).toBe(0x80207512);
    expect(ublk.UBLK_U_CMD_GET_FEATURES).toBe(0x80207513);
    expect(ublk.UBLK_U_CMD_DEL_DEV_ASYNC).toBe(0x80207514);
    expect(ublk.UBLK_U_CMD_UPDATE_SIZE).toBe(0xc0207515);
    expect(ublk.UBLK_U_CMD_QUIESCE_DEV).toBe(0xc0207516);
    expect(ublk.UBLK_U_CMD_TRY_STOP_DEV).toBe(0xc0207517);
    expect(ublk.UBLK_U_IO_FETCH_REQ).toBe(0xc0107520);
    expect(ublk.UBLK_U_IO_COMMIT_AND_FETCH_REQ).toBe(0xc0107521);
    expect(ublk.UBLK_U_IO_NEED_GET_DATA).toBe(0xc0107522);
  });
  test("feature bits, states, ops", () => {
    expect([ublk.UBLK_F_SUPPORT_ZERO_COPY, ublk.UBLK_F_URING_CMD_COMP_IN_TASK, ublk.UBLK_F_NEED_GET_DATA, ublk.UBLK_F_USER_RECOVERY,
      ublk.UBLK_F_USER_RECOVERY_REISSUE, ublk.UBLK_F_UNPRIVILEGED_DEV, ublk.UBLK_F_CMD_IOCTL_ENCODE, ublk.UBLK_F_USER_COPY,
      ublk.UBLK_F_ZONED, ublk.UBLK_F_USER_RECOVERY_FAIL_IO]).toEqual([1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    expect([ublk.UBLK_F_UPDATE_SIZE, ublk.UBLK_F_AUTO_BUF_REG, ublk.UBLK_F_QUIESCE, ublk.UBLK_F_PER_IO_DAEMON, ublk.UBLK_F_BUF_REG_OFF_DAEMON,
      ublk.UBLK_F_BATCH_IO, ublk.UBLK_F_INTEGRITY, ublk.UBLK_F_SAFE_STOP_DEV, ublk.UBLK_F_NO_AUTO_PART_SCAN, ublk.UBLK_F_SHMEM_ZC,
      ublk.UBLK_F_IO_DESC_SIZE]).toEqual([1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20]);
    // Every bit up to Linux 7.3 (bits 0-20), spelled as in include/uapi/linux/ublk_cmd.h.
    expect(ublk.UBLK_F_NAMES).toEqual([
      "SUPPORT_ZERO_COPY", "URING_CMD_COMP_IN_TASK", "NEED_GET_DATA", "USER_RECOVERY", "USER_RECOVERY_REISSUE", "UNPRIVILEGED_DEV",
      "CMD_IOCTL_ENCODE", "USER_COPY", "ZONED", "USER_RECOVERY_FAIL_IO", "UPDATE_SIZE", "AUTO_BUF_REG", "QUIESCE", "PER_IO_DAEMON",
      "BUF_REG_OFF_DAEMON", "BATCH_IO", "INTEGRITY", "SAFE_STOP_DEV", "NO_AUTO_PART_SCAN", "SHMEM_ZC", "IO_DESC_SIZE",
    ]);
    // 7.3's GET_FEATURES answer, and the flags it gives a null device ublk-bun adds there.
    expect(ublk.ublkFeatureNames(0x1fffff)).toEqual(ublk.UBLK_F_NAMES as string[]);
    expect(ublk.ublkFeatureNames(0x260c2)).toEqual(["URING_CMD_COMP_IN_TASK", "CMD_IOCTL_ENCODE", "USER_COPY", "PER_IO_DAEMON",
      "BUF_REG_OFF_DAEMON", "SAFE_STOP_DEV"]);
    expect(ublk.ublkFeatureNames(2 ** 21 + 1)).toEqual(["SUPPORT_ZERO_COPY", "bit 21"]);
    expect(ublk.ublkFeatureNames(0)).toEqual([]);
    expect([ublk.UBLK_S_DEV_DEAD, ublk.UBLK_S_DEV_LIVE, ublk.UBLK_S_DEV_QUIESCED, ublk.UBLK_S_DEV_FAIL_IO]).toEqual([0, 1, 2, 3]);
    expect([ublk.UBLK_IO_OP_READ, ublk.UBLK_IO_OP_WRITE, ublk.UBLK_IO_OP_FLUSH, ublk.UBLK_IO_OP_DISCARD, ublk.UBLK_IO_OP_WRITE_ZEROES]).toEqual([0, 1, 2, 3, 5]);
    expect([ublk.UBLK_IO_F_FUA, ublk.UBLK_IO_F_NOUNMAP]).toEqual([0x2000, 0x8000]);
    expect([ublk.UBLK_ATTR_READ_ONLY, ublk.UBLK_ATTR_ROTATIONAL, ublk.UBLK_ATTR_VOLATILE_CACHE, ublk.UBLK_ATTR_FUA]).toEqual([1, 2, 4, 8]);
    expect([ublk.UBLK_PARAM_TYPE_BASIC, ublk.UBLK_PARAM_TYPE_DISCARD, ublk.UBLK_PARAM_TYPE_DEVT, ublk.UBLK_PARAM_TYPE_ZONED]).toEqual([1, 2, 4, 8]);
  });
  test("descriptor mapping and USER_COPY offsets", () => {
    expect(ublk.ublkDescAreaBytes(128)).toBe(4096);
    expect(ublk.ublkDescAreaBytes(171)).toBe(8192);
    expect(ublk.ublkDescAreaBytes(4096)).toBe(98304);
    expect(ublk.ublkDescMmapOffset(0)).toBe(0);
    expect(ublk.ublkDescMmapOffset(3)).toBe(3 * 98304);
    expect(ublk.ublkUserCopyOffset(0, 0, 0)).toBe(0x80000000);
    expect(ublk.ublkUserCopyOffset(1, 2, 512)).toBe(0x80000000 + 2 ** 41 + 2 * 2 ** 25 + 512);
  });
});

describe("libc layouts", () => {
  test("struct rusage: ru_nivcsw is what /proc says of this thread's involuntary switches", () => {
    expect(plain(rusage)).toEqual({ SIZE: 144, ru_nivcsw: 136 });
    const preemptions = threadPreemptions();
    const fromProc = Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(readFileSync("/proc/thread-self/status", "utf8"))![1]);
    expect(fromProc - preemptions).toBeGreaterThanOrEqual(0);
    expect(fromProc - preemptions).toBeLessThanOrEqual(2); // preempted in between, at most
  });
});

describe("layout helper", () => {
  test("rejects fields outside, misaligned or overlapping", () => {
    expect(() => struct("t", 8, { a: [6, 4] })).toThrow(/outside/);
    expect(() => struct("t", 8, { a: [2, 4] })).toThrow(/aligned/);
    expect(() => struct("t", 8, { a: [0, 4], b: [2, 2] })).toThrow(/overlaps/);
    expect(struct("t", 8, { a: [0, 4], b: [4, 2] })).toEqual({ SIZE: 8, a: 0, b: 4 });
  });
  test("ioc matches the kernel's _IOC encoding", () => {
    expect(ioc(0, "u", 1, 0)).toBe(0x7501);
    expect(ior("T", 0x13, 4)).toBe(0x80045413);
    expect(iowr("u", 0x20, 16)).toBe(0xc0107520);
  });
});
