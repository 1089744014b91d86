// The io_uring ring against the host kernel (io_uring works here; no ublk needed).
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CQE_FLAGS, CQE_RES, CQE_USER_DATA_HI, CQE_USER_DATA_LO, Ring } from "../../ffi/ring.ts";
import {
  AF_UNIX, close, eventfd, iovec, memoryAt, mmapAnonymous, msghdr, MSG_NOSIGNAL, MSG_WAITALL, munmap, O_CREAT, O_DIRECT,
  O_RDWR, open, PAGE_BYTES, SOCK_STREAM, socketpair, write,
} from "../../ffi/libc.ts";
import { EAGAIN, EBADF, EBUSY, ECANCELED, EFAULT, ENOBUFS, ETIME } from "../../ffi/errno.ts";
import {
  IORING_SETUP_COOP_TASKRUN, IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_SQE128,
  IORING_SETUP_TASKRUN_FLAG, POLLIN,
  IORING_FEAT_NODROP, IOSQE_FIXED_FILE, IOSQE_BUFFER_SELECT, IORING_CQE_F_BUFFER, IORING_CQE_BUFFER_SHIFT,
} from "../../ffi/uapi/io_uring.ts";

const workDir = mkdtempSync(join(tmpdir(), "ublk-bun-ring-"));
afterAll(() => rmSync(workDir, { recursive: true, force: true }));

/** Reads every ready CQE into [userDataLow, userDataHigh, res] triples and releases them. */
function reap(ring: Ring): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  let head = ring.cqHead();
  const tail = ring.cqTail();
  while (head !== tail) {
    const base = ring.cqeBase(head);
    out.push([ring.cqe32[base + CQE_USER_DATA_LO]! >>> 0, ring.cqe32[base + CQE_USER_DATA_HI]! >>> 0, ring.cqe32[base + CQE_RES]!]);
    head = (head + 1) >>> 0;
  }
  ring.cqAdvanceTo(head);
  return out;
}

/** Submits one prepared SQE and returns its [user_data low, high, res]. */
function runOne(ring: Ring, prepare: (base: number) => void): [number, number, number] {
  const base = ring.getSqe();
  expect(base).toBeGreaterThanOrEqual(0);
  prepare(base);
  expect(ring.submit(1)).toBeGreaterThanOrEqual(0);
  const completions = reap(ring);
  expect(completions.length).toBe(1);
  return completions[0]!;
}

function ringMappings(): number {
  return readFileSync("/proc/self/maps", "utf8").split("\n").filter((line) => line.includes("io_uring")).length;
}

