// What the queue loop accepts from a target and from the kernel, as pure decisions (lib/queue-worker.ts).
import { describe, expect, test } from "bun:test";
import { classifyIoCqe, IO_CQE_FAILED, IO_CQE_GET_DATA, IO_CQE_RETIRE, IO_CQE_SERVE } from "../../lib/command-transport.ts";
import { isValidResult } from "../../lib/queue-worker.ts";
import { EAGAIN, EBUSY, EINVAL, EIO, ENODEV, ENOSPC } from "../../ffi/errno.ts";

const READ = 0, WRITE = 1, FLUSH = 2, DISCARD = 3, WRITE_ZEROES = 5;

describe("target results", () => {
  test("READ / WRITE: 0 < bytes ≤ the request's, or -errno", () => {
    for (const op of [READ, WRITE]) {
      for (const good of [4096, 512, 1, -EIO, -ENOSPC, -4095]) expect([op, good, isValidResult(op, 4096, good)]).toEqual([op, good, true]);
      for (const bad of [0, 4097, 1.5, NaN, undefined, -0.5, -4096, 2 ** 32, Infinity, "4096", null]) {
        expect([op, bad, isValidResult(op, 4096, bad as number)]).toEqual([op, bad, false]);
      }
    }
  });

  test("FLUSH / DISCARD / WRITE_ZEROES: 0 or -errno", () => {
    for (const op of [FLUSH, DISCARD, WRITE_ZEROES]) {
      for (const good of [0, -EIO]) expect(isValidResult(op, 0, good)).toBe(true);
      for (const bad of [1, 4096, NaN, undefined, 0.25]) expect([op, bad, isValidResult(op, 4096, bad as number)]).toEqual([op, bad, false]);
    }
  });
});

describe("io command completions", () => {
  test("only -ENODEV (UBLK_IO_RES_ABORT) retires a tag; any other error is a failure", () => {
    expect(classifyIoCqe(0)).toBe(IO_CQE_SERVE);
    expect(classifyIoCqe(1)).toBe(IO_CQE_GET_DATA);
    expect(classifyIoCqe(-ENODEV)).toBe(IO_CQE_RETIRE);
    for (const res of [-EINVAL, -EBUSY, -EAGAIN, -EIO, -1, 2]) expect([res, classifyIoCqe(res)]).toEqual([res, IO_CQE_FAILED]);
  });
});
