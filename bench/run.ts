#!/usr/bin/env bun
/**
 * `npm run bench`: fio against our targets beside the kernel's own drivers, in one boot, as ratios.
 *   null target  vs null_blk (configfs, irqmode=0, hw_queue_depth 128, 1 queue), and with UBLKSRV_DIR=DIR vs the C
 *                reference server's null target; where the kernel has BATCH_IO, batch vs per-tag commands (--batch 0)
 *   file target  vs loop (buffered) over the same zero-filled 1 GiB file on tmpfs; memory target beside them
 *   nbd target   vs nbd.ko + nbd-client, both over loopback TCP to one `nbdkit memory` export (BENCH_CASES=nbd only)
 *   ext4         file target vs loop with direct I/O vs fio on the file itself (O_DIRECT), optionally vs the C
 *                reference server's loop target, over one written 1 GiB file on ext4 on a virtio-blk disk
 *                (BENCH_CASES=ext4 only; the VM gets the disk from vm.sh --disk; UBLKSRV_DIR=DIR adds the C server)
 * Each case runs REPEATS times alternating ours and the kernel's; medians are reported (one TCG boot varies
 * by 6–10 % between identical runs, boots by 15 %: compare only figures from one run of this script).
 * Writes results.md, results.json (with the raw fio JSON) and results.svg to bench/results/ (or /out in the VM);
 * the nbd and ext4 groups write nbd.md/nbd.json and ext4.md/ext4.json instead, so a run of one alone leaves the
 * other groups' results be.
 * On a machine without ublk_drv it runs itself in the test VM (tests/vm/vm.sh).
 *
 *   BENCH_SECONDS=10 BENCH_REPEATS=3 BENCH_CASES=null,file,memory npm run bench     (the default groups)
 *   BENCH_CASES=nbd npm run bench      (about 8 min more at the defaults: not in the default set)
 *   UBLKSRV_DIR=/tmp/ublkbin BENCH_CASES=ext4 npm run bench     (not in the default set either; outside the VM it
 *                                      formats BENCH_EXT4_DEVICE, which must be given)
 *   npm run bench -- --kernel backports     the VM's kernel (tests/vm/vm.sh --kernel; default trixie)
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { renderSvg } from "./svg.ts";

const root = join(import.meta.dir, "..");
const seconds = Number(process.env.BENCH_SECONDS ?? 10);
const repeats = Number(process.env.BENCH_REPEATS ?? 3);
const groups = new Set((process.env.BENCH_CASES ?? "null,file,memory").split(","));
const kernelArg = process.argv.indexOf("--kernel");
const vmKernel = kernelArg >= 0 ? process.argv[kernelArg + 1] : process.argv.find((arg) => arg.startsWith("--kernel="))?.slice(9);
if (kernelArg >= 0 && !vmKernel) {
  console.error("bench: --kernel needs trixie or backports");
  process.exit(2);
}

/** The ext4 group's disk: the 1 GiB file plus ext4's metadata and journal, with room to spare. */
const EXT4_DISK_MIB = 1536;

if (!existsSync("/dev/ublk-control")) {
  if (process.env.UBLK_BUN_VM === "1") throw new Error("bench: ublk_drv is not loaded in the VM");
  const env = ["BENCH_SECONDS", "BENCH_REPEATS", "BENCH_CASES"].filter((k) => process.env[k]).flatMap((k) => ["--env", `${k}=${process.env[k]}`]);
  const kernel = vmKernel === undefined ? [] : ["--kernel", vmKernel];
  // The ext4 group needs a real disk; with UBLKSRV_DIR the C server's binaries are copied in as /with.
  const ext4 = !groups.has("ext4") ? [] : ["--disk", String(EXT4_DISK_MIB)];
  const peerBinaries = process.env.UBLKSRV_DIR ? ["--with", process.env.UBLKSRV_DIR, "--env", "UBLKSRV_DIR=/with"] : [];
  const run = Bun.spawnSync(["bash", "tests/vm/vm.sh", ...kernel, "--timeout", "5400", "--out", join(root, "bench/results"), ...ext4, ...peerBinaries, ...env,
    "--", "bun bench/run.ts"], { cwd: root, stdio: ["ignore", "inherit", "inherit"] });
  process.exit(run.exitCode ?? 1);
}

const outDir = process.env.UBLK_BUN_VM === "1" ? "/out" : join(root, "bench/results");
mkdirSync(outDir, { recursive: true });
const cli = (args: string[]) => {
  const run = Bun.spawnSync([process.execPath, join(root, "bin/ublk-bun.ts"), ...args], { stdin: "ignore", env: { ...process.env } });
  if (run.exitCode !== 0) throw new Error(`ublk-bun ${args.join(" ")}: ${run.stderr}`);
  return run.stdout.toString();
};
const sh = (command: string) => {
  const run = Bun.spawnSync(["sh", "-c", command], { stdin: "ignore" });
  if (run.exitCode !== 0) throw new Error(`${command}: ${run.stderr}`);
  return run.stdout.toString().trim();
};

interface Job { name: string; rw: string; bs: string; depth: number; jobs?: number; buffered?: boolean }
const JOBS: Record<string, Job> = {
  randread1: { name: "4k randread QD1", rw: "randread", bs: "4k", depth: 1 },
  randread64: { name: "4k randread QD64", rw: "randread", bs: "4k", depth: 64 },
  randwrite1: { name: "4k randwrite QD1", rw: "randwrite", bs: "4k", depth: 1 },
  randwrite64: { name: "4k randwrite QD64", rw: "randwrite", bs: "4k", depth: 64 },
  read128k: { name: "128k seq read QD64", rw: "read", bs: "128k", depth: 64 },
  write128k: { name: "128k seq write QD64", rw: "write", bs: "128k", depth: 64 },
  randread64x2: { name: "4k randread QD64 ×2 jobs", rw: "randread", bs: "4k", depth: 64, jobs: 2 },
};

/** Server CPU per I/O in µs, split by where it went: queue threads in user space, queue threads and io_uring
 * workers in the kernel, JSC's JIT compiler threads, everything else (main thread, GC, allocator). */
