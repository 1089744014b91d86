/**
 * Starting server processes (daemons, supervisors) and reading the status lines they write on fd 3. Node
 * modules only, no FFI: `recover` starts its daemon from here before it loads anything else, since every
 * millisecond before the new daemon runs is the application's stall (the daemon does recover's checks itself).
 *
 * Status lines:
 *   ADDED <devId>        ADD_DEV succeeded (if nothing follows, the caller removes the device again)
 *   WAITING <ms> <state> a recovery waits for the kernel to quiesce the device
 *   STANDBY              a standby daemon is loaded and waits for the serving daemon to exit
 *   READY <json>         the device is served; json = the DeviceRecord
 *   ERROR <message>      start failed and everything was cleaned up
 */
import type { Subprocess } from "bun";
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync } from "node:fs";
import type { DaemonSpec, RecoveryRequest } from "./serving.ts";
import type { DeviceRecord } from "./records.ts";
import { runDir } from "./run-dir.ts";

export { DAEMON_SPEC_ENV, daemonLogPath, isOurDaemon, processAlive, STATUS_FD, SUPERVISOR_PID_ENV } from "./daemon-env.ts";
import { DAEMON_SPEC_ENV, daemonLogPath, processAlive, STATUS_FD, SUPERVISOR_PID_ENV } from "./daemon-env.ts";
import { readyTimeoutMs, recoverThroughStandby } from "./standby-client.ts";
import { lineReader, readStatusLine } from "./status-lines.ts";


export const DAEMON_PATH = new URL("./daemon.ts", import.meta.url).pathname;
export const SUPERVISOR_PATH = new URL("./supervisor.ts", import.meta.url).pathname;


/**
 * Starts a daemon (or an --auto-recover supervisor, which starts one) for `spec` and waits for its READY. On
 * failure or timeout the process — and with a supervisor, every daemon it started — is killed before this
 * returns, so that nothing can still reach READY; the caller removes what it created (`addedDevId`).
 */
export async function runServer(spec: DaemonSpec | RecoveryRequest, entryPath: string, extraEnv: Record<string, string> = {},
                                onAdded?: (devId: number) => void,
                                onWaiting?: (elapsedMs: number, state: string) => void): Promise<{ record?: DeviceRecord; error?: string; addedDevId: number }> {
  const readyTimeout = readyTimeoutMs();
  const inSupervisor = extraEnv[SUPERVISOR_PID_ENV] !== undefined;
  let addedDevId = -1;
  let child: ServerProcess | undefined;
  const outcome = await new Promise<{ record?: DeviceRecord; error?: string }>((resolve) => {
    const timer = setTimeout(() => resolve({ error: `the daemon did not report READY within ${readyTimeout / 1000} s` }), readyTimeout);
    const finish = (value: { record?: DeviceRecord; error?: string }) => {
      clearTimeout(timer);
      resolve(value);
    };
    child = spawnServer(spec, entryPath, extraEnv, (line) => readStatusLine(line, {
      onAdded: (devId) => {
        addedDevId = devId;
        onAdded?.(devId);
      },
      onWaiting,
      onReady: (record) => finish({ record }),
      onError: (message) => finish({ error: message }),
    }), (error) => finish({ error: error ?? `the daemon exited during ${spec.mode === "recover" ? "recovery" : "start"} (see ${daemonLogPath()})` }));
  });
  if (outcome.record) {
    child!.release();
    return { record: outcome.record, addedDevId };
  }
  // The daemon failed or hung: make sure it is gone — and with a supervisor, every daemon it started — before
  // anything it created is removed; a survivor could still reach READY on a device whose data is gone.
  if (child!.pid && !inSupervisor) await killProcessGroup(child!.pid);
  else if (child!.pid && child!.exitCode === null) {
    try { process.kill(child!.pid, "SIGKILL"); } catch { /* already gone */ }
    await waitForExit(child!.pid, 5_000);
  }
  return { error: outcome.error ?? "the daemon failed", addedDevId };
}

/** A server process this one started, as its starter sees it. */
export interface ServerProcess {
  readonly pid: number;
  /** null while it runs. */
  readonly exitCode: number | null;
  kill(signal: NodeJS.Signals): void;
  /** Lets this process exit while the server still runs. */
  unref(): void;
  /** Stops listening to its status lines (it is READY) and lets this process exit without it. */
  release(): void;
}

