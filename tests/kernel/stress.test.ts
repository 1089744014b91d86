// Short forms of the stress tests: many devices, many cycles, kills at awkward moments, bad records.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync } from "node:fs";
import { Ctrl } from "../../lib/ctrl.ts";
import { processAlive } from "../../lib/daemon-env.ts";
import { readStandby } from "../../lib/records.ts";
import { join } from "node:path";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, fio, ROOT, spawnPaused, ublkHolders, waitFor } from "./helpers.ts";

/** bench/stress.sh runs this file with a larger scale (the long forms); CI runs scale 1. */
const SCALE = Math.max(1, Number(process.env.UBLK_BUN_STRESS_SCALE ?? 1));

beforeAll(() => cleanUp());
afterEach(() => cleanUp());

function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}
/**
 * The daemon's own resident memory (heap, buffers): RssAnon. The memory target's image is mapped from /dev/shm
 * and counts in VmRSS as the load touches more of it — that is the disk's data, bounded by its size, not growth.
 */
function rssKiB(pid: number): number {
  return Number(/RssAnon:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);
}

describe("stress (short forms)", () => {
  test("kill -9 during add (after ADD_DEV, before START_DEV): add fails cleanly, del -a finds nothing to do", async () => {
    const { child: add, daemonPid: victim } = await spawnPaused(["add", "-t", "null", "-q", "2"], "before-start-dev");
    expect(readdirSync("/dev").some((name) => name.startsWith("ublkc"))).toBe(true); // ADD_DEV happened
    process.kill(victim, "SIGKILL");
    expect(await add.exited).not.toBe(0);
    const stderr = await new Response(add.stderr).text();
    expect(stderr.trim().split("\n")).toHaveLength(1);
    expect(stderr).toMatch(/the daemon exited during start/);
    expectClean();
    expect(cli(["del", "-a"]).status).toBe(0);
    expectClean();
  });

  test("8 devices at once, fio on each, then del -a", () => {
    const ids = Array.from({ length: 8 }, (_, index) => addDevice(["-t", index % 2 ? "memory" : "null", "-s", "16M", "-q", "1", "-d", "16"]));
    expect(new Set(ids).size).toBe(8);
    const runs = ids.map((devId) => Bun.spawn(["fio", "--name=many", `--filename=/dev/ublkb${devId}`, "--rw=randrw", "--bs=4k", "--direct=1",
      "--ioengine=io_uring", "--iodepth=4", `--runtime=${3 * SCALE}`, "--time_based", "--output-format=json"], { stdout: "pipe", stderr: "pipe" }));
    return Promise.all(runs.map(async (run) => {
      expect(await run.exited).toBe(0);
      const json = JSON.parse((await new Response(run.stdout).text()).replace(/^[^{]*/, ""));
      expect(json.jobs[0].error).toBe(0);
    })).then(() => {
      const del = cli(["del", "-a"]);
      expect(del.stderr).toBe("");
      expect(del.status).toBe(0);
      expectClean();
    });
  });

  test("a long-running daemon keeps its fd count and RSS stable under load", () => {
    const devId = addDevice(["-t", "memory", "-s", "64M", "-q", "2"]);
    const pid = daemonPidOf(devId);
    const load = () => fio(["--name=soak", `--filename=/dev/ublkb${devId}`, "--rw=randrw", "--bs=4k,64k", "--direct=1", "--ioengine=io_uring",
      "--iodepth=32", "--runtime=4", "--time_based", "--numjobs=2"]);
    expect(load().errors).toBe(0); // warm up: buffers touched, JIT settled
    const fdsBefore = fdCount(pid), rssBefore = rssKiB(pid);
    for (let round = 0; round < 3 * SCALE; round++) expect(load().errors).toBe(0);
    const fdsAfter = fdCount(pid), rssAfter = rssKiB(pid);
    console.log(`soak: fds ${fdsBefore} → ${fdsAfter}, RssAnon ${rssBefore} → ${rssAfter} KiB`);
    expect(fdsAfter).toBe(fdsBefore);
    expect(rssAfter).toBeLessThan(rssBefore * 1.2 + 4096);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test(`${50 * SCALE} add/del cycles with 2 queues leave nothing behind`, () => {
    for (let cycle = 0; cycle < 50 * SCALE; cycle++) {
      const devId = addDevice(["-t", "null", "-q", "2", "-d", "8"]);
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });
});

describe("del --force while fio runs (plain del refuses): fio sees errors, nothing hangs, everything is gone", () => {
  const backing = "/tmp/ublk-bun-stress-backing.img";
  const cases: Array<[string, string[]]> = [
    ["null", ["-t", "null"]],
    ["null -i 1", ["-t", "null", "-i", "1"]],
    ["memory", ["-t", "memory", "-s", "64M", "-q", "2"]],
    ["file", ["-t", "file", "-f", backing]],
    ["fault (base=memory, delayMs=2)", ["-t", "fault", "-o", "base=memory", "-o", "delayMs=2", "-s", "64M"]],
  ];
  for (const [name, args] of cases) {
    test(name, async () => {
      writeFileSync(backing, Buffer.alloc(64 << 20));
      const devId = addDevice(args);
      // psync: on 6.12 a deleted ublk disk fails blocking I/O with EIO at once, while fio's io_uring engine keeps
      // resubmitting the -EAGAIN its NOWAIT reads get until its runtime ends (kernel + fio behaviour, not ours).
      const fioProcess = Bun.spawn(["fio", "--name=busy", `--filename=/dev/ublkb${devId}`, "--rw=randrw", "--bs=4k", "--direct=1",
        "--ioengine=psync", "--numjobs=4", "--runtime=60", "--time_based", "--output-format=json"], { stdout: "pipe", stderr: "pipe" });
      await Bun.sleep(1500);
      expect(fioProcess.exitCode).toBeNull();
      const refused = cli(["del", "-n", String(devId)]);
      expect(refused.status).toBe(1);
      // fio's jobs are its child processes: any of them may be the one named.
      expect(refused.stderr).toMatch(new RegExp(`^ublk-bun: del: device ${devId} is in use: ublkb${devId} is open by pid \\d+ \\(fio\\)`));
      expect(refused.stderr.trim().split("\n")).toHaveLength(1);
      expect(fioProcess.exitCode).toBeNull(); // nothing was stopped
      const started = Date.now();
      const del = cli(["del", "-n", String(devId), "--force"]);
      expect(del.stderr).toBe("");
      expect(del.status).toBe(0);
      const fioStatus = await Promise.race([fioProcess.exited, Bun.sleep(30_000).then(() => "hung")]);
      expect(fioStatus).not.toBe("hung");
      expect(fioStatus).not.toBe(0); // the device vanished under it
      expect(Date.now() - started).toBeLessThan(40_000);
      expectClean();
      expect(readdirSync("/dev/shm").filter((file) => file.startsWith("ublk-bun-memory-"))).toEqual([]);
      rmSync(backing, { force: true });
    });
  }
});

describe("records that cannot be trusted", () => {
  const recordOf = (devId: number) => `/run/ublk-bun/${devId}.json`;
  const cases: Array<[string, (path: string, original: string) => void, RegExp]> = [
    ["corrupt", (path) => writeFileSync(path, "{not json"), /corrupt \(not valid JSON\)/],
    ["truncated", (path, original) => writeFileSync(path, original.slice(0, 40)), /corrupt/],
    ["wrong fields", (path) => writeFileSync(path, JSON.stringify({ version: 1, devId: 0 })), /corrupt \(missing or wrong fields\)/],
    ["a symlink", (path) => {
      writeFileSync("/tmp/elsewhere.json", readFileSync(path));
      rmSync(path);
      symlinkSync("/tmp/elsewhere.json", path);
    }, /is a symlink; refusing to follow it/],
    ["owned by another user", (path) => Bun.spawnSync(["chown", "65534", path]), /owned by uid 65534/],
  ];
  for (const [name, damage, message] of cases) {
    test(`${name}: list says so, recover refuses with one line, del still removes everything`, async () => {
      const devId = addDevice(["-t", "memory", "-s", "8M", "-i", "1"]);
      await waitFor("the spare", () => readStandby(devId) !== null, 60_000);
      const sparePid = readStandby(devId)!.pid;
      process.kill(daemonPidOf(devId), "SIGKILL");
      await waitFor("QUIESCED", () => cliOk(["list", "-n", String(devId)]).includes("state QUIESCED"), 60_000);
      // Damaged once the spare has re-attached (it has read the record and opened /dev/ublkcN), as it waits for `recover`.
      await waitFor("the spare to re-attach", () => ublkHolders().some((holder) => holder.startsWith(`${sparePid}/`)), 60_000);
      damage(recordOf(devId), readFileSync(recordOf(devId), "utf8"));
      // The spare checks every second that it is still wanted: a record it cannot read is not a deleted device.
      await Bun.sleep(1_500);
      expect(processAlive(sparePid)).toBe(true);
      expect(cliOk(["list", "-n", String(devId)])).toMatch(/\ttarget \(record unusable: /);
      const recover = cli(["recover", "-n", String(devId)]);
      expect(recover.status).not.toBe(0);
      expect(recover.stderr.trim().split("\n")).toHaveLength(1);
      expect(recover.stderr).toMatch(message);
      cliOk(["del", "-n", String(devId)]);
      expect(readdirSync("/dev").filter((n) => n.startsWith("ublk") && n !== "ublk-control")).toEqual([]);
      rmSync("/tmp/elsewhere.json", { force: true });
      rmSync(recordOf(devId), { force: true }); // the memory file of a broken record cannot be trusted to be ours
      for (const name of readdirSync("/dev/shm").filter((n) => n.startsWith("ublk-bun-memory-"))) rmSync(join("/dev/shm", name));
      expectClean();
    });
  }
});

describe("orphans", () => {
  test("a dead daemon, a record without a device and an unused /dev/shm file: list shows each, del -a removes all, twice is fine", async () => {
    // A device whose daemon died (recoverable), and one whose kernel device vanished behind our back.
    const deadId = addDevice(["-t", "memory", "-s", "8M", "-r", "1"]);
    const staleId = addDevice(["-t", "memory", "-s", "8M", "-r", "1"]);
    for (const devId of [deadId, staleId]) process.kill(daemonPidOf(devId), "SIGKILL");
    await waitFor("QUIESCED", () => [deadId, staleId].every((devId) => cliOk(["list", "-n", String(devId)]).includes("state QUIESCED")), 60_000);
    const ctrl = Ctrl.open();
    try {
      ctrl.stopDev(staleId);
      ctrl.delDev(staleId);
    } finally {
      ctrl.close();
    }
    // A memory file nobody refers to, old enough not to belong to an `add` in progress.
    const leftover = "/dev/shm/ublk-bun-memory-orphan-test";
    writeFileSync(leftover, Buffer.alloc(4096));
    const twoMinutesAgo = new Date(Date.now() - 120_000);
    utimesSync(leftover, twoMinutesAgo, twoMinutesAgo);

    const list = cli(["list"]);
    expect(list.status).toBe(0);
    expect(list.stdout).toContain(`\torphan: no daemon serves it; "recover -n ${deadId}" or "del -n ${deadId}"`);
    expect(list.stdout).not.toContain(`dev id ${staleId}:`);
    expect(list.stderr).toContain(`orphan: record /run/ublk-bun/${staleId}.json: the kernel has no ublk device ${staleId} (del -a removes it)`);
    expect(list.stderr).toContain(`orphan: ${leftover} (4096 bytes of memory-target data that no device uses) (del -a removes it)`);
    expect(list.stderr.trim().split("\n")).toHaveLength(2); // the dead device's memory file is in use by its record

    for (let round = 0; round < 2; round++) {
      const del = cli(["del", "-a"]);
      expect(del.stderr).toBe("");
      expect(del.status).toBe(0);
      expectClean();
      expect(readdirSync("/dev/shm").filter((name) => name.startsWith("ublk-bun-memory-"))).toEqual([]);
      expect(cli(["list"])).toEqual({ status: 0, stdout: "", stderr: "" });
    }
  });
});
