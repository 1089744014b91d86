// The batch command transport's commands as the kernel would read them, and how it answers their completions. A
// host ring holds the SQEs (nothing is submitted: ublk_drv is not here); the kernel side runs in the VM suite.
import { afterEach, describe, expect, test } from "bun:test";
import { close, eventfd, memoryAt } from "../../ffi/libc.ts";
import { EBUSY, EINVAL, ENOBUFS, ENODEV } from "../../ffi/errno.ts";
import { type BufferGroup, Ring } from "../../ffi/ring.ts";
import {
  IORING_CQE_F_BUFFER, IORING_CQE_F_MORE, IORING_OP_URING_CMD, IORING_URING_CMD_MULTISHOT, IOSQE_BUFFER_SELECT, io_uring_sqe,
} from "../../ffi/uapi/io_uring.ts";
import {
  UBLK_BATCH_F_HAS_BUF_ADDR, UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_USER_COPY, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_U_IO_FETCH_IO_CMDS,
  UBLK_U_IO_PREP_IO_CMDS,
} from "../../ffi/uapi/ublk_cmd.ts";
import { batchTransport, type CommandTransport } from "../../lib/command-transport.ts";
import { buffersMode, noDataMode, zeroCopyMode } from "../../lib/data-mode.ts";

const DEPTH = 8, Q_ID = 1;
let cleanups: Array<() => void> = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

interface Sqe { opcode: number; sqeFlags: number; cmdOp: number; address: number; opFlags: number; bufGroup: number; userDataLow: number;
  userDataHigh: number; qId: number; batchFlags: number; nrElem: number; elemBytes: number }

/** A batch transport on a host ring, with what it queued and served; charFd an eventfd standing in for /dev/ublkcN. */
function harness(devFlags: number) {
  const ring = Ring.create({ entries: 64 });
  const charFd = eventfd(0, 0);
  let group: BufferGroup | undefined;
  const register = ring.registerBufferGroup.bind(ring);
  ring.registerBufferGroup = (groupId, count, bufferBytes) => (group = register(groupId, count, bufferBytes));
  cleanups.push(() => { ring.close(); close(charFd); });
  const bases: number[] = [];
  const served: number[] = [];
  const dataMode = (devFlags & UBLK_F_AUTO_BUF_REG) !== 0 ? zeroCopyMode()
    : (devFlags & UBLK_F_USER_COPY) !== 0 ? noDataMode() : buffersMode({ bufferAddress: 0x10000, tagStrideBytes: 0x1000 });
  const transport: CommandTransport = batchTransport({
    ring, charFd, qId: Q_ID, depth: DEPTH, devFlags: UBLK_F_BATCH_IO | devFlags, dataMode, serve: (tag) => served.push(tag),
    nextSqe: () => {
      const base = ring.getSqe();
      bases.push(base);
      return base;
    },
  });
  /** The SQEs queued since the last call, decoded. */
  const taken = (): Sqe[] => bases.splice(0).map((base) => {
    const w = ring.sqe32;
    return {
      opcode: w[base]! & 0xff, sqeFlags: (w[base]! >>> 8) & 0xff, cmdOp: w[base + io_uring_sqe.off / 4]!,
      address: w[base + io_uring_sqe.addr / 4]! + w[base + io_uring_sqe.addr / 4 + 1]! * 2 ** 32, opFlags: w[base + io_uring_sqe.rw_flags / 4]!,
      bufGroup: w[base + io_uring_sqe.buf_index / 4]! & 0xffff, userDataLow: w[base + io_uring_sqe.user_data / 4]!,
      userDataHigh: w[base + io_uring_sqe.user_data / 4 + 1]!, qId: w[base + 12]! & 0xffff, batchFlags: w[base + 12]! >>> 16,
      nrElem: w[base + 13]! & 0xffff, elemBytes: (w[base + 13]! >>> 16) & 0xff,
    };
  });
  /** The elements a PREP / COMMIT names: [tag, buf_index, result, buf_addr?]. */
  const elementsOf = (sqe: Sqe): number[][] => {
    const words = new Uint32Array(memoryAt(sqe.address, sqe.nrElem * sqe.elemBytes));
    return Array.from({ length: sqe.nrElem }, (_, i) => {
      const at = (i * sqe.elemBytes) / 4;
      const element = [words[at]! & 0xffff, words[at]! >>> 16, words[at + 1]! | 0];
      if (sqe.elemBytes === 16) element.push(words[at + 2]! + words[at + 3]! * 2 ** 32);
      return element;
    });
  };
  /** Puts `tags` into FETCH buffer `bid`, as the kernel does, and returns the CQE flags naming it. */
  const deliver = (bid: number, tags: number[], more = true): [number, number] => {
    const view = new Uint16Array(group!.bytes.buffer, group!.bytes.byteOffset + bid * group!.bufferBytes, tags.length);
    view.set(tags);
    return [tags.length * 2, IORING_CQE_F_BUFFER | (more ? IORING_CQE_F_MORE : 0) | (bid << 16)];
  };
  return { transport, taken, elementsOf, served, deliver, group: () => group! };
}