interface CpuSplit { queueUser: number; queueSys: number; jit: number; other: number }
/** peerCpuUsPerIo: the CPU per I/O of a process both sides share (the nbd group's nbdkit). */
interface Sample { iops: number; mbps: number; p50us: number; p99us: number; cpuUsPerIo: number | null; cpuSplit: CpuSplit | null;
  peerCpuUsPerIo: number | null; raw: unknown }

/** utime and stime (clock ticks) of one thread or, for a pid's own stat, of the whole process. */
function statTicks(statPath: string): { comm: string; user: number; sys: number } {
  const stat = readFileSync(statPath, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return { comm: stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")")), user: Number(fields[11]), sys: Number(fields[12]) };
}
function cpuTicks(pid: number): number {
  const { user, sys } = statTicks(`/proc/${pid}/stat`);
  return user + sys;
}
/** Ticks per part of the server; threads that ended between two snapshots fall out of the split. */
function threadTicks(pid: number): Map<string, { part: keyof CpuSplit; user: number; sys: number }> {
  const threads = new Map<string, { part: keyof CpuSplit; user: number; sys: number }>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const { comm, user, sys } = statTicks(`/proc/${pid}/task/${tid}/stat`);
      // io_uring's own workers (iou-wrk-*) run blocking file I/O for the queue rings: kernel time of the queues.
      const part = /^ublk\d+q\d+$/.test(comm) ? "queueUser" : comm.startsWith("iou-wrk") ? "queueSys" : /JIT/.test(comm) ? "jit" : "other";
      threads.set(tid, { part, user, sys });
    } catch { /* the thread ended meanwhile */ }
  }
  return threads;
}
function cpuSplit(before: ReturnType<typeof threadTicks>, after: ReturnType<typeof threadTicks>, usPerTick: number): CpuSplit {
  const split: CpuSplit = { queueUser: 0, queueSys: 0, jit: 0, other: 0 };
  for (const [tid, now] of after) {
    const then = before.get(tid) ?? { user: 0, sys: 0 };
    if (now.part === "queueUser") {
      split.queueUser += (now.user - then.user) * usPerTick;
      split.queueSys += (now.sys - then.sys) * usPerTick;
    } else split[now.part] += (now.user - then.user + now.sys - then.sys) * usPerTick;
  }
  return split;
}

function fio(path: string, job: Job, serverPid: number | null, peerPid: number | null = null): Sample {
  const ticksBefore = serverPid ? cpuTicks(serverPid) : 0;
  const peerTicksBefore = peerPid ? cpuTicks(peerPid) : 0;
  const threadsBefore = serverPid ? threadTicks(serverPid) : null;
  const started = performance.now();
  const out = sh(`fio --name=bench --filename=${path} --rw=${job.rw} --bs=${job.bs} --iodepth=${job.depth} --numjobs=${job.jobs ?? 1} ` +
    `--size=1g --direct=${job.buffered ? 0 : 1} --ioengine=io_uring --time_based --runtime=${seconds} --ramp_time=2 --group_reporting --output-format=json`);
  const wallS = (performance.now() - started) / 1000;
  const json = JSON.parse(out.slice(out.indexOf("{")));
  const result = job.rw.includes("write") ? json.jobs[0].write : json.jobs[0].read;
  const percentile = (p: string) => (result.clat_ns?.percentile?.[p] ?? 0) / 1000;
  const ios = result.iops * seconds;
  const cpuS = serverPid ? (cpuTicks(serverPid) - ticksBefore) / 100 : 0;
  // CPU is measured over the whole fio run (ramp included); scale it to the measured part.
  const cpuUsPerIo = serverPid ? (cpuS * (seconds / wallS) * 1e6) / ios : null;
  const split = serverPid ? cpuSplit(threadsBefore!, threadTicks(serverPid), ((seconds / wallS) * 1e4) / ios) : null;
  const peerCpuUsPerIo = peerPid ? (((cpuTicks(peerPid) - peerTicksBefore) / 100) * (seconds / wallS) * 1e6) / ios : null;
  return { iops: result.iops, mbps: result.bw / 1024, p50us: percentile("50.000000"), p99us: percentile("99.000000"), cpuUsPerIo,
    cpuSplit: split, peerCpuUsPerIo, raw: json };
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
const cpuSplitMedian = (splits: CpuSplit[]): CpuSplit | null => splits.length === 0 ? null : {
  queueUser: median(splits.map((s) => s.queueUser)), queueSys: median(splits.map((s) => s.queueSys)),
  jit: median(splits.map((s) => s.jit)), other: median(splits.map((s) => s.other)),
};
function summarize(samples: Sample[]) {
  const cpu = samples.map((s) => s.cpuUsPerIo).filter((v): v is number => v !== null);
  const peerCpu = samples.map((s) => s.peerCpuUsPerIo).filter((v): v is number => v !== null);
  return { iops: median(samples.map((s) => s.iops)), mbps: median(samples.map((s) => s.mbps)), p50us: median(samples.map((s) => s.p50us)),
    p99us: median(samples.map((s) => s.p99us)), cpuUsPerIo: cpu.length ? median(cpu) : null, peerCpuUsPerIo: peerCpu.length ? median(peerCpu) : null,
    cpuSplit: cpuSplitMedian(samples.map((s) => s.cpuSplit).filter((v): v is CpuSplit => v !== null)) };
}
type Summary = ReturnType<typeof summarize>;

/** A device or file fio runs on; pid: the server whose CPU is measured (none for the kernel's drivers). */
interface Side { label: string; path: string; pid?: number }
/** A further side of a comparison (the ext4 group's): its medians and ours ÷ it. */
interface OtherSide { label: string; result: Summary; ratio: number }
interface Row { group: string; case: string; ours: string; kernel: string; oursResult: Summary; kernelResult: Summary | null; ratio: number | null; metric: "IOPS" | "MB/s";
  others?: OtherSide[] }
const rows: Row[] = [];
const raw: Record<string, unknown[]> = {};
/** Resident memory of each server after its runs: now and at its peak (VmHWM), MiB. */
const serverMemory: Array<{ label: string; rssMiB: number; peakMiB: number }> = [];

function recordMemory(label: string, pid: number): void {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)![1]);
  serverMemory.push({ label, rssMiB: kib("VmRSS") / 1024, peakMiB: kib("VmHWM") / 1024 });
}

