/**
 * Where records, locks, the daemon log and standby sockets live, and the names a daemon and the process that
 * starts it share. No imports at all: `recover` reaches an --standby spare through this before it loads anything
 * else (lib/standby-client.ts), and a daemon's entry starts its queue Workers with only this (lib/daemon.ts).
 */

/** The daemon's status pipe (see lib/server-process.ts for its lines). */
export const STATUS_FD = 3;
/** The daemon's spec, as JSON. */
export const DAEMON_SPEC_ENV = "UBLK_BUN_DAEMON_SPEC";
/** Set by an --auto-recover supervisor in the environment of the daemons it starts. */
export const SUPERVISOR_PID_ENV = "UBLK_BUN_SUPERVISOR_PID";

/** The directory records live in (root: /run/ublk-bun); UBLK_BUN_RUN_DIR overrides it. */
export function runDir(): string {
  if (process.env.UBLK_BUN_RUN_DIR) return process.env.UBLK_BUN_RUN_DIR;
  const uid = process.getuid?.() ?? 0;
  // A user serving unprivileged devices keeps records in their own runtime directory.
  return uid === 0 ? "/run/ublk-bun" : `${process.env.XDG_RUNTIME_DIR || `/run/user/${uid}`}/ublk-bun`;
}

/** A device's record (lib/records.ts writes and checks it). */
export function recordPath(devId: number): string {
  return `${runDir()}/${devId}.json`;
}

export function daemonLogPath(): string {
  return `${runDir()}/daemon.log`;
}

/** The unix socket an `add --standby` spare listens on for `recover` once its daemon died (lib/standby.ts). */
export function standbySocketPath(devId: number): string {
  return `${runDir()}/${devId}.standby.sock`;
}
