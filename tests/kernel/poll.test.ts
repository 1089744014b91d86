// --poll-us: queue threads spin for their next request for a while instead of sleeping at once (by default,
// "auto", only while requests come one at a time). Data must stay right, an idle queue must go back to sleep,
// and the setting must survive kill -9 + recover.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { addDevice, cleanUp, cliOk, daemonPidOf, expectClean, fio, verify, waitFor } from "./helpers.ts";

beforeAll(() => cleanUp());
afterAll(() => cleanUp());

const POLL_US = 200;

function queueThreads(devId: number): Array<{ pid: number; tid: number }> {
  const [listed] = JSON.parse(cliOk(["list", "-n", String(devId), "--json"]));
  return listed.queues.map((queue: { tid: number }) => ({ pid: listed.daemonPid, tid: queue.tid }));
}

/** utime+stime ticks and the scheduler state letter of one thread. */
function threadStat(pid: number, tid: number): { ticks: number; state: string } {
  const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return { ticks: Number(fields[11]) + Number(fields[12]), state: fields[0]! };
}

/** Once the poll window has passed, an idle queue thread sleeps in io_uring_enter and burns no CPU. */
async function expectIdleQueuesAsleep(devId: number): Promise<void> {
  await Bun.sleep(300);
  const threads = queueThreads(devId);
  const before = threads.map(({ pid, tid }) => threadStat(pid, tid));
  await Bun.sleep(1000);
  const after = threads.map(({ pid, tid }) => threadStat(pid, tid));
  // A thread still polling would use ~100 ticks in that second; a sleeping one none (a few allowed for timers).
  const report = threads.map(({ tid }, i) => ({ tid, state: after[i]!.state, ticks: after[i]!.ticks - before[i]!.ticks }));
  expect(report.filter((thread) => thread.state !== "S" || thread.ticks > 3)).toEqual([]);
}

function randRead(devId: number, depth = 1) {
  return fio([`--name=poll`, `--filename=/dev/ublkb${devId}`, "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=io_uring",
    `--iodepth=${depth}`, "--runtime=2", "--time_based", "--size=32m"]);
}
const qd1Read = (devId: number) => randRead(devId, 1);

/** Reads at `fioDepth` for 2 s from a fresh null device (debug log on), deletes it, and returns its queue's
 * counters as it logged them when it stopped: requests served, and spins that found the next request or gave up. */
async function spinCounters(pollArgs: string[], fioDepth: number): Promise<{ pollUs: unknown; served: number; found: number; missed: number }> {
  const out = cliOk(["add", "-t", "null", ...pollArgs], { UBLK_BUN_DEBUG: "1" });
  const devId = Number(/^dev id (\d+):/m.exec(out)![1]);
  const pid = daemonPidOf(devId);
  let pollUs: unknown;
  try {
    pollUs = JSON.parse(readFileSync(`/run/ublk-bun/${devId}.json`, "utf8")).config.pollUs;
    const run = randRead(devId, fioDepth);
    expect({ status: run.status, errors: run.errors }).toEqual({ status: 0, errors: 0 });
    await expectIdleQueuesAsleep(devId);
  } finally {
    cliOk(["del", "-n", String(devId)]);
  }
  const log = readFileSync("/run/ublk-bun/daemon.log", "utf8");
  const counters = new RegExp(`ublk-bun\\[${pid}\\]: queue 0: .* served (\\d+) requests .* spins: (\\d+) found a request, (\\d+) did not`).exec(log);
  if (!counters) throw new Error(`no counters of daemon ${pid} in the log`);
  console.log(log.slice(log.indexOf(counters[0]) + counters[0].indexOf("served")).split("\n")[0]);
  return { pollUs, served: Number(counters[1]), found: Number(counters[2]), missed: Number(counters[3]) };
}

describe("--poll-us auto (the default)", () => {
  test("a queue serving one request at a time spins for the next; an idle one sleeps; --poll-us 0 never spins", async () => {
    const serial = await spinCounters([], 1);
    expect(serial.pollUs).toBe("auto");
    expect(serial.served).toBeGreaterThan(200);
    // The mechanism: requests coming one at a time make the queue spin, and a spin finds the next request through
    // the ring's TASKRUN flag. How often it pays is the bench's to measure, not this test's: it depends on the
    // scheduler (on 7.3 a woken fio sharing the spinner's CPU waits behind it; 6.12 preempts at once) and on what
    // else the host runs (seen from 0.1 % to 50 % of requests), and misses make auto back off.
    expect(serial.found).toBeGreaterThan(0);
    // Overlapping requests: sleeping costs little there, so auto spins seldom if ever.
    const overlapping = await spinCounters([], 32);
    console.log(`auto: QD1 ${serial.found}/${serial.served} spins found a request, QD32 ${overlapping.found}/${overlapping.served}`);
    expect(overlapping.found).toBeLessThan(overlapping.served / 4);
    const off = await spinCounters(["--poll-us", "0"], 1);
    expect(off.pollUs).toBe(0);
    expect({ found: off.found, missed: off.missed }).toEqual({ found: 0, missed: 0 });
    expectClean();
  });
});

describe("--poll-us N", () => {
  test("crc32c verify on memory at QD1 and QD32 with 2 polling queues; idle queues sleep again", async () => {
    const devId = addDevice(["-t", "memory", "-s", "64M", "-q", "2", "--poll-us", String(POLL_US)]);
    try {
      for (const depth of [1, 32]) {
        const [name, status, errors] = verify(devId, "randwrite", "4k", depth, "16m");
        expect({ name, status, errors }).toEqual({ name, status: 0, errors: 0 });
      }
      await expectIdleQueuesAsleep(devId);
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("the setting is kept in the record and survives kill -9 + recover", async () => {
    const devId = addDevice(["-t", "null", "-r", "1", "--poll-us", String(POLL_US)]);
    try {
      const recordOf = () => JSON.parse(readFileSync(`/run/ublk-bun/${devId}.json`, "utf8"));
      expect(recordOf().config.pollUs).toBe(POLL_US);
      const before = qd1Read(devId);
      expect({ status: before.status, errors: before.errors }).toEqual({ status: 0, errors: 0 });
      const oldPid = daemonPidOf(devId);
      process.kill(oldPid, "SIGKILL");
      await waitFor("QUIESCED", () => cliOk(["list", "-n", String(devId)]).includes("state QUIESCED"), 60_000);
      cliOk(["recover", "-n", String(devId)]);
      expect(daemonPidOf(devId)).not.toBe(oldPid);
      expect(recordOf().config.pollUs).toBe(POLL_US);
      const after = qd1Read(devId);
      expect({ status: after.status, errors: after.errors }).toEqual({ status: 0, errors: 0 });
      expect(after.iops).toBeGreaterThan(100);
      await expectIdleQueuesAsleep(devId);
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });
});
