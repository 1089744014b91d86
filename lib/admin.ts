/**
 * What the CLI does, as functions: add (spawn the daemon and wait for READY), list, del, features.
 * Kept apart from bin/ so the embedding API and tests can call the same code.
 */
import { closeSync, readdirSync, readFileSync } from "node:fs";
import { EACCES, ENODEV, EPERM, ErrnoError } from "../ffi/errno.ts";
import { ublkFeatureNames, UBLK_F_USER_RECOVERY, UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE, UBLK_S_NAMES } from "../ffi/uapi/ublk_cmd.ts";
import { dataPathName } from "./data-mode.ts";
import { Ctrl, cpusOf, type DeviceParams, type DevInfo } from "./ctrl.ts";
import { oneLine, runDaemon, type DaemonSpec } from "./serving.ts";
import { DAEMON_PATH, daemonLogPath, isOurDaemon, processAlive, runServer } from "./server-process.ts";
import { lockPath, readRecord, readStandby, recordedDevIds, recordPath, removeRecord, tryLockDevice, type DeviceRecord } from "./records.ts";
import {
  lockHolder, provenProcess, provenServers, SIGKILL, SIGTERM, signalProven, stillRunning, waitForExitOf, type ProcessIdentity,
} from "./process-identity.ts";
import { builtInTypes, loadTarget } from "../targets/registry.ts";
import type { TargetRecord } from "../targets/types.ts";

/** Everything `list` shows about one device. */
export interface DeviceListing {
  info: DevInfo;
  params: DeviceParams | null;
  record: DeviceRecord | null;
  /** Why the record could not be used, when it exists but is broken. */
  recordProblem?: string;
  /** A live daemon serves the device but the record names another (its write failed; the daemon retries). */
  recordStale: boolean;
  stateName: string;
  queues: Array<{ qId: number; tid: number; cpus: number[] }>;
}

/**
 * Starts a daemon (or an --auto-recover supervisor, which starts one) for `spec` and resolves with the
 * record once the device is READY. On failure the device the daemon added (if any) is deleted again and the
 * error says why.
 */
export async function addDevice(spec: DaemonSpec, entryPath = DAEMON_PATH, extraEnv: Record<string, string> = {},
                                onAdded?: (devId: number) => void): Promise<DeviceRecord> {
  const outcome = await runServer(spec, entryPath, extraEnv, onAdded);
  if (outcome.record) return outcome.record;
  if (outcome.addedDevId >= 0) await removeLeftovers(outcome.addedDevId);
  throw new Error(outcome.error);
}

export { DAEMON_PATH, daemonLogPath, spawnServer, SUPERVISOR_PATH, waitForExit } from "./server-process.ts";
export { isOurDaemon, processAlive, recoverDevice } from "./server-process.ts";

/** Runs the daemon in this process (--foreground); `onReady` sees the record. Resolves when stopped by a signal. */
export async function runForeground(spec: DaemonSpec, onReady: (record: DeviceRecord) => void): Promise<void> {
  await runDaemon(spec, (line) => {
    if (line.startsWith("READY ")) onReady(JSON.parse(line.slice(6)) as DeviceRecord);
  });
}

/** Ids of the ublk devices the kernel has now. */
export function kernelDevIds(): number[] {
  try {
    return readdirSync("/sys/class/ublk-char")
      .map((name) => /^ublkc(\d+)$/.exec(name)).filter((m) => m !== null).map((m) => Number(m![1])).sort((a, b) => a - b);
  } catch {
    return [];
  }
}

