/**
 * What the server process behind `ublk-bun add` does (its entry is lib/daemon.ts): creates or recovers the
 * device (lib/device.ts), writes its record and reports on a status pipe, then serves until SIGTERM/SIGINT,
 * when it stops and deletes the device. Its status lines are listed in lib/server-process.ts.
 */
import { closeSync } from "node:fs";
import { Device, pauseForTest, QueueRetiredError, type DeviceConfig, type DeviceEvents } from "./device.ts";
import { lockDevice, lockDeviceWaiting, readRecord, removeRecord, RECORD_VERSION, writeRecord, type DeviceRecord } from "./records.ts";
import { recordedIdentity, waitForDeathOf } from "./process-identity.ts";
import { debug } from "./debug.ts";
import { dropEarlyQueueWorkers } from "./queue-workers.ts";
import { DAEMON_SPEC_ENV, isOurDaemon, processAlive, STATUS_FD, SUPERVISOR_PID_ENV } from "./daemon-env.ts";
import { Ctrl, type DevInfo } from "./ctrl.ts";
import { runDir } from "./run-dir.ts";
import { forget, keepStandby, recoverAsked, type Asker, type KeptStandby } from "./standby.ts";
import type { SentListing } from "./status-lines.ts";

export { DAEMON_SPEC_ENV, STATUS_FD, SUPERVISOR_PID_ENV };
import { loadTarget } from "../targets/registry.ts";
import { UBLK_F_USER_RECOVERY, UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE } from "../ffi/uapi/ublk_cmd.ts";
import type { TargetRecord } from "../targets/types.ts";

export interface DaemonSpec {
  /**
   * "create": ADD_DEV … START_DEV. "recover": re-attach to a quiesced device (config.devId names it).
   * "standby" (an --auto-recover supervisor's warm spare): load everything a recovery needs — runtime, target,
   * queue Workers with their rings — report STANDBY, then wait, owning nothing, until `watchPid` (the serving
   * daemon) exits, and recover the device at once.
   */
  mode?: "create" | "recover" | "standby";
  /** With "standby": the serving daemon's pid. */
  watchPid?: number;
  /** With "standby": once `watchPid` has exited, re-attach at once but resume the device's I/O (END_USER_RECOVERY)
   * only when `recover -n ID` asks (on the standby's socket, see standbySocketPath) — the spare of `add --standby`,
   * not of a supervisor. */
  waitForRecover?: boolean;
  /** `add --standby`: every daemon of the device keeps a warm spare that `recover` hands the device to. */
  standby?: boolean;
  config: DeviceConfig;
  target: TargetRecord;
  /** With "recover": when the device was first created (kept in the record). */
  createdAt?: string;
}


/** How many times a spare's queues run their request path ahead (QueueStart.warmUpRounds): under emulation 32
 * rounds of 128 stand-in requests took 0.25 s per queue, long before the spare is needed, and brought the first
 * batch after a take-over from 10–90 ms to 6–17 ms. */
const STANDBY_WARM_UP_ROUNDS = 32;
/** How long a recovering daemon waits for the device's lock: a daemon just killed still holds it until it has exited. */
const LOCK_WAIT_MS = 2_000;
/** Back-off of the record write a recovered daemon retries (first delay, then doubling up to the max). */
const RECORD_RETRY_FIRST_MS = 500;
const RECORD_RETRY_MAX_MS = 30_000;

/** What `recover -n ID` sends: the daemon checks the device and reads its record itself (see recoverySpec). */
export interface RecoveryRequest {
  mode: "recover";
  devId: number;
}

/**
 * The spec that recovers device `devId` from its record, after the checks `recover` makes: the device exists,
 * has a record and recovery, is not served by a live daemon, and is not watched by a supervisor (other than the
 * one that started us). Throws one line naming what is wrong.
 */
