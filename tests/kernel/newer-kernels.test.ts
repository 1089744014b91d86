// Features of newer kernels: resize (UPDATE_SIZE, 6.16), restart (QUIESCE_DEV, 6.16), safe delete
// (TRY_STOP_DEV, 7.0, plus the look around on every kernel) and --no-part-scan (7.0). Each test that needs a
// feature is skipped — reported as skipped — where the kernel lacks it, and its refusal is tested there instead.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { addDevice, CLI, cleanUp, cli, cliOk, daemonPidOf, defaultCommands, expectClean, fio, kernelFeatureNames, waitFor } from "./helpers.ts";

const features = kernelFeatureNames();
const has = (name: string) => features.includes(name);
const work = mkdtempSync("/tmp/ublk-bun-newer-");
const MiB = 1024 * 1024;

beforeAll(() => cleanUp());
afterEach(() => cleanUp());
afterAll(() => {
  cleanUp();
  rmSync(work, { recursive: true, force: true });
});

function sizeBytesOf(devId: number): number {
  const run = Bun.spawnSync(["blockdev", "--getsize64", `/dev/ublkb${devId}`]);
  return Number(run.stdout.toString().trim());
}

function recordOf(devId: number): any {
  return JSON.parse(readFileSync(`/run/ublk-bun/${devId}.json`, "utf8"));
}

function stateOf(devId: number): string {
  return cliOk(["list", "-n", String(devId)]).split("\n")[1]!.trim().split(/\s+/).at(-1)!;
}

/** fio writes [offset, offset+size) with crc32c verify headers (checked right away). */
function writeVerified(devId: number, offsetBytes: number, sizeBytes: number): void {
  const result = fio([`--name=w`, `--filename=/dev/ublkb${devId}`, "--rw=write", "--bs=64k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
    `--offset=${offsetBytes}`, `--size=${sizeBytes}`, "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"]);
  expect({ status: result.status, errors: result.errors }).toEqual({ status: 0, errors: 0 });
}

/** fio reads [offset, offset+size) back and checks the headers the same job wrote earlier. */
function expectVerified(devId: number, offsetBytes: number, sizeBytes: number): void {
  const result = fio([`--name=w`, `--filename=/dev/ublkb${devId}`, "--rw=write", "--bs=64k", "--direct=1", "--ioengine=io_uring", "--iodepth=8",
    `--offset=${offsetBytes}`, `--size=${sizeBytes}`, "--verify=crc32c", "--verify_only", "--verify_fatal=1"]);
  if (result.status !== 0) console.error(result.stderr);
  expect({ status: result.status, errors: result.errors }).toEqual({ status: 0, errors: 0 });
}

/** The device's warm spare (`list` names it once it is loaded), waited for. */
async function standbyOf(devId: number): Promise<number> {
  let pid = 0;
  await waitFor(`the spare of device ${devId}`, () => (pid = Number(/standby daemon: (\d+)/.exec(cliOk(["list", "-n", String(devId)]))?.[1] ?? 0)) > 0, 60_000);
  return pid;
}

/** One line on stderr, non-zero exit. */
function expectRefused(args: string[], message: RegExp): void {
  const run = cli(args);
  expect(run.status).not.toBe(0);
  expect(run.stderr.trim().split("\n")).toHaveLength(1);
  expect(run.stderr).toMatch(message);
}

