/**
 * Which processes `del` may signal: only those it can prove are ours. A pid alone proves nothing — the kernel's
 * dev_info pid of an unprivileged device is whatever number its owner passed to START_DEV, and a dead daemon's
 * pid is soon another process's. So a process counts as ours when
 * - a record of ours names its pid together with its start time and executable (written by the daemon itself), or
 * - it holds the device's lock file (in our 0700 run directory, which no one else can open),
 * and every signal goes through a pidfd opened before the last check, so a pid recycled meanwhile is never hit.
 */
import { lstatSync, readFileSync, readlinkSync } from "node:fs";
import { close, pidfdOpen, pidfdSendSignal } from "../ffi/libc.ts";
import { Ring } from "../ffi/ring.ts";
import { POLLIN } from "../ffi/uapi/io_uring.ts";

/** One process for the life of the system: a pid with its start time (clock ticks after boot) and executable. */
export interface ProcessIdentity {
  pid: number;
  startTicks: number;
  exe: string;
}

export const SIGKILL = 9;
export const SIGTERM = 15;

/** The identity of a live (not zombie) process `pid`, or null when it is gone or not ours to inspect. */
export function identityOf(pid: number): ProcessIdentity | null {
  if (!(Number.isInteger(pid) && pid > 0)) return null;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces and parentheses): state is field 3, starttime field 22.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (fields[0] === "Z" || fields[0] === "X") return null;
    const startTicks = Number(fields[19]);
    // An executable replaced on disk (an upgrade) reads "PATH (deleted)": still the same program for this purpose.
    const exe = readlinkSync(`/proc/${pid}/exe`).replace(/ \(deleted\)$/, "");
    return Number.isInteger(startTicks) ? { pid, startTicks, exe } : null;
  } catch {
    return null;
  }
}

/** What a record keeps about its daemon and supervisor, so that a later `del` can prove them. */
export function recordedIdentity(supervisorPid: number): { pidStartTicks?: number; supervisorStartTicks?: number; exe?: string } {
  const self = identityOf(process.pid);
  const supervisor = supervisorPid > 0 ? identityOf(supervisorPid) : null;
  return {
    ...(self ? { pidStartTicks: self.startTicks, exe: self.exe } : {}),
    ...(supervisor ? { supervisorStartTicks: supervisor.startTicks } : {}),
  };
}

/** `pid` as the process a record describes (same start time and executable), or null. */
export function provenProcess(pid: number | undefined, startTicks: number | undefined, exe: string | undefined): ProcessIdentity | null {
  if (pid === undefined || startTicks === undefined || exe === undefined || pid === process.pid) return null;
  const now = identityOf(pid);
  return now && now.startTicks === startTicks && now.exe === exe ? now : null;
}

/** True while the process `identity` names still runs (a recycled pid does not count). */
export function stillRunning(identity: ProcessIdentity): boolean {
  const now = identityOf(identity.pid);
  return now !== null && now.startTicks === identity.startTicks && now.exe === identity.exe;
}

/**
 * The process holding `lockPath` with flock(2), from /proc/locks (which names the locking pid with the file's
 * device and inode). Null when no one holds it.
 */
export function lockHolder(lockPath: string): ProcessIdentity | null {
  let stat;
  try {
    stat = lstatSync(lockPath, { bigint: true });
  } catch {
    return null;
  }
  if (!stat.isFile() || stat.uid !== BigInt(process.getuid?.() ?? 0)) return null;
  // dev_t as the kernel splits it (MAJOR/MINOR of new_encode_dev); /proc/locks prints them in hex.
  const major = Number(((stat.dev >> 8n) & 0xfffn) | ((stat.dev >> 32n) & ~0xfffn));
  const minor = Number((stat.dev & 0xffn) | ((stat.dev >> 12n) & ~0xffn));
  let locks = "";
  try { locks = readFileSync("/proc/locks", "utf8"); } catch { return null; }
  for (const line of locks.split("\n")) {
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; waiters are listed with "->" and hold nothing.
    const match = /^\d+: FLOCK\s+\S+\s+WRITE\s+(\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s/.exec(line);
    if (!match || parseInt(match[2]!, 16) !== major || parseInt(match[3]!, 16) !== minor || BigInt(match[4]!) !== stat.ino) continue;
    const pid = Number(match[1]);
    return pid === process.pid ? null : identityOf(pid);
  }
  return null;
}

/**
 * The processes serving or recovering a device that are provably ours: the daemon its record names and the
 * holder of its lock. Never the kernel's dev_info pid on its own.
 */
export function provenServers(record: { pid: number; pidStartTicks?: number; exe?: string } | null, lockPath: string): ProcessIdentity[] {
  const found = [provenProcess(record?.pid, record?.pidStartTicks, record?.exe), lockHolder(lockPath)]
    .filter((identity): identity is ProcessIdentity => identity !== null);
  return found.filter((identity, index) => found.findIndex((other) => other.pid === identity.pid) === index);
}

/** Signals `identity` only if it still is that process; false when it is gone (or was never there). */
export function signalProven(identity: ProcessIdentity, signal: number): boolean {
  const pidfd = pidfdOpen(identity.pid);
  if (pidfd < 0) return false;
  try {
    // Checked after the pidfd pinned the process: if the pid was recycled before, this check fails; if after,
    // the pidfd still names the old (exited) process and the signal reaches no one.
    return stillRunning(identity) && pidfdSendSignal(pidfd, signal) === 0;
  } finally {
    close(pidfd);
  }
}

/** Waits until `identity` has exited (a recycled pid counts as exited); false on timeout. */
export async function waitForExitOf(identity: ProcessIdentity, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (stillRunning(identity)) {
    if (Date.now() > deadline) return false;
    await Bun.sleep(20);
  }
  return true;
}

/**
 * Resolves when process `pid` has exited (at once when it is already gone). A pidfd polls readable as soon as
 * the process exits, zombie or not: no polling interval between the death and the answer. The wait runs in
 * 100 ms slices so this process still handles signals and messages meanwhile.
 */
export async function waitForDeathOf(pid: number): Promise<void> {
  const pidfd = pid > 0 ? pidfdOpen(pid) : -1;
  if (pidfd < 0) return; // ESRCH: gone already
  const ring = Ring.create({ entries: 2 });
  try {
    ring.prepPollAdd(ring.getSqe(), pidfd, POLLIN, 0);
    for (;;) {
      const cqe = ring.waitCqe(100);
      if (cqe >= 0) return;
      await Bun.sleep(0);
    }
  } finally {
    ring.close();
    close(pidfd);
  }
}
