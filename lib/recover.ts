/**
 * `recover -n ID` as a function, with few imports: the cheap checks, then a daemon started at once (lib/daemon.ts
 * in "recover" mode), which waits for the kernel to quiesce the device while its queue Workers load.
 */
import { ENODEV, ErrnoError } from "../ffi/errno.ts";
import { UBLK_F_USER_RECOVERY, UBLK_S_DEV_LIVE } from "../ffi/uapi/ublk_cmd.ts";
import { Ctrl, type DevInfo } from "./ctrl.ts";
import { isOurDaemon, processAlive } from "./process-identity.ts";
import { readRecord, runDir, type DeviceRecord } from "./records.ts";
import { DAEMON_PATH, runServer, SUPERVISOR_PID_ENV } from "./server-process.ts";

/**
 * `recover -n ID`: checks that the device can be recovered, then starts a daemon that waits until the kernel has
 * quiesced it and re-attaches (Device.recover); resolves with the new record. A failed recovery leaves the device
 * quiesced for another attempt.
 */
export async function recoverDevice(devId: number, onWait?: (elapsedMs: number, state: string) => void,
                                    entryPath = DAEMON_PATH, extraEnv: Record<string, string> = {}): Promise<DeviceRecord> {
  const record = readRecord(devId);
  const ctrl = Ctrl.open();
  let info: DevInfo;
  try {
    try {
      info = ctrl.getDevInfo(devId);
    } catch (error) {
      if (error instanceof ErrnoError && error.errno === ENODEV) throw new ErrnoError("recover", ENODEV, `recover: no ublk device ${devId}`);
      throw error;
    }
    if (!record) throw new Error(`recover: device ${devId} has no record in ${runDir()}; only devices added by ublk-bun can be recovered`);
    if ((info.flags & UBLK_F_USER_RECOVERY) === 0) {
      throw new Error(`recover: device ${devId} was created without recovery (-r 1 or -i 1); it can only be deleted`);
    }
    if (info.state === UBLK_S_DEV_LIVE && processAlive(info.ublksrvPid)) {
      throw new Error(`recover: device ${devId} is LIVE with daemon pid ${info.ublksrvPid}; nothing to recover`);
    }
    const supervisor = record.supervisorPid ?? 0;
    if (supervisor > 0 && supervisor !== Number(extraEnv[SUPERVISOR_PID_ENV] ?? 0) && processAlive(supervisor) && isOurDaemon(supervisor)) {
      throw new Error(`recover: device ${devId} is watched by supervisor pid ${supervisor} (--auto-recover), which recovers it`);
    }
  } finally {
    ctrl.close();
  }
  // The daemon starts at once: it waits for the kernel to quiesce the device itself (reporting WAITING lines),
  // while its queue Workers load — no second wait here before it.
  const outcome = await runServer({ mode: "recover", config: { ...record.config, devId }, target: record.target, createdAt: record.createdAt },
    entryPath, extraEnv, undefined, onWait);
  if (!outcome.record) throw new Error(outcome.error);
  return outcome.record;
}
