#!/usr/bin/env bun
/**
 * The server process behind `ublk-bun add` and `recover` (spawned by lib/server-process.ts; lib/serving.ts does
 * the work). Its queue Workers start here, before the daemon's own modules load, so that the two start-ups —
 * the longest part of a recovery — overlap instead of following each other.
 */
import { DAEMON_SPEC_ENV, recordPath, STATUS_FD } from "./run-dir.ts";
import { startQueueWorkersEarly } from "./queue-workers.ts";
import { debug } from "./debug.ts";
import type { DaemonSpec, RecoveryRequest } from "./serving.ts";

/** More Workers than this are not started ahead: a device with more queues starts the rest when it needs them. */
const EARLY_WORKERS_MAX = 16;

/**
 * How many queues, of which target, the device will have: from the spec, or for `recover -n ID` from its record.
 * A guess only — serving.ts reads and checks the record itself and a Worker loads a target with the same checks —
 * so anything unreadable means no early Workers. Bun.file, not node:fs: that module alone is 30 ms of a start
 * under TCG, and the Workers should start before it.
 */
async function foreseenQueues(spec: DaemonSpec | RecoveryRequest): Promise<{ count: number; targetType?: string }> {
  let source: { config?: { nrHwQueues?: unknown }; target?: { type?: unknown } } = spec as DaemonSpec;
  if ("devId" in spec) {
    try {
      source = JSON.parse(await Bun.file(recordPath(spec.devId)).text());
    } catch {
      return { count: 0 };
    }
  }
  const count = Number(source.config?.nrHwQueues);
  const targetType = source.target?.type;
  return { count: Number.isInteger(count) && count > 0 ? Math.min(count, EARLY_WORKERS_MAX) : 0,
           ...(typeof targetType === "string" ? { targetType } : {}) };
}

const spec = JSON.parse(process.env[DAEMON_SPEC_ENV] ?? "null") as DaemonSpec | RecoveryRequest | null;
if (!spec) {
  console.error(`ublk-bun daemon: ${DAEMON_SPEC_ENV} is not set (the daemon is started by "ublk-bun add")`);
  process.exit(2);
}
delete process.env[DAEMON_SPEC_ENV];
const { count, targetType } = await foreseenQueues(spec);
startQueueWorkersEarly(count, targetType);
debug(`daemon: ${count} queue Workers started ${Math.round(performance.now())} ms after exec`);
const { oneLine, runDaemon } = await import("./serving.ts");
const { writeSync } = await import("node:fs");
debug("daemon: modules loaded");
const report = (line: string) => {
  try { writeSync(STATUS_FD, line + "\n"); } catch { /* the CLI has gone; keep serving */ }
};
runDaemon(spec, report).then(
  () => process.exit(0),
  (error) => {
    console.error(`ublk-bun daemon: ${oneLine(error)}`);
    process.exit(1);
  },
);
