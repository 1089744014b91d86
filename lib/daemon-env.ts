/**
 * What a daemon and the process that starts it agree on: the status pipe, the environment, how to recognise a
 * daemon. Node's fs only — the daemon imports this instead of server-process.ts, whose child_process it never
 * needs (every module a recovering daemon loads is the application's stall).
 */
import { readFileSync } from "node:fs";
export { DAEMON_SPEC_ENV, daemonLogPath, standbySocketPath, STATUS_FD, SUPERVISOR_PID_ENV } from "./run-dir.ts";

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
