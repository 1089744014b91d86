import { describe, expect, test } from "bun:test";
import { createDevice } from "../../lib/index.ts";
import {
  CLI_NAMES, parseDevId, parseDeviceShape, parseInteger, parseLogicalBlockBytes, parseMaxIoBytes, parseNrQueues, isPollSetting, parsePollUs, parseQueueDepth, parseSize, parseSwitch, single, UsageError,
} from "../../lib/options.ts";

describe("option parsing", () => {
  test("sizes with binary units", () => {
    expect(parseSize("-s", "4096")).toBe(4096);
    expect(parseSize("-s", "512K")).toBe(512 * 1024);
    expect(parseSize("-s", "10G")).toBe(10 * 1024 ** 3);
    expect(parseSize("-s", "1.5GiB")).toBe(1.5 * 1024 ** 3);
    expect(parseSize("-s", "2tb")).toBe(2 * 1024 ** 4);
    expect(parseSize("-s", 1024)).toBe(1024);
  });
  test("bad sizes name the flag", () => {
    for (const bad of ["", "0", "-1", "10X", "1.5", "G", "ten", "1e3", "0x10", "99999P"]) {
      expect(() => parseSize("-s", bad)).toThrow(UsageError);
    }
    expect(() => parseSize("--size", "10X")).toThrow(/^--size: "10X" is not a size/);
  });
  test("integers and ranges", () => {
    expect(parseInteger("-q", "4", 1, 8)).toBe(4);
    expect(() => parseInteger("-q", "0", 1, 8)).toThrow(/out of range \(1\.\.8\)/);
    expect(() => parseInteger("-q", "2.5", 1, 8)).toThrow(/not a whole number/);
    expect(() => parseInteger("-q", "abc", 1, 8)).toThrow(/not a whole number/);
    expect(parseQueueDepth("-d", 4096)).toBe(4096);
    expect(parsePollUs("--poll-us", "0")).toBe(0);
    expect(parsePollUs("--poll-us", 1_000_000)).toBe(1_000_000);
    expect(() => parsePollUs("--poll-us", 1_000_001)).toThrow(/out of range/);
    expect(parsePollUs("--poll-us", "auto")).toBe("auto");
    expect(() => parsePollUs("--poll-us", "Auto")).toThrow(/^--poll-us: "Auto" is neither auto nor a whole number of µs$/);
    expect([isPollSetting("auto"), isPollSetting(0), isPollSetting(250), isPollSetting(-1), isPollSetting("100"), isPollSetting(1.5)])
      .toEqual([true, true, true, false, false, false]);
    expect(() => parseQueueDepth("-d", 5000)).toThrow(/out of range/);
    expect(() => parseQueueDepth("-d", 0)).toThrow(/out of range/);
    expect(() => parseNrQueues("-q", 0)).toThrow(/out of range/);
    expect(parseDevId("-n", "1048575")).toBe(1048575);
    expect(() => parseDevId("-n", "1048576")).toThrow(/out of range/);
    expect(() => parseDevId("-n", "-1")).toThrow(/out of range/);
  });
  test("switches, block sizes, request sizes, repeats", () => {
    expect(parseSwitch("-r", undefined)).toBe(false);
    expect(parseSwitch("-r", 1)).toBe(true);
    expect(parseSwitch("-r", "0")).toBe(false);
    expect(() => parseSwitch("-r", 2)).toThrow(/out of range/);
    expect(() => parseSwitch("-r", true)).toThrow(/needs a value/);
    expect(parseLogicalBlockBytes("-b", 4096)).toBe(4096);
    expect(() => parseLogicalBlockBytes("-b", 3000)).toThrow(/power of two/);
    expect(() => parseLogicalBlockBytes("-b", 8192)).toThrow(/out of range/);
    expect(parseMaxIoBytes("--max-io-size", "1M")).toBe(1024 * 1024);
    expect(() => parseMaxIoBytes("--max-io-size", "1000")).toThrow(/multiple of 4K/);
    expect(() => single("-n", [1, 2])).toThrow(/more than once/);
  });
});

describe("embedding options", () => {
  test("createDevice refuses a bad pollUs before it touches the kernel", async () => {
    await expect(createDevice({ target: "null", pollUs: -1 })).rejects.toThrow(/^pollUs: -1 is out of range \(0\.\.1000000\)$/);
    await expect(createDevice({ target: "null", pollUs: 1.5 })).rejects.toThrow(/^pollUs: "1\.5" is neither auto nor a whole number of µs$/);
  });
  test("createDevice validates with the CLI's rules before it touches the kernel", async () => {
    // The kernel's queue_depth is a u16: 65537 would have become 1.
    await expect(createDevice({ target: "null", depth: 65537 })).rejects.toThrow(/^depth: 65537 is out of range \(1\.\.4096\)$/);
    await expect(createDevice({ target: "null", depth: 0 })).rejects.toThrow(/^depth: 0 is out of range/);
    await expect(createDevice({ target: "null", queues: 1.5 })).rejects.toThrow(/^queues: "1\.5" is not a whole number$/);
    await expect(createDevice({ target: "null", devId: 1 << 20 })).rejects.toThrow(/^devId: 1048576 is out of range/);
    await expect(createDevice({ target: "null", maxIoBytes: 1000 })).rejects.toThrow(/^maxIoBytes: must be a multiple of 4K/);
    await expect(createDevice({ target: "null", maxIoBytes: 64 << 20 })).rejects.toThrow(/^maxIoBytes: must be a multiple of 4K between 4K and 32M$/);
    await expect(createDevice({ target: "null", targetOptions: { logicalBlockBytes: 3000 } })).rejects.toThrow(/^targetOptions\.logicalBlockBytes: 3000 is not a power of two/);
    await expect(createDevice({ target: "null", targetOptions: { sizeBytes: 1000, logicalBlockBytes: 4096 } }))
      .rejects.toThrow(/^targetOptions\.sizeBytes: size must be a multiple of the logical block size \(4096\)$/);
    await expect(createDevice({ target: "null", targetOptions: { sizeBytes: -4096 } })).rejects.toThrow(/^targetOptions\.sizeBytes: "-4096" is not a size/);
    await expect(createDevice({ target: "null", recovery: "always" as never })).rejects.toThrow(/^recovery: "always" is not one of "none", "recover", "reissue"$/);
    await expect(createDevice({ target: "null", dataMode: "zero-copy" as never })).rejects.toThrow(/^dataMode: "zero-copy" is not one of/);
    await expect(createDevice({ target: "null", zeroCopy: "yes" as never })).rejects.toThrow(/^zeroCopy: "yes" is not true or false$/);
    await expect(createDevice({ target: "null", zeroCopy: true, dataMode: "user-copy" })).rejects.toThrow(/^zeroCopy: cannot be combined with dataMode "user-copy"$/);
  });
  test("parseDeviceShape fills in the defaults", () => {
    expect(parseDeviceShape({}, CLI_NAMES)).toEqual({ devId: -1, nrHwQueues: 1, queueDepth: 128, maxIoBufBytes: 512 * 1024, pollUs: "auto" });
    expect(parseDeviceShape({ devId: "3", depth: "64", sizeBytes: "1G", logicalBlockBytes: "4096" }, CLI_NAMES))
      .toMatchObject({ devId: 3, queueDepth: 64, sizeBytes: 1 << 30, logicalBlockBytes: 4096 });
    expect(() => parseDeviceShape({ depth: 65537 }, CLI_NAMES)).toThrow(/^-d: 65537 is out of range/);
  });
});
