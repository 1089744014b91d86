#!/usr/bin/env bun
/**
 * `npm run bench:recovery`: how long an application stalls when the daemon dies, per phase. A null device
 * (`-q 2 -d 128 -i 1`) is read by fio (4k randread QD64) while its daemon is killed with SIGKILL, KILLS times per
 * round and mode, ROUNDS rounds alternating the modes, in one boot:
 *   recover   kill → QUIESCED; then `recover` is started (as an operator would, after the kernel quiesced the
 *             device) and its phases are timed from its start: the new daemon process exists, START_USER_RECOVERY
 *             done, every queue FETCHed, END_USER_RECOVERY done, `recover` exits, the first completed I/O
 *   at-once   `recover` started right after the kill: kill → first completed I/O
 *   auto      `add --auto-recover`: kill → QUIESCED and kill → first completed I/O, no operator; each kill once the
 *             supervisor's standby daemon is ready and the serving daemon has lived long enough to count as healthy
 * The device state is polled in this process (GET_DEV_INFO on one open control ring), completed I/O from
 * /sys/block/ublkbN/stat; the daemon's phases come from its debug log (UBLK_BUN_DEBUG=1, wall-clock ms) and the
 * new process's start time from /proc. fio must end with no error. Medians (min–max) over all kills of a mode.
 * On a machine without ublk_drv it runs itself in the test VM.
 *
 *   RECOVERY_KILLS=5 RECOVERY_ROUNDS=3 npm run bench:recovery
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Ctrl } from "../lib/ctrl.ts";
import { UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED } from "../ffi/uapi/ublk_cmd.ts";

const root = join(import.meta.dir, "..");
const kills = Number(process.env.RECOVERY_KILLS ?? 5);
const rounds = Number(process.env.RECOVERY_ROUNDS ?? 3);
const modes = (process.env.RECOVERY_MODES ?? "recover,at-once,auto").split(",") as Mode[];
type Mode = "recover" | "at-once" | "auto";

if (!existsSync("/dev/ublk-control")) {
  if (process.env.UBLK_BUN_VM === "1") throw new Error("bench: ublk_drv is not loaded in the VM");
  const env = ["RECOVERY_KILLS", "RECOVERY_ROUNDS", "RECOVERY_MODES"].filter((k) => process.env[k]).flatMap((k) => ["--env", `${k}=${process.env[k]}`]);
  const run = Bun.spawnSync(["bash", "tests/vm/vm.sh", "--timeout", "3600", "--out", join(root, "bench/results"), ...env, "--", "bun bench/recovery.ts"],
    { cwd: root, stdio: ["ignore", "inherit", "inherit"] });
  process.exit(run.exitCode ?? 1);
}

const outDir = process.env.UBLK_BUN_VM === "1" ? "/out" : join(root, "bench/results");
mkdirSync(outDir, { recursive: true });
const CLI = join(root, "bin/ublk-bun.ts");
const env = { ...process.env, UBLK_BUN_DEBUG: "1" };
const cli = (args: string[]) => {
  const run = Bun.spawnSync([process.execPath, CLI, ...args], { stdin: "ignore", env });
  if (run.exitCode !== 0) throw new Error(`ublk-bun ${args.join(" ")}: ${run.stderr}`);
  return run.stdout.toString();
};
const LOG = "/run/ublk-bun/daemon.log";
const ctrl = Ctrl.open();

/** Requests completed on the device so far (reads + writes), from the block layer's counters. */
function completedIos(devId: number): number {
  const fields = readFileSync(`/sys/block/ublkb${devId}/stat`, "utf8").trim().split(/\s+/);
  return Number(fields[0]) + Number(fields[4]);
}

/** Wall-clock ms when a process started (/proc/PID/stat starttime, in clock ticks since boot). */
function processStartMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const startTicks = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19]);
  const bootS = Number(/^btime (\d+)$/m.exec(readFileSync("/proc/stat", "utf8"))![1]);
  return bootS * 1000 + startTicks * 10; // USER_HZ is 100 on Linux
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