/** Lists one device (or all); throws ErrnoError ENODEV for a missing id. */
export function listDevices(devId?: number): DeviceListing[] {
  const ctrl = Ctrl.open();
  try {
    const ids = devId === undefined ? kernelDevIds() : [devId];
    const listings: DeviceListing[] = [];
    for (const id of ids) {
      let info: DevInfo;
      try {
        info = ctrl.getDevInfo(id);
      } catch (error) {
        // Listing all: skip devices that went away meanwhile, and (not root) other users' devices.
        if (devId === undefined && error instanceof ErrnoError && [ENODEV, EPERM, EACCES].includes(error.errno)) continue;
        throw error;
      }
      let params: DeviceParams | null = null;
      try { params = ctrl.getParams(id); } catch { /* before SET_PARAMS there are none */ }
      let record: DeviceRecord | null = null;
      let recordProblem: string | undefined;
      try { record = readRecord(id); } catch (error) { recordProblem = oneLine(error); }
      const queues = [];
      for (let qId = 0; qId < info.nrHwQueues; qId++) {
        let cpus: number[] = [];
        try { cpus = cpusOf(ctrl.getQueueAffinity(id, qId)); } catch { /* shown empty */ }
        const tid = record && record.pid === info.ublksrvPid ? record.queues.find((q) => q.qId === qId)?.tid ?? 0 : 0;
        queues.push({ qId, tid, cpus });
      }
      const recordStale = record !== null && info.state === UBLK_S_DEV_LIVE && record.pid !== info.ublksrvPid && processAlive(info.ublksrvPid);
      listings.push({ info, params, record, recordProblem, recordStale, stateName: UBLK_S_NAMES[info.state] ?? `state ${info.state}`, queues });
    }
    return listings;
  } finally {
    ctrl.close();
  }
}

/** ublksrv's `list` block for one device, so scripts that parse it keep working. */
export function formatListing(listing: DeviceListing): string {
  const { info, params } = listing;
  const basic = params?.basic;
  const devt = params?.devt;
  const lines = [
    `dev id ${info.devId}: nr_hw_queues ${info.nrHwQueues} queue_depth ${info.queueDepth} block size ${1 << (basic?.logicalBsShift ?? 9)} dev_capacity ${basic?.devSectors ?? 0}`,
    `\tmax rq size ${info.maxIoBufBytes} daemon pid ${info.ublksrvPid} flags 0x${info.flags.toString(16)} state ${listing.stateName}`,
    // The names on a line of their own: the line above keeps ublksrv's format, which scripts parse.
    `\tflag names: ${ublkFeatureNames(info.flags).join(" ") || "(none)"}`,
    `\tublkc: ${devt?.charMajor ?? 0}:${devt?.charMinor ?? 0} ublkb: ${devt?.diskMajor ?? 0}:${devt?.diskMinor ?? 0} owner: ${info.ownerUid}:${info.ownerGid}`,
  ];
  for (const queue of listing.queues) lines.push(`\tqueue ${queue.qId}: tid ${queue.tid} affinity(${queue.cpus.join(" ")})`);
  if (listing.record) lines.push(`\ttarget ${JSON.stringify(listing.record.target)}`);
  else lines.push(`\ttarget ${listing.recordProblem ? `(record unusable: ${listing.recordProblem})` : "(no record)"}`);
  lines.push(`\tdata path: ${dataPathName(info.flags)}`);
  // No "pid" in these lines: scripts find the daemon's pid as the 7th field of the one line containing "pid".
  if (listing.recordStale) {
    lines.push(`\trecord stale: it names daemon ${listing.record!.pid}, not the one serving (its write failed; the daemon retries, see ${daemonLogPath()})`);
  }
  const supervisor = listing.record?.supervisorPid ?? 0;
  if (supervisor > 0) lines.push(`\tauto-recover supervisor: ${supervisor}${processAlive(supervisor) ? "" : " (not running)"}`);
  const standby = liveStandby(info.devId);
  if (standby) {
    const when = supervisor > 0 ? "takes over the moment the daemon dies" : `"recover -n ${info.devId}" hands it the device`;
    lines.push(`\tstandby daemon: ${standby.pid} (${when})`);
  }
  if (!processAlive(info.ublksrvPid) && !(supervisor > 0 && processAlive(supervisor))) {
    const recoverable = (info.flags & UBLK_F_USER_RECOVERY) !== 0 && info.state !== UBLK_S_DEV_DEAD && listing.record !== null;
    lines.push(`\torphan: no daemon serves it; ${recoverable ? `"recover -n ${info.devId}" or ` : ""}"del -n ${info.devId}"`);
  }
  return lines.join("\n");
}