export function recoverySpec(devId: number): DaemonSpec {
  const record = readRecord(devId);
  const ctrl = Ctrl.open();
  let info: DevInfo;
  try {
    info = ctrl.getDevInfoFor("recover", devId);
  } finally {
    ctrl.close();
  }
  if (!record) throw new Error(`recover: device ${devId} has no record in ${runDir()}; only devices added by ublk-bun can be recovered`);
  if ((info.flags & UBLK_F_USER_RECOVERY) === 0) {
    throw new Error(`recover: device ${devId} was created without recovery (-r 1 or -i 1); it can only be deleted`);
  }
  if (info.state === UBLK_S_DEV_LIVE && processAlive(info.ublksrvPid)) {
    throw new Error(`recover: device ${devId} is LIVE with daemon pid ${info.ublksrvPid}; nothing to recover`);
  }
  const supervisor = record.supervisorPid ?? 0;
  if (supervisor > 0 && supervisor !== Number(process.env[SUPERVISOR_PID_ENV] ?? 0) && processAlive(supervisor) && isOurDaemon(supervisor)) {
    throw new Error(`recover: device ${devId} is watched by supervisor pid ${supervisor} (--auto-recover), which recovers it`);
  }
  return { mode: "recover", config: { ...record.config, devId }, target: record.target, createdAt: record.createdAt,
    ...(record.standby ? { standby: true } : {}) };
}

/**
 * What a spare recovers with: the record as it is now, not as it was when the spare started. `resize` may have
 * changed the size since (the queues follow a grown file by themselves, see targets/mapping.ts); anything else
 * changed means the spare's queues serve something the record no longer describes, so it steps back and a daemon
 * started from the record does the recovery.
 */
function recordedTarget(spec: DaemonSpec, record: DeviceRecord): TargetRecord {
  const withoutSize = (target: TargetRecord) => JSON.stringify({ ...target, sizeBytes: 0 });
  const { devId: _recordedId, ...recordedConfig } = record.config;
  const { devId: _specId, ...specConfig } = spec.config;
  if (withoutSize(record.target) !== withoutSize(spec.target) || JSON.stringify(recordedConfig) !== JSON.stringify(specConfig)) {
    throw new Error(`standby for device ${record.devId}: the device's record changed since this spare started; ` +
      `run "recover -n ${record.devId}" again to recover it with a daemon started from the record`);
  }
  return record.target;
}

/** A started device with its record written; `stop()` deletes the device, the record and the target's state. */
export interface ServedDevice {
  device: Device;
  record: DeviceRecord;
  stop(): Promise<void>;
  /** Lets go of the device for a new server (Device.handOver); the record and the target's state stay. */
  handOver(): Promise<void>;
}

/** The signal `restart` sends a daemon: hand the device over instead of deleting it. */
export const HANDOVER_SIGNAL = "SIGUSR2";

