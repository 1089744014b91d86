#!/usr/bin/env bun
/**
 * The --auto-recover supervisor: a small process that owns a device's daemon, sees it die and recovers the
 * device itself (as `ublk-bun recover` would), with a growing delay when daemons keep dying. It speaks the
 * daemon's status protocol on fd 3 for the first start only, so `add` works the same with or without it.
 * Its daemons stay in its process group, so a failed `add` ends them with it. `del` stops the supervisor
 * (SIGTERM) before the daemon. Every event goes to the daemon log.
 */
import { writeSync } from "node:fs";
import { addDevice, DAEMON_PATH, kernelDevIds, processAlive, recoverDevice } from "./admin.ts";
import { DAEMON_SPEC_ENV, oneLine, STATUS_FD, SUPERVISOR_PID_ENV, type DaemonSpec } from "./daemon.ts";
import { readRecord } from "./records.ts";

const MAX_DELAY_MS = 30_000;
/** A daemon that lived this long was healthy: the count of quick deaths starts again. */
const HEALTHY_MS = 10_000;
/** Quick deaths in a row that are recovered at once; after that the delay doubles from 1 s (a crash loop). */
const QUICK_DEATHS_FREE = 3;

function log(message: string): void {
  console.error(`${new Date().toISOString()} ublk-bun supervisor[${process.pid}]: ${message}`);
}

/** Resolves when `pid` is gone. Polled: addDevice has let the child go, and processAlive counts an unreaped zombie as gone. */
async function waitForDeath(pid: number): Promise<void> {
  while (processAlive(pid)) await Bun.sleep(50);
}

async function supervise(spec: DaemonSpec): Promise<void> {
  const env = { [SUPERVISOR_PID_ENV]: String(process.pid) };
  let stopping = false;
  process.once("SIGTERM", () => { stopping = true; log("SIGTERM: leaving the daemon to whoever stops it"); process.exit(0); });

  let record;
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
  for (;;) {
    const startedAt = Date.now();
    await waitForDeath(record.pid);
    if (stopping) return;
    const current = readRecord(devId);
    if (!current || !kernelDevIds().includes(devId)) {
      log(`device ${devId}: deleted; supervisor exits`);
      return;
    }
    const livedMs = Date.now() - startedAt;
    quickDeaths = livedMs > HEALTHY_MS ? 0 : quickDeaths + 1;
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