/** PREPs every tag, completes the PREP and returns the FETCH it armed. */
function started(h: ReturnType<typeof harness>): Sqe {
  h.transport.start(-1);
  const [prep] = h.taken();
  expect(h.transport.onCqe(prep!.userDataLow, 0, 0)).toBe(0);
  const [fetch] = h.taken();
  return fetch!;
}

describe("batch command transport", () => {
  test("PREP names every tag in one command (user copy: 8-byte elements, no buffer); its completion arms one multishot FETCH", () => {
    const h = harness(UBLK_F_USER_COPY);
    h.transport.start(-1);
    const [prep, ...more] = h.taken();
    expect(more).toEqual([]);
    expect(prep).toMatchObject({ opcode: IORING_OP_URING_CMD, cmdOp: UBLK_U_IO_PREP_IO_CMDS, qId: Q_ID, batchFlags: 0, nrElem: DEPTH, elemBytes: 8,
      userDataHigh: 0 });
    expect(h.elementsOf(prep!)).toEqual(Array.from({ length: DEPTH }, (_, tag) => [tag, 0, 0]));
    expect(h.transport.onCqe(prep!.userDataLow, 0, 0)).toBe(0);
    const [fetch] = h.taken();
    expect(fetch).toMatchObject({ opcode: IORING_OP_URING_CMD, cmdOp: UBLK_U_IO_FETCH_IO_CMDS, sqeFlags: IOSQE_BUFFER_SELECT,
      opFlags: IORING_URING_CMD_MULTISHOT, bufGroup: h.group().groupId, qId: Q_ID, batchFlags: 0, elemBytes: 2, userDataHigh: 0 });
    // A buffer per tag: a completion takes one whatever it carries, so the FETCH never runs dry.
    expect(h.group().count).toBeGreaterThanOrEqual(DEPTH);
    expect(h.transport.retired()).toBe(false);
  });

  test("copy mode names each tag's buffer (HAS_BUF_ADDR, 16-byte elements); zero copy its slot (buf_index = tag)", () => {
    const copy = harness(0);
    copy.transport.start(-1);
    const [prep] = copy.taken();
    expect(prep).toMatchObject({ batchFlags: UBLK_BATCH_F_HAS_BUF_ADDR, elemBytes: 16, nrElem: DEPTH });
    expect(copy.elementsOf(prep!)[3]).toEqual([3, 0, 0, 0x10000 + 3 * 0x1000]);
    const zero = harness(UBLK_F_AUTO_BUF_REG);
    zero.transport.start(-1);
    const [zeroPrep] = zero.taken();
    expect(zeroPrep).toMatchObject({ batchFlags: 0, elemBytes: 8 });
    expect(zero.elementsOf(zeroPrep!)[5]).toEqual([5, 5, 0]);
  });

  test("a held tag: the PREP leaves it out and no FETCH is armed until resume() has PREPped it too", () => {
    const h = harness(UBLK_F_USER_COPY);
    h.transport.start(DEPTH - 1);
    const [prep] = h.taken();
    expect(prep!.nrElem).toBe(DEPTH - 1);
    expect(h.elementsOf(prep!).map(([tag]) => tag)).not.toContain(DEPTH - 1);
    h.transport.onCqe(prep!.userDataLow, 0, 0);
    expect(h.taken()).toEqual([]); // the kernel would answer a FETCH ENODEV now
    h.transport.resume(DEPTH - 1);
    const [resume] = h.taken();
    expect(resume).toMatchObject({ cmdOp: UBLK_U_IO_PREP_IO_CMDS, nrElem: 1 });
    expect(h.elementsOf(resume!)).toEqual([[DEPTH - 1, 0, 0]]);
    h.transport.onCqe(resume!.userDataLow, 0, 0);
    expect(h.taken().map((sqe) => sqe.cmdOp)).toEqual([UBLK_U_IO_FETCH_IO_CMDS]);
  });

  test("a FETCH completion serves each tag it carries; results go back in one COMMIT per round, two arrays alternating", () => {
    const h = harness(UBLK_F_USER_COPY);
    const fetch = started(h);
    const [res, flags] = h.deliver(2, [3, 5, 0]);
    expect(h.transport.onCqe(fetch.userDataLow, res, flags)).toBe(3);
    expect(h.served).toEqual([3, 5, 0]);
    h.transport.commit(3, 4096);
    h.transport.commit(5, -5);
    h.transport.flush();
    const [first] = h.taken();
    expect(first).toMatchObject({ cmdOp: UBLK_U_IO_COMMIT_IO_CMDS, qId: Q_ID, nrElem: 2, elemBytes: 8 });
    expect(h.elementsOf(first!)).toEqual([[3, 0, 4096], [5, 0, -5]]);
    // The next round gathers in the other array; while the first COMMIT is in flight it waits.
    h.transport.commit(0, 512);
    h.transport.flush();
    h.transport.commit(3, 512); // not possible in practice before tag 3's next request; here: a second element
    h.transport.flush();
    expect(h.taken()).toEqual([]);
    expect(h.transport.onCqe(first!.userDataLow, 2 * 8, 0)).toBe(0);
    h.transport.flush();
    const [second] = h.taken();
    expect(second!.address).not.toBe(first!.address);
    expect(h.elementsOf(second!)).toEqual([[0, 0, 512], [3, 0, 512]]);
    h.transport.flush(); // nothing gathered: nothing sent
    expect(h.taken()).toEqual([]);
    // A COMMIT the kernel took only in part (it stops at the first element it refuses): the queue cannot go on.
    expect(() => h.transport.onCqe(second!.userDataLow, 8, 0)).toThrow(/^queue 1: the kernel refused its COMMIT_IO_CMDS of 2 results \(at tag 3\) with EIO/);
  });

  test("a FETCH that ran out of buffers is armed again; ENODEV retires the queue; any other error is the kernel refusing it", () => {
    const h = harness(UBLK_F_USER_COPY);
    const fetch = started(h);
    expect(h.transport.onCqe(fetch.userDataLow, -ENOBUFS, 0)).toBe(0);
    expect(h.taken().map((sqe) => sqe.cmdOp)).toEqual([UBLK_U_IO_FETCH_IO_CMDS]);
    // A last batch without F_MORE: served, and armed again.
    const [res, flags] = h.deliver(1, [7], false);
    expect(h.transport.onCqe(fetch.userDataLow, res, flags)).toBe(1);
    expect(h.taken().map((sqe) => sqe.cmdOp)).toEqual([UBLK_U_IO_FETCH_IO_CMDS]);
    expect(h.transport.onCqe(fetch.userDataLow, -ENODEV, 0)).toBe(0);
    expect(h.transport.retired()).toBe(true);
    expect(h.taken()).toEqual([]);
    const other = harness(UBLK_F_USER_COPY);
    const otherFetch = started(other);
    expect(() => other.transport.onCqe(otherFetch.userDataLow, -EINVAL, 0)).toThrow(/^queue 1: the kernel refused its FETCH_IO_CMDS with EINVAL \(-22\)$/);
    const refusedPrep = harness(UBLK_F_USER_COPY);
    refusedPrep.transport.start(-1);
    const [prep] = refusedPrep.taken();
    expect(() => refusedPrep.transport.onCqe(prep!.userDataLow, -EBUSY, 0)).toThrow(/^queue 1: the kernel refused its PREP_IO_CMDS of 8 tags with EBUSY \(-16\)$/);
  });

  test("a FETCH that ends (ABORT: QUIESCE_DEV, STOP_DEV) retires the queue only once every result it holds is committed", () => {
    const h = harness(UBLK_F_USER_COPY);
    const fetch = started(h);
    const [res, flags] = h.deliver(0, [2, 4]);
    h.transport.onCqe(fetch.userDataLow, res, flags);
    h.transport.commit(2, 512);
    h.transport.onCqe(fetch.userDataLow, -ENODEV, 0); // in the same round as the requests
    expect(h.transport.retired()).toBe(false); // tag 2's result is only gathered
    h.transport.flush();
    const [commit] = h.taken();
    expect(h.elementsOf(commit!)).toEqual([[2, 0, 512]]);
    expect(h.transport.retired()).toBe(false); // in flight; and tag 4 is still with the target
    h.transport.onCqe(commit!.userDataLow, 8, 0);
    h.transport.commit(4, 512);
    h.transport.flush();
    const [last] = h.taken();
    h.transport.onCqe(last!.userDataLow, 8, 0);
    expect(h.transport.retired()).toBe(true);
  });

  test("the warm-up's results are forgotten, never committed", () => {
    const h = harness(UBLK_F_USER_COPY);
    started(h);
    h.transport.commit(1, 512);
    h.transport.dropUnflushed();
    h.transport.flush();
    expect(h.taken()).toEqual([]);
  });
});
