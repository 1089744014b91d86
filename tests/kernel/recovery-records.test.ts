// Recovery's bookkeeping: the record holds what the kernel granted, a recover never deletes the device it
// recovered over a record write, `del` and a recover in progress do not race, and a failed `add --auto-recover`
// leaves no process and nothing else behind.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { addDevice, cleanUp, cli, cliOk, CLI, daemonPidOf, expectClean, expectFioClean, records, ROOT, spawnPaused, ublkNodes, waitFor } from "./helpers.ts";

const work = "/tmp/ublk-bun-recovery-records";
const runDir = "/run/ublk-bun";
const logPath = join(runDir, "daemon.log");

beforeAll(() => {
  cleanUp();
  mkdirSync(work, { recursive: true });
});
afterEach(() => cleanUp());
afterAll(() => {
  cleanUp();
  rmSync(work, { recursive: true, force: true });
});

function listJson(devId: number): any {
  return JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0];
}

function state(devId: number): string {
  return listJson(devId).state;
}

function recordOf(devId: number): any {
  return JSON.parse(readFileSync(join(runDir, `${devId}.json`), "utf8"));
}

/** Alive and not a zombie (PID 1 in the VM may be slow to reap orphans). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const processState = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return processState !== "Z" && processState !== "X";
  } catch {
    return false;
  }
}

/** Live processes running our daemon or supervisor. */
function ourProcesses(): number[] {
  return readdirSync("/proc").filter((name) => /^\d+$/.test(name)).map(Number).filter((pid) => {
    try {
      const commandLine = readFileSync(`/proc/${pid}/cmdline`, "utf8");
      return (commandLine.includes("lib/daemon.ts") || commandLine.includes("lib/supervisor.ts")) && alive(pid);
    } catch {
      return false;
    }
  });
}

function shmFiles(): string[] {
  return readdirSync("/dev/shm").filter((name) => name.startsWith("ublk-bun-memory-"));
}

async function killDaemon(devId: number, pid = daemonPidOf(devId)): Promise<number> {
  process.kill(pid, "SIGKILL");
  await waitFor("QUIESCED", () => state(devId) === "QUIESCED", 60_000);
  return pid;
}

