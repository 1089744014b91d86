/**
 * Device records: /run/ublk-bun/<devId>.json, one per device, everything needed to list it and to rebuild its
 * server after a crash (the kernel keeps no target configuration). Written atomically (temporary file +
 * rename), mode 0600, and never read or written through a symlink.
 */
import { closeSync, constants, fstatSync, ftruncateSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, statSync, unlinkSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { recordPath, runDir } from "./run-dir.ts";
import { standbySocketPath } from "./daemon-env.ts";
import { identityOf, type ProcessIdentity } from "./process-identity.ts";
import type { DeviceConfig, QueueInfo } from "./device.ts";
import type { TargetRecord } from "../targets/types.ts";
import { flock, LOCK_EX, LOCK_NB } from "../ffi/libc.ts";
import { EAGAIN, ErrnoError } from "../ffi/errno.ts";
import { isPollSetting } from "./options.ts";

export const RECORD_VERSION = 1;

export interface DeviceRecord {
  version: number;
  devId: number;
  config: DeviceConfig;
  target: TargetRecord;
  /** The serving daemon's pid (0 while none). */
  pid: number;
  queues: QueueInfo[];
  /** Pid of an --auto-recover supervisor, when one watches the daemon. */
  supervisorPid?: number;
  /** Start times (/proc/PID/stat, clock ticks after boot) of `pid` and `supervisorPid`, and the executable both run:
   * with the pid they prove a process is ours before `del` signals it (lib/process-identity.ts). */
  pidStartTicks?: number;
  supervisorStartTicks?: number;
  exe?: string;
  /** `add --standby`: each daemon keeps a warm spare for `recover` (lib/standby.ts). */
  standby?: boolean;
  createdAt: string;
}

export { recordPath, runDir };

/** Writes a record atomically; the directory is created 0700 if missing. */
export function writeRecord(record: DeviceRecord): void {
  const dir = runDir();
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const finalPath = recordPath(record.devId);
  const temporaryPath = join(dir, `.${record.devId}.json.${process.pid}.tmp`);
  const fd = openSync(temporaryPath, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o600);
  try {
    writeSync(fd, JSON.stringify(record, null, 2) + "\n");
  } finally {
    closeSync(fd);
  }
  renameSync(temporaryPath, finalPath); // rename replaces a symlink at finalPath, never follows it
}

/** Reads a record; null when there is none. Throws an Error with a one-line reason when it is unusable. */
export function readRecord(devId: number): DeviceRecord | null {
  const path = recordPath(devId);
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return null;
    if (code === "ELOOP") throw new Error(`record ${path} is a symlink; refusing to follow it`);
    throw new Error(`cannot read record ${path}: ${(error as Error).message}`);
  }
  let text = "";
  try {
    const stat = fstatSync(fd);
    if (!stat.isFile()) throw new Error(`record ${path} is not a regular file`);
    if (stat.uid !== (process.getuid?.() ?? 0)) throw new Error(`record ${path} is owned by uid ${stat.uid}, not by us; refusing it`);
    if (stat.size > 1 << 20) throw new Error(`record ${path} is too large (${stat.size} bytes)`);
    const bytes = Buffer.alloc(stat.size);
    let done = 0;
    while (done < stat.size) {
      const n = readSync(fd, bytes, done, stat.size - done, done);
      if (n <= 0) break;
      done += n;
    }
    text = bytes.subarray(0, done).toString("utf8");
  } finally {
    closeSync(fd);
  }
  let record: DeviceRecord;
  try {
    record = JSON.parse(text) as DeviceRecord;
  } catch {
    throw new Error(`record ${path} is corrupt (not valid JSON)`);
  }
  if (!isRecord(record) || record.devId !== devId) throw new Error(`record ${path} is corrupt (missing or wrong fields)`);
  return record;
}

function isRecord(value: unknown): value is DeviceRecord {
  const r = value as DeviceRecord;
  return typeof r === "object" && r !== null && r.version === RECORD_VERSION && Number.isInteger(r.devId) &&
    typeof r.config === "object" && r.config !== null && Number.isInteger(r.config.nrHwQueues) && Number.isInteger(r.config.queueDepth) &&
    Number.isInteger(r.config.maxIoBufBytes) && Number.isInteger(r.config.flags) &&
    (r.config.pollUs === undefined || isPollSetting(r.config.pollUs)) && (r.config.zeroCopy === undefined || typeof r.config.zeroCopy === "boolean") &&
    (r.config.batchIo === undefined || typeof r.config.batchIo === "boolean") &&
    typeof r.target === "object" && r.target !== null && typeof r.target.type === "string" && Number.isFinite(r.target.sizeBytes) &&
    Number.isInteger(r.pid) && Array.isArray(r.queues) &&
    (r.pidStartTicks === undefined || Number.isInteger(r.pidStartTicks)) &&
    (r.supervisorStartTicks === undefined || Number.isInteger(r.supervisorStartTicks)) && (r.exe === undefined || typeof r.exe === "string");
}