function addDevice(args: string[]): { devId: number; pid: number } {
  const out = cli(["add", ...args]);
  const devId = Number(/^dev id (\d+):/m.exec(out)![1]);
  warmUp(`/dev/ublkb${devId}`);
  return { devId, pid: Number(/daemon pid (\d+)/.exec(out)![1]) };
}

/** An unmeasured run on a new device: its server's first thousands of requests run before JSC's optimizing tiers have
 * compiled the queue loop (the first QD1 case measured 0.4× a later one); the C server gets the same for fairness. */
function warmUp(path: string): void {
  sh(`fio --name=warm-up --filename=${path} --rw=randread --bs=4k --iodepth=16 --direct=1 --ioengine=io_uring --size=64m ` +
    "--runtime=2 --time_based >/dev/null");
}

/**
 * Runs each job on ours, (if given) the kernel's device and any other sides, in turn, REPEATS times; peerPid's CPU
 * is measured on all of them, each side's own server (pid) on its own runs.
 */
function compare(group: string, ours: Side & { pid: number }, kernel: Side | null, jobKeys: string[], peerPid: number | null = null,
  otherSides: Side[] = []) {
  for (const key of jobKeys) {
    const job = JOBS[key]!;
    const mine: Sample[] = [], theirs: Sample[] = [];
    const others: Sample[][] = otherSides.map(() => []);
    for (let repeat = 0; repeat < repeats; repeat++) {
      mine.push(fio(ours.path, job, ours.pid, peerPid));
      if (kernel) theirs.push(fio(kernel.path, job, kernel.pid ?? null, peerPid));
      otherSides.forEach((side, i) => others[i]!.push(fio(side.path, job, side.pid ?? null, peerPid)));
    }
    const oursResult = summarize(mine);
    const kernelResult = kernel ? summarize(theirs) : null;
    const metric = job.bs === "128k" ? "MB/s" : "IOPS";
    const value = (s: Summary) => (metric === "IOPS" ? s.iops : s.mbps);
    const ratio = kernelResult ? value(oursResult) / value(kernelResult) : null;
    const otherResults = otherSides.map((side, i) => {
      const result = summarize(others[i]!);
      return { label: side.label, result, ratio: value(oursResult) / value(result) };
    });
    rows.push({ group, case: job.name, ours: ours.label, kernel: kernel?.label ?? "—", oursResult, kernelResult, ratio, metric,
      ...(otherSides.length ? { others: otherResults } : {}) });
    raw[`${group} ${job.name} ours`] = mine.map((s) => s.raw);
    if (kernel) raw[`${group} ${job.name} kernel`] = theirs.map((s) => s.raw);
    otherSides.forEach((side, i) => { raw[`${group} ${job.name} ${side.label}`] = others[i]!.map((s) => s.raw); });
    console.log(`${group} ${job.name}: ours ${value(oursResult).toFixed(0)} ${metric}` +
      (kernelResult ? ` vs ${kernel!.label} ${value(kernelResult).toFixed(0)} → ${ratio!.toFixed(2)}` : "") +
      otherResults.map((o) => `, vs ${o.label} ${value(o.result).toFixed(0)} → ${o.ratio.toFixed(2)}`).join(""));
  }
}

// The optional C reference server (UBLKSRV_DIR names a build of ublksrv), run on the same cases in the same boot.
const peerDir = process.env.UBLKSRV_DIR;
const peerEnv = peerDir && existsSync(join(peerDir, "lib")) ? { ...process.env, LD_LIBRARY_PATH: join(peerDir, "lib") } : process.env;
function peer(args: string[]): string {
  const run = Bun.spawnSync([join(peerDir!, "ublk"), ...args], { stdin: "ignore", env: peerEnv });
  if (run.exitCode !== 0) throw new Error(`ublk ${args.join(" ")}: ${run.stderr}`);
  return run.stdout.toString();
}
/** A C server device of the given target, depth 128, with its daemon's pid from `ublk list`. */
function addPeerDevice(target: string, queues: number, args: string[]): Side & { devId: number } {
  // A device id of our choosing, above ours: ublksrv's `add` prints nothing when it succeeds.
  const devId = 90 + queues;
  peer(["add", "-t", target, "-n", String(devId), ...args, "-q", String(queues), "-d", "128"]);
  const pid = Number(/daemon pid (\d+)/.exec(peer(["list", "-n", String(devId)]))?.[1]);
  if (!(pid > 0)) throw new Error(`bench: no daemon pid for ublksrv device ${devId}`);
  warmUp(`/dev/ublkb${devId}`);
  return { label: `C ublksrv ${target}${queues > 1 ? ` ${queues}q` : ""}`, path: `/dev/ublkb${devId}`, pid, devId };
}

let batching = "not measured";
process.env.UBLK_BUN_DEBUG = "1"; // the daemons log their queue counters when they stop
cli(["del", "-a"]);
// The machine itself: fio's own overhead on /dev/null (no O_DIRECT there), to compare boots.
const machine = fio("/dev/null", { ...JOBS.randread64!, rw: "write", buffered: true }, null);
console.log(`machine: fio on /dev/null 4k write QD64 ${machine.iops.toFixed(0)} IOPS`);

// loop over a zero-filled 1 GiB file on tmpfs: the file target's reference, and QD1's for the null target.
const loop = groups.has("null") || groups.has("file") ? (() => {
  sh("mkdir -p /tmp/bench && dd if=/dev/zero of=/tmp/bench/backing.img bs=1M count=1024 2>/dev/null");
  return sh("/usr/sbin/losetup -f --show /tmp/bench/backing.img"); // busybox sh would run its own losetup
})() : "";

