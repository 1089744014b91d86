// USER_RECOVERY: kill -9 the daemon under fio, recover, and check what the application sees.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, expectFioClean, fioResult, ROOT, spawnPaused, ublkHolders, waitFor } from "./helpers.ts";

const work = "/tmp/ublk-bun-recovery";
beforeAll(() => {
  cleanUp();
  mkdirSync(work, { recursive: true });
});
afterEach(() => cleanUp()); // a failed test must not leave devices that fail the next one
afterAll(() => {
  cleanUp();
  rmSync(work, { recursive: true, force: true });
});

/** FAIL_IO (-e 1) exists from Linux 6.13; tests that need it report as skipped on older kernels. */
const features: string[] = JSON.parse(cliOk(["features", "--json"])).names;
const hasFailIo = features.includes("USER_RECOVERY_FAIL_IO");

function state(devId: number): string {
  const line = cliOk(["list", "-n", String(devId)]).split("\n")[1]!;
  return line.trim().split(/\s+/).at(-1)!;
}

function readsCompleted(devId: number): number {
  return Number(readFileSync(`/sys/block/ublkb${devId}/stat`, "utf8").trim().split(/\s+/)[0]);
}

interface KillTiming {
  killToQuiescedMs: number;
  recoverToLiveMs: number;
  recoverToFirstIoMs: number;
}

