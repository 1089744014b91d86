/**
 * `resize -n ID -s SIZE` (UPDATE_SIZE, Linux ≥ 6.16): changes the size of a live device without stopping it.
 *
 * Order, so that a crash anywhere leaves something `recover` accepts and no request can reach bytes the target
 * does not have:
 *   grow:   target makes room → record says the new size → UPDATE_SIZE
 *   shrink: record says the new size → UPDATE_SIZE → target releases the tail
 * If UPDATE_SIZE fails the record is put back. Running queues learn of a grow by themselves (targets/mapping.ts).
 */
import { closeSync, constants, mkdirSync, openSync } from "node:fs";
import { EAGAIN, ErrnoError } from "../ffi/errno.ts";
import { flock, LOCK_EX, LOCK_NB } from "../ffi/libc.ts";
import { UBLK_F_UPDATE_SIZE, UBLK_S_DEV_LIVE, UBLK_S_NAMES } from "../ffi/uapi/ublk_cmd.ts";
import { Ctrl } from "./ctrl.ts";
import { UsageError } from "./options.ts";
import { adminLockPath, readRecord, runDir, writeRecord, type DeviceRecord } from "./records.ts";
import { loadTarget } from "../targets/registry.ts";

export interface ResizeResult {
  devId: number;
  oldSizeBytes: number;
  newSizeBytes: number;
}

/**
 * Takes `<runDir>/<devId>.admin.lock` for one resize or restart: two of them on one device would each write a
 * record from what they read. (The device's own lock is held by its daemon for its whole life.)
 * Returns the fd to close when done.
 */
export function lockAdmin(devId: number, op: string): number {
  mkdirSync(runDir(), { recursive: true, mode: 0o700 });
  const path = adminLockPath(devId);
  const fd = openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
  const locked = flock(fd, LOCK_EX | LOCK_NB);
  if (locked < 0) {
    closeSync(fd);
    if (-locked === EAGAIN) throw new Error(`${op}: device ${devId} is busy: another resize or restart of it is running`);
    throw new ErrnoError(`flock ${path}`, -locked);
  }
  return fd;
}

export async function resizeDevice(devId: number, newSizeBytes: number): Promise<ResizeResult> {
  const ctrl = Ctrl.open();
  let lockFd = -1;
  try {
    if ((ctrl.getFeatures() & UBLK_F_UPDATE_SIZE) === 0) {
      throw new UsageError("resize: this kernel's ublk_drv has no UPDATE_SIZE (it needs Linux ≥ 6.16)");
    }
    const info = ctrl.getDevInfoFor("resize", devId);
    // UPDATE_SIZE on a device without a disk (not started, or stopped) oopses kernels before 7.0's fix.
    if (info.state !== UBLK_S_DEV_LIVE) {
      throw new Error(`resize: device ${devId} is ${UBLK_S_NAMES[info.state] ?? info.state}, not LIVE; recover it first`);
    }
    lockFd = lockAdmin(devId, "resize");
    const record = readRecord(devId);
    if (!record) throw new Error(`resize: device ${devId} has no record in ${runDir()}; only devices added by ublk-bun can be resized`);
    const blockBytes = 2 ** record.target.logicalBlockShift;
    if (newSizeBytes % blockBytes !== 0) throw new UsageError(`-s: size must be a multiple of the logical block size (${blockBytes})`);
    const oldSizeBytes = record.target.sizeBytes;
    const result = { devId, oldSizeBytes, newSizeBytes };
    if (newSizeBytes === oldSizeBytes) return result;
    const target = await loadTarget(record.target.type);
    if (!target.resize) throw new Error(`resize: the ${record.target.type} target cannot be resized`);
    const growing = newSizeBytes > oldSizeBytes;
    if (growing) await target.resize(record.target, newSizeBytes);
    const resized: DeviceRecord = { ...record, target: { ...record.target, sizeBytes: newSizeBytes } };
    writeRecord(resized);
    try {
      ctrl.updateSize(devId, newSizeBytes / 512);
    } catch (error) {
      writeRecord(record);
      throw error;
    }
    if (!growing) await target.resize(record.target, newSizeBytes);
    return result;
  } finally {
    if (lockFd >= 0) closeSync(lockFd);
    ctrl.close();
  }
}
