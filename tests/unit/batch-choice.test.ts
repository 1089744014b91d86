// Which devices get batch commands (lib/device.ts batchIoFlags) and how `list` names the data path.
import { expect, test } from "bun:test";
import {
  UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_NEED_GET_DATA, UBLK_F_QUIESCE, UBLK_F_USER_COPY, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_REISSUE,
} from "../../ffi/uapi/ublk_cmd.ts";
import { BATCH_IO_UNAVAILABLE, BATCH_IO_WITH_GET_DATA, batchIoFlags } from "../../lib/device.ts";
import { dataPathName } from "../../lib/data-mode.ts";

const WITH = UBLK_F_BATCH_IO | UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG | UBLK_F_QUIESCE; // a kernel's features, 7.0 and later
const WITHOUT = UBLK_F_USER_COPY; // 6.12's

test("batch by default where the kernel has it, never asked per tag; NEED_GET_DATA, which it cannot carry, stays per tag", () => {
  expect(batchIoFlags(undefined, 0, WITH)).toBe(UBLK_F_BATCH_IO);
  expect(batchIoFlags(undefined, UBLK_F_USER_COPY, WITH)).toBe(UBLK_F_BATCH_IO);
  expect(batchIoFlags(undefined, UBLK_F_AUTO_BUF_REG, WITH)).toBe(UBLK_F_BATCH_IO);
  expect(batchIoFlags(true, 0, WITH)).toBe(UBLK_F_BATCH_IO);
  expect(batchIoFlags(false, 0, WITH)).toBe(0);
  expect(batchIoFlags(undefined, UBLK_F_NEED_GET_DATA, WITH)).toBe(0);
  expect(batchIoFlags(undefined, 0, WITHOUT)).toBe(0);
  expect(batchIoFlags(false, 0, WITHOUT)).toBe(0);
});

test("a recoverable device stays per tag where restart would QUIESCE it (which breaks batch queues), unless batch is asked for", () => {
  const recoverable = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
  expect(batchIoFlags(undefined, recoverable, WITH)).toBe(0);
  expect(batchIoFlags(undefined, UBLK_F_USER_RECOVERY, WITH)).toBe(0);
  expect(batchIoFlags(true, recoverable, WITH)).toBe(UBLK_F_BATCH_IO);
  expect(batchIoFlags(undefined, recoverable, WITH & ~UBLK_F_QUIESCE)).toBe(UBLK_F_BATCH_IO); // nothing to restart it with
});

test("batch required where it cannot be: the reason, in one line", () => {
  expect(() => batchIoFlags(true, 0, WITHOUT)).toThrow(BATCH_IO_UNAVAILABLE);
  expect(() => batchIoFlags(true, UBLK_F_NEED_GET_DATA, WITH)).toThrow(BATCH_IO_WITH_GET_DATA);
});

test("list names the data mode, then the commands", () => {
  expect(dataPathName(UBLK_F_USER_COPY | UBLK_F_BATCH_IO)).toBe("user copy, batch commands");
  expect(dataPathName(UBLK_F_AUTO_BUF_REG | UBLK_F_BATCH_IO)).toBe("zero copy, batch commands");
  expect(dataPathName(0)).toBe("copy, per-tag commands");
  expect(dataPathName(UBLK_F_NEED_GET_DATA)).toBe("copy (NEED_GET_DATA), per-tag commands");
});
