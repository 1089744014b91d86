#!/usr/bin/env bun
/**
 * `npm run bench:recovery`: how long an application stalls when the daemon dies, per phase. A null device
 * (`-q 2 -d 128 -i 1`) is read by fio (4k randread QD64) while its daemon is killed with SIGKILL, KILLS times per
 * round and mode, ROUNDS rounds alternating the modes (and the servers), in one boot:
 *   recover   `add --standby 0` (no spare): kill → QUIESCED; then `recover` is started (as an operator would, after
 *             the kernel quiesced the device) and timed from its start: the new daemon process exists,
 *             START_USER_RECOVERY done, every queue FETCHed, END_USER_RECOVERY done, `recover` exits, the first
 *             completed I/O
 *   at-once   `recover` started right after the kill (ours with the default spare): kill → LIVE, kill → first
 *             completed I/O
 *   auto      `add --auto-recover`: kill → QUIESCED and kill → first completed I/O, no operator; each kill once the
 *             supervisor's standby daemon is ready and the serving daemon has lived long enough to count as healthy
 *   standby   the default warm spare (`add -i 1`): as recover, once the spare is ready (it re-attaches after the
 *             kill, holding the device's I/O); `recover` asks it to resume (the C column of its row is the C
 *             server's plain recover); the spare's memory is read once it is ready
 * With UBLKSRV_DIR naming a build of the C reference server (ublksrv: ublk, ublk.null; ../shared/tools has a
 * build script), the recover and at-once modes run with it too, alternating, and the table gives ours ÷ C.
 * The device state is polled in this process (GET_DEV_INFO on one open control ring), completed I/O from
 * /sys/block/ublkbN/stat; our daemon's phases come from its debug log (UBLK_BUN_DEBUG=1, wall-clock ms) and its
 * start time from /proc. fio must end with no error. Medians (min–max) over all kills of a mode.
 * Before `recover` is timed (recover and standby modes), a throwaway `bun -e 0` runs: see TCG_NOTE.
 * On a machine without ublk_drv it runs itself in the test VM (UBLKSRV_DIR is copied in with it).
 *
 *   RECOVERY_KILLS=5 RECOVERY_ROUNDS=3 UBLKSRV_DIR=/tmp/ublkbin npm run bench:recovery [-- --kernel backports]
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Ctrl } from "../lib/ctrl.ts";
import { UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED } from "../ffi/uapi/ublk_cmd.ts";

const root = join(import.meta.dir, "..");
const kills = Number(process.env.RECOVERY_KILLS ?? 5);
const rounds = Number(process.env.RECOVERY_ROUNDS ?? 3);
type Mode = "recover" | "at-once" | "auto" | "standby";
const modes = (process.env.RECOVERY_MODES ?? "recover,at-once,auto,standby").split(",") as Mode[];

if (!existsSync("/dev/ublk-control")) {
  if (process.env.UBLK_BUN_VM === "1") throw new Error("bench: ublk_drv is not loaded in the VM");
  const env = ["RECOVERY_KILLS", "RECOVERY_ROUNDS", "RECOVERY_MODES"].filter((k) => process.env[k]).flatMap((k) => ["--env", `${k}=${process.env[k]}`]);
  const peer = process.env.UBLKSRV_DIR ? ["--with", process.env.UBLKSRV_DIR, "--env", "UBLKSRV_DIR=/with"] : [];
  const run = Bun.spawnSync(["bash", "tests/vm/vm.sh", ...process.argv.slice(2), "--timeout", "3600", "--out", join(root, "bench/results"), ...peer, ...env,
    "--", "bun bench/recovery.ts"], { cwd: root, stdio: ["ignore", "inherit", "inherit"] });
  process.exit(run.exitCode ?? 1);
}

const outDir = process.env.UBLK_BUN_VM === "1" ? "/out" : join(root, "bench/results");
mkdirSync(outDir, { recursive: true });
const CLI = join(root, "bin/ublk-bun.ts");
const env = { ...process.env, UBLK_BUN_DEBUG: "1" };
const LOG = "/run/ublk-bun/daemon.log";
const ctrl = Ctrl.open();

function run(command: string[], extraEnv: Record<string, string> = {}): string {
  const result = Bun.spawnSync(command, { stdin: "ignore", env: { ...env, ...extraEnv } });
  if (result.exitCode !== 0) throw new Error(`${command.join(" ")}: ${result.stderr}`);
  return result.stdout.toString();
}

/** A server under test: how to add a recoverable null device, recover it and delete it. */
interface Server {
  name: string;
  add(mode: Mode): number;
  recoverCommand(devId: number): string[];
  extraEnv: Record<string, string>;
  del(devId: number): void;
}
const ours: Server = {
  name: "ublk-bun",
  add: (mode) => Number(/^dev id (\d+):/m.exec(run([process.execPath, CLI, "add", "-t", "null", "-q", "2", "-d", "128", "-i", "1",
    ...(mode === "auto" ? ["--auto-recover"] : mode === "recover" ? ["--standby", "0"] : [])]))![1]),
  recoverCommand: (devId) => [process.execPath, CLI, "recover", "-n", String(devId)],
  extraEnv: {},
  del: (devId) => void run([process.execPath, CLI, "del", "-n", String(devId)]),
};
const peerDir = process.env.UBLKSRV_DIR;
const c: Server | null = peerDir ? {
  name: "C (ublksrv)",
  add: () => {
    run([join(peerDir, "ublk"), "add", "-t", "null", "-n", "9", "-q", "2", "-d", "128", "-r", "1", "-i", "1"], c!.extraEnv);
    return 9;
  },
  recoverCommand: (devId) => [join(peerDir, "ublk"), "recover", "-n", String(devId)],
  extraEnv: existsSync(join(peerDir, "lib")) ? { LD_LIBRARY_PATH: join(peerDir, "lib") } : {},
  del: (devId) => void run([join(peerDir, "ublk"), "del", "-n", String(devId)], c!.extraEnv),
} : null;