if (groups.has("null")) {
  sh("modprobe null_blk nr_devices=0 && mkdir -p /sys/kernel/config/nullb/nullb0 && cd /sys/kernel/config/nullb/nullb0 && " +
    "echo 0 > irqmode && echo 128 > hw_queue_depth && echo 1 > submit_queues && echo 256000 > size && echo 512 > blocksize && echo 1 > power");
  const one = addDevice(["-t", "null", "-q", "1", "-d", "128"]);
  const cNull = peerDir ? addPeerDevice("null", 1, []) : null;
  compare("null", { label: "ublk-bun null 1q", path: `/dev/ublkb${one.devId}`, pid: one.pid }, { label: "null_blk", path: "/dev/nullb0" },
    ["randread1", "randread64", "randwrite64", "read128k", "write128k"], null, cNull ? [cNull] : []);
  if (cNull) peer(["del", "-n", String(cNull.devId)]);
  // At QD1 null_blk completes inline: `loop`, which also hands each request to another thread, is the reference.
  compare("null-loop", { label: "ublk-bun null 1q", path: `/dev/ublkb${one.devId}`, pid: one.pid }, { label: "loop", path: loop }, ["randread1"]);
  recordMemory("null, 1 queue, depth 128", one.pid);
  cli(["del", "-n", String(one.devId)]);
  // Queues that never spin (--poll-us 0, as ublksrv): every request wakes the queue thread.
  const sleeping = addDevice(["-t", "null", "-q", "1", "-d", "128", "--poll-us", "0"]);
  compare("null-sleep", { label: "ublk-bun null 1q --poll-us 0", path: `/dev/ublkb${sleeping.devId}`, pid: sleeping.pid },
    { label: "loop", path: loop }, ["randread1"]);
  compare("null-sleep", { label: "ublk-bun null 1q --poll-us 0", path: `/dev/ublkb${sleeping.devId}`, pid: sleeping.pid },
    { label: "null_blk", path: "/dev/nullb0" }, ["randread64"]);
  cli(["del", "-n", String(sleeping.devId)]);
  const two = addDevice(["-t", "null", "-q", "2", "-d", "128"]);
  const cTwo = peerDir ? addPeerDevice("null", 2, []) : null;
  compare("null-2q", { label: "ublk-bun null 2q", path: `/dev/ublkb${two.devId}`, pid: two.pid }, null, ["randread64x2"], null, cTwo ? [cTwo] : []);
  if (cTwo) peer(["del", "-n", String(cTwo.devId)]);
  recordMemory("null, 2 queues, depth 128", two.pid);
  cli(["del", "-n", String(two.devId)]);
  // Where the kernel has BATCH_IO ours uses it: beside ours forced onto per-tag commands (--batch 0), alternating.
  const batched = addDevice(["-t", "null", "-q", "1", "-d", "128"]);
  if (JSON.parse(cli(["list", "-n", String(batched.devId), "--json"]))[0].dataPath.endsWith("batch commands")) {
    const perTag = addDevice(["-t", "null", "-q", "1", "-d", "128", "--batch", "0"]);
    compare("batch", { label: "ublk-bun null, batch", path: `/dev/ublkb${batched.devId}`, pid: batched.pid },
      { label: "ublk-bun null --batch 0", path: `/dev/ublkb${perTag.devId}`, pid: perTag.pid }, ["randread1", "randread64", "randwrite64"]);
    cli(["del", "-n", String(perTag.devId)]);
  }
  cli(["del", "-n", String(batched.devId)]);
  // Batching: a fresh device, one QD64 run, then the queue's counters from its debug log.
  const counted = addDevice(["-t", "null", "-q", "1", "-d", "128"]);
  fio(`/dev/ublkb${counted.devId}`, JOBS.randread64!, null);
  cli(["del", "-n", String(counted.devId)]);
  const log = readFileSync("/run/ublk-bun/daemon.log", "utf8");
  const counters = new RegExp(`ublk-bun\\[${counted.pid}\\]: queue 0: .* served (\\d+) requests in (\\d+) io_uring_enter calls, ([\\d.]+) ublk CQEs per enter`).exec(log);
  batching = counters ? `null 1 queue, 4k randread QD64: ${counters[1]} requests in ${counters[2]} io_uring_enter calls, ${counters[3]} requests per enter` : "not found in the log";
  console.log(`batching: ${batching}`);
  sh("rmdir /sys/kernel/config/nullb/nullb0; modprobe -r null_blk; true"); // best effort: the VM is thrown away anyway
}

if (groups.has("file")) {
  const file = addDevice(["-t", "file", "-f", "/tmp/bench/backing.img"]);
  compare("file", { label: "ublk-bun file", path: `/dev/ublkb${file.devId}`, pid: file.pid }, { label: "loop", path: loop },
    ["randread1", "randread64", "randwrite64", "read128k", "write128k"]);
  recordMemory("file, 1 queue, depth 128", file.pid);
  cli(["del", "-n", String(file.devId)]);
  const fileTwo = addDevice(["-t", "file", "-f", "/tmp/bench/backing.img", "-q", "2"]);
  compare("file-2q", { label: "ublk-bun file 2q", path: `/dev/ublkb${fileTwo.devId}`, pid: fileTwo.pid }, { label: "loop", path: loop }, ["randread64x2"]);
  cli(["del", "-n", String(fileTwo.devId)]);
}
if (loop) sh(`/usr/sbin/losetup -d ${loop}`);

if (groups.has("memory")) {
  const memory = addDevice(["-t", "memory", "-s", "1G"]);
  compare("memory", { label: "ublk-bun memory", path: `/dev/ublkb${memory.devId}`, pid: memory.pid }, null,
    ["randread1", "randread64", "randwrite64", "read128k", "write128k"]);
  recordMemory("memory, 1 queue, depth 128", memory.pid);
  cli(["del", "-n", String(memory.devId)]);
  const memoryTwo = addDevice(["-t", "memory", "-s", "1G", "-q", "2"]);
  compare("memory-2q", { label: "ublk-bun memory 2q", path: `/dev/ublkb${memoryTwo.devId}`, pid: memoryTwo.pid }, null, ["randread64x2"]);
  cli(["del", "-n", String(memoryTwo.devId)]);
}

