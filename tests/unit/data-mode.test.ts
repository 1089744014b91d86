// lib/data-mode.ts: the address each io command carries and who copies a request's data. The user-copy mode's
// pread/pwrite go to a sparse temporary file standing in for /dev/ublkcN, at the offsets the kernel decodes
// (queue, tag): the bytes must land in the right tag's buffer (or the target's memory) and come back from it.
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { close, memoryAt, mmapAnonymous, O_CREAT, O_RDWR, open, pread, pwrite } from "../../ffi/libc.ts";
import { EIO } from "../../ffi/errno.ts";
import {
  UBLK_F_AUTO_BUF_REG, UBLK_F_USER_COPY, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, ublkUserCopyOffset,
} from "../../ffi/uapi/ublk_cmd.ts";
import { pickDataMode } from "../../lib/data-mode.ts";
import type { QueueHandler } from "../../targets/types.ts";

const DEPTH = 4, STRIDE_BYTES = 4096, Q_ID = 1;
const dir = mkdtempSync(join(tmpdir(), "data-mode-"));
const charFd = open(join(dir, "ublkc"), O_RDWR | O_CREAT, 0o600);
const bufferAddress = mmapAnonymous(DEPTH * STRIDE_BYTES);
const tagBuffer = (tag: number) => new Uint8Array(memoryAt(bufferAddress + tag * STRIDE_BYTES, STRIDE_BYTES));
afterAll(() => {
  close(charFd);
  rmSync(dir, { recursive: true, force: true });
});

const serving: QueueHandler = { handleIo: () => 0 };
const buffers = () => ({ bufferAddress, tagStrideBytes: STRIDE_BYTES });

test("buffers: each tag's command carries its buffer, and nothing is copied by the queue", () => {
  const mode = pickDataMode(0, charFd, Q_ID, DEPTH, buffers(), serving);
  expect(mode.commandAddress(0)).toBe(bufferAddress);
  expect(mode.commandAddress(3)).toBe(bufferAddress + 3 * STRIDE_BYTES);
  expect(mode.sqeAddress(3)).toBe(0);
  tagBuffer(2).fill(7);
  expect(mode.beforeTarget(2, UBLK_IO_OP_WRITE, 0, 8)).toBe(0);
  expect(mode.afterTarget(2, UBLK_IO_OP_READ, 4096)).toBe(4096);
  expect(tagBuffer(2)[0]).toBe(7);
});

test("user copy: a write's data is read in from its (queue, tag) offset, a read's written back out there", () => {
  const mode = pickDataMode(UBLK_F_USER_COPY, charFd, Q_ID, DEPTH, buffers(), serving);
  expect(mode.commandAddress(2)).toBe(0);
  const written = new Uint8Array(1024).map((_, i) => i % 251);
  expect(pwrite(charFd, written, 1024, ublkUserCopyOffset(Q_ID, 2, 0))).toBe(1024);
  tagBuffer(2).fill(0);
  expect(mode.beforeTarget(2, UBLK_IO_OP_WRITE, 0, 2)).toBe(0);
  expect(tagBuffer(2).subarray(0, 1024)).toEqual(written);
  expect(tagBuffer(1)[0]).toBe(0); // no other tag's buffer touched

  tagBuffer(3).fill(0x5a, 0, 512);
  expect(mode.beforeTarget(3, UBLK_IO_OP_READ, 0, 1)).toBe(0); // a read brings nothing in
  expect(mode.afterTarget(3, UBLK_IO_OP_READ, 512)).toBe(512);
  const back = new Uint8Array(512);
  expect(pread(charFd, back, 512, ublkUserCopyOffset(Q_ID, 3, 0))).toBe(512);
  expect(back.every((byte) => byte === 0x5a)).toBe(true);
});

test("user copy: a failed read fails nothing more, and a copy that comes up short fails the request with EIO", () => {
  const mode = pickDataMode(UBLK_F_USER_COPY, charFd, Q_ID, DEPTH, buffers(), serving);
  expect(mode.afterTarget(0, UBLK_IO_OP_READ, -5)).toBe(-5);
  expect(mode.beforeTarget(0, UBLK_IO_OP_FLUSH, 0, 0)).toBe(0);
  // Past the file's end (tag 3 of queue 2 was never written): pread returns 0 bytes.
  const shortMode = pickDataMode(UBLK_F_USER_COPY, charFd, 2, DEPTH, buffers(), serving);
  expect(shortMode.beforeTarget(3, UBLK_IO_OP_WRITE, 0, 8)).toBe(-EIO);
  const closed = pickDataMode(UBLK_F_USER_COPY, -1, Q_ID, DEPTH, buffers(), serving);
  expect(closed.beforeTarget(0, UBLK_IO_OP_READ, 0, 1)).toBe(0);
  expect(closed.afterTarget(0, UBLK_IO_OP_READ, 512)).toBe(-EIO);
});

test("user copy: a target's own memory (dataAddress) is copied to and from instead of the tag's buffer", () => {
  const ownAddress = mmapAnonymous(4096);
  const own = new Uint8Array(memoryAt(ownAddress, 4096));
  const asked: number[][] = [];
  const mode = pickDataMode(UBLK_F_USER_COPY, charFd, Q_ID, DEPTH, buffers(), {
    handleIo: () => 0,
    dataAddress: (tag, op, startSector, nrSectors) => (asked.push([tag, op, startSector, nrSectors]), ownAddress),
  });
  expect(pwrite(charFd, new Uint8Array(512).fill(9), 512, ublkUserCopyOffset(Q_ID, 1, 0))).toBe(512);
  tagBuffer(1).fill(0);
  expect(mode.beforeTarget(1, UBLK_IO_OP_WRITE, 16, 1)).toBe(0);
  expect(own[0]).toBe(9);
  expect(tagBuffer(1)[0]).toBe(0);
  expect(asked).toEqual([[1, UBLK_IO_OP_WRITE, 16, 1]]);
});

test("no data: user copy with a target that ignores the data copies nothing", () => {
  const mode = pickDataMode(UBLK_F_USER_COPY, -1, Q_ID, DEPTH, buffers(), { handleIo: () => 0, ignoresData: true });
  expect(mode.commandAddress(1)).toBe(0);
  expect(mode.beforeTarget(1, UBLK_IO_OP_WRITE, 0, 8)).toBe(0); // a closed fd would have failed a copy
  expect(mode.afterTarget(1, UBLK_IO_OP_READ, 4096)).toBe(4096);
});

test("zero copy: each tag's command names its own slot of the ring's buffer table (ublk_auto_buf_reg.index), no flags", () => {
  const mode = pickDataMode(UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY, -1, Q_ID, DEPTH, buffers(), serving);
  expect([0, 1, 3, 4095].map((tag) => mode.sqeAddress(tag))).toEqual([0, 1, 3, 4095]);
  expect(mode.commandAddress(3)).toBe(0); // the kernel refuses a buffer address beside it (EINVAL)
  expect(mode.beforeTarget(1, UBLK_IO_OP_WRITE, 0, 8)).toBe(0); // nothing copied: a closed fd would fail
  expect(mode.afterTarget(1, UBLK_IO_OP_READ, 4096)).toBe(4096);
});
