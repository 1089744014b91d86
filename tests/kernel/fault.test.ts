// The fault-injection target: errors, delays and daemon crashes on demand, and what the application sees.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync } from "node:fs";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, fio, verify, waitFor } from "./helpers.ts";

beforeAll(() => cleanUp());
afterEach(() => cleanUp());

const shmLeft = () => readdirSync("/dev/shm").filter((name) => name.startsWith("ublk-bun-memory-"));

describe("fault target", () => {
  test("-o failPercent=1: fio sees EIO on about 1 % of reads, nothing hangs, del removes everything", () => {
    const devId = addDevice(["-t", "fault", "-o", "base=memory", "-s", "16M", "-o", "failPercent=1", "-o", "failErrno=5"]);
    const started = Date.now();
    const result = fio(["--name=faulty", `--filename=/dev/ublkb${devId}`, "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=io_uring",
      "--iodepth=8", "--runtime=3", "--time_based", "--continue_on_error=all"]);
    expect(Date.now() - started).toBeLessThan(60_000);
    const job = result.json.jobs[0];
    const ios = job.read.total_ios as number;
    expect(ios).toBeGreaterThan(1000);
    expect(job.total_err).toBeGreaterThan(ios * 0.002);
    expect(job.total_err).toBeLessThan(ios * 0.05);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    expect(shmLeft()).toEqual([]);
  });

  test("over memory (a USER_COPY device), with and without delays, the data written comes back", () => {
    for (const delay of [[], ["-o", "delayMs=1"]]) {
      const devId = addDevice(["-t", "fault", "-o", "base=memory", "-s", "16M", ...delay]);
      expect(JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].flags & (1 << 7)).toBe(1 << 7); // USER_COPY, as memory
      const [name, status, errors] = verify(devId, "randwrite", "4k", 8, "8m");
      expect([name, delay.join(" "), status, errors]).toEqual([name, delay.join(" "), 0, 0]);
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
    expect(shmLeft()).toEqual([]);
  });

  test("-o delayMs=5: every request takes at least 5 ms", () => {
    const devId = addDevice(["-t", "fault", "-o", "base=null", "-o", "delayMs=5"]);
    const result = fio(["--name=slow", `--filename=/dev/ublkb${devId}`, "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
      "--runtime=2", "--time_based"]);
    expect(result.status).toBe(0);
    expect(result.errors).toBe(0);
    expect(result.json.jobs[0].read.clat_ns.percentile["1.000000"]).toBeGreaterThanOrEqual(5_000_000);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("-o crashAfter=N with -i 1: the daemon dies like kill -9, recover resumes, the reader sees no error", async () => {
    const devId = addDevice(["-t", "fault", "-o", "base=memory", "-s", "16M", "-o", "crashAfter=1500", "-i", "1"]);
    const pid = daemonPidOf(devId);
    const dd = Bun.spawn(["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=4000", "iflag=direct"], { stdout: "ignore", stderr: "pipe" });
    await waitFor("the daemon to crash", () => !readdirSync("/proc").includes(String(pid)), 60_000);
    await waitFor("QUIESCED", () => cliOk(["list", "-n", String(devId)]).includes("state QUIESCED"), 60_000);
    expect(dd.exitCode).toBeNull(); // the reader waits for the device instead of failing
    const recover = cli(["recover", "-n", String(devId)]);
    expect(recover.status).toBe(0);
    expect(await dd.exited).toBe(0);
    expect(await new Response(dd.stderr).text()).toContain("4000+0 records in");
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    expect(shmLeft()).toEqual([]);
  });

  test("bad fault options are one-line errors", () => {
    for (const [args, message] of [
      [["-o", "failPercent=150"], /failPercent=150 is out of range/],
      [["-o", "base=fault"], /would wrap itself/],
      [["-o", "base=nosuch"], /unknown target type "nosuch"/],
    ] as const) {
      const run = cli(["add", "-t", "fault", ...args]);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(message);
    }
    expectClean();
  });
});