// nbd: ours and the kernel's NBD client (nbd.ko, set up by nbd-client) over loopback TCP to one nbdkit memory export,
// each with one connection and one hardware queue of depth 128 (nbd.ko's own); nbdkit's CPU per I/O is measured
// for both. The export is zero-filled sparse RAM, so reads of never-written blocks cost nbdkit the least.
let nbdMemory = "";
/** Ours forced onto the copy path (-z 0), beside ours where the kernel has zero copy. */
const NBD_COPY_LABEL = "ublk-bun nbd, copy";
if (groups.has("nbd")) {
  // A free port of the loopback, found by listening on port 0; nbdkit takes it over right after.
  const probe = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = probe.port;
  probe.stop(true);
  const pidFile = "/tmp/bench-nbdkit.pid";
  // -P writes the pid file once nbdkit accepts connections.
  const nbdkit = Bun.spawn(["nbdkit", "-f", "-i", "127.0.0.1", "-p", String(port), "-P", pidFile, "memory", "1G"], { stdin: "ignore", stdout: "inherit", stderr: "inherit" });
  for (let waitedMs = 0; !existsSync(pidFile); waitedMs += 100) {
    if (nbdkit.exitCode !== null || waitedMs > 30_000) throw new Error(`bench: nbdkit did not start listening on 127.0.0.1:${port}`);
    Bun.sleepSync(100);
  }
  try {
    const uri = `nbd://127.0.0.1:${port}/`;
    const ours = addDevice(["-t", "nbd", "--nbd", uri, "-q", "1", "-d", "128"]);
    // Where the kernel has AUTO_BUF_REG ours is zero copy: beside ours forced onto the copy path (-z 0), alternating.
    const copying = JSON.parse(cli(["list", "-n", String(ours.devId), "--json"]))[0].dataPath.startsWith("zero copy")
      ? addDevice(["-t", "nbd", "--nbd", uri, "-q", "1", "-d", "128", "-z", "0"]) : null;
    sh("modprobe nbd");
    // Debian's nbd-client (netlink), not busybox's applet of the same name: spelled out, as busybox sh prefers its applets.
    sh(`/usr/sbin/nbd-client 127.0.0.1 ${port} /dev/nbd0`);
    if (Number(sh("cat /sys/block/nbd0/size")) === 0) throw new Error("bench: nbd-client left /dev/nbd0 without a size");
    // Unmeasured runs first: a new daemon serves its first thousands of requests before JSC's optimizing tiers have
    // compiled the queue loop, and at QD1 (about 1K IOPS here) that was its whole first run (up to 2× slower).
    const copySides: Side[] = copying ? [{ label: NBD_COPY_LABEL, path: `/dev/ublkb${copying.devId}`, pid: copying.pid }] : [];
    for (const path of [`/dev/ublkb${ours.devId}`, "/dev/nbd0", ...copySides.map((side) => side.path)]) {
      for (const key of ["randread64", "randread1"]) fio(path, JOBS[key]!, null);
    }
    compare("nbd", { label: "ublk-bun nbd", path: `/dev/ublkb${ours.devId}`, pid: ours.pid }, { label: "nbd.ko", path: "/dev/nbd0" },
      ["randread1", "randwrite1", "randread64", "randwrite64", "read128k", "write128k"], nbdkit.pid, copySides);
    const status = readFileSync(`/proc/${ours.pid}/status`, "utf8");
    const mib = (field: string) => (Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)![1]) / 1024).toFixed(0);
    nbdMemory = `${mib("VmRSS")} / ${mib("VmHWM")}`;
    sh("/usr/sbin/nbd-client -d /dev/nbd0");
    cli(["del", "-n", String(ours.devId)]);
    if (copying) cli(["del", "-n", String(copying.devId)]);
  } finally {
    nbdkit.kill();
  }
}