/** Requests completed on the device so far (reads + writes), from the block layer's counters. */
function completedIos(devId: number): number {
  const fields = readFileSync(`/sys/block/ublkb${devId}/stat`, "utf8").trim().split(/\s+/);
  return Number(fields[0]) + Number(fields[4]);
}

/** Ms since boot when a process started (/proc/PID/stat starttime, in clock ticks of 10 ms). */
function processStartMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]) * 10; // USER_HZ is 100 on Linux
}

/** Ms since boot now, on the clock processStartMs uses. */
function uptimeMs(): number {
  return Number(readFileSync("/proc/uptime", "utf8").split(" ")[0]) * 1000;
}

/** The wall-clock ms of the first debug line of `pid` matching `pattern`, NaN if none. */
function logTimeMs(log: string, pid: number, pattern: string): number {
  const match = new RegExp(`^(\\S+) ublk-bun\\[${pid}\\]: ${pattern}`, "m").exec(log);
  return match ? Date.parse(match[1]!) : Number.NaN;
}

/** Polls until `condition` holds (every ~1 ms), resolving with the performance.now() it first held. */
async function whenTrue(condition: () => boolean, timeoutMs: number): Promise<number> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (condition()) return performance.now();
    if (performance.now() > deadline) return Number.NaN;
    await Bun.sleep(1);
  }
}

/** lib/supervisor.ts: a daemon that lived this long was healthy, and its death gets a standby take-over. */
const HEALTHY_MS = 10_500;

/** Ready standbys of `devId` the log names so far (a supervisor's or an --standby daemon's). */
function standbysLogged(devId: number): number {
  return (readFileSync(LOG, "utf8").match(new RegExp(`device ${devId}: standby pid \\d+ is ready`, "g")) ?? []).length;
}

/** Waits (up to 30 s) until the log names more ready standbys for `devId` than `seen`; returns the count. */
async function standbyReady(devId: number, seen: number): Promise<number> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const count = standbysLogged(devId);
    if (count > seen) return count;
    if (Date.now() > deadline) throw new Error(`device ${devId}: no standby became ready within 30 s`);
    await Bun.sleep(50);
  }
}

/** A process's proportional and private memory in KiB (/proc/PID/smaps_rollup). */
function memoryOf(pid: number): { pssKiB: number; privateKiB: number } {
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(rollup)?.[1] ?? Number.NaN);
  return { pssKiB: field("Pss"), privateKiB: field("Private_Clean") + field("Private_Dirty") };
}
/** The ready spare's memory, once per kill of the standby mode. */
const spareMemory: Array<{ pssKiB: number; privateKiB: number }> = [];

