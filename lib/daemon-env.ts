/**
 * What a daemon and the process that starts it agree on: the status pipe, the environment, how to recognise a
 * daemon. Node's fs only — the daemon imports this instead of server-process.ts, whose child_process it never
 * needs (every module a recovering daemon loads is the application's stall).
 */
import { readFileSync } from "node:fs";
export { daemonLogPath, standbySocketPath } from "./run-dir.ts";

export const STATUS_FD = 3;
export const DAEMON_SPEC_ENV = "UBLK_BUN_DAEMON_SPEC";
/** Set by an --auto-recover supervisor in the environment of the daemons it starts. */
export const SUPERVISOR_PID_ENV = "UBLK_BUN_SUPERVISOR_PID";

/** True while `pid` names a live process (zombies count as gone). */
export function processAlive(pid: number): boolean {
  if (!(pid > 0)) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/** True when `pid` runs our daemon (so a recycled pid is never signalled). */
export function isOurDaemon(pid: number): boolean {
  try {
    const commandLine = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return commandLine.includes("daemon.ts") || commandLine.includes("supervisor.ts") || commandLine.includes("ublk-bun");
  } catch {
    return false;
  }
}