// ext4: the file target as users run it, on a file in a disk file system with O_DIRECT, beside what else serves such
// a file as a block device: the kernel's loop driver with direct I/O, the C reference server's loop target (when
// UBLKSRV_DIR names a build of it) and, as the limit, fio on the file itself with no block device above it.
const ext4Setup: string[] = [];
let ext4Memory = "";
if (groups.has("ext4")) {
  // In the VM the disk is vm.sh --disk's; anywhere else the device to format must be named.
  const disk = process.env.UBLK_BUN_VM === "1" ? "/dev/vda" : process.env.BENCH_EXT4_DEVICE;
  if (!disk) {
    console.error("bench: the ext4 group formats a disk; outside the test VM name it with BENCH_EXT4_DEVICE=/dev/...");
    process.exit(2);
  }
  if (process.env.UBLK_BUN_VM === "1") sh("modprobe virtio_blk");
  for (let waitedMs = 0; !existsSync(disk); waitedMs += 100) {
    if (waitedMs > 30_000) throw new Error(`bench: ${disk} did not appear (was the VM started with --disk?)`);
    Bun.sleepSync(100);
  }
  // Inode tables and the journal initialized now, not by ext4lazyinit's writes during the runs. The file is written
  // in full (no unwritten extents, so a write is an overwrite in place with no journal commit), then the page
  // cache is dropped so that reads reach the disk.
  const mountPoint = "/mnt/bench-ext4", file = `${mountPoint}/backing.img`;
  sh(`/usr/sbin/mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 ${disk} && mkdir -p ${mountPoint} && mount -t ext4 ${disk} ${mountPoint}`);
  sh(`dd if=/dev/zero of=${file} bs=1M count=1024 conv=fsync 2>/dev/null && sync && echo 3 > /proc/sys/vm/drop_caches`);
  const diskBytes = Number(sh(`cat /sys/block/${disk.replace("/dev/", "")}/size`)) * 512;
  ext4Setup.push(`${disk} (${(diskBytes / 2 ** 20).toFixed(0)} MiB${process.env.UBLK_BUN_VM === "1" ? ", virtio-blk, a sparse raw image on the host with cache=none" : ""}), ` +
    `mkfs.ext4 (${sh("/usr/sbin/mkfs.ext4 -V 2>&1 | head -n 1")}), mounted \`${sh(`grep ' ${mountPoint} ' /proc/mounts | cut -d' ' -f4`)}\`, ` +
    `a 1 GiB file written in full with dd, synced, page cache dropped.`);

  const loopDio = sh(`/usr/sbin/losetup --direct-io=on -f --show ${file}`); // busybox sh would run its own losetup
  if (sh(`cat /sys/block/${loopDio.replace("/dev/", "")}/loop/dio`) !== "1") throw new Error(`bench: ${loopDio} did not switch to direct I/O`);
  /** The C server's loop target on the file (O_DIRECT, its default). */
  const addPeer = (queues: number) => addPeerDevice("loop", queues, ["-f", file]);
  /** Ours on the file, checked to serve it with O_DIRECT through the queue's io_uring (the record says so). */
  const addOurs = (queues: number) => {
    const device = addDevice(["-t", "file", "-f", file, "-q", String(queues), "-d", "128"]);
    const record = JSON.parse(readFileSync(`/run/ublk-bun/${device.devId}.json`, "utf8"));
    if (record.target.options.direct !== true) throw new Error(`bench: the file target did not open ${file} with O_DIRECT`);
    return device;
  };
  const fileItself: Side = { label: "fio on the file", path: file };
  const loopSide: Side = { label: "loop dio", path: loopDio };

  const ours = addOurs(1);
  const c = peerDir ? addPeer(1) : null;
  compare("ext4", { label: "ublk-bun file", path: `/dev/ublkb${ours.devId}`, pid: ours.pid }, loopSide,
    ["randread1", "randread64", "randwrite64", "read128k", "write128k"], null, c ? [fileItself, c] : [fileItself]);
  const status = readFileSync(`/proc/${ours.pid}/status`, "utf8");
  const mib = (field: string) => (Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)![1]) / 1024).toFixed(0);
  ext4Memory = `${mib("VmRSS")} / ${mib("VmHWM")}`;
  cli(["del", "-n", String(ours.devId)]);
  if (c) peer(["del", "-n", String(c.devId)]);
  // Two queues: ours and the C server with -q 2; loop has one hardware queue whatever fio does.
  const oursTwo = addOurs(2);
  const cTwo = peerDir ? addPeer(2) : null;
  compare("ext4-2q", { label: "ublk-bun file 2q", path: `/dev/ublkb${oursTwo.devId}`, pid: oursTwo.pid }, loopSide, ["randread64x2"], null,
    cTwo ? [fileItself, cTwo] : [fileItself]);
  cli(["del", "-n", String(oursTwo.devId)]);
  if (cTwo) peer(["del", "-n", String(cTwo.devId)]);
  // Where the kernel has AUTO_BUF_REG ours is zero copy: beside ours forced onto the copy path (-z 0), alternating.
  const zeroCopy = addOurs(1);
  if (JSON.parse(cli(["list", "-n", String(zeroCopy.devId), "--json"]))[0].dataPath.startsWith("zero copy")) {
    const copying = addDevice(["-t", "file", "-f", file, "-q", "1", "-d", "128", "-z", "0"]);
    compare("zero-copy", { label: "ublk-bun file, zero copy", path: `/dev/ublkb${zeroCopy.devId}`, pid: zeroCopy.pid },
      { label: "ublk-bun file -z 0", path: `/dev/ublkb${copying.devId}`, pid: copying.pid }, ["randread1", "randread64", "randwrite64", "read128k", "write128k"]);
    cli(["del", "-n", String(copying.devId)]);
  }
  cli(["del", "-n", String(zeroCopy.devId)]);
  sh(`/usr/sbin/losetup -d ${loopDio} && umount ${mountPoint}`);
}

const fmt = (value: number | null | undefined, digits = 0) => (value === null || value === undefined ? "—" : value.toFixed(digits));
const mainRows = rows.filter((r) => r.group !== "nbd" && r.group !== "zero-copy" && !r.group.startsWith("ext4"));
// (The batch group's "kernel" side is ours with per-tag commands: its ratio is batch ÷ per tag.)
/** The further side whose label starts with prefix (the C server: "C "), if the row has one. */
const other = (r: Row, prefix: string) => r.others?.find((o) => o.label.startsWith(prefix));
const mainWithC = mainRows.some((r) => other(r, "C "));
const lines = [
  `# ublk-bun benchmark (${new Date().toISOString().slice(0, 10)}, ${seconds} s per run, median of ${repeats}, one boot)`,
  "",
  `Machine: fio on /dev/null, 4k write QD64: ${machine.iops.toFixed(0)} IOPS. Kernel ${sh("uname -r")}, ${sh("nproc")} CPUs.`,
  "",
  "| case | ours | IOPS | MB/s | p50 µs | p99 µs | server CPU µs/IO | kernel | IOPS | MB/s | p50 µs | p99 µs | ratio |" +
    (mainWithC ? " C IOPS | C MB/s | C CPU µs/IO | ours ÷ C |" : ""),
  "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |" + (mainWithC ? " ---: | ---: | ---: | ---: |" : ""),
  ...mainRows.map((r) => `| ${r.case} | ${r.ours} | ${fmt(r.oursResult.iops)} | ${fmt(r.oursResult.mbps, 1)} | ${fmt(r.oursResult.p50us)} | ${fmt(r.oursResult.p99us)} | ` +
    `${fmt(r.oursResult.cpuUsPerIo, 1)} | ${r.kernel} | ${fmt(r.kernelResult?.iops)} | ${fmt(r.kernelResult?.mbps, 1)} | ${fmt(r.kernelResult?.p50us)} | ` +
    `${fmt(r.kernelResult?.p99us)} | ${r.ratio === null ? "—" : `${r.ratio.toFixed(2)} (${r.metric})`} |` + (!mainWithC ? "" : (() => {
      const c = other(r, "C ");
      return ` ${fmt(c?.result.iops)} | ${fmt(c?.result.mbps, 1)} | ${fmt(c?.result.cpuUsPerIo, 1)} | ${c ? `${c.ratio.toFixed(2)} (${r.metric})` : "—"} |`;
    })())),
  ...(mainRows.some((r) => r.group === "batch") ? ["", "The batch rows put ours with batch commands (BATCH_IO) beside ours with per-tag commands (`--batch 0`): " +
    "their ratio is batch ÷ per tag."] : []),
  ...(mainWithC ? ["", "\"C\" is the C reference server (ublksrv, its own null target, `-q 1 -d 128` or `-q 2`), run alternating with ours in the same boot."] : []),
  "",
  "Where the server's CPU goes, µs per I/O (median of the runs): queue threads in user space (our JS loop and",
  "target) / queue threads and io_uring workers in the kernel (ublk_drv, io_uring, block layer, wake-ups) / JSC's JIT",
  "compiler threads / all other threads:",
  "",
  ...mainRows.filter((r) => r.oursResult.cpuSplit).map((r) => {
    const c = r.oursResult.cpuSplit!;
    return `- ${r.group}: ${r.case}: ${fmt(c.queueUser, 1)} / ${fmt(c.queueSys, 1)} / ${fmt(c.jit, 1)} / ${fmt(c.other, 1)}`;
  }),
  "",
  `Batching (${batching}).`,
  "",
  "Server memory after its runs (resident now / peak, MiB): " + serverMemory.map((m) => `${m.label}: ${fmt(m.rssMiB)} / ${fmt(m.peakMiB)}`).join("; ") + ".",
  "",
];
const rawOf = (kept: Row[]) => Object.fromEntries(Object.entries(raw).filter(([key]) => kept.some((r) => key.startsWith(`${r.group} ${r.case} `))));
if (mainRows.length > 0) {
  writeFileSync(join(outDir, "results.md"), lines.join("\n"));
  writeFileSync(join(outDir, "results.json"), JSON.stringify({ seconds, repeats, machineIops: machine.iops, rows: mainRows, serverMemory, raw: rawOf(mainRows) }, null, 1));
  writeFileSync(join(outDir, "results.svg"), renderSvg(mainRows.map((r) => ({ label: `${r.group}: ${r.case}`, ours: r.oursResult.iops, kernel: r.kernelResult?.iops ?? null,
    oursP99us: r.oursResult.p99us, kernelP99us: r.kernelResult?.p99us ?? null }))));
  console.log(lines.join("\n"));
}