type Timing = Record<string, number>;
const timings = new Map<string, Timing[]>();
/** fio errors per server: ours must stay at 0 (the exit status says so); the C server's are reported. */
const fioErrors = new Map<string, number>();

/** Live with a daemon other than `oldPid`, then one more completed I/O: resolves with both times. */
async function resumed(devId: number, oldPid: number): Promise<{ liveAt: number; firstIoAt: number }> {
  const liveAt = await whenTrue(() => { const info = ctrl.getDevInfo(devId); return info.state === UBLK_S_DEV_LIVE && info.ublksrvPid !== oldPid; }, 60_000);
  // I/O completed after the kill while the old daemon's commits drained is not a resumption: counted from LIVE.
  const iosAtLive = completedIos(devId);
  return { liveAt, firstIoAt: await whenTrue(() => completedIos(devId) > iosAtLive, 10_000) };
}

async function round(server: Server, mode: Mode): Promise<void> {
  const logCharsBeforeAdd = existsSync(LOG) ? readFileSync(LOG, "utf8").length : 0;
  const devId = server.add(mode);
  const fio = Bun.spawn(["fio", "--name=stall", `--filename=/dev/ublkb${devId}`, "--rw=randread", "--bs=4k", "--direct=1",
    "--ioengine=io_uring", "--iodepth=64", "--time_based", "--runtime=3600", "--output-format=json",
    // fio would end at a server's first I/O error, and every later kill of that round would wait for I/O that
    // never comes: it reads on and counts them.
    "--continue_on_error=all"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  await Bun.sleep(2_000); // fio running at full depth
  const key = `${server.name}:${mode}`;
  // A device id comes back round after round: count only this round's standbys.
  let standbysReady = existsSync(LOG) ? (readFileSync(LOG, "utf8").slice(0, logCharsBeforeAdd).match(new RegExp(`device ${devId}: standby pid \\d+ is ready`, "g")) ?? []).length : 0;
  for (let kill = 0; kill < kills; kill++) {
    if (mode === "auto") {
      // As in use: the daemon lived long enough to count as healthy (a crash loop gets no standby), and the
      // supervisor's standby is loaded.
      if (kill > 0) await Bun.sleep(HEALTHY_MS);
      standbysReady = await standbyReady(devId, standbysReady);
    }
    // Our at-once kills find the default spare ready too, as in use (C keeps none).
    if (mode === "at-once" && server === ours) standbysReady = await standbyReady(devId, standbysReady);
    if (mode === "standby") {
      standbysReady = await standbyReady(devId, standbysReady);
      spareMemory.push(memoryOf(Number([...readFileSync(LOG, "utf8").matchAll(new RegExp(`device ${devId}: standby pid (\\d+) is ready`, "g"))].at(-1)![1])));
    }
    const oldPid = ctrl.getDevInfo(devId).ublksrvPid;
    const killedAt = performance.now();
    const killedWallMs = Date.now();
    process.kill(oldPid, "SIGKILL");
    console.log(`${new Date().toISOString()} ${key} kill ${kill + 1}: SIGKILL to ${oldPid}`);
    const timing: Timing = {};
    if (mode === "at-once") {
      const recover = Bun.spawn(server.recoverCommand(devId), { stdin: "ignore", stdout: "ignore", stderr: "pipe", env: { ...env, ...server.extraEnv } });
      const { liveAt, firstIoAt } = await resumed(devId, oldPid);
      timing.killToLiveMs = liveAt - killedAt;
      timing.killToFirstIoMs = firstIoAt - killedAt;
      if ((await recover.exited) !== 0) throw new Error(`recover failed: ${await new Response(recover.stderr).text()}`);
    } else {
      timing.killToQuiescedMs = (await whenTrue(() => ctrl.getDevInfo(devId).state === UBLK_S_DEV_QUIESCED, 60_000)) - killedAt;
      if (mode === "auto") {
        const { liveAt, firstIoAt } = await resumed(devId, oldPid);
        timing.killToLiveMs = liveAt - killedAt;
        timing.killToFirstIoMs = firstIoAt - killedAt;
      } else {
        await Bun.sleep(300);
        // The emulator's bill (TCG_NOTE), paid before the clock starts, for both servers alike.
        await Bun.spawn([process.execPath, "-e", "0"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" }).exited;
        const iosBefore = completedIos(devId);
        const startAt = performance.now();
        const startWallMs = Date.now();
        const startUptimeMs = uptimeMs();
        const recover = Bun.spawn(server.recoverCommand(devId), { stdin: "ignore", stdout: "ignore", stderr: "pipe", env: { ...env, ...server.extraEnv } });
        const firstIoAt = await whenTrue(() => completedIos(devId) > iosBefore, 60_000);
        const status = await recover.exited;
        const exitAt = performance.now();
        if (status !== 0) throw new Error(`recover failed: ${await new Response(recover.stderr).text()}`);
        timing.firstIoMs = firstIoAt - startAt;
        timing.recoverExitedMs = exitAt - startAt;
        if (server === ours) {
          const newPid = ctrl.getDevInfo(devId).ublksrvPid;
          const log = readFileSync(LOG, "utf8");
          if (mode === "recover") {
            timing.daemonStartedMs = processStartMs(newPid) - startUptimeMs; // ±10 ms
            timing.startUserRecoveryMs = logTimeMs(log, newPid, "device \\d+: START_USER_RECOVERY done") - startWallMs;
            timing.queuesFetchedMs = logTimeMs(log, newPid, "device \\d+: every queue fetched") - startWallMs;
          } else {
            // The spare re-attached before `recover` was started: those steps are timed from the kill.
            timing.killToQueuesFetchedMs = logTimeMs(log, newPid, "device \\d+: every queue fetched") - killedWallMs;
            timing.standbyAskedMs = logTimeMs(log, newPid, "standby for device \\d+: recover asked") - startWallMs;
          }
          timing.endUserRecoveryMs = logTimeMs(log, newPid, "device \\d+: END_USER_RECOVERY done") - startWallMs;
        }
      }
    }
    timings.set(key, [...(timings.get(key) ?? []), timing]);
    console.log(`${key} kill ${kill + 1}: ${Object.entries(timing).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(", ")}`);
    await Bun.sleep(1_000); // serving again at full depth before the next kill
  }
  fio.kill("SIGINT");
  await fio.exited;
  const text = await new Response(fio.stdout).text();
  const json = JSON.parse(text.slice(text.indexOf("{")));
  const errors = json.jobs.reduce((sum: number, job: { total_err?: number; error: number }) => sum + (job.total_err ?? (job.error ? 1 : 0)), 0);
  fioErrors.set(server.name, (fioErrors.get(server.name) ?? 0) + errors);
  console.log(`${key}: fio ${Math.floor(json.jobs[0].read.io_bytes / 2 ** 20)} MiB read, ${errors} errors`);
  server.del(devId);
}

run([process.execPath, CLI, "del", "-a"]);
for (let r = 0; r < rounds; r++) {
  for (const mode of modes) {
    await round(ours, mode);
    if (c && mode !== "auto" && mode !== "standby") await round(c, mode);
  }
}
ctrl.close();

const median = (values: number[]) => {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  return sorted.length === 0 ? Number.NaN : sorted[Math.floor(sorted.length / 2)]!;
};
const stats = (values: number[]) => {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return "—";
  return `${median(sorted).toFixed(0)} (${sorted[0]!.toFixed(0)}–${sorted.at(-1)!.toFixed(0)})`;
};
const PHASES: Array<[Mode, string, string]> = [
  ["recover", "killToQuiescedMs", "kill -9 → device QUIESCED"],
  ["recover", "daemonStartedMs", "no spare (`--standby 0`): `recover` start → new daemon process started"],
  ["recover", "startUserRecoveryMs", "no spare: `recover` start → START_USER_RECOVERY done"],
  ["recover", "queuesFetchedMs", "no spare: `recover` start → every queue FETCHed"],
  ["recover", "endUserRecoveryMs", "no spare: `recover` start → END_USER_RECOVERY done"],
  ["recover", "firstIoMs", "no spare: `recover` start → first completed I/O"],
  ["recover", "recoverExitedMs", "no spare: `recover` start → `recover` exits"],
  ["at-once", "killToLiveMs", "kill → LIVE, `recover` started at once (ours: warm spare)"],
  ["at-once", "killToFirstIoMs", "kill → first completed I/O, `recover` started at once (ours: warm spare)"],
  ["auto", "killToQuiescedMs", "`--auto-recover` (standby ready): kill → QUIESCED"],
  ["auto", "killToLiveMs", "`--auto-recover`: kill → LIVE"],
  ["auto", "killToFirstIoMs", "`--auto-recover`: kill → first completed I/O"],
  ["standby", "killToQuiescedMs", "warm spare (the default; ready): kill → QUIESCED"],
  ["standby", "killToQueuesFetchedMs", "warm spare: kill → the spare has every queue FETCHed (I/O still held)"],
  ["standby", "standbyAskedMs", "warm spare: `recover` start → the spare has the request"],
  ["standby", "endUserRecoveryMs", "warm spare: `recover` start → END_USER_RECOVERY done"],
  ["standby", "firstIoMs", "warm spare: `recover` start → first completed I/O (C: plain recover)"],
  ["standby", "recoverExitedMs", "warm spare: `recover` start → `recover` exits (C: plain recover)"],
];
/** Why a throwaway process runs between the kill and `recover` (recover and standby modes). */
const TCG_NOTE = "Before `recover` is started, a throwaway `bun -e 0` runs (for both servers): under qemu TCG the first " +
  "process to reuse the memory of a killed process that ran JIT-compiled code (our daemon, not the C server) waits while " +
  "qemu drops its translations of that code. In the 7.3 VM a `bun -e 0` right after a busy Bun process was killed took " +
  "1.3–1.5 s, after an idle one 0.1 s (4 kills each). Real hardware has no such cost.";
const column = (server: Server, mode: Mode, key: string) => (timings.get(`${server.name}:${mode}`) ?? []).map((t) => t[key] ?? Number.NaN);
const lines = [
  `# ublk-bun recovery stall (${new Date().toISOString().slice(0, 10)}; kernel ${Bun.spawnSync(["uname", "-r"]).stdout.toString().trim()}; ` +
    `${rounds} rounds × ${kills} kills per mode and server, alternating, one boot)`,
  "",
  "`-t null -q 2 -d 128 -i 1` under fio 4k randread QD64 (io_uring). Milliseconds, median (min–max).",
  "",
  TCG_NOTE,
  "",
  c ? "| phase | ublk-bun | C (ublksrv) | ours ÷ C |" : "| phase | ublk-bun |",
  c ? "| --- | ---: | ---: | ---: |" : "| --- | ---: |",
  ...PHASES.filter(([mode]) => modes.includes(mode)).map(([mode, key, label]) => {
    const mine = column(ours, mode, key);
    if (!c) return `| ${label} | ${stats(mine)} |`;
    const theirs = column(c, mode === "standby" ? "recover" : mode, key);
    const ratio = median(mine) / median(theirs);
    return `| ${label} | ${stats(mine)} | ${stats(theirs)} | ${Number.isFinite(ratio) ? ratio.toFixed(2) : "—"} |`;
  }),
  "",
  `fio errors across all kills: ${[...fioErrors].map(([name, errors]) => `${name} ${errors}`).join(", ")}`,
  ...(spareMemory.length > 0 ? ["", `A ready spare's memory (median of ${spareMemory.length}): ${(median(spareMemory.map((m) => m.pssKiB)) / 1024).toFixed(1)} MiB ` +
    `proportional set size, ${(median(spareMemory.map((m) => m.privateKiB)) / 1024).toFixed(1)} MiB of it private`] : []),
  "",
];
writeFileSync(join(outDir, "recovery.md"), lines.join("\n"));
// Our daemons' step-by-step log (UBLK_BUN_DEBUG), beside the kill times printed above, for reading a phase apart.
if (existsSync(LOG)) writeFileSync(join(outDir, "recovery-daemon.log"), readFileSync(LOG));
writeFileSync(join(outDir, "recovery.json"), JSON.stringify({ kills, rounds, timings: Object.fromEntries(timings), fioErrors: Object.fromEntries(fioErrors), spareMemory }, null, 1));
console.log(lines.join("\n"));
process.exit(fioErrors.get(ours.name) === 0 ? 0 : 1);