/** Creates and starts the device and writes its record (used by the daemon, --foreground and createDevice). */
export async function startServing(spec: DaemonSpec, events: DeviceEvents & { onStandby?(): void; recoverAsked?(): Promise<void> } = {}):
    Promise<ServedDevice> {
  // The device lock is held for the life of the serving process: a second recover of the device is refused
  // instead of racing this one; the kernel drops it however this process dies. A standby takes it only when
  // its turn comes: until then the serving daemon holds it.
  let lockFd = -1;
  const devId = spec.config.devId;
  /** An --standby spare's `recover -n ID`, listened for from its daemon's death on. */
  let recoverAsked: Promise<void> | undefined;
  /** A recovery's turn: the device is ours to recover once we hold its lock (a killed daemon releases it as it
   * exits) and its record is still there (`del` removes it under the lock). A standby first waits, fully loaded,
   * for the serving daemon to exit. */
  const awaitTurn = async (prepared: Promise<void>): Promise<TargetRecord | void> => {
    if (spec.mode === "standby") {
      await prepared;
      events.onStandby?.();
      await waitForDeathOf(spec.watchPid ?? 0);
      debug(`standby for device ${devId}: daemon ${spec.watchPid} exited; taking over`);
      await pauseForTest("standby-listen");
      if (spec.waitForRecover) {
        recoverAsked = events.recoverAsked?.() ?? Promise.resolve();
        recoverAsked.catch(() => { /* awaited by awaitResume */ });
      }
    }
    if (spec.mode === "recover") await pauseForTest("recover-lock");
    lockFd = await lockDeviceWaiting(devId, spec.mode ?? "recover", LOCK_WAIT_MS);
    debug(`device ${devId}: locked`);
    const record = readRecord(devId);
    if (record === null) throw new Error(`${spec.mode}: device ${devId} has no record any more (deleted meanwhile)`);
    if (spec.mode === "standby") return recordedTarget(spec, record);
  };
  /** The spare re-attaches at once — up to every queue FETCHed, the device still quiesced — and resumes its I/O
   * (END_USER_RECOVERY) when `recover` asks: the operator's command then waits for nothing else. */
  const awaitResume = async (): Promise<TargetRecord> => {
    await recoverAsked;
    debug(`standby for device ${devId}: recover asked`);
    const record = readRecord(devId);
    if (record === null) throw new Error(`recover: device ${devId} has no record in ${runDir()} any more`);
    return recordedTarget(spec, record);
  };
  let device: Device;
  try {
    device = spec.mode === "recover" || spec.mode === "standby"
      ? await Device.recover(spec.config, spec.target, events, {
        awaitTurn, ...(spec.waitForRecover ? { awaitResume } : {}), ...(spec.mode === "standby" ? { warmUpRounds: STANDBY_WARM_UP_ROUNDS } : {}),
      })
      : await Device.create(spec.config, spec.target, events);
  } catch (error) {
    if (lockFd >= 0) closeSync(lockFd);
    throw error;
  }
  if (lockFd < 0) {
    try {
      lockFd = lockDevice(device.devId, "add");
    } catch (error) {
      await device.stop();
      throw error;
    }
  }
  const supervisorPid = Number(process.env[SUPERVISOR_PID_ENV] ?? 0);
  const record: DeviceRecord = {
    version: RECORD_VERSION, devId: device.devId, config: device.config, target: device.target, pid: process.pid,
    queues: device.queueInfo, createdAt: spec.createdAt ?? new Date().toISOString(),
    ...(supervisorPid > 0 ? { supervisorPid } : {}), ...recordedIdentity(supervisorPid), ...(spec.standby ? { standby: true } : {}),
  };
  await pauseForTest("before-record");
  let retryTimer: ReturnType<typeof setTimeout> | undefined;
  try {
    writeRecord(record);
  } catch (error) {
    if (spec.mode !== "recover") {
      // A new device nobody uses yet: without a record it could not be recovered or listed, so it goes.
      await device.stop();
      closeSync(lockFd);
      throw error;
    }
    // A recovered device may be mounted, with the application's I/O waiting on it: deleting it now would turn
    // a bookkeeping failure into data loss. Serve on (the old record's pid is stale, which `list` shows) and
    // retry the write with back-off. `del` stops this process, and with it the retries, before removing the record.
    const retry = (delayMs: number, failure: unknown) => {
      log(`device ${device.devId}: cannot write its record (${oneLine(failure)}); serving on, retrying in ${delayMs} ms`);
      retryTimer = setTimeout(() => {
        try {
          writeRecord(record);
          log(`device ${device.devId}: record written`);
        } catch (again) {
          retry(Math.min(RECORD_RETRY_MAX_MS, delayMs * 2), again);
        }
      }, delayMs);
    };
    retry(RECORD_RETRY_FIRST_MS, error);
  }
  let stopping: Promise<void> | undefined;
  return {
    device,
    record,
    handOver() {
      stopping ??= device.handOver().finally(() => closeSync(lockFd));
      return stopping;
    },
    stop() {
      stopping ??= (async () => {
        clearTimeout(retryTimer);
        await device.stop();
        removeRecord(device.devId);
        closeSync(lockFd);
        const target = await loadTarget(spec.target.type);
        await target.destroy?.(spec.target);
      })();
      return stopping;
    },
  };
}

