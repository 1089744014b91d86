// Shared helpers for the kernel suite: run the CLI and fio as a user would, and check that nothing is left.
import { expect } from "bun:test";
import { existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { join } from "node:path";

export const ROOT = join(import.meta.dir, "../..");
export const CLI = join(ROOT, "bin/ublk-bun.ts");

export interface Run {
  status: number;
  stdout: string;
  stderr: string;
}

/** Runs `ublk-bun ARGS…` to completion. */
export function cli(args: string[], env: Record<string, string> = {}, timeoutMs = 180_000): Run {
  const result = Bun.spawnSync([process.execPath, CLI, ...args], { env: { ...process.env, ...env }, stdin: "ignore", timeout: timeoutMs });
  return { status: result.exitCode ?? -1, stdout: result.stdout.toString(), stderr: result.stderr.toString() };
}

/** The kernel's ublk feature names (`features --json`). */
export function kernelFeatureNames(): string[] {
  return JSON.parse(cliOk(["features", "--json"])).names;
}

/** How `list` names a new device's commands on this kernel: batch where it has BATCH_IO (our default). */
export function defaultCommands(): string {
  return kernelFeatureNames().includes("BATCH_IO") ? "batch commands" : "per-tag commands";
}

/** Runs the CLI and expects success; returns stdout. */
export function cliOk(args: string[], env: Record<string, string> = {}): string {
  const run = cli(args, env);
  if (run.status !== 0) throw new Error(`ublk-bun ${args.join(" ")} failed (${run.status}): ${run.stderr}${run.stdout}`);
  return run.stdout;
}

/** `add` and return the new device id (parsed from the list block it prints). */
export function addDevice(args: string[], env: Record<string, string> = {}): number {
  const out = cliOk(["add", ...args], env);
  const match = /^dev id (\d+):/m.exec(out);
  if (!match) throw new Error(`add printed no device: ${out}`);
  return Number(match[1]);
}

/** The daemon pid as scripts read it: 7th field of the line containing "pid". */
export function daemonPidOf(devId: number): number {
  const line = cliOk(["list", "-n", String(devId)]).split("\n").find((l) => l.includes("pid"))!;
  return Number(line.trim().split(/\s+/)[6]);
}

export interface FioResult {
  status: number;
  errors: number;
  iops: number;
  json: any;
  stderr: string;
}

/** Runs fio with JSON output; `errors` sums every job's error count (and counts a failed run). */
export function fio(args: string[], timeoutMs = 300_000): FioResult {
  const result = Bun.spawnSync(["fio", "--output-format=json", "--group_reporting", ...args], { timeout: timeoutMs, stdin: "ignore" });
  const stdout = result.stdout.toString();
  const jsonStart = stdout.indexOf("{");
  let json: any = null;
  try { json = JSON.parse(stdout.slice(jsonStart)); } catch { /* fio failed before printing JSON */ }
  const jobs: any[] = json?.jobs ?? [];
  const errors = jobs.reduce((sum, job) => sum + (job.error ?? 0), 0);
  const iops = jobs.reduce((sum, job) => sum + (job.read?.iops ?? 0) + (job.write?.iops ?? 0), 0);
  return { status: result.exitCode ?? -1, errors, iops, json, stderr: result.stderr.toString() };
}

/** ublk nodes in /dev right now. */
/** fio write-then-verify with crc32c; returns [status, errors] so a failure shows which case. */
export function verify(devId: number, rw: string, bs: string, depth: number, sizeBytes: string): [string, number, number] {
  const result = fio([`--name=verify-${rw}-${bs}-${depth}`, `--filename=/dev/ublkb${devId}`, `--rw=${rw}`, `--bs=${bs}`, "--direct=1",
    "--ioengine=io_uring", `--iodepth=${depth}`, `--size=${sizeBytes}`, "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]);
  if (result.status !== 0) console.error(result.stderr);
  return [`${rw} ${bs} QD${depth}`, result.status, result.errors];
}

export function ublkNodes(): string[] {
  return readdirSync("/dev").filter((name) => name.startsWith("ublkb") || name.startsWith("ublkc"));
}

/** Processes holding /dev/ublkc* open. */
export function ublkHolders(): string[] {
  const holders: string[] = [];
  for (const pid of readdirSync("/proc").filter((name) => /^\d+$/.test(name))) {
    try {
      for (const fd of readdirSync(`/proc/${pid}/fd`)) {
        try {
          if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith("/dev/ublkc")) holders.push(`${pid}/${fd}`);
        } catch { /* raced */ }
      }
    } catch { /* raced */ }
  }
  return holders;
}

export function records(runDir = process.env.UBLK_BUN_RUN_DIR || "/run/ublk-bun"): string[] {
  return existsSync(runDir) ? readdirSync(runDir).filter((name) => name.endsWith(".json")) : [];
}

/** Nothing of ours is left: no device nodes, no records, nobody holding a ublk char device. */
export function expectClean(): void {
  expect(ublkNodes()).toEqual([]);
  expect(records()).toEqual([]);
  expect(ublkHolders()).toEqual([]);
}

/** Deletes every device; used in afterAll so one failing test does not poison the next. */
export function cleanUp(): void {
  cli(["del", "-a", "--force"]);
}

export async function waitFor(what: string, condition: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(50);
  }
}

/**
 * Starts `ublk-bun ARGS…` with its daemon told to pause `pauseMs` at `step` (UBLK_BUN_TEST_PAUSE) and waits until
 * a daemon other than `notPid` logs that pause; returns the CLI process and the paused daemon's pid.
 */
export async function spawnPaused(args: string[], step: string, notPid = 0, pauseMs = 60_000) {
  const child = Bun.spawn([process.execPath, CLI, ...args],
    { env: { ...process.env, UBLK_BUN_TEST_PAUSE: `${step}:${pauseMs}`, UBLK_BUN_DEBUG: "1" }, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  let daemonPid = 0;
  await waitFor(`the daemon to pause at ${step}`, () => {
    let log = "";
    try { log = readFileSync("/run/ublk-bun/daemon.log", "utf8"); } catch { /* not written yet */ }
    const match = [...log.matchAll(new RegExp(`ublk-bun\\[(\\d+)\\]: pausing \\d+ ms at ${step}`, "g"))].at(-1);
    daemonPid = match ? Number(match[1]) : 0;
    return daemonPid > 0 && daemonPid !== notPid && readdirSync("/proc").includes(String(daemonPid));
  }, 60_000);
  return { child, daemonPid };
}

/** Waits (bounded) for a background fio; a hung one is killed and reported as "hung". */
export async function fioResult(fio: Bun.Subprocess<"ignore", "pipe", "pipe">, timeoutMs = 120_000): Promise<{ status: number | string; stdout: string; stderr: string }> {
  const status = await Promise.race([fio.exited, Bun.sleep(timeoutMs).then(() => "hung")]);
  if (status === "hung") fio.kill("SIGKILL");
  return { status, stdout: await new Response(fio.stdout).text(), stderr: await new Response(fio.stderr).text() };
}

/**
 * Lets a long fio job run on for `afterMs` more (I/O after the last recovery), stops it with SIGINT — fio then
 * writes its JSON and exits 128 — and checks it saw no error and did real I/O (more than `minIos`). Stopping by
 * signal instead of `--runtime` keeps the test independent of how long the kills took on a slow machine.
 */
export async function expectFioClean(fio: Bun.Subprocess<"ignore", "pipe", "pipe">, afterMs = 2000, minIos = 1000): Promise<void> {
  await Bun.sleep(afterMs);
  expect(fio.exitCode).toBeNull(); // it must not have ended by itself (that would be an error)
  fio.kill("SIGINT");
  const { status, stdout, stderr } = await fioResult(fio);
  expect(stderr).not.toMatch(/verify|error/i);
  expect(status).toBe(128);
  const result = fioJson(stdout);
  expect(result.errors).toBe(0);
  expect(result.ios).toBeGreaterThan(minIos);
}

export function fioJson(text: string): { errors: number; ios: number } {
  const json = JSON.parse(text.slice(text.indexOf("{")));
  const job = json.jobs[0];
  return { errors: job.error, ios: (job.read?.total_ios ?? 0) + (job.write?.total_ios ?? 0) };
}
