// Which processes `del` may signal (lib/process-identity.ts): a pid proves nothing until its start time and
// executable match, or it holds the device's lock. Runs on the host: it needs /proc and flock, not ublk.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { identityOf, lockHolder, provenProcess, provenServers, SIGTERM, signalProven, waitForExitOf } from "../../lib/process-identity.ts";

const work = mkdtempSync("/tmp/ublk-bun-identity-");
afterAll(() => rmSync(work, { recursive: true, force: true }));

function sleeper() {
  return Bun.spawn(["sleep", "60"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
}

describe("process identity", () => {
  test("a live process is proven only with its own start time and executable", async () => {
    const child = sleeper();
    try {
      const identity = identityOf(child.pid)!;
      expect(identity.pid).toBe(child.pid);
      expect(identity.startTicks).toBeGreaterThan(0);
      expect(identity.exe).toMatch(/sleep|busybox|coreutils/);
      expect(provenProcess(child.pid, identity.startTicks, identity.exe)).toEqual(identity);
      expect(provenProcess(child.pid, identity.startTicks + 1, identity.exe)).toBeNull(); // a recycled pid
      expect(provenProcess(child.pid, identity.startTicks, process.execPath + "-other")).toBeNull();
      expect(provenProcess(child.pid, undefined, identity.exe)).toBeNull(); // a record without a start time proves nothing
      expect(provenServers({ pid: child.pid }, join(work, "none.lock"))).toEqual([]); // the pid alone: nothing

      // A wrong identity is never signalled; the right one is.
      expect(signalProven({ ...identity, startTicks: identity.startTicks + 1 }, SIGTERM)).toBe(false);
      expect(identityOf(child.pid)).not.toBeNull();
      expect(signalProven(identity, SIGTERM)).toBe(true);
      expect(await waitForExitOf(identity, 5_000)).toBe(true);
      await child.exited;
      expect(signalProven(identity, SIGTERM)).toBe(false); // gone (and reaped)
    } finally {
      child.kill("SIGKILL");
    }
  });

  test("the holder of a lock file is found through /proc/locks", async () => {
    const lockPath = join(work, "7.lock");
    writeFileSync(lockPath, "", { mode: 0o600 });
    expect(lockHolder(lockPath)).toBeNull();
    // flock(1) from util-linux holds the lock while it runs `sleep`; it is the locking process.
    const holder = Bun.spawn(["flock", "-x", lockPath, "sleep", "60"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
    try {
      const deadline = Date.now() + 5_000;
      let found = lockHolder(lockPath);
      while (!found && Date.now() < deadline) {
        await Bun.sleep(20);
        found = lockHolder(lockPath);
      }
      expect(found?.pid).toBe(holder.pid);
      expect(provenServers(null, lockPath).map((identity) => identity.pid)).toEqual([holder.pid]);
    } finally {
      holder.kill("SIGKILL");
      await holder.exited;
    }
  });
});
