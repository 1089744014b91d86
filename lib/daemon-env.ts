/**
 * What a daemon and the process that starts it agree on: the status pipe and environment names (kept in
 * lib/run-dir.ts), whether a process lives and is one of ours. Node's fs only.
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
