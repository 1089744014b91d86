// The first block device: `add -t null`, fio and dd on /dev/ublkbN, list, del — through the CLI, as a user would.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { close, memoryAt, mmapAnonymous, munmap, O_DIRECT, O_RDWR, open, PAGE_BYTES, pread, pwrite } from "../../ffi/libc.ts";
import { ublkFeatureNames } from "../../ffi/uapi/ublk_cmd.ts";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, defaultCommands, expectClean, fio, records, ublkNodes, waitFor } from "./helpers.ts";

beforeAll(() => cleanUp());
afterAll(() => cleanUp());

describe("null target through the CLI", () => {
  for (const queues of [1, 2]) {
    test(`fio 4k randread/randwrite at QD1 and QD64 on ${queues} queue(s): no errors`, () => {
      const devId = addDevice(["-t", "null", "-q", String(queues)]);
      try {
        for (const rw of ["randread", "randwrite"]) {
          for (const depth of [1, 64]) {
            const result = fio([`--name=${rw}${depth}`, `--filename=/dev/ublkb${devId}`, `--rw=${rw}`, "--bs=4k", "--direct=1",
              "--ioengine=io_uring", `--iodepth=${depth}`, "--runtime=2", "--time_based", `--numjobs=${queues}`, "--size=1G"]);
            expect({ rw, depth, status: result.status, errors: result.errors }).toEqual({ rw, depth, status: 0, errors: 0 });
            expect(result.iops).toBeGreaterThan(100);
          }
        }
      } finally {
        cliOk(["del", "-n", String(devId)]);
      }
      expectClean();
    });
  }

  for (const [mode, flag] of [["USER_COPY", "-u"], ["NEED_GET_DATA", "-g"]]) {
    test(`${mode} data mode: fio randrw with writes and reads, no errors`, () => {
      const devId = addDevice(["-t", "null", flag!, "-q", "2"]);
      try {
        const listed = JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0];
        const bit = mode === "USER_COPY" ? 1 << 7 : 1 << 2;
        expect(listed.flags & bit).toBe(bit);
        const result = fio(["--name=mixed", `--filename=/dev/ublkb${devId}`, "--rw=randrw", "--bs=4k,64k", "--direct=1",
          "--ioengine=io_uring", "--iodepth=16", "--runtime=2", "--time_based", "--numjobs=2"]);
        expect({ status: result.status, errors: result.errors }).toEqual({ status: 0, errors: 0 });
        expect(result.iops).toBeGreaterThan(100);
      } finally {
        cliOk(["del", "-n", String(devId)]);
      }
      expectClean();
    });
  }

  test("by default USER_COPY and no copy at all: a write is discarded, a read leaves the reader's buffer as it was", () => {
    const devId = addDevice(["-t", "null"]);
    const written = mmapAnonymous(PAGE_BYTES), readInto = mmapAnonymous(PAGE_BYTES);
    const fd = open(`/dev/ublkb${devId}`, O_RDWR | O_DIRECT);
    try {
      expect(JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].flags & (1 << 7)).toBe(1 << 7);
      new Uint8Array(memoryAt(written, PAGE_BYTES)).fill(0x5a);
      const buffer = new Uint8Array(memoryAt(readInto, PAGE_BYTES)).fill(0xa5);
      expect(pwrite(fd, written, PAGE_BYTES, 0)).toBe(PAGE_BYTES);
      expect(pread(fd, readInto, PAGE_BYTES, 0)).toBe(PAGE_BYTES);
      expect(buffer.every((byte) => byte === 0xa5)).toBe(true);
    } finally {
      close(fd);
      munmap(written, PAGE_BYTES);
      munmap(readInto, PAGE_BYTES);
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("dd reads 1 GiB", () => {
    const devId = addDevice(["-t", "null", "-s", "2G"]);
    try {
      const dd = Bun.spawnSync(["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=1M", "count=1024", "iflag=direct"]);
      expect(dd.exitCode).toBe(0);
      expect(dd.stderr.toString()).toContain("1024+0 records out");
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("list shows LIVE, the daemon pid, the queues and the target; --json parses", () => {
    const devId = addDevice(["-t", "null", "-q", "2", "-d", "32", "-s", "1G"]);
    const text = cliOk(["list", "-n", String(devId)]);
    const lines = text.trimEnd().split("\n");
    expect(lines[0]).toBe(`dev id ${devId}: nr_hw_queues 2 queue_depth 32 block size 512 dev_capacity 2097152`);
    expect(lines[1]).toMatch(/^\tmax rq size 524288 daemon pid \d+ flags 0x[0-9a-f]+ state LIVE$/);
    // The flags by name, from the mask of the line above (the kernel adds some of its own, e.g. CMD_IOCTL_ENCODE).
    const flagsMask = Number(/flags (0x[0-9a-f]+)/.exec(lines[1]!)![1]);
    expect(lines[2]).toBe(`\tflag names: ${ublkFeatureNames(flagsMask).join(" ")}`);
    expect(lines[2]).toContain(" CMD_IOCTL_ENCODE");
    expect(lines[3]).toMatch(/^\tublkc: \d+:\d+ ublkb: \d+:\d+ owner: 0:0$/);
    expect(lines[4]).toMatch(/^\tqueue 0: tid \d+ affinity\([\d ]+\)$/);
    expect(lines[5]).toMatch(/^\tqueue 1: tid \d+ affinity\([\d ]+\)$/);
    expect(lines[6]).toStartWith("\ttarget {");
    expect(lines[7]).toBe(`\tdata path: user copy, ${defaultCommands()}`); // the null target prefers USER_COPY
    const pid = daemonPidOf(devId);
    expect(existsSync(`/proc/${pid}`)).toBe(true);
    const json = JSON.parse(cliOk(["list", "--json"]));
    const mine = json.find((entry: any) => entry.devId === devId);
    expect(mine).toMatchObject({ state: "LIVE", daemonPid: pid, nrHwQueues: 2, queueDepth: 32, devSectors: 2097152 });
    expect(mine.flagNames).toEqual(ublkFeatureNames(mine.flags));
    expect(mine.dataPath).toBe(`user copy, ${defaultCommands()}`);
    expect(mine.queues.every((queue: any) => queue.tid > 0)).toBe(true);
    // The queue threads really are threads of the daemon, named after their device and queue.
    // A queue whose kernel CPU set is a single CPU is not pinned there (it would take turns with the submitter).
    const allowed = (tid: number) => /Cpus_allowed_list:\s*(\S+)/.exec(readFileSync(`/proc/${pid}/task/${tid}/status`, "utf8"))![1];
    for (const queue of mine.queues) {
      expect(readFileSync(`/proc/${pid}/task/${queue.tid}/comm`, "utf8")).toBe(`ublk${devId}q${queue.qId}\n`);
      if (queue.cpus.length === 1) expect(allowed(queue.tid)).toBe(allowed(pid));
    }
    if (navigator.hardwareConcurrency === 2) expect(mine.queues.map((queue: any) => queue.cpus.length)).toEqual([1, 1]);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("SIGTERM to the daemon stops and deletes the device", async () => {
    const devId = addDevice(["-t", "null"]);
    const pid = daemonPidOf(devId);
    process.kill(pid, "SIGTERM");
    await waitFor("the device to go", () => !existsSync(`/dev/ublkc${devId}`));
    await waitFor("the record to go", () => records().length === 0);
    expectClean();
  });

  test("20 add/del cycles leave no device, record or open ublk fd", () => {
    const ownFds = readdirSync("/proc/self/fd").length;
    for (let cycle = 0; cycle < 20; cycle++) {
      const devId = addDevice(["-t", "null", "-q", "2", "-d", "16"]);
      expect(ublkNodes().length).toBeGreaterThan(0);
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
    expect(readdirSync("/proc/self/fd").length).toBe(ownFds);
  });
});

describe("bad input: one line, non-zero exit, nothing left", () => {
  const cases: Array<[string, string[], RegExp]> = [
    ["unknown target", ["add", "-t", "nosuch"], /unknown target type "nosuch"/],
    ["-q 0", ["add", "-t", "null", "-q", "0"], /-q: 0 is out of range/],
    ["-d 0", ["add", "-t", "null", "-d", "0"], /-d: 0 is out of range/],
    ["-d 5000", ["add", "-t", "null", "-d", "5000"], /-d: 5000 is out of range/],
    ["non-numeric size", ["add", "-t", "null", "-s", "lots"], /-s: "lots" is not a size/],
    ["zero size", ["add", "-t", "null", "-s", "0"], /-s: size must be greater than zero/],
    ["missing type", ["add"], /-t TYPE is required/],
    ["unknown flag", ["add", "-t", "null", "--frobnicate"], /^ublk-bun: add: unknown option --frobnicate \(try: ublk-bun add --help\)$/m],
    ["del of a missing id", ["del", "-n", "4242"], /no ublk device 4242/],
    ["del without id", ["del"], /-n ID or -a is required/],
    ["bad id", ["list", "-n", "abc"], /-n: "abc" is not a whole number/],
    ["id out of range", ["add", "-t", "null", "-n", "1048576"], /-n: 1048576 is out of range \(0\.\.1048575\)/],
    ["recover of an id out of range", ["recover", "-n", "99999999"], /-n: 99999999 is out of range/],
    ["del of a bad id", ["del", "-n", "x"], /-n: "x" is not a whole number/],
    ["size with a bad suffix", ["add", "-t", "null", "-s", "10Q"], /-s: "10Q" is not a size/],
    ["block size not a power of two", ["add", "-t", "null", "-b", "1000"], /-b: 1000 is not a power of two/],
    ["zero max I/O size", ["add", "-t", "null", "--max-io-size", "0"], /--max-io-size: size must be greater than zero/],
    ["-r 2", ["add", "-t", "null", "-r", "2"], /-r: 2 is out of range \(0\.\.1\)/],
    ["-i yes", ["add", "-t", "null", "-i", "yes"], /-i: "yes" is not a whole number/],
    ["negative poll time", ["add", "-t", "null", "--poll-us=-1"], /--poll-us: -1 is out of range \(0\.\.1000000\)/],
    ["poll time in seconds", ["add", "-t", "null", "--poll-us", "2s"], /--poll-us: "2s" is neither auto nor a whole number of µs/],
    ["a flag given twice", ["add", "-t", "null", "-d", "12", "-d", "14"], /-d given more than once/],
  ];
  for (const [name, args, message] of cases) {
    test(name, () => {
      const run = cli(args);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(message);
      expect(run.stderr).not.toContain("    at "); // no stack trace
      expectClean();
    });
  }

  test("-n of a busy id", () => {
    const devId = addDevice(["-t", "null", "-n", "3"]);
    expect(devId).toBe(3);
    const run = cli(["add", "-t", "null", "-n", "3"]);
    expect(run.status).not.toBe(0);
    expect(run.stderr.trim().split("\n")).toHaveLength(1);
    expect(run.stderr).toMatch(/already in use/);
    expect(cliOk(["list"]).match(/^dev id /gm)).toHaveLength(1);
    cliOk(["del", "-n", "3"]);
    expectClean();
  });

  test("add without ublk_drv (control path elsewhere)", () => {
    const run = cli(["add", "-t", "null"], { UBLK_BUN_CONTROL: "/nonexistent/ublk-control" });
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/ublk_drv is not loaded/);
    expectClean();
  });

  test("add as a non-root user", () => {
    const run = Bun.spawnSync(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", process.execPath,
      `${import.meta.dir}/../../bin/ublk-bun.ts`, "add", "-t", "null"], { env: { ...process.env, UBLK_BUN_RUN_DIR: "/tmp/ublk-bun-nobody" } });
    const stderr = run.stderr.toString();
    expect(run.exitCode).not.toBe(0);
    expect(stderr.trim().split("\n")).toHaveLength(1);
    expect(stderr).toMatch(/permission denied \(run as root, or open it to users for --unprivileged\)/);
    expectClean();
  });
});

