#!/usr/bin/env bun
/**
 * The --auto-recover supervisor: a small process that owns a device's daemon, sees it die and recovers the
 * device itself, with a growing delay when daemons keep dying. It keeps a warm standby daemon (runtime, target
 * and queue Workers loaded, owning nothing) that recovers the device the moment the serving daemon dies, and
 * starts the next standby behind it; after quick deaths in a row it recovers as `ublk-bun recover` would. It speaks the
 * daemon's status protocol on fd 3 for the first start only, so `add` works the same with or without it.
 * Its daemons stay in its process group, so a failed `add` ends them with it. `del` stops the supervisor
 * (SIGTERM) before the daemon. Every event goes to the daemon log.
 */
import type { ServerProcess } from "./server-process.ts";
import { writeSync } from "node:fs";
import { addDevice, DAEMON_PATH, kernelDevIds, processAlive, recoverDevice, spawnServer } from "./admin.ts";
import { DAEMON_SPEC_ENV, oneLine, STATUS_FD, SUPERVISOR_PID_ENV, type DaemonSpec } from "./serving.ts";
import { waitForDeathOf } from "./process-identity.ts";
import { readStatusLine } from "./status-lines.ts";
import { readRecord, removeStandby, writeStandby, type DeviceRecord } from "./records.ts";

const MAX_DELAY_MS = 30_000;
/** A daemon that lived this long was healthy: the count of quick deaths starts again. */
const HEALTHY_MS = 10_000;
/** Quick deaths in a row that are recovered at once; after that the delay doubles from 1 s (a crash loop). */
const QUICK_DEATHS_FREE = 3;

function log(message: string): void {
  console.error(`${new Date().toISOString()} ublk-bun supervisor[${process.pid}]: ${message}`);
}

/** A warm spare daemon ("standby" mode): loaded and waiting for the serving daemon to die, then recovering. */
interface Standby {
  pid: number;
  /** Resolves when it reported STANDBY (fully loaded). */
  loaded: Promise<void>;
  /** Resolves with the record once it serves the device, or with the reason it could not. */
  outcome: Promise<DeviceRecord | string>;
  child: ServerProcess;
}

/** Starts a standby for the daemon `record.pid` serves from; its status lines are its log entries here. */
function startStandby(record: DeviceRecord, env: Record<string, string>): Standby {
  let loadedResolve!: () => void;
  const loaded = new Promise<void>((resolve) => { loadedResolve = resolve; });
  let child!: ServerProcess;
  const outcome = new Promise<DeviceRecord | string>((resolve) => {
    child = spawnServer({ mode: "standby", watchPid: record.pid, config: record.config, target: record.target, createdAt: record.createdAt },
      DAEMON_PATH, env, (line) => readStatusLine(line, { onStandby: loadedResolve, onReady: resolve, onError: resolve }), (error) => resolve(error ?? "the standby exited"));
  });
  return { pid: child.pid, loaded, outcome, child };
}

function stopStandby(standby: Standby | null): void {
  if (standby && standby.child.exitCode === null) {
    try { standby.child.kill("SIGKILL"); } catch { /* gone meanwhile */ }
  }
}

