// device.ts's checkRecoverable: a device LIVE with a daemon that is still running has nothing to recover, but a
// daemon killed a moment ago may linger as a zombie (not yet reaped by its parent) while the kernel still reports
// LIVE — a recovery (an --auto-recover standby's, seen failing in a full 6.12 run) must then wait, not give up.
import { expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { checkRecoverable } from "../../lib/device.ts";
import { UBLK_F_USER_RECOVERY, UBLK_S_DEV_LIVE } from "../../ffi/uapi/ublk_cmd.ts";

const config = { devId: 3, nrHwQueues: 1, queueDepth: 128, maxIoBufBytes: 524288, flags: UBLK_F_USER_RECOVERY };
const liveWith = (pid: number) => ({ devId: 3, nrHwQueues: 1, queueDepth: 128, state: UBLK_S_DEV_LIVE, maxIoBufBytes: 524288,
  ublksrvPid: pid, flags: UBLK_F_USER_RECOVERY, ublksrvFlags: 0, ownerUid: 0, ownerGid: 0 });

test("LIVE with a running daemon: nothing to recover", () => {
  expect(() => checkRecoverable(liveWith(process.pid), config)).toThrow(/is LIVE with daemon pid \d+; nothing to recover/);
});

test("LIVE with a daemon that is a zombie: recoverable (the caller waits for QUIESCED)", async () => {
  // `sleep 0` ends at once; its parent then execs `sleep 5`, which never reaps it: a zombie for 5 s.
  const parent = Bun.spawn(["sh", "-c", "sleep 0 & echo $!; exec sleep 5"], { stdin: "ignore", stdout: "pipe" });
  const reader = parent.stdout.getReader();
  const zombie = Number(new TextDecoder().decode((await reader.read()).value).trim());
  try {
    const state = () => existsSync(`/proc/${zombie}/stat`) ? readFileSync(`/proc/${zombie}/stat`, "utf8").split(") ")[1]![0] : "gone";
    for (let waitedMs = 0; state() !== "Z" && waitedMs < 3000; waitedMs += 10) await Bun.sleep(10);
    expect(state()).toBe("Z");
    expect(() => checkRecoverable(liveWith(zombie), config)).not.toThrow();
  } finally {
    parent.kill();
    await parent.exited;
  }
});