function startFio(devId: number, args: string[]) {
  return Bun.spawn(["fio", `--filename=/dev/ublkb${devId}`, ...args, "--output-format=json"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
}

const VERIFY_WRITER = ["--name=verify", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
  "--size=16M", "--time_based", "--runtime=300", "--verify=crc32c", "--verify_backlog=128", "--verify_fatal=1"];
const PSYNC_READER = ["--name=r", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync", "--runtime=300", "--time_based"];

describe("the record holds what the kernel granted", () => {
  test("add -q (CPUs + 2) -i 1: the record has the kernel's queue count; fio verify, kill -9, recover: no error", async () => {
    const asked = navigator.hardwareConcurrency + 2;
    const devId = addDevice(["-t", "memory", "-s", "32M", "-q", String(asked), "-i", "1", "-d", "32"]);
    const granted = listJson(devId).nrHwQueues;
    expect(granted).toBeLessThan(asked); // ADD_DEV clamps to the CPUs: the case under test
    expect(recordOf(devId).config.nrHwQueues).toBe(granted);
    const fio = startFio(devId, VERIFY_WRITER);
    await Bun.sleep(1500);
    const oldPid = await killDaemon(devId);
    const recover = cli(["recover", "-n", String(devId)]);
    expect(recover.stderr).toBe("");
    expect(recover.status).toBe(0);
    expect(state(devId)).toBe("LIVE");
    expect(daemonPidOf(devId)).not.toBe(oldPid);
    // A record an older ublk-bun wrote (what was asked) still recovers the device, and is rewritten as granted.
    const recordPath = join(runDir, `${devId}.json`);
    const old = recordOf(devId);
    old.config.nrHwQueues = asked;
    writeFileSync(recordPath, JSON.stringify(old), { mode: 0o600 });
    await Bun.sleep(1000);
    await killDaemon(devId);
    const again = cli(["recover", "-n", String(devId)]);
    expect(again.stderr).toBe("");
    expect(again.status).toBe(0);
    expect(recordOf(devId).config.nrHwQueues).toBe(granted);
    await expectFioClean(fio, 2000, 500); // a verifying writer does fewer I/Os than a reader
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("a request size the kernel rounds down: the record has the kernel's value; kill -9, recover works", async () => {
    // createDevice() and the CLI take only multiples of 4 KiB; the layer below them (startServing) still records
    // what the kernel granted for whatever it is given.
    const script = join(work, "serve.ts");
    writeFileSync(script, `
import { startServing } from "${ROOT}/lib/serving.ts";
import memory from "${ROOT}/targets/memory.ts";
import { UBLK_F_USER_RECOVERY } from "${ROOT}/ffi/uapi/ublk_cmd.ts";
const target = { ...(await memory.prepare({ sizeBytes: 16 << 20 })), type: "memory" };
const served = await startServing({ config: { devId: -1, nrHwQueues: 1, queueDepth: 128, maxIoBufBytes: 512 * 1024 + 1000, flags: UBLK_F_USER_RECOVERY }, target });
console.log("DEV " + served.device.devId);
setInterval(() => {}, 1 << 30); // serve until killed
`);
    const server = Bun.spawn([process.execPath, script], { stdin: "ignore", stdout: "pipe", stderr: "inherit" });
    const reader = server.stdout.getReader();
    let text = "";
    while (!/DEV \d+\n/.test(text)) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the server ended: ${text}`);
      text += new TextDecoder().decode(value);
    }
    const devId = Number(/DEV (\d+)/.exec(text)![1]);
    const granted = listJson(devId).maxIoBufBytes;
    expect(granted).toBeLessThan(512 * 1024 + 1000);
    expect(recordOf(devId).config.maxIoBufBytes).toBe(granted);
    await killDaemon(devId, server.pid);
    const recover = cli(["recover", "-n", String(devId)]);
    expect(recover.stderr).toBe("");
    expect(recover.status).toBe(0);
    expect(state(devId)).toBe("LIVE");
    const dd = Bun.spawnSync(["dd", "if=/dev/zero", `of=/dev/ublkb${devId}`, "bs=1M", "count=4", "oflag=direct"]);
    expect(dd.exitCode).toBe(0);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});

describe("a recover that cannot write its record", () => {
  test("keeps serving, says so in the log and in list, and writes the record once it can", async () => {
    // No spare (--standby 0): the daemon that `recover` starts is the one paused here.
    const devId = addDevice(["-t", "memory", "-s", "32M", "-i", "1", "-d", "16", "--standby", "0"]);
    const fio = startFio(devId, PSYNC_READER);
    await Bun.sleep(1000);
    const oldPid = await killDaemon(devId);
    const { child, daemonPid } = await spawnPaused(["recover", "-n", String(devId)], "before-end-recovery", oldPid, 5_000);
    // A directory where the daemon writes its temporary record: the write fails even for root.
    const obstacle = join(runDir, `.${devId}.json.${daemonPid}.tmp`);
    mkdirSync(obstacle);
    try {
      expect(await child.exited).toBe(0);
      expect(await new Response(child.stdout).text()).toContain("record stale");
      expect(state(devId)).toBe("LIVE");
      expect(daemonPidOf(devId)).toBe(daemonPid);
      expect(recordOf(devId).pid).toBe(oldPid);
      expect(readFileSync(logPath, "utf8")).toMatch(new RegExp(`ublk-bun\\[${daemonPid}\\]: device ${devId}: cannot write its record .*serving on, retrying`));
      expect(listJson(devId).recordStale).toBe(true);
      // The application's I/O goes on.
      await Bun.sleep(1000);
      expect(fio.exitCode).toBeNull();
    } finally {
      rmdirSync(obstacle);
    }
    await waitFor("the record to be rewritten", () => recordOf(devId).pid === daemonPid, 60_000);
    expect(cliOk(["list", "-n", String(devId)])).not.toContain("record stale");
    expect(recordOf(devId).queues.length).toBe(1);
    await expectFioClean(fio, 2000, 500); // a verifying writer does fewer I/Os than a reader
    // The rewritten record is good for the next crash.
    await killDaemon(devId);
    cliOk(["recover", "-n", String(devId)]);
    expect(state(devId)).toBe("LIVE");
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});

describe("del while a recover runs", () => {
  for (const step of ["before-end-recovery", "before-record"]) {
    test(`del during a recover paused at ${step}: del succeeds, the recovering daemon is gone, nothing comes back`, async () => {
      const devId = addDevice(["-t", "memory", "-s", "16M", "-i", "1", "-d", "16", "--standby", "0"]);
      const oldPid = await killDaemon(devId);
      const { child, daemonPid } = await spawnPaused(["recover", "-n", String(devId)], step, oldPid);
      const del = cli(["del", "-n", String(devId)], {}, 60_000);
      expect(del.stderr).toBe("");
      expect(del.status).toBe(0);
      expect(alive(daemonPid)).toBe(false);
      expect(await child.exited).not.toBe(0);
      // Give anything still running the time to write a record or serve again.
      await Bun.sleep(3000);
      expect(ourProcesses()).toEqual([]);
      expect(records()).toEqual([]);
      expect(shmFiles()).toEqual([]);
      expectClean();
    });
  }

  test("del of a device whose supervisor is recovering it: no supervisor, no daemon, no record afterwards", async () => {
    const devId = addDevice(["-t", "memory", "-s", "16M", "-i", "1", "--auto-recover"]);
    const supervisor = Number(/auto-recover supervisor: (\d+)/.exec(cliOk(["list", "-n", String(devId)]))![1]);
    // The supervisor's next daemon inherits its environment, so it cannot be paused from here: kill it as soon
    // as it exists and delete while the supervisor is between daemons or in a recover.
    const oldPid = daemonPidOf(devId);
    process.kill(oldPid, "SIGKILL");
    await Bun.sleep(300);
    const del = cli(["del", "-n", String(devId)], {}, 60_000);
    expect(del.stderr).toBe("");
    expect(del.status).toBe(0);
    expect(alive(supervisor)).toBe(false);
    await Bun.sleep(3000);
    expect(ourProcesses()).toEqual([]);
    expect(shmFiles()).toEqual([]);
    expectClean();
  });
});

describe("add --auto-recover that times out", () => {
  test("ends the supervisor and its daemon, then removes the device, record and shm file; one line", async () => {
    const logBefore = existsSync(logPath) ? readFileSync(logPath, "utf8").length : 0;
    const add = Bun.spawnSync([process.execPath, CLI, "add", "-t", "memory", "-s", "16M", "-i", "1", "--auto-recover"], {
      env: { ...process.env, UBLK_BUN_TEST_PAUSE: "before-start-dev:90000", UBLK_BUN_DEBUG: "1", UBLK_BUN_READY_TIMEOUT_MS: "20000" },
      stdin: "ignore", timeout: 120_000,
    });
    const stderr = add.stderr.toString();
    expect(add.exitCode).not.toBe(0);
    expect(stderr.trim().split("\n")).toHaveLength(1);
    expect(stderr).toContain("did not report READY within 20 s");
    // The scenario happened: a daemon added a device and was held before START_DEV when the CLI gave up.
    const log = readFileSync(logPath, "utf8").slice(logBefore);
    const paused = /ublk-bun\[(\d+)\]: pausing \d+ ms at before-start-dev/.exec(log);
    expect(paused).not.toBeNull();
    expect(alive(Number(paused![1]))).toBe(false);
    expect(ourProcesses()).toEqual([]);
    expect(ublkNodes()).toEqual([]);
    expect(records()).toEqual([]);
    expect(shmFiles()).toEqual([]);
    // Nothing comes back later either (before the fix the paused daemon went on to READY).
    await Bun.sleep(3000);
    expect(ublkNodes()).toEqual([]);
    expect(records()).toEqual([]);
    expectClean();
  });
});
