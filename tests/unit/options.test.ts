import { describe, expect, test } from "bun:test";
import { createDevice } from "../../lib/index.ts";
import {
  parseDevId, parseInteger, parseLogicalBlockBytes, parseMaxIoBytes, parseNrQueues, isPollSetting, parsePollUs, parseQueueDepth, parseSize, parseSwitch, single, UsageError,
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
});
