// `add --standby`: a warm spare daemon that `recover` hands the device to (lib/standby.ts). Real ublk_drv.
import { afterEach, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, expectFioClean, kernelFeatureNames, waitFor } from "./helpers.ts";

afterEach(cleanUp);

/** Pids running our daemon entry (serving or spare). */
function daemonProcesses(): number[] {
  const pids: number[] = [];
  for (const name of readdirSync("/proc").filter((entry) => /^\d+$/.test(entry))) {
    try {
      if (readFileSync(`/proc/${name}/cmdline`, "utf8").includes("lib/daemon.ts")) pids.push(Number(name));
    } catch { /* raced */ }
  }
  return pids;
}

const alive = (pid: number) => readdirSync("/proc").includes(String(pid));
const stateOf = (devId: number) => / state (\S+)/.exec(cliOk(["list", "-n", String(devId)]))?.[1];

/** Waits until `list` names a standby other than `notPid`; returns its pid. */
async function standbyOf(devId: number, notPid = 0): Promise<number> {
  let pid = 0;
  await waitFor(`a standby daemon for device ${devId}`, () => {
    pid = Number(/standby daemon: (\d+)/.exec(cliOk(["list", "-n", String(devId)]))?.[1] ?? 0);
    return pid > 0 && pid !== notPid;
  }, 60_000);
  return pid;
}

/** Whether `pid` has /dev/ublkcN open: a spare that re-attached while the device's I/O is held. */
function holdsCharDevice(pid: number, devId: number): boolean {
  try {
    return readdirSync(`/proc/${pid}/fd`).some((fd) => {
      try { return readlinkSync(`/proc/${pid}/fd/${fd}`) === `/dev/ublkc${devId}`; } catch { return false; }
    });
  } catch {
    return false;
  }
}

async function killAndWaitQuiesced(devId: number): Promise<number> {
  const pid = daemonPidOf(devId);
  process.kill(pid, "SIGKILL");
  await waitFor(`device ${devId} to quiesce`, () => stateOf(devId) === "QUIESCED", 30_000);
  return pid;
}

async function expectNoDaemonLeft(): Promise<void> {
  await waitFor("every daemon and standby to exit", () => daemonProcesses().length === 0, 10_000);
}

const VERIFY_WRITER = ["--name=verify", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
  "--size=16M", "--time_based", "--runtime=300", "--verify=crc32c", "--verify_backlog=128", "--verify_fatal=1"];

