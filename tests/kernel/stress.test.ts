// Short forms of the stress tests: many devices, many cycles, kills at awkward moments, bad records.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, fio, ROOT, waitFor } from "./helpers.ts";

beforeAll(() => cleanUp());
afterEach(() => cleanUp());

function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}
function rssKiB(pid: number): number {
  return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);
}

describe("stress (short forms)", () => {
  test("kill -9 during add (after ADD_DEV, before START_DEV): add fails cleanly, del -a finds nothing to do", async () => {
    const add = Bun.spawn([process.execPath, join(ROOT, "bin/ublk-bun.ts"), "add", "-t", "null", "-q", "2"],
      { env: { ...process.env, UBLK_BUN_TEST_PAUSE: "before-start-dev:60000", UBLK_BUN_DEBUG: "1" }, stdout: "pipe", stderr: "pipe" });
    let victim = 0;
    await waitFor("the daemon to pause before START_DEV", () => {
      let log = "";
      try { log = readFileSync("/run/ublk-bun/daemon.log", "utf8"); } catch { /* not written yet */ }
      const match = [...log.matchAll(/ublk-bun\[(\d+)\]: pausing \d+ ms at before-start-dev/g)].at(-1);
      victim = match ? Number(match[1]) : 0;
      return victim > 0 && readdirSync("/proc").includes(String(victim));
    }, 60_000);
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
      "--ioengine=io_uring", "--iodepth=4", "--runtime=3", "--time_based", "--output-format=json"], { stdout: "pipe", stderr: "pipe" }));
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
    for (let round = 0; round < 3; round++) expect(load().errors).toBe(0);
    const fdsAfter = fdCount(pid), rssAfter = rssKiB(pid);
    console.log(`soak: fds ${fdsBefore} → ${fdsAfter}, RSS ${rssBefore} → ${rssAfter} KiB`);
    expect(fdsAfter).toBe(fdsBefore);
    expect(rssAfter).toBeLessThan(rssBefore * 1.2 + 4096);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("50 add/del cycles with 2 queues leave nothing behind", () => {
    for (let cycle = 0; cycle < 50; cycle++) {
      const devId = addDevice(["-t", "null", "-q", "2", "-d", "8"]);
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });
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
      process.kill(daemonPidOf(devId), "SIGKILL");
      await waitFor("QUIESCED", () => cliOk(["list", "-n", String(devId)]).includes("state QUIESCED"), 60_000);
      damage(recordOf(devId), readFileSync(recordOf(devId), "utf8"));
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
