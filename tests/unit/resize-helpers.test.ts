// Host-side pieces of resize and safe delete: the queue mapping that follows a grown file, and device numbers.
import { afterAll, describe, expect, test } from "bun:test";
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { memoryAt, PROT_READ, PROT_WRITE } from "../../ffi/libc.ts";
import { FileMapping } from "../../targets/mapping.ts";
import { busyReasons, deviceNumber } from "../../lib/safe-delete.ts";

const work = mkdtempSync("/tmp/ublk-bun-unit-");
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe("FileMapping", () => {
  test("covers what is mapped; remaps once the file has grown; 0 past the end of the file", () => {
    const path = join(work, "image");
    writeFileSync(path, Buffer.alloc(8192, 7));
    const fd = openSync(path, "r+");
    const mapping = new FileMapping(fd, path, 8192, PROT_READ | PROT_WRITE);
    try {
      const first = mapping.cover(8192);
      expect(first).toBeGreaterThan(0);
      expect(mapping.cover(4096)).toBe(first);
      expect(mapping.cover(8193)).toBe(0); // the file is not longer: no mapping past its end (SIGBUS)
      ftruncateSync(fd, 65536);
      const grown = mapping.cover(65536);
      expect(grown).toBeGreaterThan(0);
      expect(mapping.bytes).toBe(65536);
      const bytes = new Uint8Array(memoryAt(grown, 65536));
      expect(bytes[8191]).toBe(7); // the old bytes, seen through the new mapping
      expect(bytes[8192]).toBe(0);
      bytes[65535] = 9;
      expect(mapping.cover(65537)).toBe(0);
    } finally {
      mapping.close();
      closeSync(fd);
    }
    expect(statSync(path).size).toBe(65536);
  });
});

describe("safe delete", () => {
  test("deviceNumber encodes major:minor as stat's rdev does", () => {
    expect(deviceNumber(1, 3)).toBe(statSync("/dev/null").rdev);
    expect(deviceNumber(5, 0)).toBe(statSync("/dev/tty").rdev);
    expect(deviceNumber(259, 300)).toBe((259 << 8) | 44 | (256 << 12));
    expect(deviceNumber(4100, 0)).toBe(4 * 256 + 2 ** 44);
  });
  test("a disk that does not exist is in use by nobody", () => {
    expect(busyReasons(987654)).toEqual([]);
  });
});