/** JSON form of a listing for `list --json`. */
export function listingJson(listing: DeviceListing): object {
  return {
    devId: listing.info.devId, state: listing.stateName, daemonPid: listing.info.ublksrvPid, nrHwQueues: listing.info.nrHwQueues,
    queueDepth: listing.info.queueDepth, maxIoBufBytes: listing.info.maxIoBufBytes, flags: listing.info.flags,
    flagNames: ublkFeatureNames(listing.info.flags),
    dataPath: dataPathName(listing.info.flags),
    ownerUid: listing.info.ownerUid, ownerGid: listing.info.ownerGid,
    logicalBlockBytes: 1 << (listing.params?.basic.logicalBsShift ?? 9), devSectors: listing.params?.basic.devSectors ?? 0,
    devt: listing.params?.devt ?? null, params: listing.params, queues: listing.queues, target: listing.record?.target ?? null,
    recordProblem: listing.recordProblem ?? null, recordStale: listing.recordStale, supervisorPid: listing.record?.supervisorPid ?? null,
    standbyPid: liveStandby(listing.info.devId)?.pid ?? null,
  };
}

/** The device's --auto-recover standby daemon, while it runs and is provably ours. */
function liveStandby(devId: number): ProcessIdentity | null {
  const noted = readStandby(devId);
  return noted && stillRunning(noted) && isOurDaemon(noted.pid) ? noted : null;
}

/**
 * Deletes a device: asks its daemon to stop (SIGTERM) and waits; if there is no live daemon, or it does not
 * finish in time, stops and deletes the device directly. Removes the record and the target's outside state.
 */
export async function deleteDevice(devId: number, timeoutMs = 30_000): Promise<void> {
  const ctrl = Ctrl.open();
  try {
    let info: DevInfo | null = null;
    try {
      info = ctrl.getDevInfo(devId);
    } catch (error) {
      if (!(error instanceof ErrnoError && error.errno === ENODEV)) throw error;
    }
    let record: DeviceRecord | null = null;
    try { record = readRecord(devId); } catch { /* a broken record is removed below */ }
    if (!info && !record) throw new ErrnoError("del", ENODEV, `del: no ublk device ${devId}`);
    // The supervisor first, so that it does not recover what we are deleting.
    // Only processes proven ours are signalled (lib/process-identity.ts); never the kernel's dev_info pid alone.
    const supervisor = provenProcess(record?.supervisorPid, record?.supervisorStartTicks, record?.exe);
    if (supervisor && isOurDaemon(supervisor.pid) && signalProven(supervisor, SIGTERM)) await waitForExitOf(supervisor, 10_000);
    // Its standby owns nothing yet; the supervisor ends it, but may have died before it could.
    const standby = liveStandby(devId);
    if (standby && signalProven(standby, SIGKILL)) await waitForExitOf(standby, 5_000);
    const daemons = provenServers(record, lockPath(devId)).filter((daemon) => isOurDaemon(daemon.pid));
    for (const daemon of daemons) signalProven(daemon, SIGTERM);
    for (const daemon of daemons) {
      if (!(await waitForExitOf(daemon, timeoutMs)) && signalProven(daemon, SIGKILL)) await waitForExitOf(daemon, 5_000);
    }
    // Only under the device's lock: a daemon recovering the device (started by `recover` or by a supervisor, and
    // known to neither the kernel nor the record until it is done) holds it, and must be gone before the device
    // and the record are, or it would serve a deleted device and write its record back.
    const lockFd = await takeDeviceLock(devId, timeoutMs);
    try {
      if (info) await removeLeftovers(devId, ctrl);
      else await removeRecordAndState(devId, record);
    } finally {
      closeSync(lockFd);
    }
  } finally {
    ctrl.close();
  }
}

/**
 * Takes the device's lock for `del`, stopping its holder first when that is one of our daemons (SIGTERM, then
 * SIGKILL): a daemon still recovering has no signal handler yet and dies at once, before any record write.
 * Another holder (a second `del`) is waited for. Throws a one-line reason after `timeoutMs`.
 */
