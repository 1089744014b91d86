// A target that breaks its contract (tests/kernel/fixtures/bad-target.ts), seen through the real device: the bad
// request fails with EIO, every other request still works, the daemon stays up and idle, and `del` cleans up.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createDevice } from "../../lib/index.ts";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, fio, waitFor } from "./helpers.ts";

const BAD_TARGET = join(import.meta.dir, "fixtures/bad-target.ts");
const LOG = join(process.env.UBLK_BUN_RUN_DIR || "/run/ublk-bun", "daemon.log");

beforeAll(() => cleanUp());
afterEach(() => cleanUp());

const logText = () => (existsSync(LOG) ? readFileSync(LOG, "utf8") : "");
/** What the daemon log gained since `fromLength`. */
const logSince = (fromLength: number) => logText().slice(fromLength);
const alive = (pid: number) => readdirSync("/proc").includes(String(pid));

/** CPU time (user + system, in clock ticks, all threads) the process used over `ms`. */
async function cpuTicksOver(pid: number, ms: number): Promise<number> {
  const ticks = () => {
    const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
    return Number(fields[11]) + Number(fields[12]); // utime, stime (fields 14 and 15 of stat)
  };
  const before = ticks();
  await Bun.sleep(ms);
  return ticks() - before;
}

/** One dd of `count` 512-byte sectors at `sector` (direct I/O); resolves with its status and stderr. */
async function dd(devId: number, write: boolean, sector: number, count = 1, timeoutMs = 60_000) {
  const args = write
    ? ["dd", "if=/dev/urandom", `of=/dev/ublkb${devId}`, "bs=512", `seek=${sector}`, `count=${count}`, "oflag=direct"]
    : ["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=512", `skip=${sector}`, `count=${count}`, "iflag=direct"];
  const child = Bun.spawn(args, { stdout: "ignore", stderr: "pipe", timeout: timeoutMs });
  const status = await child.exited;
  return { status, stderr: await new Response(child.stderr).text() };
}

/** The request at sector 8 fails with EIO, its neighbours work, the daemon is alive and idle, `del` cleans up. */
async function expectOnlyBadRequestFails(devId: number, write: boolean) {
  const pid = daemonPidOf(devId);
  const bad = await dd(devId, write, 8);
  expect([bad.status, bad.stderr]).toEqual([1, expect.stringContaining("Input/output error")]);
  for (const sector of [0, 16, 1000]) expect((await dd(devId, write, sector, 8)).status).toBe(0);
  expect((await dd(devId, !write, 8)).status).toBe(0); // the other direction on the same sector
  expect(alive(pid)).toBe(true);
  expect(await cpuTicksOver(pid, 1000)).toBeLessThan(30); // not spinning (100 ticks = one CPU busy)
  cliOk(["del", "-n", String(devId)]);
  expectClean();
}

describe("a target returning a bad result", () => {
  for (const [bad, op] of [["zero", "write"], ["zero", "read"], ["nan", "read"], ["undefined", "write"], ["float", "read"], ["huge", "write"]] as const) {
    test(`${bad} for a ${op}: EIO for that request and one log line naming the target; no livelock`, async () => {
      const logStart = logText().length;
      const devId = addDevice(["-t", BAD_TARGET, "-o", "badSector=8", "-o", `bad=${bad}`, "-o", `badOp=${op}`]);
      await expectOnlyBadRequestFails(devId, op === "write");
      const lines = logSince(logStart).split("\n").filter((line) => line.includes("failing the request with EIO"));
      expect(lines).toHaveLength(1);
      expect(lines[0]).toContain(`target "${BAD_TARGET}" returned`);
      expect(lines[0]).toContain(`for a ${op.toUpperCase()} of 512 bytes`);
    });
  }
});