describe("ring", () => {
  test("100k NOP round trips keep both halves of user_data", () => {
    const ring = Ring.create({ entries: 32, flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN });
    let bad = 0;
    for (let i = 0; i < 100_000; i++) {
      const base = ring.getSqe();
      ring.prepNop(base, i, 0xffffffff - i);
      ring.submit(1);
      const head = ring.cqHead();
      const cqe = ring.cqeBase(head);
      if (ring.cqe32[cqe + CQE_USER_DATA_LO]! >>> 0 !== i || ring.cqe32[cqe + CQE_USER_DATA_HI]! >>> 0 !== 0xffffffff - i || ring.cqe32[cqe + CQE_RES] !== 0) bad++;
      ring.cqAdvanceTo(head + 1);
    }
    expect(bad).toBe(0);
    expect(ring.cqReady()).toBe(0);
    ring.close();
  });

  test("refused optional flags are dropped; the ring reports what it got", () => {
    // DEFER_TASKRUN without SINGLE_ISSUER is invalid: the ring must fall back instead of failing.
    const ring = Ring.create({ entries: 8, flags: IORING_SETUP_DEFER_TASKRUN });
    expect(ring.flags & IORING_SETUP_DEFER_TASKRUN).toBe(0);
    expect(runOne(ring, (b) => ring.prepNop(b, 7))).toEqual([7, 0, 0]);
    ring.close();
    const big = Ring.create({ entries: 8, flags: IORING_SETUP_SQE128 });
    expect(big.sqeWords).toBe(32);
    expect(runOne(big, (b) => big.prepNop(b, 9))).toEqual([9, 0, 0]);
    big.close();
  });

  for (const direct of [false, true]) {
    test(`write then read a file through the ring (${direct ? "O_DIRECT" : "buffered"})`, () => {
      const path = join(workDir, `data-${direct}`);
      const fd = open(path, O_RDWR | O_CREAT | (direct ? O_DIRECT : 0), 0o600);
      expect(fd).toBeGreaterThanOrEqual(0);
      const lengthBytes = 64 * 1024;
      const address = mmapAnonymous(lengthBytes * 2);
      const out = new Uint8Array(memoryAt(address, lengthBytes));
      const back = new Uint8Array(memoryAt(address + lengthBytes, lengthBytes));
      for (let i = 0; i < lengthBytes; i++) out[i] = (i * 7 + 3) & 0xff;
      const ring = Ring.create({ entries: 8 });
      expect(runOne(ring, (b) => ring.prepWrite(b, fd, address, lengthBytes, 4096, 1))[2]).toBe(lengthBytes);
      expect(runOne(ring, (b) => ring.prepFsync(b, fd, 0, 2))[2]).toBe(0);
      expect(runOne(ring, (b) => ring.prepRead(b, fd, address + lengthBytes, lengthBytes, 4096, 3))[2]).toBe(lengthBytes);
      expect(Buffer.from(back).equals(Buffer.from(out))).toBe(true);
      // The bytes really are in the file, at the offset asked for.
      expect(readFileSync(path).subarray(4096).equals(Buffer.from(out))).toBe(true);
      // FALLOCATE punch-hole (mode 3 = KEEP_SIZE|PUNCH_HOLE) zeroes the first page of data.
      expect(runOne(ring, (b) => ring.prepFallocate(b, fd, 3, 4096, 4096, 4))[2]).toBe(0);
      expect(readFileSync(path).subarray(4096, 8192).every((byte) => byte === 0)).toBe(true);
      ring.close();
      close(fd);
      munmap(address, lengthBytes * 2);
    });
  }

  test("a registered file is named by its index with IOSQE_FIXED_FILE, its fd no longer needed", () => {
    const path = join(workDir, "fixed-file");
    const fd = open(path, O_RDWR | O_CREAT, 0o600);
    expect(fd).toBeGreaterThanOrEqual(0);
    const address = mmapAnonymous(PAGE_BYTES);
    const bytes = new Uint8Array(memoryAt(address, PAGE_BYTES));
    bytes.fill(0x5a, 0, 512);
    const ring = Ring.create({ entries: 8 });
    // Before registration index 0 names nothing.
    expect(runOne(ring, (b) => { ring.prepWrite(b, 0, address, 512, 0, 1); ring.setSqeFlags(b, IOSQE_FIXED_FILE); })).toEqual([1, 0, -EBADF]);
    expect(ring.registerFiles([fd])).toBe(0);
    close(fd); // the ring holds its own reference
    expect(runOne(ring, (b) => { ring.prepWrite(b, 0, address, 512, 0, 2); ring.setSqeFlags(b, IOSQE_FIXED_FILE); })).toEqual([2, 0, 512]);
    bytes.fill(0, 0, 512);
    expect(runOne(ring, (b) => { ring.prepRead(b, 0, address, 512, 0, 3); ring.setSqeFlags(b, IOSQE_FIXED_FILE); })).toEqual([3, 0, 512]);
    expect(bytes.subarray(0, 512).every((byte) => byte === 0x5a)).toBe(true);
    expect(readFileSync(path).subarray(0, 512).every((byte) => byte === 0x5a)).toBe(true);
    // A second table is refused: the ring has one.
    expect(ring.registerFiles([1])).toBe(-EBUSY);
    ring.close();
    munmap(address, PAGE_BYTES);
  });

  test("a buffer group: each RECV with BUFFER_SELECT takes the next buffer, ENOBUFS once all are out, recycle gives one back", () => {
    const pair = socketpair(AF_UNIX, SOCK_STREAM);
    if (typeof pair === "number") throw new Error(`socketpair: ${pair}`);
    const [left, right] = pair;
    const ring = Ring.create({ entries: 4 });
    const group = ring.registerBufferGroup(7, 2, 16);
    const text = new TextEncoder();
    /** Sends `message` on one end and receives it on the other into a buffer of group 7: [res, bid or -1, bytes]. */
    const receive = (message: string): [number, number, string] => {
      expect(write(right, text.encode(message), message.length)).toBe(message.length);
      const base = ring.getSqe();
      ring.prepRecv(base, left, 0, 0, 0, 1); // length 0: the selected buffer's
      ring.setSqeFlags(base, IOSQE_BUFFER_SELECT);
      ring.setBufferGroup(base, 7);
      expect(ring.submit(1)).toBe(1);
      const at = ring.cqeBase(ring.cqHead());
      const res = ring.cqe32[at + CQE_RES]!, flags = ring.cqe32[at + CQE_FLAGS]!;
      ring.cqAdvanceTo(ring.cqHead() + 1);
      const bid = (flags & IORING_CQE_F_BUFFER) !== 0 ? flags >>> IORING_CQE_BUFFER_SHIFT : -1;
      return [res, bid, bid < 0 ? "" : new TextDecoder().decode(group.bytes.subarray(bid * 16, bid * 16 + Math.max(res, 0)))];
    };
    expect(receive("abc")).toEqual([3, 0, "abc"]);
    expect(receive("de")).toEqual([2, 1, "de"]);
    expect(receive("f")).toEqual([-ENOBUFS, -1, ""]);
    group.recycle(0);
    expect(receive("")).toEqual([1, 0, "f"]); // the byte left waiting
    expect(group.bufferAddress(1) - group.bufferAddress(0)).toBe(16);
    // A second group with the same id is refused.
    expect(() => ring.registerBufferGroup(7, 2, 16)).toThrow(/buffer group 7/);
    ring.close();
    close(left);
    close(right);
  });

  test("SENDMSG gathers two iovecs into one stream; RECV with MSG_WAITALL and SEND move them back", () => {
    const pair = socketpair(AF_UNIX, SOCK_STREAM);
    if (typeof pair === "number") throw new Error(`socketpair: ${pair}`);
    const [left, right] = pair;
    const address = mmapAnonymous(PAGE_BYTES);
    const memory = new Uint8Array(memoryAt(address, PAGE_BYTES));
    const words = new Uint32Array(memoryAt(address, PAGE_BYTES));
    memory.set([1, 2, 3], 1024);
    memory.set([4, 5, 6, 7, 8], 2048);
    const u64 = (byteOffset: number, value: number) => {
      words[byteOffset / 4] = value >>> 0;
      words[byteOffset / 4 + 1] = Math.floor(value / 2 ** 32);
    };
    // msghdr at 0 naming two iovecs at 64: 3 bytes at 1024, 5 bytes at 2048.
    u64(msghdr.msg_iov, address + 64);
    u64(msghdr.msg_iovlen, 2);
    u64(64 + iovec.iov_base, address + 1024);
    u64(64 + iovec.iov_len, 3);
    u64(64 + iovec.SIZE + iovec.iov_base, address + 2048);
    u64(64 + iovec.SIZE + iovec.iov_len, 5);
    const ring = Ring.create({ entries: 4 });
    expect(runOne(ring, (b) => ring.prepSendmsg(b, left, address, MSG_NOSIGNAL, 7))).toEqual([7, 0, 8]);
    expect(runOne(ring, (b) => ring.prepRecv(b, right, address + 3072, 8, MSG_WAITALL, 8))).toEqual([8, 0, 8]);
    expect([...memory.subarray(3072, 3080)]).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(runOne(ring, (b) => ring.prepSend(b, right, address + 3072, 2, MSG_NOSIGNAL, 9))).toEqual([9, 0, 2]);
    expect(runOne(ring, (b) => ring.prepRecv(b, left, address + 3584, 16, 0, 10))).toEqual([10, 0, 2]);
    expect([...memory.subarray(3584, 3586)]).toEqual([1, 2]);
    // A closed peer: RECV sees the end of the stream (0).
    close(right);
    expect(runOne(ring, (b) => ring.prepRecv(b, left, address + 3584, 16, MSG_WAITALL, 11))).toEqual([11, 0, 0]);
    ring.close();
    close(left);
    munmap(address, PAGE_BYTES);
  });

  test("a ring private to its thread: no fd, no kernel mapping; NOPs, a poll and a buffer table through its index; closed, its index is free again", () => {
    const ringFds = () => readdirSync("/proc/self/fd").filter((fd) => { try { return readlinkSync(`/proc/self/fd/${fd}`).includes("io_uring"); } catch { return false; } }).length;
    const fdsBefore = ringFds(), mappingsBefore = ringMappings();
    const ring = Ring.create({ entries: 8, flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG, privateToThread: true });
    expect([ring.registeredRing, ringFds(), ringMappings()]).toEqual([true, fdsBefore, mappingsBefore]);
    expect(ring.flags & IORING_SETUP_DEFER_TASKRUN).toBe(IORING_SETUP_DEFER_TASKRUN);
    for (let i = 0; i < 20; i++) expect(runOne(ring, (b) => ring.prepNop(b, i, 1))).toEqual([i, 1, 0]);
    const efd = eventfd(0, 0);
    const poll = ring.getSqe();
    ring.prepPollAdd(poll, efd, POLLIN, 21, 0);
    expect(ring.submit(0)).toBe(1);
    expect(reap(ring)).toEqual([]);
    expect(write(efd, new BigUint64Array([1n]), 8)).toBe(8);
    expect(ring.submit(1)).toBeGreaterThanOrEqual(0);
    expect(reap(ring).map(([low, , res]) => [low, res > 0])).toEqual([[21, true]]);
    expect(ring.registerSparseBuffers(4)).toBe(0);
    ring.close();
    close(efd);
    // A thread holds 16 registered rings at most: each closed ring gave its index back.
    for (let i = 0; i < 20; i++) {
      const again = Ring.create({ entries: 4, privateToThread: true });
      expect(again.registeredRing).toBe(true);
      expect(runOne(again, (b) => again.prepNop(b, 1, 0))).toEqual([1, 0, 0]);
      again.close();
    }
  });

  test("a bad fd comes back as -EBADF in the CQE", () => {
    const ring = Ring.create({ entries: 4 });
    const address = mmapAnonymous(PAGE_BYTES);
    expect(runOne(ring, (b) => ring.prepRead(b, 9999, address, 512, 0, 5))).toEqual([5, 0, -EBADF]);
    ring.close();
    munmap(address, PAGE_BYTES);
  });

  test("a sparse buffer table: registered once (a second is -EBUSY); READ_FIXED / WRITE_FIXED on an empty slot are -EFAULT", () => {
    const ring = Ring.create({ entries: 4 });
    const fd = open(join(workDir, "fixed.img"), O_RDWR | O_CREAT, 0o600);
    expect(ring.registerSparseBuffers(8)).toBe(0);
    expect(ring.registerSparseBuffers(8)).toBe(-EBUSY);
    // Slot 3 is empty (the kernel fills slots, e.g. ublk's AUTO_BUF_REG); slot 8 is past the table.
    expect(runOne(ring, (b) => ring.prepReadFixed(b, fd, 3, 0, 512, 0, 6))).toEqual([6, 0, -EFAULT]);
    expect(runOne(ring, (b) => ring.prepWriteFixed(b, fd, 3, 0, 512, 0, 7))).toEqual([7, 0, -EFAULT]);
    expect(runOne(ring, (b) => ring.prepReadFixed(b, fd, 8, 0, 512, 0, 8))[2]).toBeLessThan(0);
    close(fd);
    ring.close();
  });

  test("POLL_ADD on an eventfd is woken by a write from another Worker", async () => {
    const efd = eventfd(0, 0);
    expect(efd).toBeGreaterThanOrEqual(0);
    const ring = Ring.create({ entries: 4, flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN });
    const base = ring.getSqe();
    ring.prepPollAdd(base, efd, POLLIN, 11);
    expect(ring.submit()).toBe(1);
    expect(reap(ring)).toEqual([]);
    const worker = new Worker(new URL("./eventfd-waker.ts", import.meta.url).href);
    const written = new Promise<number>((resolve) => { worker.onmessage = (event) => resolve(event.data as number); });
    worker.postMessage({ fd: efd, delayMs: 50 });
    // Blocks this thread in io_uring_enter until the other thread's write() wakes the poll.
    const started = performance.now();
    expect(ring.waitCqe(5000)).toBeGreaterThanOrEqual(0);
    expect(performance.now() - started).toBeGreaterThan(20);
    const completions = reap(ring);
    expect(completions.length).toBe(1);
    expect(completions[0]![0]).toBe(11);
    expect(completions[0]![2] & POLLIN).toBe(POLLIN);
    expect(await written).toBe(8);
    worker.terminate();
    ring.close();
    close(efd);
  });

  test("with TASKRUN_FLAG a DEFER_TASKRUN ring shows waiting task work in shared memory; entering runs it", async () => {
    // What a polling queue thread relies on: it watches the flag instead of entering the kernel in a loop.
    const efd = eventfd(0, 0);
    const ring = Ring.create({ entries: 4, flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG });
    expect(ring.flags & IORING_SETUP_TASKRUN_FLAG).toBe(IORING_SETUP_TASKRUN_FLAG);
    ring.prepPollAdd(ring.getSqe(), efd, POLLIN, 12);
    expect(ring.submit()).toBe(1);
    expect(ring.taskWorkPending()).toBe(false);
    const worker = new Worker(new URL("./eventfd-waker.ts", import.meta.url).href);
    const written = new Promise<number>((resolve) => { worker.onmessage = (event) => resolve(event.data as number); });
    worker.postMessage({ fd: efd, delayMs: 0 });
    expect(await written).toBe(8);
    // The write woke the poll in the writer's thread; its completion waits for us as task work, not yet a CQE.
    expect({ pending: ring.taskWorkPending(), ready: ring.cqReady() }).toEqual({ pending: true, ready: 0 });
    expect(ring.submit(0)).toBe(0);
    expect(ring.taskWorkPending()).toBe(false);
    const completions = reap(ring);
    expect(completions.map(([userData]) => userData)).toEqual([12]);
    expect(completions[0]![2] & POLLIN).toBe(POLLIN);
    worker.terminate();
    ring.close();
    close(efd);
  });

  test("a wait with a timeout ends with -ETIME; a cancelled poll completes with -ECANCELED", () => {
    const ring = Ring.create({ entries: 4 });
    const efd = eventfd(0, 0);
    const started = performance.now();
    expect(ring.waitCqe(60)).toBe(-ETIME);
    expect(performance.now() - started).toBeGreaterThanOrEqual(50);
    let base = ring.getSqe();
    ring.prepPollAdd(base, efd, POLLIN, 21);
    base = ring.getSqe();
    ring.prepCancel(base, 21, 0, 0, 22);
    ring.submit(2);
    const completions = reap(ring).sort((a, b) => a[0] - b[0]);
    expect(completions).toEqual([[21, 0, -ECANCELED], [22, 0, 0]]);
    ring.close();
    close(efd);
  });

  test("TIMEOUT fires after its timespec", () => {
    const ring = Ring.create({ entries: 4 });
    const address = mmapAnonymous(PAGE_BYTES);
    const timespec = new Uint32Array(memoryAt(address, 16));
    timespec[2] = 30_000_000; // 30 ms in tv_nsec
    const started = performance.now();
    expect(runOne(ring, (b) => ring.prepTimeout(b, address, 0, 0, 31))).toEqual([31, 0, -ETIME]);
    expect(performance.now() - started).toBeGreaterThanOrEqual(25);
    ring.close();
    munmap(address, PAGE_BYTES);
  });

  test("a full SQ refuses SQEs until submitted; an overflowing CQ loses nothing", () => {
    const ring = Ring.create({ entries: 4 });
    expect(ring.features & IORING_FEAT_NODROP).toBe(IORING_FEAT_NODROP);
    const total = 64; // 8× the CQ size, submitted without reaping
    const seen = new Set<number>();
    let next = 0;
    while (next < total) {
      let base = ring.getSqe();
      if (base < 0) {
        expect(ring.sqSpace()).toBe(0);
        expect(ring.submit()).toBe(ring.sqEntries);
        base = ring.getSqe();
      }
      ring.prepNop(base, next++);
    }
    expect(ring.submit()).toBeGreaterThanOrEqual(0);
    expect(ring.cqReady()).toBe(ring.cqEntries); // the CQ is full: the rest overflowed
    // Drain: the kernel keeps what did not fit in the CQ and flushes it as we make room.
    for (let rounds = 0; seen.size < total && rounds < 100; rounds++) {
      for (const [userData] of reap(ring)) seen.add(userData);
      ring.submit(0);
    }
    expect(seen.size).toBe(total);
    expect(ring.cqOverflowCount()).toBe(0);
    ring.close();
  });

  test("SQEs dropped since a mark never reach the kernel; a drop past a submit throws", () => {
    const ring = Ring.create({ entries: 8 });
    ring.prepNop(ring.getSqe(), 1); // kept: filled before the mark
    const mark = ring.sqeMark();
    for (let i = 0; i < 4; i++) ring.prepNop(ring.getSqe(), 100 + i);
    ring.dropSqesSince(mark);
    expect(ring.sqPending()).toBe(1);
    ring.prepNop(ring.getSqe(), 2);
    expect(ring.submit(2)).toBe(2);
    expect(reap(ring).map(([userData]) => userData)).toEqual([1, 2]);
    const late = ring.sqeMark();
    ring.prepNop(ring.getSqe(), 3);
    expect(ring.submit(1)).toBe(1);
    expect(() => ring.dropSqesSince(late)).toThrow("SQEs after the mark were submitted");
    expect(reap(ring).map(([userData]) => userData)).toEqual([3]);
    ring.close();
  });

  test("close() leaves no mapping and no fd", () => {
    const before = ringMappings();
    const ring = Ring.create({ entries: 64, flags: IORING_SETUP_SQE128 });
    expect(ringMappings()).toBeGreaterThan(before);
    const fd = ring.fd;
    expect(readlinkSync(`/proc/self/fd/${fd}`)).toContain("io_uring");
    ring.close();
    ring.close();
    expect(ringMappings()).toBe(before);
    expect(() => readlinkSync(`/proc/self/fd/${fd}`)).toThrow();
  });

  test("nextSqe() on a full SQ submits to make room, and returns the error when the kernel refuses the submit", () => {
    const ring = Ring.create({ entries: 4 });
    for (let i = 0; i < ring.sqEntries; i++) ring.prepNop(ring.nextSqe(), i);
    expect(ring.getSqe()).toBe(-1);
    const base = ring.nextSqe(); // submitted the four NOPs
    expect(base).toBeGreaterThanOrEqual(0);
    ring.prepNop(base, 4);
    for (let i = 1; i < ring.sqEntries; i++) ring.prepNop(ring.nextSqe(), 4 + i);
    // A ring whose fd is gone: every submit fails. nextSqe() must say so, not spin for ever.
    const fd = ring.fd;
    close(fd);
    const started = performance.now();
    expect(ring.nextSqe()).toBe(-EBADF);
    expect(performance.now() - started).toBeLessThan(5_000);
    (ring as unknown as { fd: number }).fd = -1; // already closed
    ring.close();
  });

  test("submit() enters again on -EAGAIN / -EBUSY while no completion is ready; with completions it returns them", () => {
    const ring = Ring.create({ entries: 4 });
    // The kernel gives these answers only when short of memory or request slots: a stand-in for io_uring_enter
    // answers them first, then the real one runs.
    const instance = ring as unknown as { enter: (...args: number[]) => number };
    const realEnter = instance.enter.bind(ring);
    let answers = [-EAGAIN, -EBUSY, -EAGAIN];
    let calls = 0;
    instance.enter = (...args: number[]) => {
      calls++;
      return answers.length > 0 ? answers.shift()! : realEnter(...args);
    };
    ring.prepNop(ring.getSqe(), 1);
    expect(ring.submit(1)).toBe(1);
    expect(calls).toBe(4);
    expect(reap(ring)).toEqual([[1, 0, 0]]);
    // With a completion waiting, -EBUSY goes back to the caller: it must reap first.
    ring.prepNop(ring.getSqe(), 2);
    expect(ring.submit(1)).toBe(1);
    ring.prepNop(ring.getSqe(), 3);
    answers = [-EBUSY];
    expect(ring.submit()).toBe(-EBUSY);
    expect(reap(ring)).toEqual([[2, 0, 0]]);
    expect(ring.submit(1)).toBe(1);
    expect(reap(ring)).toEqual([[3, 0, 0]]);
    // A kernel that keeps answering -EAGAIN: the error comes back after a bounded number of tries.
    instance.enter = () => -EAGAIN;
    ring.prepNop(ring.getSqe(), 4);
    expect(ring.submit()).toBe(-EAGAIN);
    ring.close();
  });
});