/** Runs a device until a stop signal; `report` receives the status lines. Resolves when stopped. */
export async function runDaemon(request: DaemonSpec | RecoveryRequest, reportToStarter: (line: string) => void): Promise<void> {
  let served: ServedDevice | undefined;
  /** An --standby spare's `recover` hears what the process that started us would. */
  let asker: Asker | undefined;
  const report = (line: string) => {
    reportToStarter(line);
    asker?.write(line);
  };
  let handingOver = false;
  let fatalSeen = false;
  const onFatal = async (error: Error) => {
    if (handingOver || fatalSeen) return; // the queues end by themselves during a hand-over; one report is enough
    fatalSeen = true;
    const starting = served === undefined;
    await pauseForTest("on-fatal");
    // `del` stopped the device itself (TRY_STOP_DEV): the queues ended because the disk is gone. Finish the
    // deletion quietly instead of reporting a failure. Not after a queue failed: 6.12 stops a device whose
    // queue thread died too (its monitor work), and that device stays for `del`, its record with it.
    let dead = false;
    try {
      dead = error instanceof QueueRetiredError && served !== undefined && served.device.refreshInfo().state === UBLK_S_DEV_DEAD;
    } catch { /* report below */ }
    if (dead) {
      served!.stop().then(() => process.exit(0), () => process.exit(1));
      return;
    }
    if (starting || served === undefined) {
      // Still starting: whoever waits for READY hears why (and removes a device it added).
      report(`ERROR ${oneLine(error)}`);
      process.exit(1);
    }
    console.error(`ublk-bun: device ${served.device.devId}: ${error.message}; exiting so the kernel can quiesce the device`);
    process.exit(1);
  };
  try {
    const spec = "devId" in request ? recoverySpec(request.devId) : request;
    debug(`daemon: ${spec.mode ?? "create"} device ${spec.config.devId}`);
    served = await startServing(spec, {
      onAdded: (devId) => report(`ADDED ${devId}`),
      onWaiting: (elapsedMs, state) => report(`WAITING ${Math.round(elapsedMs)} ${state}`),
      onStandby() {
        report("STANDBY");
        // What a spare needs once it serves, loaded while it waits (see listingLine).
        if (spec.waitForRecover) import("./admin.ts").catch(() => { /* listingLine reports nothing then */ });
      },
      recoverAsked: () => recoverAsked(spec.config.devId, spec.watchPid ?? 0, (who) => { asker = who; }),
      onFatal,
    });
  } catch (error) {
    report(`ERROR ${oneLine(error)}`);
    throw error;
  } finally {
    dropEarlyQueueWorkers();
  }
  report(`READY ${JSON.stringify(served.record)}`);
  // A spare's own note goes once it serves; a supervisor keeps the spares of its devices itself.
  forget(served.device.devId, process.pid);
  if (asker) {
    // `recover` prints the device's list block: sent from here (admin.ts is loaded by now), it loads nothing for it.
    asker.end(await listingLine(served.device.devId));
    asker = undefined;
  }
  let spare: KeptStandby | undefined;
  if (served.record.standby && !served.record.supervisorPid) {
    try {
      spare = await keepStandby(served.record, log);
    } catch (error) {
      log(`device ${served.device.devId}: cannot start a standby: ${oneLine(error)}`);
    }
  }
  const how = await new Promise<"stop" | "hand over">((resolve) => {
    process.once("SIGTERM", () => resolve("stop"));
    process.once("SIGINT", () => resolve("stop"));
    process.once("SIGHUP", () => resolve("stop"));
    process.once(HANDOVER_SIGNAL, () => resolve("hand over"));
  });
  spare?.stop(); // it would wait for a recover that the stop or the new server makes pointless
  if (how === "hand over") {
    handingOver = true;
    await served.handOver();
  } else {
    await served.stop();
  }
}

/** The LISTING status line for a served device (see SentListing), or undefined: `recover` then builds it itself. */
async function listingLine(devId: number): Promise<string | undefined> {
  try {
    const { formatListing, listDevices, listingJson } = await import("./admin.ts");
    const [listing] = listDevices(devId);
    return `LISTING ${JSON.stringify({ text: formatListing(listing!), json: listingJson(listing!) } satisfies SentListing)}`;
  } catch (error) {
    log(`device ${devId}: cannot send recover the list block: ${oneLine(error)}`);
    return undefined;
  }
}

/** One line in the daemon log (the daemon's stderr), always — not only with UBLK_BUN_DEBUG. */
function log(message: string): void {
  console.error(`${new Date().toISOString()} ublk-bun[${process.pid}]: ${message}`);
}

export function oneLine(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).split("\n")[0]!;
}