/** Waits (up to 30 s) until the supervisor logs more ready standbys for `devId` than `seen`; returns the count. */
async function standbyReady(devId: number, seen: number): Promise<number> {
  const pattern = new RegExp(`device ${devId}: standby pid \\d+ is ready`, "g");
  const deadline = Date.now() + 30_000;
  for (;;) {
    const count = (readFileSync(LOG, "utf8").match(pattern) ?? []).length;
    if (count > seen) return count;
    if (Date.now() > deadline) throw new Error(`device ${devId}: no standby became ready within 30 s`);
    await Bun.sleep(50);
  }
}

type Timing = Record<string, number>;
const timings: Record<Mode, Timing[]> = { recover: [], "at-once": [], auto: [] };
let fioErrors = 0;

async function round(mode: Mode): Promise<void> {
  const add = mode === "auto" ? ["--auto-recover"] : [];
  const out = cli(["add", "-t", "null", "-q", "2", "-d", "128", "-i", "1", ...add]);
  const devId = Number(/^dev id (\d+):/m.exec(out)![1]);
  const fio = Bun.spawn(["fio", "--name=stall", `--filename=/dev/ublkb${devId}`, "--rw=randread", "--bs=4k", "--direct=1",
    "--ioengine=io_uring", "--iodepth=64", "--time_based", "--runtime=3600", "--output-format=json"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  await Bun.sleep(2_000); // fio running at full depth
  let standbysReady = 0;
  for (let kill = 0; kill < kills; kill++) {
    if (mode === "auto") {
      // As in use: the daemon lived long enough to count as healthy (a crash loop gets no standby), and the
      // supervisor's standby is loaded.
      if (kill > 0) await Bun.sleep(HEALTHY_MS);
      standbysReady = await standbyReady(devId, standbysReady);
    }
    const oldPid = ctrl.getDevInfo(devId).ublksrvPid;
    const killedAt = performance.now();
    process.kill(oldPid, "SIGKILL");
    const timing: Timing = {};
    if (mode === "at-once") {
      const recover = Bun.spawn([process.execPath, CLI, "recover", "-n", String(devId)], { stdin: "ignore", stdout: "ignore", stderr: "pipe", env });
      // I/O completed after the kill while the old daemon's commits drained is not a resumption: wait for LIVE first.
      const liveAt = await whenTrue(() => { const info = ctrl.getDevInfo(devId); return info.state === UBLK_S_DEV_LIVE && info.ublksrvPid !== oldPid; }, 60_000);
      const iosAtLive = completedIos(devId);
      timing.killToFirstIoMs = (await whenTrue(() => completedIos(devId) > iosAtLive, 10_000)) - killedAt;
      timing.killToLiveMs = liveAt - killedAt;
      if ((await recover.exited) !== 0) throw new Error(`recover failed: ${await new Response(recover.stderr).text()}`);
    } else {
      timing.killToQuiescedMs = (await whenTrue(() => ctrl.getDevInfo(devId).state === UBLK_S_DEV_QUIESCED, 60_000)) - killedAt;
      if (mode === "auto") {
        const liveAt = await whenTrue(() => { const info = ctrl.getDevInfo(devId); return info.state === UBLK_S_DEV_LIVE && info.ublksrvPid !== oldPid; }, 60_000);
        const iosAtLive = completedIos(devId);
        timing.killToFirstIoMs = (await whenTrue(() => completedIos(devId) > iosAtLive, 10_000)) - killedAt;
        timing.killToLiveMs = liveAt - killedAt;
      } else {
        await Bun.sleep(300);
        const iosBefore = completedIos(devId);
        const startAt = performance.now();
        const startWallMs = Date.now();
        const recover = Bun.spawn([process.execPath, CLI, "recover", "-n", String(devId)], { stdin: "ignore", stdout: "ignore", stderr: "pipe", env });
        const firstIoAt = await whenTrue(() => completedIos(devId) > iosBefore, 60_000);
        const status = await recover.exited;
        const exitAt = performance.now();
        if (status !== 0) throw new Error(`recover failed: ${await new Response(recover.stderr).text()}`);
        const newPid = ctrl.getDevInfo(devId).ublksrvPid;
        const log = readFileSync(LOG, "utf8");
        timing.daemonStartedMs = processStartMs(newPid) - startWallMs;
        timing.startUserRecoveryMs = logTimeMs(log, newPid, "device \\d+: START_USER_RECOVERY done") - startWallMs;
        timing.queuesFetchedMs = logTimeMs(log, newPid, "device \\d+: every queue fetched") - startWallMs;
        timing.endUserRecoveryMs = logTimeMs(log, newPid, "device \\d+: END_USER_RECOVERY done") - startWallMs;
        timing.recoverExitedMs = exitAt - startAt;
        timing.firstIoMs = firstIoAt - startAt;
      }
    }
    timings[mode].push(timing);
    console.log(`${mode} kill ${kill + 1}: ${Object.entries(timing).map(([k, v]) => `${k} ${v.toFixed(0)}`).join(", ")}`);
    await Bun.sleep(1_000); // serving again at full depth before the next kill
  }
  fio.kill("SIGINT");
  await fio.exited;
  const text = await new Response(fio.stdout).text();
  const json = JSON.parse(text.slice(text.indexOf("{")));
  const errors = json.jobs.reduce((sum: number, job: { error: number }) => sum + job.error, 0);
  fioErrors += errors;
  console.log(`${mode}: fio ${json.jobs[0].read.io_bytes >> 20} MiB read, ${errors} errors`);
  cli(["del", "-n", String(devId)]);
}

cli(["del", "-a"]);
for (let r = 0; r < rounds; r++) for (const mode of modes) await round(mode);
ctrl.close();

const stats = (values: number[]) => {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (sorted.length === 0) return "—";
  return `${sorted[Math.floor(sorted.length / 2)]!.toFixed(0)} (${sorted[0]!.toFixed(0)}–${sorted.at(-1)!.toFixed(0)})`;
};
const PHASES: Array<[Mode, string, string]> = [
  ["recover", "killToQuiescedMs", "kill -9 → device QUIESCED"],
  ["recover", "daemonStartedMs", "`recover` start → new daemon process started"],
  ["recover", "startUserRecoveryMs", "`recover` start → START_USER_RECOVERY done"],
  ["recover", "queuesFetchedMs", "`recover` start → every queue FETCHed"],
  ["recover", "endUserRecoveryMs", "`recover` start → END_USER_RECOVERY done"],
  ["recover", "firstIoMs", "`recover` start → first completed I/O"],
  ["recover", "recoverExitedMs", "`recover` start → `recover` exits"],
  ["at-once", "killToLiveMs", "kill → LIVE, `recover` started at once"],
  ["at-once", "killToFirstIoMs", "kill → first completed I/O, `recover` started at once"],
  ["auto", "killToQuiescedMs", "`--auto-recover` (standby ready): kill → QUIESCED"],
  ["auto", "killToLiveMs", "`--auto-recover`: kill → LIVE"],
  ["auto", "killToFirstIoMs", "`--auto-recover`: kill → first completed I/O"],
];
const lines = [
  `# ublk-bun recovery stall (${new Date().toISOString().slice(0, 10)}; kernel ${Bun.spawnSync(["uname", "-r"]).stdout.toString().trim()}; ` +
    `${rounds} rounds × ${kills} kills per mode, one boot)`,
  "",
  "`-t null -q 2 -d 128 -i 1` under fio 4k randread QD64 (io_uring). Milliseconds, median (min–max).",
  "",
  "| phase | ms |",
  "| --- | ---: |",
  ...PHASES.filter(([mode]) => modes.includes(mode)).map(([mode, key, label]) => `| ${label} | ${stats(timings[mode].map((t) => t[key]!))} |`),
  "",
  `fio errors across all kills: ${fioErrors}`,
  "",
];
writeFileSync(join(outDir, "recovery.md"), lines.join("\n"));
writeFileSync(join(outDir, "recovery.json"), JSON.stringify({ kills, rounds, timings, fioErrors }, null, 1));
console.log(lines.join("\n"));
process.exit(fioErrors === 0 ? 0 : 1);