describe("a target that throws", () => {
  test("on one sector: that request fails with EIO, the daemon lives on", async () => {
    const logStart = logText().length;
    const devId = addDevice(["-t", BAD_TARGET, "-o", "badSector=8", "-o", "bad=throw", "-o", "badOp=read"]);
    await expectOnlyBadRequestFails(devId, false);
    expect(logSince(logStart)).toContain("threw on a READ at sector 8: bad target: throwing on sector 8; failing the request with EIO");
  });

  test("on every request of one sector with -i 1 --auto-recover: no crash loop, the same daemon serves on", async () => {
    const devId = addDevice(["-t", BAD_TARGET, "-o", "badSector=8", "-o", "bad=throw", "-o", "badOp=read", "-i", "1", "--auto-recover"]);
    const pid = daemonPidOf(devId);
    for (let i = 0; i < 3; i++) expect((await dd(devId, false, 8)).status).toBe(1);
    expect((await dd(devId, false, 0, 8)).status).toBe(0);
    expect(daemonPidOf(devId)).toBe(pid);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});

describe("a target that completes a request twice", () => {
  for (const mode of ["doubleComplete", "lateComplete"]) {
    test(`-o ${mode}=7: the extra completions are refused and logged; fio verify finds every byte`, () => {
      const logStart = logText().length;
      const devId = addDevice(["-t", BAD_TARGET, "-o", `${mode}=7`, "-d", "16"]);
      const pid = daemonPidOf(devId);
      const result = fio(["--name=twice", `--filename=/dev/ublkb${devId}`, "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=io_uring",
        "--iodepth=8", "--size=4m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"], 120_000);
      expect([result.status, result.errors]).toEqual([0, 0]);
      expect(alive(pid)).toBe(true);
      const log = logSince(logStart);
      expect(log).toMatch(new RegExp(`queue 0 tag \\d+: target "${BAD_TARGET}" completed a request that was already completed \\(result \\d+\\); ignored`));
      expect(log).not.toContain("refused its io command");
      cliOk(["del", "-n", String(devId)]);
      expectClean();
    });
  }
});

describe("the kernel refusing an io command", () => {
  // The trigger: the target sends a second FETCH_REQ for a tag the queue has already fetched, which ublk_drv
  // refuses. The queue sees a failed io command for that tag, as it would for any refusal. Per-tag commands
  // (--batch 0) on every kernel: a batch device refuses every FETCH_REQ, and the batch transport's refusals are
  // tested on the host (tests/ring/command-transport.test.ts).
  // A queue's failure reaches the main thread a little after the kernel's refusal: the daemon pauses 2 s after
  // START_DEV so that it surely has. (Without the pause either outcome may happen, this one or the next test's.)
  test("during START_DEV (the partition scan's first read): add fails with one line naming tag and errno; nothing is left", () => {
    const run = cli(["add", "-t", BAD_TARGET, "-o", "dupFetch=1", "--batch", "0"], { UBLK_BUN_TEST_PAUSE: "before-live:2000" });
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/^ublk-bun: .*queue 0 tag \d+: the kernel refused its io command with EBUSY \(-16\)\n$/);
    expectClean();
  });

  // The daemon pauses 7 s before it reports: on 6.12 the kernel's monitor work (every 5 s) has stopped the
  // device by then, its queue thread being gone. A stopped device once read as "del stopped it", and the daemon
  // deleted the device and its record without a word; it must stay for `del`, with the failure in the log.
  test("after start: the daemon ends with a message naming the tag and errno; the device stays for del, which cleans up", async () => {
    const logStart = logText().length;
    const devId = addDevice(["-t", BAD_TARGET, "-o", "dupFetchSector=4096", "--batch", "0"], { UBLK_BUN_TEST_PAUSE: "on-fatal:7000" });
    const pid = daemonPidOf(devId);
    await dd(devId, false, 4096, 1, 30_000);
    await waitFor("the daemon to exit", () => !alive(pid), 30_000);
    const log = logSince(logStart);
    expect(log).toMatch(/device \d+: queue 0: queue 0 tag \d+: the kernel refused its io command with EBUSY \(-16\); exiting/);
    expect(log).not.toContain("at serveUntilRetired"); // one line, not a stack trace
    expect(cliOk(["list", "-n", String(devId)])).toContain(`dev id ${devId}:`);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});

describe("stopping while the target holds requests", () => {
  test("a request held for 3 s: del waits for it, the reader gets its data", async () => {
    const devId = addDevice(["-t", BAD_TARGET, "-o", "badSector=8", "-o", "bad=hold", "-o", "holdMs=3000"]);
    const reader = dd(devId, false, 8);
    await Bun.sleep(1000);
    const del = cli(["del", "--force", "-n", String(devId)]); // dd holds the device open: plain del refuses
    expect([del.status, del.stderr]).toEqual([0, ""]);
    expect((await reader).status).toBe(0);
    expectClean();
  });

  // STOP_DEV itself waits for the held request (del_gendisk drains the disk): the server gives up on it after
  // 30 s, then tells its queues to stop; the queue fails the request its target still holds (after 2 s), so the
  // kernel can finish the stop and DEL_DEV can release the device, and keeps that tag's buffer mapped. (Before,
  // the queue left at once and closing its ring made the kernel fail the request: this passed then too, and
  // stays as a check of the bounded stop.) Through `del` the daemon is SIGKILLed after 30 s instead; on 6.12
  // that exit was seen to hang behind the STOP_DEV still waiting in the kernel — not tested here.
  test("a request never completed, BlockDevice.stop(): the queue fails it with EIO, stop() resolves, nothing is left", async () => {
    const fatal: Error[] = [];
    const device = await createDevice({ target: BAD_TARGET, targetOptions: { badSector: 8, bad: "hold", holdMs: 0 }, onFatal: (error) => fatal.push(error) });
    const reader = dd(device.devId, false, 8, 1, 150_000);
    await Bun.sleep(1000);
    const started = Date.now();
    await device.stop();
    expect(Date.now() - started).toBeLessThan(120_000);
    const read = await reader;
    expect([read.status, read.stderr]).toEqual([1, expect.stringContaining("Input/output error")]);
    expect(fatal).toEqual([]);
    expectClean();
  }, 200_000);

  test("a target whose openQueue never returns: add fails within the bound, naming the wait; nothing is left", () => {
    const started = Date.now();
    const run = cli(["add", "-t", BAD_TARGET, "-o", "openHangs=1"]);
    expect(run.status).not.toBe(0);
    expect(run.stderr).toContain("did not fetch its tags within 30 s");
    expect(Date.now() - started).toBeLessThan(100_000);
    expectClean();
  });
});