/**
 * Starts a daemon (or supervisor) process for `spec`, its stdout and stderr in the daemon log, and passes each
 * status line it writes on fd 3 to `onLine`; `onEnd` when that pipe closes (the process exited) or the process
 * could not be started (with the reason). Bun.spawn, not node:child_process: loading that module is a tenth of
 * `recover`'s own start.
 */
export function spawnServer(spec: DaemonSpec | RecoveryRequest, entryPath: string, extraEnv: Record<string, string>, onLine: (line: string) => void,
                            onEnd: (error?: string) => void): ServerProcess {
  mkdirSync(runDir(), { recursive: true, mode: 0o700 });
  const logFd = openSync(daemonLogPath(), "a", 0o600);
  // The child leads a process group of its own (a new session, away from the terminal). A supervisor's daemons
  // stay in the supervisor's group, so a failed `add --auto-recover` can end the whole tree with one signal.
  const inSupervisor = extraEnv[SUPERVISOR_PID_ENV] !== undefined;
  let child: Subprocess;
  try {
    child = Bun.spawn([process.execPath, entryPath], {
      detached: !inSupervisor,
      stdio: ["ignore", logFd, logFd, "pipe"],
      env: { ...process.env, ...extraEnv, [DAEMON_SPEC_ENV]: JSON.stringify(spec) },
    });
  } catch (error) {
    queueMicrotask(() => onEnd(`cannot start the daemon: ${(error as Error).message}`));
    return { pid: 0, exitCode: 127, kill() {}, unref() {}, release() {} };
  } finally {
    closeSync(logFd);
  }
  // Bun hands the pipe's read end over as a bare fd, ours to close.
  const statusFd = child.stdio[STATUS_FD] as unknown as number;
  const reader = Bun.file(statusFd).stream().getReader();
  let released = false;
  void (async () => {
    const onChunk = lineReader(onLine);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        onChunk(value);
      }
    } catch { /* released, or the pipe failed: either way no more lines */ }
    if (!released) {
      closeSync(statusFd);
      onEnd();
    }
  })();
  return {
    get pid() { return child.pid; },
    get exitCode() { return child.exitCode; },
    kill: (signal) => child.kill(signal),
    unref: () => child.unref(),
    release() {
      if (released) return;
      released = true;
      reader.cancel().catch(() => {}).finally(() => closeSync(statusFd));
      child.unref();
    },
  };
}

/**
 * SIGKILLs every process in the group `pgid` (a child we spawned detached, and the daemons it started) and
 * waits until none is left. While any member lives the id names no one else: the kernel does not reuse a pid
 * that still names a process group.
 */
export async function killProcessGroup(pgid: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      process.kill(-pgid, "SIGKILL");
    } catch {
      return; // ESRCH: the group is empty
    }
    // Zombies stay in the group until reaped (an orphan's by init, which may be slow to do it); they hold nothing.
    if (!groupHasLiveMember(pgid) || Date.now() > deadline) return;
    await Bun.sleep(20);
  }
}

function groupHasLiveMember(pgid: number): boolean {
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // After the ")" that ends the command name: state, ppid, pgrp.
      const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(pgrp) === pgid && state !== "Z" && state !== "X") return true;
    } catch { /* exited meanwhile */ }
  }
  return false;
}

export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > deadline) return false;
    await Bun.sleep(20);
  }
  return true;
}

/**
 * `recover -n ID`: starts a daemon that checks the device can be recovered, waits until the kernel has quiesced
 * it and re-attaches (Device.recover); resolves with the new record. A failed recovery leaves the device
 * quiesced for another attempt.
 */
export async function recoverDevice(devId: number, onWait?: (elapsedMs: number, state: string) => void,
                                    entryPath = DAEMON_PATH, extraEnv: Record<string, string> = {}): Promise<DeviceRecord> {
  const spare = await recoverThroughStandby(devId, onWait);
  if (spare.record) return spare.record;
  if (spare.error) throw new Error(spare.error);
  const outcome = await runServer({ mode: "recover", devId }, entryPath, extraEnv, undefined, onWait);
  if (!outcome.record) throw new Error(outcome.error);
  return outcome.record;
}