async function supervise(spec: DaemonSpec): Promise<void> {
  const env = { [SUPERVISOR_PID_ENV]: String(process.pid) };
  let stopping = false;
  let standby: Standby | null = null;
  process.once("SIGTERM", () => {
    stopping = true;
    log("SIGTERM: stopping the standby, leaving the daemon to whoever stops it");
    stopStandby(standby);
    process.exit(0);
  });

  let record: DeviceRecord;
  try {
    // ADDED goes on to the CLI at once: should the start fail or time out, the CLI removes the device.
    record = await addDevice(spec, DAEMON_PATH, env, (devId) => {
      try { writeSync(STATUS_FD, `ADDED ${devId}\n`); } catch { /* the CLI has gone */ }
    });
  } catch (error) {
    try { writeSync(STATUS_FD, `ERROR ${oneLine(error)}\n`); } catch { /* the CLI has gone */ }
    throw error;
  }
  const devId = record.devId;
  try { writeSync(STATUS_FD, `READY ${JSON.stringify(record)}\n`); } catch { /* the CLI has gone */ }
  log(`device ${devId}: supervising daemon pid ${record.pid}`);

  let quickDeaths = 0;
  let delayMs = 0;
  let standbyFailures = 0;
  for (;;) {
    const startedAt = Date.now();
    // A warm spare takes over the moment the daemon dies — unless daemons keep dying (a crash loop backs off).
    if (!standby && record.pid > 0 && quickDeaths < QUICK_DEATHS_FREE) {
      standby = startStandby(record, env);
      writeStandby(devId, standby.pid);
      const current: Standby = standby;
      void current.loaded.then(() => log(`device ${devId}: standby pid ${current.pid} is ready`));
    }
    const spare = standby;
    const event = await Promise.race([
      waitForDeathOf(record.pid).then(() => "daemon" as const),
      ...(spare ? [spare.outcome.then(() => "standby" as const)] : []),
    ]);
    if (stopping) return;
    if (event === "standby" && processAlive(record.pid)) {
      // The spare failed while the daemon still serves: start another, slower each time it keeps failing.
      log(`device ${devId}: standby pid ${spare!.pid} ended: ${await spare!.outcome}`);
      standby = null;
      removeStandby(devId);
      standbyFailures++;
      if (standbyFailures > 1) await Bun.sleep(Math.min(MAX_DELAY_MS, 1_000 * 2 ** standbyFailures));
      continue;
    }
    const current = readRecord(devId);
    if (!current || !kernelDevIds().includes(devId)) {
      log(`device ${devId}: deleted; supervisor exits`);
      stopStandby(standby);
      return;
    }
    const livedMs = Date.now() - startedAt;
    quickDeaths = livedMs > HEALTHY_MS ? 0 : quickDeaths + 1;
    if (spare) {
      standby = null;
      removeStandby(devId);
      const outcome = await spare.outcome;
      if (typeof outcome !== "string") {
        log(`device ${devId}: daemon pid ${record.pid} died after ${livedMs} ms; standby pid ${outcome.pid} took over`);
        spare.child.release();
        record = outcome;
        standbyFailures = 0;
        continue;
      }
      log(`device ${devId}: daemon pid ${record.pid} died; the standby could not take over: ${outcome}`);
      stopStandby(spare);
    }
    delayMs = quickDeaths <= QUICK_DEATHS_FREE ? 0 : Math.min(MAX_DELAY_MS, Math.max(1_000, delayMs * 2));
    log(`device ${devId}: daemon pid ${record.pid} died after ${livedMs} ms; recovering${delayMs ? ` in ${delayMs} ms` : ""}`);
    if (delayMs) await Bun.sleep(delayMs);
    const recoverStart = Date.now();
    try {
      record = await recoverDevice(devId, undefined, DAEMON_PATH, env);
      log(`device ${devId}: recovered by daemon pid ${record.pid} in ${Date.now() - recoverStart} ms`);
    } catch (error) {
      log(`device ${devId}: recovery failed: ${oneLine(error)}`);
      // Try again after a longer pause, as long as the device and its record exist.
      record = { ...(readRecord(devId) ?? record), pid: 0 };
      delayMs = Math.min(MAX_DELAY_MS, Math.max(1_000, delayMs * 2));
      await Bun.sleep(delayMs);
    }
  }
}

if (import.meta.main) {
  const spec = JSON.parse(process.env[DAEMON_SPEC_ENV] ?? "null") as DaemonSpec | null;
  if (!spec) {
    console.error(`ublk-bun supervisor: ${DAEMON_SPEC_ENV} is not set (it is started by "ublk-bun add --auto-recover")`);
    process.exit(2);
  }
  delete process.env[DAEMON_SPEC_ENV];
  supervise(spec).then(
    () => process.exit(0),
    (error) => {
      log(oneLine(error));
      process.exit(1);
    },
  );
}