async function takeDeviceLock(devId: number, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let signalled: ProcessIdentity | null = null;
  let killAfter = 0;
  for (;;) {
    const fd = tryLockDevice(devId);
    if (fd >= 0) return fd;
    // The holder as /proc/locks names it, signalled only through a pidfd (lib/process-identity.ts).
    const holder = lockHolder(lockPath(devId));
    if (holder && runsDaemon(holder.pid)) {
      if (signalled?.pid !== holder.pid || signalled.startTicks !== holder.startTicks) {
        signalProven(holder, SIGTERM);
        signalled = holder;
        killAfter = Date.now() + Math.min(timeoutMs, 10_000);
      } else if (Date.now() > killAfter) signalProven(holder, SIGKILL);
    }
    if (Date.now() > deadline) throw new Error(`del: device ${devId} is busy: pid ${holder?.pid ?? "?"} holds its lock`);
    await Bun.sleep(20);
  }
}

/** True when `pid` runs lib/daemon.ts (not a CLI, which may be another `del`). */
function runsDaemon(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").includes(DAEMON_PATH);
  } catch {
    return false;
  }
}

/** Stops and deletes a device that has no daemon, then removes its record and target state. */
async function removeLeftovers(devId: number, ctrlIn?: Ctrl): Promise<void> {
  const ctrl = ctrlIn ?? Ctrl.open();
  let record: DeviceRecord | null = null;
  try { record = readRecord(devId); } catch { /* removed below */ }
  try {
    let exists = true;
    try {
      const info = ctrl.getDevInfo(devId);
      if (info.state !== UBLK_S_DEV_DEAD) {
        try { ctrl.stopDev(devId); } catch { /* deleting anyway */ }
      }
    } catch (error) {
      if (error instanceof ErrnoError && error.errno === ENODEV) exists = false;
      else throw error;
    }
    if (exists) {
      try {
        ctrl.delDev(devId, { timeoutMs: 30_000 });
      } catch (error) {
        if (!(error instanceof ErrnoError && error.errno === ENODEV)) throw error;
      }
    }
    await removeRecordAndState(devId, record);
  } finally {
    if (!ctrlIn) ctrl.close();
  }
}

async function removeRecordAndState(devId: number, record: DeviceRecord | null): Promise<void> {
  removeRecord(devId);
  if (!record) return;
  try {
    const target = await loadTarget(record.target.type);
    await target.destroy?.(record.target);
  } catch { /* the target's state cannot be found; nothing more to remove */ }
}

export interface Orphan {
  description: string;
  remove(): void | Promise<void>;
}

/**
 * Leftovers no device stands behind: records of ids the kernel no longer has, and state the built-in targets
 * find unreferenced (memory-target /dev/shm files). `list` shows them; `del -a` removes them.
 */
export async function findOrphans(): Promise<Orphan[]> {
  const inKernel = new Set(kernelDevIds());
  const orphans: Orphan[] = [];
  const inUse: TargetRecord[] = [];
  for (const devId of recordedDevIds()) {
    let record: DeviceRecord | null = null;
    try { record = readRecord(devId); } catch { /* unreadable: still an orphan if the kernel has no such device */ }
    if (record) inUse.push(record.target);
    if (!inKernel.has(devId) && !(record && provenServers(record, lockPath(devId)).length > 0)) {
      orphans.push({ description: `record ${recordPath(devId)}: the kernel has no ublk device ${devId}`, remove: () => deleteDevice(devId) });
    }
  }
  for (const type of builtInTypes()) {
    const target = await loadTarget(type);
    for (const orphan of target.orphans?.(inUse) ?? []) orphans.push(orphan);
  }
  return orphans;
}

/** Every device id known to the kernel or to a record. */
export function allDevIds(): number[] {
  return [...new Set([...kernelDevIds(), ...recordedDevIds()])].sort((a, b) => a - b);
}

/** The kernel's feature mask and the names of its bits. */
export function kernelFeatures(): { mask: number; names: string[] } {
  const ctrl = Ctrl.open();
  try {
    const mask = ctrl.getFeatures();
    return { mask, names: ublkFeatureNames(mask) };
  } finally {
    ctrl.close();
  }
}