const nbdRows = rows.filter((r) => r.group === "nbd");
if (nbdRows.length > 0) {
  const nbdLines = [
    `# ublk-bun nbd target vs the kernel's NBD client (${new Date().toISOString().slice(0, 10)}, ${seconds} s per run, median of ${repeats}, one boot)`,
    "",
    `Machine: fio on /dev/null, 4k write QD64: ${machine.iops.toFixed(0)} IOPS. Kernel ${sh("uname -r")}, ${sh("nproc")} CPUs.`,
    "Both clients reach one `nbdkit memory 1G` export over loopback TCP (127.0.0.1), one connection each: ours is",
    "`ublk-bun add -t nbd --nbd nbd://127.0.0.1:PORT/ -q 1 -d 128`, the kernel's `nbd-client 127.0.0.1 PORT /dev/nbd0`",
    "(nbd.ko, one hardware queue of depth 128). \"nbdkit CPU\" is the server's utime+stime per I/O; \"our CPU\" is the",
    "ublk-bun daemon's (the kernel client's own CPU is in kernel threads and fio's context, not measured).",
    "",
    "| case | ours IOPS | MB/s | p50 µs | p99 µs | our CPU µs/IO | nbdkit CPU µs/IO | nbd.ko IOPS | MB/s | p50 µs | p99 µs | nbdkit CPU µs/IO | ratio |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...nbdRows.map((r) => `| ${r.case} | ${fmt(r.oursResult.iops)} | ${fmt(r.oursResult.mbps, 1)} | ${fmt(r.oursResult.p50us)} | ${fmt(r.oursResult.p99us)} | ` +
      `${fmt(r.oursResult.cpuUsPerIo, 1)} | ${fmt(r.oursResult.peerCpuUsPerIo, 1)} | ${fmt(r.kernelResult?.iops)} | ${fmt(r.kernelResult?.mbps, 1)} | ` +
      `${fmt(r.kernelResult?.p50us)} | ${fmt(r.kernelResult?.p99us)} | ${fmt(r.kernelResult?.peerCpuUsPerIo, 1)} | ` +
      `${r.ratio === null ? "—" : `${r.ratio.toFixed(2)} (${r.metric})`} |`),
    "",
    `Our daemon's memory after its runs (resident / peak, MiB): ${nbdMemory}.`,
    "",
    ...(nbdRows.some((r) => other(r, NBD_COPY_LABEL)) ? [
      "Ours is zero copy on this kernel for requests over 16 KiB (AUTO_BUF_REG: a read's data received with READ_FIXED into",
      "the request's pages, a write's sent by SEND_ZC from them; smaller ones copied with pread / pwrite on /dev/ublkcN).",
      "Beside it, alternating in the same runs, ours forced onto the copy path",
      "(`-z 0`, a second device on the same export: the kernel copies each request's data to or from the daemon's buffer):",
      "",
      "| case | zero copy | our CPU µs/IO | copy | our CPU µs/IO | zero copy ÷ copy |",
      "| --- | ---: | ---: | ---: | ---: | ---: |",
      ...nbdRows.map((r) => {
        const copy = other(r, NBD_COPY_LABEL)!;
        const valueOf = (s: Summary) => (r.metric === "IOPS" ? fmt(s.iops) : fmt(s.mbps, 1));
        return `| ${r.case} | ${valueOf(r.oursResult)} ${r.metric} | ${fmt(r.oursResult.cpuUsPerIo, 1)} | ${valueOf(copy.result)} ${r.metric} | ` +
          `${fmt(copy.result.cpuUsPerIo, 1)} | ${copy.ratio.toFixed(2)} |`;
      }),
      "",
    ] : []),
  ];
  writeFileSync(join(outDir, "nbd.md"), nbdLines.join("\n"));
  writeFileSync(join(outDir, "nbd.json"), JSON.stringify({ seconds, repeats, machineIops: machine.iops, rows: nbdRows, raw: rawOf(nbdRows) }, null, 1));
  console.log(nbdLines.join("\n"));
}