/** Starts fio on the device in the background with JSON output; see expectFioClean for how it ends. */
function startFio(devId: number, args: string[]) {
  return Bun.spawn(["fio", `--filename=/dev/ublkb${devId}`, ...args, "--output-format=json"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
}

/** A reader that runs until stopped: 4k direct random reads, one at a time. */
const PSYNC_READER = ["--name=r", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync", "--runtime=300", "--time_based"];

/** kill -9 the device's daemon and wait until the kernel has quiesced the device; returns the pid and kill time. */
async function killDaemon(devId: number): Promise<{ pid: number; killedAt: number }> {
  const pid = daemonPidOf(devId);
  const killedAt = performance.now();
  process.kill(pid, "SIGKILL");
  await waitFor("QUIESCED", () => state(devId) === "QUIESCED", 60_000);
  return { pid, killedAt };
}

/** kill -9 the daemon, wait for QUIESCED, run `recover`, and time it all; expects LIVE with a new pid. */
async function killAndRecover(devId: number, pauseMs = 500): Promise<KillTiming> {
  const { pid: oldPid, killedAt } = await killDaemon(devId);
  const quiescedAt = performance.now();
  await Bun.sleep(pauseMs);
  const readsBefore = readsCompleted(devId);
  let firstIoAt = 0;
  const watcher = (async () => {
    while (firstIoAt === 0) {
      if (readsCompleted(devId) > readsBefore) firstIoAt = performance.now();
      await Bun.sleep(10);
    }
  })();
  const recoverAt = performance.now();
  const recover = cli(["recover", "-n", String(devId)]);
  const liveAt = performance.now();
  expect(recover.stderr).toBe("");
  expect(recover.status).toBe(0);
  expect(state(devId)).toBe("LIVE");
  const newPid = daemonPidOf(devId);
  expect(newPid).not.toBe(oldPid);
  await Promise.race([watcher, Bun.sleep(10_000)]);
  if (firstIoAt === 0) firstIoAt = Number.NaN;
  return { killToQuiescedMs: quiescedAt - killedAt, recoverToLiveMs: liveAt - recoverAt, recoverToFirstIoMs: firstIoAt - recoverAt };
}

/** Waits for fio to end (by itself, or after our SIGINT); "hung" if it does not within `timeoutMs`. */
function report(name: string, timings: KillTiming[]): void {
  const fmt = (values: number[]) => values.map((v) => Math.round(v)).join("/");
  console.log(`${name}: kill→QUIESCED ms ${fmt(timings.map((t) => t.killToQuiescedMs))}; ` +
    `recover→LIVE ms ${fmt(timings.map((t) => t.recoverToLiveMs))}; recover→first I/O ms ${fmt(timings.map((t) => t.recoverToFirstIoMs))}`);
}

/** ublk_drv can be reloaded only in the test VM; on a real host other devices may be using it. */
const canReloadModule = process.env.UBLK_BUN_VM === "1" || process.env.UBLK_BUN_TEST_MODULE_RELOAD === "1";

describe("recovery", () => {
  test("reference scenario (shortened): fio reads while the daemon is killed 4× per round, 2 rounds with a module reload", async () => {
    const rounds = 2, kills = 4;
    const timings: KillTiming[] = [];
    if (!canReloadModule) console.log("note: ublk_drv is not reloaded between rounds outside the test VM");
    for (let round = 0; round < rounds; round++) {
      const devId = addDevice(["-t", "null", "-d", "4", "-i", "1"]);
      expect(devId).toBe(0);
      // The reference command (buffered psync reads), shortened.
      const fio = startFio(devId, ["--name=ref", "--bs=4k", "--runtime=300s", "--rw=read", "--time_based"]);
      for (let kill = 0; kill < kills; kill++) {
        await Bun.sleep(1000);
        expect(fio.exitCode).toBeNull(); // the kill lands while fio reads
        timings.push(await killAndRecover(devId));
      }
      await expectFioClean(fio);
      cliOk(["del", "-n", String(devId)]);
      expectClean();
      if (canReloadModule) {
        const reload = Bun.spawnSync(["sh", "-c", "modprobe -r ublk_drv && modprobe ublk_drv && test -e /dev/ublk-control"]);
        expect(reload.exitCode).toBe(0);
      }
    }
    report("reference scenario", timings);
  });

  // "file on a loop device": O_DIRECT through the ring, which is zero copy (AUTO_BUF_REG) where the kernel has it.
  for (const target of ["memory", "file", "file on a loop device"]) {
    test(`data integrity: fio crc32c write+verify on ${target} while the daemon is killed 3×`, async () => {
      const backing = join(work, "verify.img");
      if (target !== "memory") writeFileSync(backing, Buffer.alloc(64 << 20));
      const loop = target === "file on a loop device" ? Bun.spawnSync(["losetup", "-f", "--show", backing]).stdout.toString().trim() : "";
      if (loop !== "") expect(loop).toStartWith("/dev/loop");
      try {
        await verifyAcrossKills(target, target === "memory" ? ["-t", "memory", "-s", "64M"] : ["-t", "file", "-f", loop || backing]);
      } finally {
        if (loop !== "") Bun.spawnSync(["losetup", "-d", loop]);
      }
    });
  }

  async function verifyAcrossKills(target: string, addArgs: string[]): Promise<void> {
    const devId = addDevice([...addArgs, "-i", "1", "-q", "2"]);
    if (target === "file on a loop device") {
      expect(cliOk(["list", "-n", String(devId)])).toContain(`data path: ${features.includes("AUTO_BUF_REG") ? "zero copy" : "copy"}`);
    }
    const fio = startFio(devId, ["--name=verify", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=16",
      "--size=32M", "--time_based", "--runtime=300", "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1"]);
    const timings: KillTiming[] = [];
    for (let kill = 0; kill < 3; kill++) {
      await Bun.sleep(1500);
      expect(fio.exitCode).toBeNull(); // still running: the kill lands mid-run
      timings.push(await killAndRecover(devId, 200));
    }
    await expectFioClean(fio);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    report(`${target} verify`, timings);
  }

  test("-r 1 without REISSUE: requests the dead daemon held fail with EIO (6.12); later I/O waits for recover", async () => {
    // Requests held 20 ms by the daemon: the kill always lands while it holds some (a null target answers in
    // microseconds, so a kill could miss them all and no EIO would be due).
    const devId = addDevice(["-t", "fault", "-o", "base=null", "-o", "delayMs=20", "-r", "1", "-d", "32"]);
    const fio = startFio(devId, ["--name=eio", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=32",
      "--runtime=20", "--time_based"]);
    await Bun.sleep(1500);
    await killAndRecover(devId);
    const { status, stderr } = await fioResult(fio, 30_000);
    expect(status).not.toBe("hung");
    expect(status).not.toBe(0);
    expect(stderr).toMatch(/Input\/output error/);
    expect(state(devId)).toBe("LIVE");
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  for (const step of ["after-start-recovery", "before-end-recovery"]) {
    test(`the daemon killed during recover (${step}): a second recover succeeds, fio sees no error`, async () => {
      // No spare (--standby 0): this is about the daemon that `recover` starts.
      const devId = addDevice(["-t", "null", "-i", "1", "-q", "2", "-d", "16", "--standby", "0"]);
      const fio = startFio(devId, PSYNC_READER);
      await Bun.sleep(1000);
      const { pid: oldPid } = await killDaemon(devId);
      // Kill the recovering daemon while it pauses at `step`.
      const { child: slow, daemonPid: victim } = await spawnPaused(["recover", "-n", String(devId)], step, oldPid);
      process.kill(victim, "SIGKILL");
      expect(await slow.exited).not.toBe(0);
      const again = cli(["recover", "-n", String(devId)]);
      expect(again.stderr).toBe("");
      expect(again.status).toBe(0);
      expect(state(devId)).toBe("LIVE");
      await expectFioClean(fio);
      cliOk(["del", "-n", String(devId)]);
      expectClean();
    });
  }

  test("a second recover while one runs is refused in one line; another device recovers meanwhile; after a kill, recover works", async () => {
    const busyId = addDevice(["-t", "null", "-i", "1", "-d", "16", "--standby", "0"]); // its recover starts a daemon
    const otherId = addDevice(["-t", "memory", "-s", "16M", "-i", "1"]);
    const fio = startFio(busyId, PSYNC_READER);
    await Bun.sleep(1000);
    const { pid: oldPid } = await killDaemon(busyId);
    const { child: first, daemonPid: recovering } = await spawnPaused(["recover", "-n", String(busyId)], "after-start-recovery", oldPid);

    const second = cli(["recover", "-n", String(busyId)]);
    expect(second.status).not.toBe(0);
    expect(second.stderr.trim().split("\n")).toHaveLength(1);
    expect(second.stderr).toContain(`device ${busyId} is busy: pid ${recovering} is serving or recovering it`);

    // An unrelated device dies and is recovered while the first recover still holds its own device.
    await killDaemon(otherId);
    cliOk(["recover", "-n", String(otherId)]);
    expect(state(otherId)).toBe("LIVE");
    expect(state(busyId)).toBe("QUIESCED");

    process.kill(recovering, "SIGKILL");
    expect(await first.exited).not.toBe(0);
    const third = cli(["recover", "-n", String(busyId)]);
    expect(third.stderr).toBe("");
    expect(third.status).toBe(0);
    expect(state(busyId)).toBe("LIVE");
    await expectFioClean(fio);
    expect(cli(["del", "-a"]).status).toBe(0);
    expectClean();
  });

  test("--auto-recover: three kills under fio, no operator command, no fio error", async () => {
    const devId = addDevice(["-t", "memory", "-s", "32M", "-i", "1", "--auto-recover"]);
    const listed = cliOk(["list", "-n", String(devId)]);
    expect(listed).toMatch(/\tauto-recover supervisor: \d+\n/);
    const supervisor = Number(/auto-recover supervisor: (\d+)/.exec(listed)![1]);
    const fio = startFio(devId, ["--name=auto", "--rw=randrw", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
      "--runtime=300", "--time_based", "--verify=crc32c", "--verify_backlog=256"]);
    const recoveredMs: number[] = [];
    for (let kill = 0; kill < 3; kill++) {
      await Bun.sleep(1500);
      expect(fio.exitCode).toBeNull();
      const oldPid = daemonPidOf(devId);
      const killedAt = performance.now();
      process.kill(oldPid, "SIGKILL");
      await waitFor("a new daemon", () => {
        try { return state(devId) === "LIVE" && daemonPidOf(devId) !== oldPid; } catch { return false; }
      }, 60_000);
      recoveredMs.push(Math.round(performance.now() - killedAt));
    }
    console.log(`auto-recover: kill→LIVE ms ${recoveredMs.join("/")}`);
    expect(fio.exitCode).toBeNull();
    await expectFioClean(fio);
    cliOk(["del", "-n", String(devId)]);
    await waitFor("the supervisor to exit", () => !readdirSync("/proc").includes(String(supervisor)), 10_000);
    expectClean();
  });

  test("--auto-recover keeps a warm standby that owns nothing, takes over the moment the daemon dies, and is replaced", async () => {
    const devId = addDevice(["-t", "memory", "-s", "16M", "-i", "1", "--auto-recover"]);
    const standbyOf = () => Number(/\tstandby daemon: (\d+) /.exec(cliOk(["list", "-n", String(devId)]))?.[1] ?? 0);
    const readyLogged = (pid: number) => readFileSync("/run/ublk-bun/daemon.log", "utf8").includes(`device ${devId}: standby pid ${pid} is ready`);
    let standby = 0;
    await waitFor("a ready standby", () => (standby = standbyOf()) > 0 && readyLogged(standby), 60_000);
    const daemon = daemonPidOf(devId);
    expect(standby).not.toBe(daemon);
    // It holds neither /dev/ublkcN nor the device's lock: the kernel can quiesce the device when the daemon dies.
    expect(ublkHolders().map((holder) => Number(holder.split("/")[0]))).toEqual([daemon]);
    expect(readFileSync(`/run/ublk-bun/${devId}.lock`, "utf8").trim()).toBe(String(daemon));
    const fio = startFio(devId, ["--name=standby", "--rw=randrw", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
      "--runtime=300", "--time_based", "--verify=crc32c", "--verify_backlog=256"]);
    await Bun.sleep(1500);
    process.kill(daemon, "SIGKILL");
    try {
      await waitFor("the standby to serve", () => {
        try { return state(devId) === "LIVE" && daemonPidOf(devId) === standby; } catch { return false; }
      }, 30_000);
    } catch (error) {
      // Say what the supervisor and the standby did (how the zombie race checkRecoverable now handles was found).
      const log = readFileSync("/run/ublk-bun/daemon.log", "utf8").split("\n")
        .filter((line) => line.includes(`[${standby}]`) || line.includes("supervisor[")).slice(-15).join("\n");
      throw new Error(`${(error as Error).message}; state ${state(devId)}, daemon pid ${daemonPidOf(devId)}, standby ${standby}\n${log}`);
    }
    expect(readFileSync("/run/ublk-bun/daemon.log", "utf8")).toContain(`standby pid ${standby} took over`);
    // A new standby behind it.
    let next = 0;
    await waitFor("the next standby", () => (next = standbyOf()) > 0 && next !== standby && readyLogged(next), 60_000);
    await Bun.sleep(1000);
    expect(fio.exitCode).toBeNull();
    await expectFioClean(fio);
    cliOk(["del", "-n", String(devId)]);
    await waitFor("the standby to be gone", () => !readdirSync("/proc").includes(String(next)), 10_000);
    expectClean();
  });

  test.skipIf(!hasFailIo)("--auto-recover -e 1: the supervisor recovers a device from FAIL_IO; the data is intact (needs USER_RECOVERY_FAIL_IO, Linux ≥ 6.13)", async () => {
    const devId = addDevice(["-t", "memory", "-s", "8M", "-e", "1", "--auto-recover"]);
    const pattern = join(work, "fail-io-pattern");
    writeFileSync(pattern, randomBytes(1 << 20));
    const dd = (args: string[]) => Bun.spawnSync(["dd", ...args, "bs=64k", "count=16"], { stdin: "ignore" });
    expect(dd([`if=${pattern}`, `of=/dev/ublkb${devId}`, "oflag=direct"]).exitCode).toBe(0);
    const oldPid = daemonPidOf(devId);
    process.kill(oldPid, "SIGKILL");
    await waitFor("a new daemon", () => {
      try { return state(devId) === "LIVE" && daemonPidOf(devId) !== oldPid; } catch { return false; }
    }, 60_000);
    const back = join(work, "fail-io-back");
    expect(dd([`if=/dev/ublkb${devId}`, `of=${back}`, "iflag=direct"]).exitCode).toBe(0);
    expect(Buffer.compare(readFileSync(back), readFileSync(pattern))).toBe(0);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("del works on a QUIESCED device whose daemon is gone", async () => {
    const devId = addDevice(["-t", "null", "-i", "1"]);
    await killDaemon(devId);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("a queue Worker that fails (its target throws outside any request) takes the whole daemon down at once; recover brings the device back", async () => {
    // A throw in handleIo fails only that request (bad-target.test.ts); one from onTargetCqe ends the queue.
    const module = join(work, "crashy.ts");
    writeFileSync(module, `
import { nullTarget } from "${ROOT}/targets/null.ts";
import { IO_PENDING, TARGET_USER_DATA, type Target } from "${ROOT}/lib/index.ts";
let served = 0;
const target: Target = {
  ...nullTarget, name: "crashy",
  prepare: (options) => ({ ...nullTarget.prepare(options) as any, type: "crashy" }),
  openQueue(record, queue) {
    const inner = nullTarget.openQueue(record, queue) as any;
    return {
      handleIo(tag: number, op: number, flags: number, start: number, n: number) {
        if (queue.recovering || ++served !== 200) return inner.handleIo(tag, op, flags, start, n);
        queue.ring.prepNop(queue.getSqe(), tag, TARGET_USER_DATA);
        return IO_PENDING;
      },
      onTargetCqe() {
        throw new Error("crashy target: deliberate failure");
      },
    };
  },
};
export default target;
`);
    const devId = addDevice(["-t", module, "-i", "1", "-q", "2"]);
    const pid = daemonPidOf(devId);
    const dd = Bun.spawnSync(["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=100", "iflag=direct", "skip=1000"]);
    expect(dd.exitCode).toBe(0);
    const fio = startFio(devId, PSYNC_READER);
    await waitFor("the daemon to exit", () => !readdirSync("/proc").includes(String(pid)), 30_000);
    await waitFor("QUIESCED", () => state(devId) === "QUIESCED", 60_000);
    expect(readFileSync("/run/ublk-bun/daemon.log", "utf8")).toContain("deliberate failure");
    const recover = cli(["recover", "-n", String(devId)]);
    expect(recover.status).toBe(0);
    expect(fio.exitCode).toBeNull();
    await expectFioClean(fio);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});

describe("recover: clear errors", () => {
  test("-e 1 (FAIL_IO) is refused with a reason where the kernel lacks it, and works where it has it", () => {
    const features = JSON.parse(cliOk(["features", "--json"]));
    const run = cli(["add", "-t", "null", "-e", "1"]);
    if (features.names.includes("USER_RECOVERY_FAIL_IO")) {
      expect(run.status).toBe(0);
      expect(run.stdout).toMatch(/flags 0x[0-9a-f]*/);
      cliOk(["del", "-a"]);
    } else {
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(/no USER_RECOVERY_FAIL_IO \(it needs Linux ≥ 6\.13\)/);
    }
    expectClean();
  });

  test("no device, no record, LIVE device, device without recovery, record that does not match", async () => {
    let run = cli(["recover", "-n", "77"]);
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/no ublk device 77/);

    const plain = addDevice(["-t", "null"]);
    run = cli(["recover", "-n", String(plain)]);
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/is LIVE with daemon pid|created without recovery/);
    process.kill(daemonPidOf(plain), "SIGKILL");
    await Bun.sleep(1000);
    run = cli(["recover", "-n", String(plain)]);
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/created without recovery/);
    cliOk(["del", "-n", String(plain)]);

    const devId = addDevice(["-t", "null", "-i", "1", "-d", "16"]);
    run = cli(["recover", "-n", String(devId)]);
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/is LIVE with daemon pid \d+; nothing to recover/);
    await killDaemon(devId);
    const recordPath = `/run/ublk-bun/${devId}.json`;
    const original = readFileSync(recordPath, "utf8");
    const tampered = JSON.parse(original);
    tampered.target.sizeBytes *= 2;
    writeFileSync(recordPath, JSON.stringify(tampered));
    run = cli(["recover", "-n", String(devId)]);
    expect(run.status).not.toBe(0);
    expect(run.stderr.trim().split("\n")).toHaveLength(1);
    expect(run.stderr).toMatch(/does not match the kernel's params/);
    expect(state(devId)).toBe("QUIESCED");
    rmSync(recordPath);
    run = cli(["recover", "-n", String(devId)]);
    expect(run.stderr).toMatch(/has no record/);
    writeFileSync(recordPath, original, { mode: 0o600 });
    run = cli(["recover", "-n", String(devId)]);
    expect(run.status).toBe(0);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});
