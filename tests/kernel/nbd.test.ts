// The NBD target against nbdkit inside the VM (servers only on unix sockets): data integrity, the bytes on the server,
// read-only exports, bad input, a server that goes away, and kill -9 + recover.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { close, ioctl, O_RDWR, open } from "../../ffi/libc.ts";
import { daemonLogPath } from "../../lib/run-dir.ts";
import { addDevice, CLI, cleanUp, cli, cliOk, daemonPidOf, expectClean, fio, kernelFeatureNames, verify, waitFor } from "./helpers.ts";

const work = mkdtempSync("/tmp/ublk-bun-nbd-");
const socketPath = join(work, "nbd.sock");
let server: Bun.Subprocess | null = null;

beforeAll(() => cleanUp());
afterEach(async () => {
  cleanUp();
  await stopServer();
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Starts `nbdkit ARGS…` in the foreground on our unix socket (or, `tcp`, on a free port of the loopback) and waits
 * (bounded) until it listens; returns the URI. */
async function startServer(args: string[], tcp = false): Promise<string> {
  rmSync(socketPath, { force: true });
  const pidFile = join(work, "nbdkit.pid"); // written once nbdkit accepts connections
  rmSync(pidFile, { force: true });
  let listen = ["-U", socketPath], uri = `nbd+unix:///?socket=${socketPath}`;
  if (tcp) {
    // A free port, found by listening on port 0; nbdkit takes it over right after.
    const probe = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    listen = ["-i", "127.0.0.1", "-p", String(probe.port)];
    uri = `nbd://127.0.0.1:${probe.port}/`;
    probe.stop(true);
  }
  server = Bun.spawn(["nbdkit", "-f", "-P", pidFile, ...listen, ...args], { stdin: "ignore", stdout: "inherit", stderr: "inherit" });
  await waitFor("nbdkit to listen", () => existsSync(pidFile) || server!.exitCode !== null, 30_000);
  if (server.exitCode !== null) throw new Error(`nbdkit ${args.join(" ")} exited with ${server.exitCode}`);
  return uri;
}

async function stopServer(): Promise<void> {
  if (!server) return;
  server.kill("SIGKILL");
  await server.exited;
  server = null;
  rmSync(socketPath, { force: true }); // a killed nbdkit leaves its socket behind
}

/** dd on the device with a bounded wait: [exit status or "hung", stderr]. */
async function dd(args: string[], timeoutMs = 60_000): Promise<[number | string, string]> {
  const child = Bun.spawn(["dd", ...args], { stdin: "ignore", stdout: "ignore", stderr: "pipe" });
  const status = await Promise.race([child.exited, Bun.sleep(timeoutMs).then(() => "hung")]);
  if (status === "hung") {
    child.kill("SIGKILL"); // it may sit in the kernel until its I/O ends: its output is not waited for
    return [status, ""];
  }
  return [status, await new Response(child.stderr).text()];
}

/** Starts dd writing 256 KiB of a pattern (from `seed`) at the start of the device, direct, in the background. */
function writePattern(devId: number, seed: number): { pattern: Buffer; writing: Promise<[number | string, string]> } {
  const pattern = Buffer.alloc(256 << 10);
  for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE((i * seed + 7) >>> 0, i);
  writeFileSync(join(work, "pattern"), pattern);
  return { pattern, writing: dd([`if=${join(work, "pattern")}`, `of=/dev/ublkb${devId}`, "bs=64k", "oflag=direct"]) };
}

/** The write of writePattern() ended without an error, and after `del` the server's `backing` file holds it. */
async function expectWritten({ pattern, writing }: ReturnType<typeof writePattern>, devId: number, backing: string): Promise<void> {
  const [status, stderr] = await writing;
  expect({ status, stderr: status === 0 ? "" : stderr }).toEqual({ status: 0, stderr: "" });
  cliOk(["del", "-n", String(devId)]);
  expect(readFileSync(backing).subarray(0, pattern.length).equals(pattern)).toBe(true);
  expectClean();
}

/** `add ARGS…` fails with one line matching `pattern` and leaves nothing. Run asynchronously, so that a server
 * played by this process can answer meanwhile. */
async function expectOneLineFailure(args: string[], pattern: RegExp): Promise<void> {
  const child = Bun.spawn([process.execPath, CLI, "add", ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const status = await Promise.race([child.exited, Bun.sleep(60_000).then(() => "hung")]);
  if (status === "hung") child.kill("SIGKILL");
  expect(status).not.toBe("hung");
  const [stdout, stderr] = [await new Response(child.stdout).text(), await new Response(child.stderr).text()];
  expect(stdout).toBe("");
  expect(status).not.toBe(0);
  expect(stderr.trim().split("\n")).toHaveLength(1);
  expect(stderr).toMatch(pattern);
  expectClean();
}

describe("nbd target", () => {
  test("fio crc32c verify against nbdkit memory: 4k random QD1/QD32, 128k sequential QD32, 1 and 2 queues, 3 connections per queue; list shows the URI", async () => {
    const log = join(work, "verify.log");
    const uri = await startServer(["--filter=log", "memory", "64M", `logfile=${log}`]);
    for (const [queues, connections] of [[1, 1], [2, 3]] as const) {
      const logged = existsSync(log) ? readFileSync(log, "utf8").length : 0; // nbdkit keeps the log open: read on from here
      const devId = addDevice(["-t", "nbd", "--nbd", uri, "-q", String(queues), "-o", `connections=${connections}`]);
      try {
        const listing = cliOk(["list", "-n", String(devId)]);
        expect(listing).toContain(`"uri":"${uri}"`);
        expect(listing).toContain("data path: copy,"); // a unix socket takes no SEND_ZC: no zero copy, no user copy

        expect(readFileSync(`/sys/block/ublkb${devId}/size`, "utf8").trim()).toBe(String((64 << 20) / 512));
        for (const [rw, bs, depth] of [["randwrite", "4k", 1], ["randwrite", "4k", 32], ["write", "128k", 32]] as const) {
          const [name, status, errors] = verify(devId, rw, bs, depth, bs === "4k" ? "8m" : "32m");
          expect({ queues, name, status, errors }).toEqual({ queues, name, status: 0, errors: 0 });
        }
      } finally {
        cliOk(["del", "-n", String(devId)]);
      }
      // nbdkit's log filter names the connection of each request: every queue's every connection carried some.
      const used = new Set([...readFileSync(log, "utf8").slice(logged).matchAll(/^\S+ \S+ connection=(\d+) (?:Read|Write) id=/gm)].map((match) => match[1]));
      expect({ queues, connections, used: used.size }).toEqual({ queues, connections, used: queues * connections });
    }
    expectClean();
  });

  test("over TCP on the loopback, zero copy where the kernel has AUTO_BUF_REG: fio verify 4k random and 128k sequential, then reads and verified writes of 4k to 128k at once", async () => {
    const devId = addDevice(["-t", "nbd", "--nbd", await startServer(["memory", "64M"], true)]);
    try {
      const zeroCopy = kernelFeatureNames().includes("AUTO_BUF_REG");
      // Zero copy with USER_COPY beside it: small requests are copied (pread / pwrite), large ones are not.
      expect(cliOk(["list", "-n", String(devId)])).toContain(`data path: ${zeroCopy ? "zero copy and user copy" : "copy"},`);
      for (const [rw, bs, depth] of [["randwrite", "4k", 32], ["write", "128k", 32]] as const) {
        const [name, status, errors] = verify(devId, rw, bs, depth, bs === "4k" ? "8m" : "32m");
        expect({ name, status, errors }).toEqual({ name, status: 0, errors: 0 });
      }
      // Small and large reads and writes on one connection at once: sends that mix copied data and SEND_ZC, replies
      // whose data is partly in the staging buffer and partly received into the request's pages.
      const common = [`--filename=/dev/ublkb${devId}`, "--direct=1", "--ioengine=io_uring", "--bsrange=4k-128k"];
      const mixed = fio(["--name=writes", ...common, "--rw=randwrite", "--iodepth=16", "--size=16m", "--verify=crc32c",
        "--do_verify=1", "--verify_fatal=1", "--name=reads", ...common, "--rw=randread", "--iodepth=4", "--thinktime=1ms",
        "--offset=32m", "--size=16m", "--time_based", "--runtime=6"]);
      expect({ status: mixed.status, errors: mixed.errors }).toEqual({ status: 0, errors: 0 });
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("several connections need the server's NBD_FLAG_CAN_MULTI_CONN: refused with one line, one connection works", async () => {
    const uri = await startServer(["--filter=multi-conn", "memory", "16M", "multi-conn-mode=disable"]);
    await expectOneLineFailure(["-t", "nbd", "--nbd", uri, "-o", "connections=2"], /no NBD_FLAG_CAN_MULTI_CONN.*-q 1 and -o connections=1/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", uri, "-q", "2"], /queue 1: .*no NBD_FLAG_CAN_MULTI_CONN/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", uri, "-o", "connections=17"], /-o connections=17: give the connections per queue, 1 to 16/);
    const devId = addDevice(["-t", "nbd", "--nbd", uri]);
    const [status] = await dd(["if=/dev/zero", `of=/dev/ublkb${devId}`, "bs=4k", "count=16", "oflag=direct"]);
    expect(status).toBe(0);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("bytes written through the device are the bytes in nbdkit file's backing file; trim and flush reach the server", async () => {
    const backing = join(work, "backing.img");
    const log = join(work, "nbdkit.log");
    writeFileSync(backing, Buffer.alloc(16 << 20));
    const uri = await startServer(["--filter=log", "file", backing, `logfile=${log}`]);
    const devId = addDevice(["-t", "nbd", "--nbd", uri]);
    const pattern = Buffer.alloc(3 << 20);
    for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE((i * 2654435761) >>> 0, i);
    writeFileSync(join(work, "pattern"), pattern);
    const [status, stderr] = await dd([`if=${join(work, "pattern")}`, `of=/dev/ublkb${devId}`, "bs=64k", "seek=16", "oflag=direct", "conv=fsync"]);
    expect({ status, stderr: status === 0 ? "" : stderr }).toEqual({ status: 0, stderr: "" });
    // Trim the first MiB through the block layer's ioctl.
    const fd = open(`/dev/ublkb${devId}`, O_RDWR);
    expect(ioctl(fd, 0x1277 /* BLKDISCARD */, new BigUint64Array([0n, 1n << 20n]))).toBe(0);
    close(fd);
    cliOk(["del", "-n", String(devId)]);
    expect(readFileSync(backing).subarray(1 << 20, (1 << 20) + pattern.length).equals(pattern)).toBe(true);
    // nbdkit's log filter writes a line per request ("connection=2 Flush id=51 ...").
    const commands = new Set([...readFileSync(log, "utf8").matchAll(/^\S+ \S+ connection=\d+ (\w+) id=/gm)].map((match) => match[1]));
    expect([commands.has("Flush"), commands.has("Trim"), commands.has("Write")]).toEqual([true, true, true]);
    expectClean();
  });

  test("qemu-nbd serving a qcow2 image (the README's example): bytes written through the device are in the image", async () => {
    const image = join(work, "disk.qcow2"), raw = join(work, "disk.raw");
    const made = Bun.spawnSync(["qemu-img", "create", "-q", "-f", "qcow2", image, "32M"], { stdin: "ignore" });
    expect(made.exitCode).toBe(0);
    rmSync(socketPath, { force: true });
    // -t: stays up when a client leaves (add's own handshake is one); one client at a time, so -q 1.
    server = Bun.spawn(["qemu-nbd", "-t", "-k", socketPath, "-f", "qcow2", image], { stdin: "ignore", stdout: "inherit", stderr: "inherit" });
    await waitFor("qemu-nbd to listen", () => existsSync(socketPath) || server!.exitCode !== null, 30_000);
    const devId = addDevice(["-t", "nbd", "--nbd", `nbd+unix:///?socket=${socketPath}`]);
    const pattern = Buffer.alloc(1 << 20);
    for (let i = 0; i < pattern.length; i += 4) pattern.writeUInt32LE((i * 2246822519 + 3) >>> 0, i);
    writeFileSync(join(work, "pattern"), pattern);
    const [status, stderr] = await dd([`if=${join(work, "pattern")}`, `of=/dev/ublkb${devId}`, "bs=64k", "seek=64", "oflag=direct", "conv=fsync"]);
    expect({ status, stderr: status === 0 ? "" : stderr }).toEqual({ status: 0, stderr: "" });
    const [verifyName, verifyStatus, verifyErrors] = verify(devId, "randwrite", "4k", 16, "4m");
    expect({ verifyName, verifyStatus, verifyErrors }).toEqual({ verifyName, verifyStatus: 0, verifyErrors: 0 });
    cliOk(["del", "-n", String(devId)]);
    await stopServer();
    const converted = Bun.spawnSync(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw], { stdin: "ignore" });
    expect(converted.exitCode).toBe(0);
    expect(readFileSync(raw).subarray(4 << 20, (4 << 20) + pattern.length).equals(pattern)).toBe(true);
    expectClean();
  });

  test("a read-only export makes a read-only device: a write fails, a read works, del does not hang", async () => {
    const uri = await startServer(["-r", "memory", "16M"]);
    const devId = addDevice(["-t", "nbd", "--nbd", uri]);
    expect(readFileSync(`/sys/block/ublkb${devId}/ro`, "utf8").trim()).toBe("1");
    const [writeStatus] = await dd(["if=/dev/zero", `of=/dev/ublkb${devId}`, "bs=4k", "count=1", "oflag=direct"]);
    expect(writeStatus).not.toBe("hung");
    expect(writeStatus).not.toBe(0);
    const [readStatus] = await dd([`if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=16", "iflag=direct"]);
    expect(readStatus).toBe(0);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("bad input: one line, a non-zero exit and nothing left", async () => {
    await expectOneLineFailure(["-t", "nbd"], /--nbd URI is required/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", "nbd://"], /names no host/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", "nbd+unix:///x"], /names no socket/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", "nbds://127.0.0.1/x"], /TLS/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", "nbd://127.0.0.1/x", "-o", "timeout=0"], /-o timeout=0: give the seconds/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", `nbd+unix:///?socket=${socketPath}`], /cannot connect to unix socket .*no such file/);
    // Nothing listens on 127.0.0.1:1 inside the VM.
    await expectOneLineFailure(["-t", "nbd", "--nbd", "nbd://127.0.0.1:1/"], /cannot connect to 127\.0\.0\.1:1: connection refused/);
    const strict = await startServer(["--filter=exportname", "memory", "16M", "exportname=good", "exportname-strict=true"]);
    await expectOneLineFailure(["-t", "nbd", "--nbd", strict.replace(":///", ":///bad")], /no export "bad"/);
    await expectOneLineFailure(["-t", "nbd", "--nbd", strict.replace(":///", ":///good"), "-s", "8M"], /-s 8388608 does not match .*16777216/);
    // Zero copy sends with SEND_ZC, which unix sockets do not take.
    await expectOneLineFailure(["-t", "nbd", "--nbd", strict.replace(":///", ":///good"), "-z", "1"],
      kernelFeatureNames().includes("AUTO_BUF_REG") ? /-z 1: target "nbd" cannot serve from the request's own pages \(only over TCP: nbd:\/\/\)/ : /no AUTO_BUF_REG/);
    const devId = addDevice(["-t", "nbd", "--nbd", strict.replace(":///", ":///good")]);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
    await stopServer();
    // Servers that are not NBD servers, or stop halfway: played by a socket in this process.
    for (const [greeting, why] of [[Buffer.from("HTTP/1.0 400 Bad Request\r\n\r\n"), /not an NBD server/],
      [Buffer.from("NBDMAGIC"), /closed the connection during the handshake/]] as const) {
      const fake = Bun.listen({ unix: socketPath, socket: { open(socket) { socket.write(greeting); socket.end(); }, data() {} } });
      try {
        await expectOneLineFailure(["-t", "nbd", "--nbd", `nbd+unix:///?socket=${socketPath}`], why);
      } finally {
        fake.stop(true);
        rmSync(socketPath, { force: true });
      }
    }
  });

  test("the server restarted within -o timeout: the write in flight is sent again, no error, its bytes are on the server", async () => {
    const backing = join(work, "restart.img");
    writeFileSync(backing, Buffer.alloc(16 << 20));
    // Each write waits 2 s in the first server: the kill lands while one is in flight (reads, such as the partition
    // scan at add, are not delayed).
    const uri = await startServer(["--filter=delay", "file", backing, "wdelay=2"]);
    const devId = addDevice(["-t", "nbd", "--nbd", uri, "-q", "2"]);
    const written = writePattern(devId, 40503);
    await Bun.sleep(1000);
    await stopServer();
    await Bun.sleep(500);
    await startServer(["file", backing]);
    await expectWritten(written, devId, backing);
  });

  test("no server within -o timeout: held requests fail with EIO, new ones at once, del does not hang; a server that comes back is used again", async () => {
    const uri = await startServer(["--filter=delay", "memory", "16M", "wdelay=3"]);
    const devId = addDevice(["-t", "nbd", "--nbd", uri, "-q", "2", "-o", "timeout=2"]);
    const writing = dd(["if=/dev/zero", `of=/dev/ublkb${devId}`, "bs=4k", "count=16", "oflag=direct"]);
    await Bun.sleep(1000);
    await stopServer();
    const [status, stderr] = await writing;
    expect(status).not.toBe("hung");
    expect(status).not.toBe(0);
    expect(stderr).toMatch(/Input\/output error/);
    const [laterStatus] = await dd([`if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=16", "skip=100", "iflag=direct"], 10_000);
    expect(laterStatus).not.toBe("hung");
    expect(laterStatus).not.toBe(0);
    await startServer(["memory", "16M"]);
    // Reconnect attempts back off up to 5 s apart: reads fail until one connects.
    let readStatus: number | string = -1;
    for (let attempt = 0; attempt < 20 && readStatus !== 0; attempt++) {
      readStatus = (await dd([`if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=16", `skip=${200 + attempt * 16}`, "iflag=direct"]))[0];
      if (readStatus !== 0) await Bun.sleep(1000);
    }
    expect(readStatus).toBe(0);
    // The server gone again, a read waiting for it: del --force (dd holds the device open) ends, and so does the read.
    await stopServer();
    const reading = dd([`if=/dev/ublkb${devId}`, "of=/dev/null", "bs=4k", "count=1", "skip=1000", "iflag=direct"]);
    await Bun.sleep(300);
    const del = cli(["del", "-n", String(devId), "--force"], {}, 60_000);
    expect({ status: del.status, stderr: del.stderr }).toEqual({ status: 0, stderr: "" });
    expect((await reading)[0]).not.toBe("hung");
    expectClean();
  });

  test("del while the server is gone fails the held requests at once, not after -o timeout", async () => {
    const uri = await startServer(["--filter=delay", "memory", "16M", "wdelay=3"]);
    const devId = addDevice(["-t", "nbd", "--nbd", uri, "-o", "timeout=600"]);
    const loggedBytes = existsSync(daemonLogPath()) ? readFileSync(daemonLogPath()).length : 0;
    const writing = dd(["if=/dev/zero", `of=/dev/ublkb${devId}`, "bs=4k", "count=4", "oflag=direct"], 120_000);
    await Bun.sleep(1000);
    await stopServer(); // the write in flight is held for a reconnect, for up to 600 s
    await Bun.sleep(500);
    const startedMs = performance.now();
    // Without the notice, STOP_DEV waits for the held write: `del` gives up on the daemon after 30 s.
    const del = cli(["del", "-n", String(devId), "--force"], {}, 120_000);
    const tookMs = performance.now() - startedMs;
    expect({ status: del.status, stderr: del.stderr }).toEqual({ status: 0, stderr: "" });
    expect(tookMs).toBeLessThan(25_000);
    const [status] = await writing;
    expect(status).not.toBe("hung");
    expect(status).not.toBe(0);
    expect(readFileSync(daemonLogPath()).subarray(loggedBytes).toString()).toMatch(/the device is being deleted while the server is gone; 1 requests failed with EIO/);
    expectClean();
  });

  // Over TCP the device is zero copy where the kernel has AUTO_BUF_REG: large requests are reissued from their pages.
  test.each([["a unix socket", false, "--bs=4k"], ["TCP", true, "--bsrange=4k-128k"]] as const)("kill -9 + recover under fio verify with -i 1 (%s): no errors", async (_, tcp, sizes) => {
    // One worker thread per connection: nbdkit (1.32) aborts when a client that vanishes with requests in flight
    // leaves two of its threads replying on the dropped socket ("raw_send_socket: Assertion `sock >= 0' failed").
    const uri = await startServer(["--threads=1", "memory", "64M"], tcp);
    const devId = addDevice(["-t", "nbd", "--nbd", uri, "-i", "1", "-q", "2"]);
    const fio = Bun.spawn(["fio", "--output-format=json", `--filename=/dev/ublkb${devId}`, "--name=verify", "--rw=randwrite", sizes,
      "--direct=1", "--ioengine=io_uring", "--iodepth=16", "--size=32M", "--time_based", "--runtime=300", "--verify=crc32c",
      "--verify_backlog=256", "--verify_fatal=1"], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
    for (let kill = 0; kill < 2; kill++) {
      await Bun.sleep(1500);
      expect(fio.exitCode).toBeNull();
      const pid = daemonPidOf(devId);
      process.kill(pid, "SIGKILL");
      await waitFor("QUIESCED", () => cliOk(["list", "-n", String(devId)]).split("\n")[1]!.trim().endsWith("QUIESCED"), 60_000);
      const recover = cli(["recover", "-n", String(devId)]);
      // nbdkit's state too: a failed recover says whether the server was still there.
      expect({ status: recover.status, stderr: recover.stderr, nbdkit: server!.exitCode ?? server!.signalCode ?? "running" })
        .toEqual({ status: 0, stderr: "", nbdkit: "running" });
      expect(daemonPidOf(devId)).not.toBe(pid);
    }
    await Bun.sleep(2000);
    expect(fio.exitCode).toBeNull();
    fio.kill("SIGINT");
    const status = await Promise.race([fio.exited, Bun.sleep(120_000).then(() => "hung")]);
    if (status === "hung") fio.kill("SIGKILL");
    expect(status).toBe(128);
    const stdout = await new Response(fio.stdout).text();
    const job = JSON.parse(stdout.slice(stdout.indexOf("{"))).jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.total_ios).toBeGreaterThan(1000);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  // --standby 0: `recover` starts a daemon, whose queues find no server; 1: the spare took its connections before.
  test.each(["0", "1"])("kill -9 while the server is down too (--standby %s): recover succeeds, the write waits for the server, and its bytes are there", async (standby) => {
    const backing = join(work, "both-down.img");
    writeFileSync(backing, Buffer.alloc(16 << 20));
    const uri = await startServer(["file", backing]);
    const devId = addDevice(["-t", "nbd", "--nbd", uri, "-i", "1", "-q", "2", "--standby", standby]);
    const pid = daemonPidOf(devId);
    process.kill(pid, "SIGKILL");
    await waitFor("QUIESCED", () => cliOk(["list", "-n", String(devId)]).split("\n")[1]!.trim().endsWith("QUIESCED"), 60_000);
    await stopServer();
    // Without a server the recovering queues wait for it as after a drop, rather than failing `recover`.
    const recover = cli(["recover", "-n", String(devId)]);
    expect({ status: recover.status, stderr: recover.stderr }).toEqual({ status: 0, stderr: "" });
    expect(daemonPidOf(devId)).not.toBe(pid);
    const written = writePattern(devId, 2654435761);
    await Bun.sleep(1500);
    await startServer(["file", backing]);
    await expectWritten(written, devId, backing);
  });
});
