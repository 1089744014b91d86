/**
 * Safe delete: `del` refuses a device that is in use unless --force.
 *
 * Two layers. First a look around, which names the user: mounts (this mount namespace's mount table), holders
 * (device-mapper, md … in /sys/block/ublkbN/holders, partitions included), swap, and processes with the disk or
 * a partition open (/proc/PID/fd). Then, where the kernel has SAFE_STOP_DEV (≥ 7.0), TRY_STOP_DEV: the kernel
 * stops the disk only if nobody has it open, atomically — which closes the gaps of the look around: the time
 * between looking and stopping, mounts in other mount namespaces, users without an fd we can see. Before 7.0
 * only the look around exists; those gaps stay (see the README).
 */
import { readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { EBUSY, ENODEV, ErrnoError } from "../ffi/errno.ts";
import { UBLK_F_SAFE_STOP_DEV } from "../ffi/uapi/ublk_cmd.ts";
import { Ctrl } from "./ctrl.ts";

interface BlockNode {
  name: string;
  major: number;
  minor: number;
}

/** The disk /dev/ublkbN and its partitions, as sysfs lists them; empty when the disk does not exist. */
function diskNodes(devId: number): BlockNode[] {
  const disk = `ublkb${devId}`;
  const nodes: BlockNode[] = [];
  const add = (name: string, sysPath: string) => {
    try {
      const [major, minor] = readFileSync(`${sysPath}/dev`, "utf8").trim().split(":").map(Number);
      nodes.push({ name, major: major!, minor: minor! });
    } catch { /* gone meanwhile */ }
  };
  let entries: string[];
  try { entries = readdirSync(`/sys/block/${disk}`); } catch { return []; }
  add(disk, `/sys/block/${disk}`);
  for (const entry of entries) if (entry.startsWith(disk + "p")) add(entry, `/sys/block/${disk}/${entry}`);
  return nodes;
}

/** glibc's makedev(), as stat's rdev encodes a device number. */
export function deviceNumber(major: number, minor: number): number {
  return (major & 0xfff) * 256 + (minor & 0xff) + (minor & ~0xff) * 4096 + Math.floor(major / 4096) * 2 ** 44;
}

/** Why /dev/ublkbN cannot be deleted safely right now, one phrase each; empty when nothing was found. */
export function busyReasons(devId: number): string[] {
  const nodes = diskNodes(devId);
  if (nodes.length === 0) return [];
  const reasons: string[] = [];
  const byNumber = new Map(nodes.map((node) => [`${node.major}:${node.minor}`, node.name]));
  const byRdev = new Map(nodes.map((node) => [deviceNumber(node.major, node.minor), node.name]));
  try {
    for (const line of readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
      const fields = line.split(" ");
      const name = byNumber.get(fields[2] ?? "");
      if (name) reasons.push(`${name} is mounted at ${unescapeMountPath(fields[4] ?? "?")}`);
    }
  } catch { /* no /proc: nothing to say */ }
  for (const node of nodes) {
    const sysPath = node.name === `ublkb${devId}` ? `/sys/block/${node.name}` : `/sys/block/ublkb${devId}/${node.name}`;
    let holders: string[] = [];
    try { holders = readdirSync(`${sysPath}/holders`); } catch { /* none */ }
    for (const holder of holders) reasons.push(`${node.name} is held by ${holder}`);
  }
  try {
    for (const line of readFileSync("/proc/swaps", "utf8").split("\n").slice(1)) {
      const path = line.split(/\s+/)[0] ?? "";
      if (!path.startsWith("/")) continue;
      try {
        const name = byRdev.get(statSync(path).rdev);
        if (name) reasons.push(`${name} is used as swap`);
      } catch { /* not a path we can stat */ }
    }
  } catch { /* no swap table */ }
  for (const pid of readdirSync("/proc").filter((entry) => /^\d+$/.test(entry))) {
    if (Number(pid) === process.pid) continue;
    let fds: string[];
    try { fds = readdirSync(`/proc/${pid}/fd`); } catch { continue; }
    const opened = new Set<string>();
    for (const fd of fds) {
      try {
        if (!readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith("/")) continue; // sockets, pipes, anon inodes
        const stat = statSync(`/proc/${pid}/fd/${fd}`);
        const name = stat.isBlockDevice() ? byRdev.get(stat.rdev) : undefined;
        if (name) opened.add(name);
      } catch { /* closed meanwhile */ }
    }
    for (const name of opened) reasons.push(`${name} is open by pid ${pid} (${commandName(pid)})`);
  }
  return reasons;
}

/** mountinfo escapes blanks and backslashes as octal. */
function unescapeMountPath(path: string): string {
  return path.replace(/\\([0-7]{3})/g, (_match, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

function commandName(pid: string): string {
  try { return readFileSync(`/proc/${pid}/comm`, "utf8").trim(); } catch { return "?"; }
}

/**
 * Called by `del` (without --force) before deleteDevice: throws a one-line Error naming why the device is in
 * use, and otherwise, where the kernel can, stops it with TRY_STOP_DEV so that nobody can open it between this
 * check and the deletion. A device that does not exist passes (deleteDevice reports that).
 */
export function stopIfUnused(devId: number): void {
  // Test hook: UBLK_BUN_TEST_NO_LOOK_AROUND=1 leaves it all to TRY_STOP_DEV (tests check the kernel's layer alone).
  const reasons = process.env.UBLK_BUN_TEST_NO_LOOK_AROUND === "1" ? [] : busyReasons(devId);
  if (reasons.length > 0) {
    const more = reasons.length > 1 ? ` (and ${reasons.length - 1} more)` : "";
    throw new Error(`del: device ${devId} is in use: ${reasons[0]}${more}; stop using it first, or del --force`);
  }
  const ctrl = Ctrl.open();
  try {
    let flags: number;
    try {
      flags = ctrl.getDevInfo(devId).flags;
    } catch (error) {
      if (error instanceof ErrnoError && error.errno === ENODEV) return;
      throw error;
    }
    if ((flags & UBLK_F_SAFE_STOP_DEV) === 0) return; // before 7.0: the look around above is all there is
    try {
      ctrl.tryStopDev(devId);
    } catch (error) {
      if (!(error instanceof ErrnoError)) throw error;
      if (error.errno === ENODEV) return; // no disk (never started, or already stopped): nobody can have it open
      if (error.errno === EBUSY) {
        throw new Error(`del: device ${devId} is in use: the kernel says /dev/ublkb${devId} is open (by something not visible from here); stop using it first, or del --force`);
      }
      throw error;
    }
  } finally {
    ctrl.close();
  }
}