describe("warm spares (add --standby, the default with recovery)", () => {
  // Batch commands (7.0 on) hold the last tag back by PREPping all but it, and arm their FETCH only once it is.
  for (const [name, extra] of [["", []], [", batch commands", ["--batch", "1"]]] as const) {
    test.skipIf(extra.length > 0 && !kernelFeatureNames().includes("BATCH_IO"))(`-i 1${name} under fio verify: kill -9 leaves the device quiesced; recover hands it to the standby, which starts the next; 0 errors; del leaves nothing`, async () => {
      const devId = addDevice(["-t", "memory", "-s", "32M", "-i", "1", "-d", "32", "--standby", ...extra]);
      expect(cliOk(["list", "-n", String(devId)])).toContain(extra.length > 0 ? "batch commands" : "per-tag commands");
      const spare = await standbyOf(devId);
      expect(cliOk(["list", "-n", String(devId)])).toContain(`"recover -n ${devId}" hands it the device`);
      const fio = Bun.spawn(["fio", `--filename=/dev/ublkb${devId}`, ...VERIFY_WRITER, "--output-format=json"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
      await Bun.sleep(1500);
      const oldPid = await killAndWaitQuiesced(devId);
      // The spare re-attaches at once (START_USER_RECOVERY, its queues FETCHed but for one tag each) but resumes
      // I/O only when asked: a reader that comes meanwhile waits, on every kernel (from 6.16 or so a queue with every
      // tag FETCHed would serve it at once).
      await waitFor(`the spare to open /dev/ublkc${devId}`, () => holdsCharDevice(spare, devId), 30_000);
      const reader = Bun.spawn(["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=1", "skip=100", "iflag=direct"],
        { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
      await Bun.sleep(1500);
      expect(stateOf(devId)).toBe("QUIESCED");
      expect(alive(spare)).toBe(true);
      expect(reader.exitCode).toBeNull();
      // recover prints the list block as `list` would (the spare sends it), naming the spare as the daemon.
      const printed = cliOk(["recover", "-n", String(devId)]);
      expect(printed).toMatch(new RegExp(`^dev id ${devId}: nr_hw_queues 1 queue_depth 32 `));
      expect(printed.split("\n").find((line) => line.includes("pid"))!.trim().split(/\s+/)[6]).toBe(String(spare));
      expect(daemonPidOf(devId)).toBe(spare); // no daemon was started: the spare serves
      expect(alive(oldPid)).toBe(false);
      expect(await reader.exited).toBe(0);
      const next = await standbyOf(devId, spare);
      expect(alive(next)).toBe(true);
      await expectFioClean(fio, 2000, 500);
      // Twice in a row: the next spare works as the first did.
      await killAndWaitQuiesced(devId);
      const printedJson = JSON.parse(cliOk(["recover", "-n", String(devId), "--json"]));
      expect([printedJson.devId, printedJson.daemonPid, printedJson.state]).toEqual([devId, next, "LIVE"]);
      expect(daemonPidOf(devId)).toBe(next);
      cliOk(["del", "-n", String(devId)]);
      expectClean();
      await expectNoDaemonLeft();
    }, 240_000);
  }

  test("a standby that died: recover starts a daemon as without --standby, and that daemon keeps a new standby", async () => {
    const devId = addDevice(["-t", "null", "-r", "1", "--standby"]);
    const spare = await standbyOf(devId);
    process.kill(spare, "SIGKILL");
    await waitFor("list to drop the dead standby", () => !cliOk(["list", "-n", String(devId)]).includes("standby daemon:"), 30_000);
    const oldPid = await killAndWaitQuiesced(devId);
    cliOk(["recover", "-n", String(devId)]);
    const served = daemonPidOf(devId);
    expect([oldPid, spare]).not.toContain(served);
    expect(stateOf(devId)).toBe("LIVE");
    await standbyOf(devId, spare);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    await expectNoDaemonLeft();
  }, 180_000);

  test("recover while the killed daemon is still exiting: the spare, not listening yet, wins the device's lock; recover hands it the device, no 'busy'", async () => {
    // The spare listens only once its daemon has exited (here 1.5 s later still); recover, asked at once, finds no
    // spare and starts a daemon, which here waits 3 s before it takes the lock: the spare has it by then.
    const devId = addDevice(["-t", "null", "-r", "1", "--standby"], { UBLK_BUN_TEST_PAUSE: "standby-listen:1500" });
    const spare = await standbyOf(devId);
    const oldPid = daemonPidOf(devId);
    process.kill(oldPid, "SIGKILL");
    const recover = cli(["recover", "-n", String(devId)], { UBLK_BUN_TEST_PAUSE: "recover-lock:3000" });
    expect({ status: recover.status, stderr: recover.stderr }).toEqual({ status: 0, stderr: "" });
    expect(daemonPidOf(devId)).toBe(spare);
    expect(stateOf(devId)).toBe("LIVE");
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    await expectNoDaemonLeft();
  }, 180_000);

  test("a spare killed once re-attached (I/O still held): recover starts a daemon, which serves", async () => {
    const devId = addDevice(["-t", "memory", "-s", "8M", "-i", "1", "--standby"]);
    const spare = await standbyOf(devId);
    await killAndWaitQuiesced(devId);
    await waitFor(`the spare to open /dev/ublkc${devId}`, () => holdsCharDevice(spare, devId), 30_000);
    process.kill(spare, "SIGKILL");
    await waitFor("the spare to exit", () => !alive(spare), 10_000);
    cliOk(["recover", "-n", String(devId)]);
    expect(stateOf(devId)).toBe("LIVE");
    expect([spare]).not.toContain(daemonPidOf(devId));
    const read = Bun.spawnSync(["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=16", "iflag=direct"], { stderr: "pipe" });
    expect([read.exitCode, read.stderr.toString().includes("16+0 records in")]).toEqual([0, true]);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    await expectNoDaemonLeft();
  }, 180_000);

  test("del of a quiesced device whose standby waits for recover, re-attached: both go, nothing is left", async () => {
    const devId = addDevice(["-t", "null", "-r", "1", "--standby"]);
    const spare = await standbyOf(devId);
    await killAndWaitQuiesced(devId);
    await waitFor(`the spare to open /dev/ublkc${devId}`, () => holdsCharDevice(spare, devId), 30_000);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    await expectNoDaemonLeft();
  }, 120_000);

  test("by default a recoverable device keeps a spare; --standby 0, a device without recovery and --auto-recover keep none of their own", async () => {
    const spared = addDevice(["-t", "null", "-r", "1"]);
    const bare = addDevice(["-t", "null", "-i", "1", "--standby", "0"]);
    const plain = addDevice(["-t", "null"]);
    const supervised = addDevice(["-t", "null", "-i", "1", "--auto-recover"]);
    // The record says whether a daemon keeps a spare (written before add returns); the processes must agree.
    const standbyRecorded = (devId: number) => JSON.parse(readFileSync(`/run/ublk-bun/${devId}.json`, "utf8")).standby === true;
    expect([spared, bare, plain, supervised].map(standbyRecorded)).toEqual([true, false, false, false]);
    const spare = await standbyOf(spared);
    const supervisorsStandby = await standbyOf(supervised);
    await Bun.sleep(2000); // a spare for `bare` or `plain` would have been started by now
    expect(daemonProcesses().sort()).toEqual([spared, bare, plain, supervised].map(daemonPidOf).concat(spare, supervisorsStandby).sort());
    for (const devId of [bare, plain]) expect(cliOk(["list", "-n", String(devId)])).not.toContain("standby daemon:");
    cliOk(["del", "-a"]);
    expectClean();
    await expectNoDaemonLeft();
  }, 180_000);

  test("refusals: without recovery, with --auto-recover, a value other than 0 or 1: one line, nothing created", () => {
    for (const [args, message] of [
      [["-t", "null", "--standby"], "ublk-bun: --standby needs -r 1, -i 1 or -e 1\n"],
      [["-t", "null", "--standby", "1"], "ublk-bun: --standby needs -r 1, -i 1 or -e 1\n"],
      [["-t", "null", "-r", "1", "--standby", "--auto-recover"], "ublk-bun: --standby and --auto-recover cannot be combined (the supervisor keeps its own standby)\n"],
      [["-t", "null", "-r", "1", "--standby", "2"], "ublk-bun: --standby: 2 is out of range (0..1)\n"],
    ] as const) {
      const run = cli(["add", ...args]);
      expect([run.status, run.stderr]).toEqual([1, message]);
    }
    expectClean();
    expect(daemonProcesses()).toEqual([]);
  });
});