const ext4Rows = rows.filter((r) => r.group.startsWith("ext4"));
const zeroCopyRows = rows.filter((r) => r.group === "zero-copy");
if (ext4Rows.length > 0) {
  const valueOf = (r: Row, s: Summary | null | undefined) => (s ? (r.metric === "IOPS" ? fmt(s.iops) : fmt(s.mbps, 1)) : "—");
  const ratioOf = (ratio: number | null | undefined) => (ratio === null || ratio === undefined ? "—" : ratio.toFixed(2));
  const withC = ext4Rows.some((r) => other(r, "C "));
  const ext4Lines = [
    `# ublk-bun file target on ext4 (${new Date().toISOString().slice(0, 10)}, ${seconds} s per run, median of ${repeats}, one boot)`,
    "",
    `Machine: fio on /dev/null, 4k write QD64: ${machine.iops.toFixed(0)} IOPS. Kernel ${sh("uname -r")}, ${sh("nproc")} CPUs.`,
    `Disk: ${ext4Setup.join(" ")}`,
    "Sides, each on that one file, run in turn: ours is `ublk-bun add -t file -f FILE -q 1 -d 128`, which opens the file",
    "with O_DIRECT and sends each request as a READ/WRITE on the queue's io_uring; \"loop dio\" is",
    "`losetup --direct-io=on` (loop.ko, one hardware queue of depth 128, whatever the case); \"fio on the file\" is fio",
    "with O_DIRECT on the file itself, no block device above it (the limit)" + (withC
      ? "; \"C\" is the C reference server (ublksrv) `ublk add -t loop -f FILE -q 1 -d 128` (O_DIRECT, its default)." : "."),
    "The ×2 jobs case gives ours " + (withC ? "and C " : "") + "`-q 2`; loop stays single-queue.",
    "Fio on the file does the file system's and the disk driver's work in fio's own thread, where the block-device sides",
    "hand it to another (a queue thread, loop's worker): with one fio job on this 2-CPU guest, where CPU is the limit,",
    "they can pass it (fio's own CPU is in the table after the latencies).",
    "Values are IOPS (4k) or MB/s (128k); ratios are ours ÷ the other side. CPU is the server's utime+stime per I/O.",
    "",
    `| case | metric | ours | loop dio | fio on the file |${withC ? " C |" : ""} ours ÷ loop dio | ours ÷ fio on the file |${withC ? " ours ÷ C |" : ""} our CPU µs/IO |${withC ? " C CPU µs/IO |" : ""}`,
    `| --- | --- | ---: | ---: | ---: |${withC ? " ---: |" : ""} ---: | ---: |${withC ? " ---: |" : ""} ---: |${withC ? " ---: |" : ""}`,
    ...ext4Rows.map((r) => {
      const onFile = other(r, "fio on the file"), c = other(r, "C ");
      return `| ${r.case} | ${r.metric} | ${valueOf(r, r.oursResult)} | ${valueOf(r, r.kernelResult)} | ${valueOf(r, onFile?.result)} |` +
        (withC ? ` ${valueOf(r, c?.result)} |` : "") + ` ${ratioOf(r.ratio)} | ${ratioOf(onFile?.ratio)} |` + (withC ? ` ${ratioOf(c?.ratio)} |` : "") +
        ` ${fmt(r.oursResult.cpuUsPerIo, 1)} |` + (withC ? ` ${fmt(c?.result.cpuUsPerIo, 1)} |` : "");
    }),
    "",
    "Completion latency, p50 / p99 µs:",
    "",
    `| case | ours | loop dio | fio on the file |${withC ? " C |" : ""}`,
    `| --- | ---: | ---: | ---: |${withC ? " ---: |" : ""}`,
    ...ext4Rows.map((r) => {
      const latency = (s: Summary | null | undefined) => (s ? `${fmt(s.p50us)} / ${fmt(s.p99us)}` : "—");
      return `| ${r.case} | ${latency(r.oursResult)} | ${latency(r.kernelResult)} | ${latency(other(r, "fio on the file")?.result)} |` +
        (withC ? ` ${latency(other(r, "C ")?.result)} |` : "");
    }),
    "",
    "fio's own CPU, % (usr_cpu + sys_cpu as its JSON reports them; for ×2 jobs its group figure), median of the runs:",
    "",
    `| case | ours | loop dio | fio on the file |${withC ? " C |" : ""}`,
    `| --- | ---: | ---: | ---: |${withC ? " ---: |" : ""}`,
    ...ext4Rows.map((r) => {
      const fioCpu = (side: string) => {
        const runs = raw[`${r.group} ${r.case} ${side}`] as Array<{ jobs: Array<{ usr_cpu: number; sys_cpu: number }> }> | undefined;
        return runs ? fmt(median(runs.map((run) => run.jobs[0]!.usr_cpu + run.jobs[0]!.sys_cpu))) : "—";
      };
      return `| ${r.case} | ${fioCpu("ours")} | ${fioCpu("kernel")} | ${fioCpu("fio on the file")} |` +
        (withC ? ` ${fioCpu(other(r, "C ")!.label)} |` : "");
    }),
    "",
    "Where our server's CPU goes, µs per I/O (as in results.md): queue threads in user space / queue threads and",
    "io_uring workers in the kernel / JIT threads / all other threads:",
    "",
    ...ext4Rows.filter((r) => r.oursResult.cpuSplit).map((r) => {
      const split = r.oursResult.cpuSplit!;
      return `- ${r.case}: ${fmt(split.queueUser, 1)} / ${fmt(split.queueSys, 1)} / ${fmt(split.jit, 1)} / ${fmt(split.other, 1)}`;
    }),
    "",
    `Our daemon's memory after its 1-queue runs (resident / peak, MiB): ${ext4Memory}.`,
    "",
    ...(zeroCopyRows.length === 0 ? [] : [
      "Zero copy (AUTO_BUF_REG, the default where the kernel has it) beside the copy path (`-z 0`), same file, alternating;",
      "ratio = zero copy ÷ copy:",
      "",
      "| case | metric | zero copy | copy (-z 0) | ratio | CPU µs/IO zero copy | CPU µs/IO copy |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
      ...zeroCopyRows.map((r) => `| ${r.case} | ${r.metric} | ${valueOf(r, r.oursResult)} | ${valueOf(r, r.kernelResult)} | ${ratioOf(r.ratio)} | ` +
        `${fmt(r.oursResult.cpuUsPerIo, 1)} | ${fmt(r.kernelResult?.cpuUsPerIo, 1)} |`),
      "",
    ]),
  ];
  writeFileSync(join(outDir, "ext4.md"), ext4Lines.join("\n"));
  writeFileSync(join(outDir, "ext4.json"), JSON.stringify({ seconds, repeats, machineIops: machine.iops, setup: ext4Setup, rows: ext4Rows,
    zeroCopyRows, raw: rawOf([...ext4Rows, ...zeroCopyRows]) }, null, 1));
  console.log(ext4Lines.join("\n"));
}
