// What an application sees when the server is gone (like ublksrv's generic/007): for each recovery mode, a
// reader (dd) is in the middle of a slow request when the daemon is killed; then a second reader arrives while
// no daemon runs; then `recover` (where the mode allows it); then a kill with `del` and no recover.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, waitFor } from "./helpers.ts";

beforeAll(() => cleanUp());
afterEach(() => cleanUp());

/** "waits" while the reader still runs; "ok"; or "error: " and the reason dd printed. */
type Seen = string;

interface Mode {
  name: string;
  flags: string[];
  /** what the reader caught mid-request sees after the kill: "error…" or "waits" */
  inFlight: "error" | "waits";
  /** what a reader arriving while no daemon runs sees */
  newIo: "error" | "waits";
  recoverable: boolean;
  /** why this kernel cannot run the row, if it cannot */
  unsupported?: string;
}

const features = cliOk(["features"]);
const modes: Mode[] = [
  { name: "no recovery", flags: [], inFlight: "error", newIo: "error", recoverable: false },
  { name: "-r 1 (USER_RECOVERY)", flags: ["-r", "1"], inFlight: "error", newIo: "waits", recoverable: true },
  { name: "-i 1 (USER_RECOVERY_REISSUE)", flags: ["-i", "1"], inFlight: "waits", newIo: "waits", recoverable: true },
];
// FAIL_IO exists from Linux 6.13; on older kernels `add -e 1` is refused (tested in recovery.test.ts) and the row
// reports as skipped.
modes.push({ name: "-e 1 (USER_RECOVERY_FAIL_IO)", flags: ["-e", "1"], inFlight: "error", newIo: "error", recoverable: true,
  unsupported: features.includes("USER_RECOVERY_FAIL_IO") ? undefined : "needs USER_RECOVERY_FAIL_IO, Linux ≥ 6.13" });

/** A direct-I/O dd reading `count` 4 KiB blocks; the fault target below makes each one take 100 ms. */
function reader(devId: number, count: number, skip = 0) {
  return Bun.spawn(["dd", `if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", `count=${count}`, `skip=${skip}`, "iflag=direct"],
    { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
}

/** What a reader has seen by now: "waits" while it still runs; otherwise its result. */
async function seen(dd: ReturnType<typeof reader>): Promise<Seen> {
  if (dd.exitCode === null) return "waits";
  const stderr = await new Response(dd.stderr).text();
  if (dd.exitCode === 0) return "ok";
  // FAIL_IO fails new requests with BLK_STS_TARGET, which reaches the reader as EREMOTEIO.
  const reason = /Input\/output error|Remote I\/O error|No such device or address|No such device|No such file or directory/.exec(stderr);
  expect(reason).not.toBeNull();
  const errnoName: Record<string, string> = { "Input/output error": "EIO", "Remote I/O error": "EREMOTEIO" };
  return `error: ${errnoName[reason![0]] ?? reason![0]}`;
}

function state(devId: number): string {
  if (!existsSync(`/sys/class/ublk-char/ublkc${devId}`)) return "gone";
  return /state (\S+)/.exec(cliOk(["list", "-n", String(devId)]))?.[1] ?? "unknown";
}

const rows: string[] = [];

describe("no server: what the application sees", () => {
  for (const mode of modes) {
    test.skipIf(mode.unsupported !== undefined)(`${mode.name}${mode.unsupported ? ` (${mode.unsupported})` : ""}`, async () => {
      const devId = addDevice(["-t", "fault", "-o", "base=null", "-o", "delayMs=100", "-s", "64M", ...mode.flags]);
      const first = reader(devId, 40); // 4 s at 100 ms each: the kill lands mid-run
      await Bun.sleep(1000);
      expect(first.exitCode).toBeNull();
      process.kill(daemonPidOf(devId), "SIGKILL");
      await waitFor("the kernel to notice the dead daemon", () => ["QUIESCED", "DEAD", "FAIL_IO", "gone"].includes(state(devId)), 60_000);
      const stateAfterKill = state(devId);
      await Bun.sleep(1500);
      const inFlight = await seen(first);
      const second = reader(devId, 1, 2000);
      await Bun.sleep(2000);
      const newIo = await seen(second);

      let afterRecover = "-";
      if (mode.recoverable) {
        const recover = cli(["recover", "-n", String(devId)]);
        expect(recover.stderr).toBe("");
        expect(recover.status).toBe(0);
        // Readers that waited finish now, without an error.
        for (const dd of [first, second]) {
          if (dd.exitCode !== null) continue; // failed before recover (counted above)
          await waitFor("a waiting reader to finish after recover", () => dd.exitCode !== null, 30_000);
          expect(await dd.exited).toBe(0);
        }
        const third = reader(devId, 3);
        expect(await third.exited).toBe(0);
        afterRecover = "I/O works, waiting readers finish without error";
      } else {
        first.kill("SIGKILL");
        second.kill("SIGKILL");
      }

      // Killed again (or still dead) and deleted instead of recovered: a waiting reader gets an error, del works.
      let delWhileWaiting = "-";
      if (mode.recoverable) {
        const waiting = reader(devId, 10_000, 4000);
        await Bun.sleep(500);
        process.kill(daemonPidOf(devId), "SIGKILL");
        await waitFor("QUIESCED", () => state(devId) !== "LIVE", 60_000);
        cliOk(["del", "-n", String(devId), "--force"]); // the reader has it open: plain del would refuse
        await waitFor("the waiting reader to end after del", () => waiting.exitCode !== null, 30_000);
        delWhileWaiting = await seen(waiting);
        expect(delWhileWaiting).toStartWith("error");
      } else {
        cliOk(["del", "-n", String(devId)]);
      }
      expectClean();

      rows.push(`| ${mode.name} | ${stateAfterKill} | ${inFlight} | ${newIo} | ${afterRecover} | ${delWhileWaiting} |`);
      expect(inFlight).toStartWith(mode.inFlight);
      expect(newIo).toStartWith(mode.newIo);
    });
  }

  test("the table", () => {
    expect(rows).toHaveLength(modes.filter((mode) => mode.unsupported === undefined).length);
    console.log(["| mode | state after kill -9 | reader mid-request | new reader | after recover | del instead of recover |",
      "| --- | --- | --- | --- | --- | --- |", ...rows].join("\n"));
  });
});
