/**
 * `restart -n ID` (QUIESCE_DEV, Linux ≥ 6.16): replaces a device's daemon by a new one — e.g. after upgrading
 * ublk-bun — without failing a request. The old daemon is told to hand over (HANDOVER_SIGNAL): it quiesces
 * the device, lets its queues finish what they hold and exits without stopping the device, so the kernel holds
 * every new request. The new daemon then re-attaches exactly like `recover` (START/END_USER_RECOVERY) from the
 * record, and the held requests are served by it. The stall printed is the time from the hand-over request
 * until the new daemon reported READY: an upper bound of how long I/O waited.
 *
 * On a kernel without QUIESCE_DEV (6.12) restart is refused: "kill + recover" with -i 1 also loses no request,
 * but a request the old daemon held when it died is served twice — we do not hide that behind "restart".
 */
import { closeSync } from "node:fs";
import { UBLK_F_BATCH_IO, UBLK_F_QUIESCE, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_FAIL_IO, UBLK_S_DEV_LIVE, UBLK_S_NAMES } from "../ffi/uapi/ublk_cmd.ts";
import { isOurDaemon, processAlive, recoverDevice, waitForExit } from "./admin.ts";
import { Ctrl } from "./ctrl.ts";
import { HANDOVER_SIGNAL } from "./serving.ts";
import { readRecord, runDir, type DeviceRecord } from "./records.ts";
import { lockAdmin } from "./resize.ts";
import { UsageError } from "./options.ts";

export interface RestartResult {
  record: DeviceRecord;
  oldPid: number;
  newPid: number;
  /** From the hand-over request to the new daemon's READY. */
  stallMs: number;
}

/** How long the old daemon's QUIESCE_DEV waits for each queue to have an idle tag, plus time to exit. */
const HANDOVER_EXIT_TIMEOUT_MS = 60_000;

export async function restartDevice(devId: number): Promise<RestartResult> {
  const ctrl = Ctrl.open();
  let lockFd = -1;
  let oldPid: number;
  try {
    if ((ctrl.getFeatures() & UBLK_F_QUIESCE) === 0) {
      throw new UsageError("restart: this kernel's ublk_drv has no QUIESCE_DEV (it needs Linux ≥ 6.16); with -i 1, kill the daemon and \"recover\" instead");
    }
    const info = ctrl.getDevInfoFor("restart", devId);
    if ((info.flags & UBLK_F_USER_RECOVERY) === 0) {
      throw new Error(`restart: device ${devId} was created without recovery (-r 1 or -i 1), which restart needs`);
    }
    if ((info.flags & UBLK_F_USER_RECOVERY_FAIL_IO) !== 0) {
      throw new Error(`restart: device ${devId} fails I/O while no daemon serves it (-e 1), so a restart would fail requests; kill its daemon and "recover" instead`);
    }
    if ((info.flags & UBLK_F_BATCH_IO) !== 0) {
      throw new Error(`restart: device ${devId} uses batch commands (--batch 1), which this kernel's QUIESCE_DEV cannot hand over ` +
        `without failing every later request; kill its daemon and "recover" instead`);
    }
    if ((info.flags & UBLK_F_QUIESCE) === 0) {
      throw new Error(`restart: device ${devId} was created without QUIESCE (by an older ublk-bun); kill its daemon and "recover" instead`);
    }
    lockFd = lockAdmin(devId, "restart");
    const record = readRecord(devId);
    if (!record) throw new Error(`restart: device ${devId} has no record in ${runDir()}; only devices added by ublk-bun can be restarted`);
    oldPid = info.ublksrvPid;
    if (info.state !== UBLK_S_DEV_LIVE || !processAlive(oldPid)) {
      throw new Error(`restart: device ${devId} is ${UBLK_S_NAMES[info.state] ?? info.state} with no live daemon; use "recover -n ${devId}"`);
    }
    if (!isOurDaemon(oldPid)) throw new Error(`restart: device ${devId} is served by pid ${oldPid}, which is not a ublk-bun daemon`);
    const supervisor = record.supervisorPid ?? 0;
    if (supervisor > 0 && processAlive(supervisor)) {
      throw new Error(`restart: device ${devId} is watched by supervisor pid ${supervisor} (--auto-recover), which would race the restart`);
    }
  } catch (error) {
    if (lockFd >= 0) closeSync(lockFd);
    throw error;
  } finally {
    ctrl.close();
  }
  try {
    const startedAt = performance.now();
    process.kill(oldPid, HANDOVER_SIGNAL);
    if (!(await waitForExit(oldPid, HANDOVER_EXIT_TIMEOUT_MS))) {
      // It could not let go (a target stuck on a request): a crash is what recovery is made for.
      try { process.kill(oldPid, "SIGKILL"); } catch { /* gone meanwhile */ }
      await waitForExit(oldPid, 10_000);
    }
    const record = await recoverDevice(devId);
    const stallMs = performance.now() - startedAt;
    return { record, oldPid, newPid: record.pid, stallMs };
  } finally {
    closeSync(lockFd);
  }
}
