// The `recover` side of a warm spare's socket (lib/standby-client.ts), against a socket played by the test.
import { afterEach, beforeEach, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { recoverThroughStandby, RECOVER_REQUEST } from "../../lib/standby-client.ts";

let dir = "";
let savedRunDir: string | undefined;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "ublk-bun-standby-"));
  savedRunDir = process.env.UBLK_BUN_RUN_DIR;
  process.env.UBLK_BUN_RUN_DIR = dir;
});
afterEach(() => {
  if (savedRunDir === undefined) delete process.env.UBLK_BUN_RUN_DIR;
  else process.env.UBLK_BUN_RUN_DIR = savedRunDir;
  rmSync(dir, { recursive: true, force: true });
});

/** A spare that answers the request with `reply` (then closes), and records what it was asked. */
function spare(reply: string[], close = true) {
  const asked: string[] = [];
  const server = Bun.listen({
    unix: join(dir, "7.standby.sock"),
    socket: {
      data(socket, chunk) {
        asked.push(chunk.toString());
        // In pieces: a READY line holds a whole record and may arrive in several reads.
        for (const piece of reply) socket.write(piece);
        if (close) socket.end();
      },
    },
  });
  return { asked, stop: () => server.stop(true) };
}

test("no spare listening: neither record nor error (recover then starts a daemon)", async () => {
  expect(await recoverThroughStandby(7)).toEqual({});
});

test("READY after WAITING lines, in pieces: the record, and each WAITING reported", async () => {
  const record = { devId: 7, pid: 1234, target: { type: "null", options: { name: "é" } } };
  const line = `READY ${JSON.stringify(record)}\n`;
  const server = spare(["WAITING 1000 LIVE\n", line.slice(0, 9), line.slice(9)]);
  const waits: string[] = [];
  const outcome = await recoverThroughStandby(7, (ms, state) => waits.push(`${ms} ${state}`));
  server.stop();
  expect(server.asked).toEqual([`${RECOVER_REQUEST}\n`]);
  expect(outcome).toEqual({ record: record as never });
  expect(waits).toEqual(["1000 LIVE"]);
});

test("READY then LISTING: the record and the list block recover prints without building it", async () => {
  const record = { devId: 7, pid: 1234 };
  const listing = { text: "dev id 7: nr_hw_queues 1\n\tmax rq size 524288 daemon pid 1234", json: { devId: 7, daemonPid: 1234 } };
  const server = spare([`READY ${JSON.stringify(record)}\n`, `LISTING ${JSON.stringify(listing)}\n`]);
  const outcome = await recoverThroughStandby(7);
  server.stop();
  expect(outcome).toEqual({ record: record as never, listing });
});

test("READY and then nothing, the connection left open: the record after a short wait, not the READY timeout", async () => {
  const record = { devId: 7, pid: 1234 };
  const server = spare([`READY ${JSON.stringify(record)}\n`], false);
  const startedMs = performance.now();
  const outcome = await recoverThroughStandby(7);
  server.stop();
  expect(outcome).toEqual({ record: record as never });
  expect(performance.now() - startedMs).toBeLessThan(10_000);
});

test("ERROR: the spare's one line", async () => {
  const server = spare(["ERROR recover: device 7 has no record any more (deleted meanwhile)\n"]);
  expect(await recoverThroughStandby(7)).toEqual({ error: "recover: device 7 has no record any more (deleted meanwhile)" });
  server.stop();
});

test("a spare that took the request and closed without an answer: an error, never a second daemon", async () => {
  const server = spare([]);
  const outcome = await recoverThroughStandby(7);
  server.stop();
  expect(outcome.error).toStartWith("the standby daemon of device 7 went away before it answered");
});
