// --poll-us: queue threads poll their ring for a while after each request instead of sleeping at once.
// Data must stay right, an idle queue must go back to sleep, and the setting must survive kill -9 + recover.
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

function qd1Read(devId: number) {
  return fio([`--name=poll`, `--filename=/dev/ublkb${devId}`, "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=io_uring",
    "--iodepth=1", "--runtime=2", "--time_based", "--size=32m"]);
}

describe("--poll-us", () => {
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