describe("resize (UPDATE_SIZE)", () => {
  test.skipIf(!has("UPDATE_SIZE"))("memory: grow and shrink a live device; data kept, record updated, recover (by the warm spare) accepts it", async () => {
    const devId = addDevice(["-t", "memory", "-s", "32M", "-q", "2", "-i", "1"]);
    writeVerified(devId, 0, 16 * MiB);
    const shmPath = recordOf(devId).target.options.shmPath;

    expect(cliOk(["resize", "-n", String(devId), "-s", "64M"])).toBe(`device ${devId}: ${32 * MiB} -> ${64 * MiB} bytes\n`);
    expect(sizeBytesOf(devId)).toBe(64 * MiB);
    expect(recordOf(devId).target.sizeBytes).toBe(64 * MiB);
    expect(statSync(shmPath).size).toBe(64 * MiB);
    expectVerified(devId, 0, 16 * MiB);
    // The running queues serve the new tail (their mappings follow the file).
    writeVerified(devId, 40 * MiB, 24 * MiB);

    cliOk(["resize", "-n", String(devId), "-s", "24M"]);
    expect(sizeBytesOf(devId)).toBe(24 * MiB);
    expect(recordOf(devId).target.sizeBytes).toBe(24 * MiB);
    expectVerified(devId, 0, 16 * MiB);
    // The tail's memory went back to tmpfs (the file keeps its length so no mapping reaches past its end).
    expect(statSync(shmPath).blocks * 512).toBeLessThanOrEqual(24 * MiB);

    // Grown again, the new part reads as zeros, not as the data the shrink cut off.
    cliOk(["resize", "-n", String(devId), "-s", "48M"]);
    const fd = openSync(`/dev/ublkb${devId}`, "r");
    const tail = Buffer.alloc(8 * MiB, 1);
    expect(readSync(fd, tail, 0, tail.length, 40 * MiB)).toBe(8 * MiB);
    closeSync(fd);
    expect(tail.every((byte) => byte === 0)).toBe(true);

    // The kernel's params and the record agree: a crash now is recoverable — by the warm spare, which was started
    // with the record of 32 MiB and must take the size from the record as it is now (and keep it there).
    const spare = await standbyOf(devId);
    process.kill(daemonPidOf(devId), "SIGKILL");
    const recover = cli(["recover", "-n", String(devId)]);
    expect(recover.stderr).toBe("");
    expect(recover.status).toBe(0);
    expect(daemonPidOf(devId)).toBe(spare);
    expect(sizeBytesOf(devId)).toBe(48 * MiB);
    expect(recordOf(devId).target.sizeBytes).toBe(48 * MiB);
    expectVerified(devId, 0, 16 * MiB);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    expect(existsSync(shmPath)).toBe(false);
    expect(existsSync(`/run/ublk-bun/${devId}.admin.lock`)).toBe(false); // resize's lock goes with the record
  });

  test.skipIf(!has("UPDATE_SIZE"))("file: grow extends the file; shrink leaves it as it is", () => {
    const backing = join(work, "resize.img");
    writeFileSync(backing, Buffer.alloc(16 * MiB));
    const devId = addDevice(["-t", "file", "-f", backing]);
    writeVerified(devId, 0, 8 * MiB);
    cliOk(["resize", "-n", String(devId), "-s", "32M"]);
    expect(statSync(backing).size).toBe(32 * MiB);
    expect(sizeBytesOf(devId)).toBe(32 * MiB);
    writeVerified(devId, 20 * MiB, 12 * MiB);
    cliOk(["resize", "-n", String(devId), "-s", "12M"]);
    expect(sizeBytesOf(devId)).toBe(12 * MiB);
    expect(statSync(backing).size).toBe(32 * MiB);
    expectVerified(devId, 0, 8 * MiB);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test.skipIf(!has("UPDATE_SIZE"))("bad input: one line, non-zero, nothing changed", () => {
    const devId = addDevice(["-t", "memory", "-s", "16M", "-b", "4096"]);
    expectRefused(["resize", "-n", String(devId)], /^ublk-bun: resize: -s SIZE is required$/m);
    expectRefused(["resize", "-s", "1G"], /^ublk-bun: resize: -n ID is required$/m);
    expectRefused(["resize", "-n", String(devId), "-s", "1000000"], /multiple of the logical block size \(4096\)/);
    expectRefused(["resize", "-n", String(devId), "-s", "0"], /-s: size must be greater than zero/);
    expectRefused(["resize", "-n", "4242", "-s", "1G"], /no ublk device 4242/);
    expect(sizeBytesOf(devId)).toBe(16 * MiB);
    expect(recordOf(devId).target.sizeBytes).toBe(16 * MiB);
    // A target that cannot grow says why, and the device keeps its size.
    const fault = addDevice(["-t", "fault", "-o", "base=memory", "-s", "16M"]);
    expectRefused(["resize", "-n", String(fault), "-s", "32M"], /the fault target cannot be resized/);
    expect(sizeBytesOf(fault)).toBe(16 * MiB);
    const backing = join(work, "ro.img");
    writeFileSync(backing, Buffer.alloc(16 * MiB));
    const readOnly = addDevice(["-t", "file", "-f", backing, "--read-only"]);
    expectRefused(["resize", "-n", String(readOnly), "-s", "32M"], /read-only, so .* cannot grow/);
    expect(sizeBytesOf(readOnly)).toBe(16 * MiB);
    expect(statSync(backing).size).toBe(16 * MiB);
    expect(recordOf(readOnly).target.sizeBytes).toBe(16 * MiB);
  });

  test.skipIf(has("UPDATE_SIZE"))("a kernel without UPDATE_SIZE: refused with one line", () => {
    const devId = addDevice(["-t", "memory", "-s", "16M"]);
    expectRefused(["resize", "-n", String(devId), "-s", "32M"], /^ublk-bun: resize: this kernel's ublk_drv has no UPDATE_SIZE \(it needs Linux ≥ 6\.16\)$/m);
    expect(sizeBytesOf(devId)).toBe(16 * MiB);
    expect(recordOf(devId).target.sizeBytes).toBe(16 * MiB);
  });
});

describe("restart (QUIESCE_DEV)", () => {
  for (const [mode, flag] of [["-i 1", "-i"], ["-r 1", "-r"]] as const) {
    test.skipIf(!has("QUIESCE"))(`${mode}: 5 restarts under fio verify, 0 errors; the stall is printed`, async () => {
      const devId = addDevice(["-t", "memory", "-s", "32M", "-q", "2", flag, "1"]);
      const fio = Bun.spawn(["fio", "--name=verify", `--filename=/dev/ublkb${devId}`, "--rw=randwrite", "--bs=4k", "--direct=1",
        "--ioengine=io_uring", "--iodepth=16", "--size=16M", "--loops=100000", "--verify=crc32c", "--verify_backlog=512",
        "--verify_fatal=1", "--output-format=json"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
      const stallsMs: number[] = [];
      const pids = [daemonPidOf(devId)];
      for (let round = 0; round < 5; round++) {
        await Bun.sleep(1000);
        expect(fio.exitCode).toBeNull(); // the restart lands while fio writes and verifies
        const restart = cli(["restart", "-n", String(devId)]);
        expect(restart.stderr).toBe("");
        expect(restart.status).toBe(0);
        const match = /^device \d+: daemon pid (\d+) handed over to pid (\d+); I\/O stalled at most (\d+) ms$/m.exec(restart.stdout);
        expect(match).not.toBeNull();
        expect(Number(match![1])).toBe(pids.at(-1)!);
        pids.push(Number(match![2]));
        stallsMs.push(Number(match![3]));
        expect(restart.stdout).toContain(`dev id ${devId}:`);
        expect(stateOf(devId)).toBe("LIVE");
        expect(daemonPidOf(devId)).toBe(pids.at(-1)!);
        expect(recordOf(devId).pid).toBe(pids.at(-1)!);
      }
      console.log(`restart ${mode}: I/O stalled at most ${stallsMs.join("/")} ms`);
      await Bun.sleep(2000);
      expect(fio.exitCode).toBeNull();
      fio.kill("SIGINT");
      const status = await Promise.race([fio.exited, Bun.sleep(60_000).then(() => "hung")]);
      const stdout = await new Response(fio.stdout).text();
      const stderr = await new Response(fio.stderr).text();
      expect(stderr).not.toMatch(/verify|error/i);
      expect(status).toBe(128);
      const job = JSON.parse(stdout.slice(stdout.indexOf("{"))).jobs[0];
      expect(job.error).toBe(0);
      expect(job.write.total_ios).toBeGreaterThan(1000);
      expect(new Set(pids).size).toBe(6);
      const log = readFileSync("/run/ublk-bun/daemon.log", "utf8");
      expect(log).not.toMatch(/ended unexpectedly|QUIESCE_DEV .*failed/);
      cliOk(["del", "-n", String(devId)]);
      expectClean();
    });
  }

  test.skipIf(!has("QUIESCE"))("refusals: no recovery, no device, no id; nothing changed", () => {
    const plain = addDevice(["-t", "null"]);
    const pid = daemonPidOf(plain);
    expectRefused(["restart", "-n", String(plain)], /^ublk-bun: restart: device \d+ was created without recovery \(-r 1 or -i 1\), which restart needs$/m);
    expect(daemonPidOf(plain)).toBe(pid);
    expect(stateOf(plain)).toBe("LIVE");
    expectRefused(["restart", "-n", "4242"], /no ublk device 4242/);
    expectRefused(["restart"], /^ublk-bun: restart: -n ID is required$/m);
  });

  test.skipIf(has("QUIESCE"))("a kernel without QUIESCE_DEV: refused with one line, the daemon keeps serving", () => {
    const devId = addDevice(["-t", "null", "-i", "1"]);
    const pid = daemonPidOf(devId);
    expectRefused(["restart", "-n", String(devId)], /^ublk-bun: restart: this kernel's ublk_drv has no QUIESCE_DEV \(it needs Linux ≥ 6\.16\)/m);
    expect(daemonPidOf(devId)).toBe(pid);
    expect(stateOf(devId)).toBe("LIVE");
  });
});

describe("safe delete", () => {
  test("del refuses a device a process holds open, naming it; --force deletes it", async () => {
    const devId = addDevice(["-t", "null"]);
    const holder = Bun.spawn(["sh", "-c", `exec 3</dev/ublkb${devId}; exec sleep 600`], { stdin: "ignore" });
    try {
      await Bun.sleep(300);
      expectRefused(["del", "-n", String(devId)], new RegExp(`^ublk-bun: del: device ${devId} is in use: ublkb${devId} is open by pid ${holder.pid} \\(sleep\\); stop using it first, or del --force$`, "m"));
      expect(stateOf(devId)).toBe("LIVE");
      expectRefused(["del", "-a"], new RegExp(`device ${devId} is in use`));
      expect(stateOf(devId)).toBe("LIVE");
      // --force stops the disk at once; the kernel completes DEL_DEV once the last opener has closed it.
      const force = Bun.spawn([process.execPath, CLI, "del", "-n", String(devId), "--force"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
      await Bun.sleep(2000);
      holder.kill();
      await holder.exited;
      expect(await force.exited).toBe(0);
      expect(await new Response(force.stderr).text()).toBe("");
      expectClean();
    } finally {
      holder.kill();
    }
  });

  test("del refuses a mounted device (and its partitions' users), deletes it once unmounted", () => {
    const devId = addDevice(["-t", "memory", "-s", "16M"]);
    const mountPoint = join(work, "mnt");
    mkdirSync(mountPoint, { recursive: true });
    // busybox sh runs its own mke2fs and mount applets (the VM has no e2fsprogs).
    const made = Bun.spawnSync(["sh", "-c", `mke2fs /dev/ublkb${devId} && mount -t ext2 /dev/ublkb${devId} ${mountPoint}`]);
    if (made.exitCode !== 0) console.error(made.stderr.toString());
    expect(made.exitCode).toBe(0);
    try {
      expectRefused(["del", "-n", String(devId)], new RegExp(`^ublk-bun: del: device ${devId} is in use: ublkb${devId} is mounted at ${mountPoint}; stop using it first, or del --force$`, "m"));
      expect(stateOf(devId)).toBe("LIVE");
    } finally {
      Bun.spawnSync(["sh", "-c", `umount ${mountPoint}`]);
    }
    const del = cli(["del", "-n", String(devId)]);
    expect(del.stderr).toBe("");
    expect(del.status).toBe(0);
    expectClean();
  });

  test.skipIf(!has("SAFE_STOP_DEV"))("the kernel's TRY_STOP_DEV refuses an opener the look around did not see", async () => {
    const devId = addDevice(["-t", "null"]);
    const holder = Bun.spawn(["sh", "-c", `exec 3</dev/ublkb${devId}; exec sleep 600`], { stdin: "ignore" });
    await Bun.sleep(300);
    const run = cli(["del", "-n", String(devId)], { UBLK_BUN_TEST_NO_LOOK_AROUND: "1" });
    holder.kill(); // whatever happened: a holder left behind would make every later del wait for it
    expect(run.status).toBe(1);
    expect(run.stderr).toBe(`ublk-bun: del: device ${devId} is in use: the kernel says /dev/ublkb${devId} is open (by something not visible from here); stop using it first, or del --force\n`);
    expect(stateOf(devId)).toBe("LIVE");
    holder.kill();
    await holder.exited;
    // Not in use any more: TRY_STOP_DEV stops it, the daemon finishes the deletion without complaint.
    const del = cli(["del", "-n", String(devId)], { UBLK_BUN_TEST_NO_LOOK_AROUND: "1" });
    expect(del.stderr).toBe("");
    expect(del.status).toBe(0);
    expectClean();
    expect(readFileSync("/run/ublk-bun/daemon.log", "utf8")).not.toMatch(new RegExp(`device ${devId}: .*ended unexpectedly`));
  });
});

/** A disk image with an MBR holding one Linux partition at 1 MiB. */
function partitionedImage(path: string, sizeBytes: number): void {
  const image = Buffer.alloc(sizeBytes);
  const entry = 446;
  image[entry + 4] = 0x83; // Linux
  image.writeUInt32LE(2048, entry + 8); // first sector
  image.writeUInt32LE(sizeBytes / 512 - 2048, entry + 12); // sectors
  image[510] = 0x55;
  image[511] = 0xaa;
  writeFileSync(path, image);
}

describe("--no-part-scan (NO_AUTO_PART_SCAN)", () => {
  test.skipIf(!has("NO_AUTO_PART_SCAN"))("the partition is not scanned with it, and is without it", () => {
    const image = join(work, "parted.img");
    partitionedImage(image, 8 * MiB);
    const scanned = addDevice(["-t", "file", "-f", image]);
    expect(existsSync(`/sys/block/ublkb${scanned}/ublkb${scanned}p1`)).toBe(true);
    cliOk(["del", "-n", String(scanned)]);
    const unscanned = addDevice(["-t", "file", "-f", image, "--no-part-scan"]);
    expect(existsSync(`/sys/block/ublkb${unscanned}`)).toBe(true);
    expect(existsSync(`/sys/block/ublkb${unscanned}/ublkb${unscanned}p1`)).toBe(false);
    expect(recordOf(unscanned).config.flags & (1 << 18)).toBe(1 << 18);
    cliOk(["del", "-n", String(unscanned)]);
    expectClean();
  });

  test.skipIf(has("NO_AUTO_PART_SCAN"))("a kernel without it: refused with one line, nothing created", () => {
    expectRefused(["add", "-t", "null", "--no-part-scan"], /^ublk-bun: --no-part-scan: this kernel's ublk_drv has no NO_AUTO_PART_SCAN \(it needs Linux ≥ 7\.0\)$/m);
    expectClean();
  });
});

/** A loop device over a file in `work` (tmpfs): a block device, so the file target opens it with O_DIRECT. */
function withLoopDevice(sizeBytes: number, body: (loop: string, backing: string) => void): void {
  const backing = join(work, "zero-copy.img");
  writeFileSync(backing, Buffer.alloc(sizeBytes));
  const loop = Bun.spawnSync(["losetup", "-f", "--show", backing]).stdout.toString().trim();
  expect(loop).toStartWith("/dev/loop");
  try {
    body(loop, backing);
  } finally {
    cleanUp();
    Bun.spawnSync(["losetup", "-d", loop]);
  }
}

function verifyAndCompare(devId: number, loop: string): void {
  for (const [rw, bs, depth] of [["randwrite", "4k", "1"], ["randwrite", "4k", "32"], ["write", "128k", "32"], ["write", "512k", "8"]] as const) {
    const result = fio([`--name=${rw}${bs}`, `--filename=/dev/ublkb${devId}`, `--rw=${rw}`, `--bs=${bs}`, "--direct=1",
      "--ioengine=io_uring", `--iodepth=${depth}`, "--size=16m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=11"]);
    expect({ rw, bs, depth, status: result.status, errors: result.errors }).toEqual({ rw, bs, depth, status: 0, errors: 0 });
  }
  // The bytes are the loop device's (and so the file's): nothing stayed in a buffer of ours.
  expect(Bun.spawnSync(["cmp", "-n", String(16 * MiB), `/dev/ublkb${devId}`, loop]).exitCode).toBe(0);
}

describe("zero copy (AUTO_BUF_REG)", () => {
  test.skipIf(!has("AUTO_BUF_REG"))("a file with O_DIRECT is zero copy by default, -z 0 the copy path; both verify, 1 and 2 queues", () => {
    withLoopDevice(32 * MiB, (loop) => {
      for (const [extra, path] of [[[], "zero copy"], [["-z", "0"], "copy"], [["-z", "1", "-q", "2"], "zero copy"]] as const) {
        const devId = addDevice(["-t", "file", "-f", loop, ...extra]);
        const listing = cliOk(["list", "-n", String(devId)]);
        expect(listing).toContain(`data path: ${path}, ${defaultCommands()}`);
        expect(listing.includes("AUTO_BUF_REG")).toBe(path === "zero copy"); // the kernel's flags, as the device got them
        verifyAndCompare(devId, loop);
        cliOk(["del", "-n", String(devId)]);
      }
    });
    expectClean();
  });

  test.skipIf(!has("AUTO_BUF_REG"))("-z 1 where zero copy cannot be: one line, nothing created", () => {
    const plain = join(work, "plain.img");
    writeFileSync(plain, Buffer.alloc(8 * MiB));
    expectRefused(["add", "-t", "file", "-f", plain, "-z", "1"], /^ublk-bun: -z 1: target "file" cannot serve from the request's own pages \(only a file with O_DIRECT can\)$/m);
    expectRefused(["add", "-t", "memory", "-s", "8M", "-z", "1"], /^ublk-bun: -z 1: target "memory" cannot serve from the request's own pages$/m);
    expectRefused(["add", "-t", "null", "-z", "1", "-u"], /^ublk-bun: -z 1: zero copy cannot be combined with -u, --need-get-data or --unprivileged$/m);
    expectClean();
  });

  test.skipIf(has("AUTO_BUF_REG"))("a kernel without it: the copy path, and -z 1 refused with one line, nothing created", () => {
    withLoopDevice(8 * MiB, (loop) => {
      const devId = addDevice(["-t", "file", "-f", loop]);
      expect(cliOk(["list", "-n", String(devId)])).toContain("data path: copy, per-tag commands");
      cliOk(["del", "-n", String(devId)]);
      expectRefused(["add", "-t", "file", "-f", loop, "-z", "1"], /^ublk-bun: -z 1: this kernel's ublk_drv has no AUTO_BUF_REG zero copy \(it needs Linux ≥ 6\.16\)$/m);
    });
    expectClean();
  });
});

describe("batch commands (BATCH_IO)", () => {
  test.skipIf(!has("BATCH_IO"))("the default on this kernel in every data mode, --batch 0 per tag; each verifies, 1 and 2 queues", () => {
    withLoopDevice(32 * MiB, (loop) => {
      const cases = [
        [["-t", "file", "-f", loop], "zero copy, batch commands"],
        [["-t", "file", "-f", loop, "-z", "0", "-q", "2"], "copy, batch commands"], // each element names the tag's buffer
        [["-t", "file", "-f", loop, "--batch", "1", "-u"], "user copy, batch commands"],
        [["-t", "file", "-f", loop, "--batch", "0"], "zero copy, per-tag commands"],
      ] as const;
      for (const [args, path] of cases) {
        const devId = addDevice([...args]);
        const listing = cliOk(["list", "-n", String(devId)]);
        expect(listing).toContain(`data path: ${path}`);
        expect(listing.includes(" BATCH_IO")).toBe(path.endsWith("batch commands")); // the kernel's flags, as the device got them
        verifyAndCompare(devId, loop);
        cliOk(["del", "-n", String(devId)]);
      }
    });
    expectClean();
  });

  test.skipIf(!has("BATCH_IO"))("--need-get-data stays per tag (batch commands cannot carry it); with --batch 1 it is refused", () => {
    const devId = addDevice(["-t", "null", "--need-get-data"]);
    expect(cliOk(["list", "-n", String(devId)])).toContain("data path: copy (NEED_GET_DATA), per-tag commands");
    cliOk(["del", "-n", String(devId)]);
    expectRefused(["add", "-t", "null", "--need-get-data", "--batch", "1"], /^ublk-bun: --batch 1: batch commands cannot carry NEED_GET_DATA \(--need-get-data\)$/m);
    expectClean();
  });

  test.skipIf(!has("BATCH_IO"))("a recoverable device stays per tag, for restart; with --batch 1 restart is refused (QUIESCE_DEV would break its queues)", () => {
    const restartable = addDevice(["-t", "null", "-i", "1", "--standby", "0"]);
    const listing = cliOk(["list", "-n", String(restartable)]);
    expect(listing).toContain("per-tag commands");
    expect(listing).toContain(" QUIESCE");
    cliOk(["del", "-n", String(restartable)]);
    const batched = addDevice(["-t", "null", "-i", "1", "--standby", "0", "--batch", "1"]);
    const batchedListing = cliOk(["list", "-n", String(batched)]);
    expect(batchedListing).toContain("batch commands");
    expect(batchedListing).not.toContain(" QUIESCE");
    const pid = daemonPidOf(batched);
    expectRefused(["restart", "-n", String(batched)], /^ublk-bun: restart: device \d+ uses batch commands \(--batch 1\), which this kernel's QUIESCE_DEV cannot hand over without failing every later request; kill its daemon and "recover" instead$/m);
    expect(daemonPidOf(batched)).toBe(pid);
    cliOk(["del", "-n", String(batched)]);
    expectClean();
  });

  test.skipIf(has("BATCH_IO"))("a kernel without it: per-tag commands, and --batch 1 refused with one line, nothing created", () => {
    const devId = addDevice(["-t", "null"]);
    expect(cliOk(["list", "-n", String(devId)])).toContain("per-tag commands");
    cliOk(["del", "-n", String(devId)]);
    expectRefused(["add", "-t", "null", "--batch", "1"], /^ublk-bun: --batch 1: this kernel's ublk_drv has no BATCH_IO \(it needs Linux ≥ 7\.0\)$/m);
    expectClean();
  });
});