/** Where an --auto-recover supervisor notes its standby daemon: pid, start time and executable. */
function standbyPath(devId: number): string {
  return join(runDir(), `${devId}.standby`);
}

/** Notes the standby daemon of a device (for `list`, and for `del` should its supervisor be gone). */
export function writeStandby(devId: number, pid: number): void {
  const identity = identityOf(pid);
  if (!identity) return;
  const temporaryPath = join(runDir(), `.${devId}.standby.${process.pid}.tmp`);
  writeFileSync(temporaryPath, JSON.stringify(identity) + "\n", { mode: 0o600, flag: "wx" });
  renameSync(temporaryPath, standbyPath(devId));
}

/** The standby daemon noted for a device, as written (not yet proven alive), or null. */
export function readStandby(devId: number): ProcessIdentity | null {
  try {
    const stat = lstatSync(standbyPath(devId));
    if (!stat.isFile() || stat.uid !== (process.getuid?.() ?? 0)) return null;
    const identity = JSON.parse(readFileSync(standbyPath(devId), "utf8")) as ProcessIdentity;
    return Number.isInteger(identity.pid) && Number.isInteger(identity.startTicks) && typeof identity.exe === "string" ? identity : null;
  } catch {
    return null;
  }
}

export function removeStandby(devId: number): void {
  try { unlinkSync(standbyPath(devId)); } catch { /* none */ }
}

/** Removes a record if present (a symlink in its place is removed, not followed). */
export function removeRecord(devId: number): void {
  for (const path of [recordPath(devId), lockPath(devId), standbyPath(devId), standbySocketPath(devId), adminLockPath(devId)]) {
    try {
      unlinkSync(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    }
  }
}

/** Held by one resize or restart of the device at a time (lib/resize.ts). */
export function adminLockPath(devId: number): string {
  return join(runDir(), `${devId}.admin.lock`);
}

export function lockPath(devId: number): string {
  return join(runDir(), `${devId}.lock`);
}

/**
 * Takes the device's lock for the life of this process (a recovering or serving daemon), so two recovers of one
 * device cannot interleave. Returns the fd (close it to release); throws a one-line reason naming the holder.
 */
export function lockDevice(devId: number, purpose: string): number {
  const fd = tryLockDevice(devId);
  if (fd < 0) throw new Error(`${purpose}: device ${devId} is busy: pid ${lockHolderPid(devId) || "?"} is serving or recovering it`);
  return fd;
}

/** lockDevice, waiting up to `timeoutMs` for a holder on its way out (a killed daemon releases it as it exits). */
export async function lockDeviceWaiting(devId: number, purpose: string, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const fd = tryLockDevice(devId);
    if (fd >= 0) return fd;
    if (Date.now() > deadline) return lockDevice(devId, purpose); // throws, naming the holder
    await Bun.sleep(2);
  }
}

/**
 * The device's lock, or -1 while another process holds it; on success our pid is written into the lock file
 * for `lockHolderPid`. A lock taken on a file that `removeRecord` unlinked meanwhile would exclude nobody, so the
 * file is opened again until the locked file is the one at the path.
 */
export function tryLockDevice(devId: number): number {
  mkdirSync(runDir(), { recursive: true, mode: 0o700 });
  const path = lockPath(devId);
  for (;;) {
    const fd = openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW, 0o600);
    const result = flock(fd, LOCK_EX | LOCK_NB);
    if (result < 0) {
      closeSync(fd);
      if (-result === EAGAIN /* EWOULDBLOCK */) return -1;
      throw new ErrnoError(`flock ${path}`, -result);
    }
    let current: number | undefined;
    try { current = statSync(path).ino; } catch { /* unlinked meanwhile: open it again */ }
    if (current !== fstatSync(fd).ino) {
      closeSync(fd);
      continue;
    }
    ftruncateSync(fd, 0);
    writeSync(fd, `${process.pid}\n`, 0);
    return fd;
  }
}

/** The pid written into the device's lock file by its last holder (0 when none is known). */
export function lockHolderPid(devId: number): number {
  try {
    const pid = Number(readFileSync(lockPath(devId), "utf8").trim());
    return Number.isInteger(pid) && pid > 0 ? pid : 0;
  } catch {
    return 0;
  }
}

/** Device ids that have a record file. */
export function recordedDevIds(): number[] {
  let names: string[];
  try {
    names = readdirSync(runDir());
  } catch {
    return [];
  }
  return names.map((name) => /^(\d+)\.json$/.exec(name)).filter((m) => m !== null).map((m) => Number(m![1])).sort((a, b) => a - b);
}
