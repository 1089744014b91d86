// UBLK_F_UNPRIVILEGED_DEV: a user without root adds, uses and deletes their own device. The kernel then checks
// every control command against the user's rights on /dev/ublkcN; giving the user the nodes is udev's job
// (the rule in the README), which this test does itself since the test VM has no udev.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { addDevice, cleanUp, CLI, cli, cliOk, daemonPidOf, expectClean, ROOT, ublkNodes, waitFor } from "./helpers.ts";

const NOBODY = 65534;
const userRunDir = "/tmp/ublk-bun-unprivileged";
const controlMode = statSync("/dev/ublk-control").mode & 0o777;
let udev: ReturnType<typeof setInterval> | undefined;

/** Runs the CLI as uid/gid 65534 with a private record directory. */
function asUser(args: string[]) {
  const run = Bun.spawnSync(["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, CLI, ...args],
    { env: { ...process.env, UBLK_BUN_RUN_DIR: userRunDir }, stdin: "ignore", timeout: 180_000 });
  return { status: run.exitCode ?? -1, stdout: run.stdout.toString(), stderr: run.stderr.toString() };
}

/** The shell command of the README's udev rule for ublk nodes, run here for each new node since the VM has no udev. */
const ruleCommand = (() => {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const rule = /^KERNEL=="ublk\[bc\]\[0-9\]\*", RUN\+="\/bin\/sh -c '(.+)'"$/m.exec(readme);
  if (!rule) throw new Error("README.md has no udev rule for ublk nodes");
  return rule[1]!;
})();
const handledNodes = new Set<string>();

function emulateUdev(): void {
  const present = readdirSync("/dev").filter((name) => /^ublk[bc]\d+$/.test(name));
  for (const name of handledNodes) if (!present.includes(name)) handledNodes.delete(name);
  for (const name of present) {
    if (handledNodes.has(name)) continue;
    handledNodes.add(name);
    const command = ruleCommand.replaceAll("/usr/local/bin/ublk-bun", `${process.execPath} ${CLI}`)
      .replaceAll("%n", /\d+$/.exec(name)![0]).replaceAll("%k", name);
    Bun.spawnSync(["/bin/sh", "-c", command], { stdin: "ignore" });
  }
}

beforeAll(() => {
  cleanUp();
  rmSync(userRunDir, { recursive: true, force: true });
  chmodSync("/dev/ublk-control", 0o666); // what a distribution's rule for ublk-control does to allow this
  udev = setInterval(emulateUdev, 50);
});
afterEach(() => {
  asUser(["del", "-a"]);
  cleanUp();
});
afterAll(() => {
  clearInterval(udev);
  chmodSync("/dev/ublk-control", controlMode);
  asUser(["del", "-a"]);
  cleanUp();
  rmSync(userRunDir, { recursive: true, force: true });
});

describe("unprivileged devices", () => {
  test("a user adds, lists, reads and writes, and deletes their own device; another user cannot open its disk", async () => {
    const add = Bun.spawn(["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, CLI,
      "add", "-t", "memory", "-s", "16M", "--unprivileged"], { env: { ...process.env, UBLK_BUN_RUN_DIR: userRunDir }, stdout: "pipe", stderr: "pipe" });
    const [status, stdout, stderr] = await Promise.all([add.exited, new Response(add.stdout).text(), new Response(add.stderr).text()]);
    expect(stderr).toBe("");
    expect(status).toBe(0);
    const devId = Number(/^dev id (\d+):/m.exec(stdout)![1]);
    expect(stdout).toContain(`owner: ${NOBODY}:${NOBODY}`);
    expect(parseInt(/flags 0x([0-9a-f]+)/.exec(stdout)![1]!, 16) & (1 << 5)).toBe(1 << 5); // UNPRIVILEGED_DEV

    const listed = asUser(["list"]);
    expect(listed.stderr).toBe("");
    expect(listed.stdout).toContain(`dev id ${devId}:`);

    const io = Bun.spawnSync(["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", "fio", "--name=user",
      `--filename=/dev/ublkb${devId}`, "--rw=randrw", "--bs=4k", "--direct=1", "--ioengine=io_uring", "--iodepth=8", "--size=16M",
      "--verify=crc32c", "--verify_state_save=0", "--output-format=json"], { stdin: "ignore", cwd: "/tmp" });
    expect(io.stderr.toString()).not.toMatch(/error|verify/i);
    expect(io.exitCode).toBe(0);

    // Even with the node opened to everyone, ublk_drv lets no other user open an unprivileged disk.
    chmodSync(`/dev/ublkb${devId}`, 0o666);
    const otherRead = Bun.spawnSync(["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "dd", `if=/dev/ublkb${devId}`,
      "of=/dev/null", "bs=4k", "count=1"]);
    expect(otherRead.exitCode).not.toBe(0);
    expect(otherRead.stderr.toString()).toMatch(/Operation not permitted|Permission denied/);

    const del = asUser(["del", "-n", String(devId)]);
    expect(del.stderr).toBe("");
    expect(del.status).toBe(0);
    expect(existsSync(`/dev/ublkc${devId}`)).toBe(false);
    expect(readdirSync(userRunDir).filter((name) => name.endsWith(".json"))).toEqual([]);
    expectClean();
  });

  // The kernel's dev_info pid of an unprivileged device is whatever its owner passed to START_DEV: root's `del`
  // must never signal it. Here nobody's server names a root process whose command line says "ublk-bun".
  test("root's del signals no process named only by an unprivileged device's dev_info pid; our own daemon it still stops", async () => {
    const victim = Bun.spawn(["bash", "-c", "exec -a ublk-bun-victim bash -c 'sleep 600; true'"], { stdin: "ignore", stdout: "ignore", stderr: "ignore" });
    const victimAlive = () => {
      try { return !/^\d+ \(.*\) [ZX] /.test(readFileSync(`/proc/${victim.pid}/stat`, "utf8")); } catch { return false; }
    };
    const serverDir = mkdtempSync("/tmp/ublk-bun-fake-pid-");
    let kernelChecksPid = false;
    try {
      chmodSync(serverDir, 0o755);
      const serverPath = join(serverDir, "server.ts");
      writeFileSync(serverPath, `
  import { Ctrl } from "${ROOT}/lib/ctrl.ts";
  import { openCharDevice, paramsOf, startQueues } from "${ROOT}/lib/device.ts";
  import { UBLK_F_UNPRIVILEGED_DEV, UBLK_S_DEV_LIVE } from "${ROOT}/ffi/uapi/ublk_cmd.ts";
  const ctrl = Ctrl.open();
  const info = ctrl.addDev({ devId: -1, nrHwQueues: 1, queueDepth: 4, maxIoBufBytes: 65536, flags: UBLK_F_UNPRIVILEGED_DEV });
  const target = { type: "null", sizeBytes: 16 << 20, logicalBlockShift: 9, physicalBlockShift: 12, attrs: 0, options: {} };
  const charFd = await openCharDevice(info.devId, 60_000);
  await startQueues(ctrl, info, target, charFd, false, { onFatal: () => process.exit(0) }, 0);
  ctrl.setParams(info.devId, paramsOf(target, info));
  try {
    ctrl.startDev(info.devId, Number(process.argv[2])); // 6.12 records whatever pid the owner names
  } catch (error) {
    // Since 6.17 START_DEV takes only the pid of the process that opened /dev/ublkcN.
    console.log("REFUSED " + info.devId + " " + (error as { errno?: number }).errno);
    process.exit(0);
  }
  console.log("STARTED " + info.devId);
  // Once someone stops the device, exit: that releases /dev/ublkcN, so that their DEL_DEV can finish.
  setInterval(() => { if (ctrl.getDevInfo(info.devId).state !== UBLK_S_DEV_LIVE) process.exit(0); }, 100);
  `);
      chmodSync(serverPath, 0o644);
      const server = Bun.spawn(["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, serverPath, String(victim.pid)],
        { stdin: "ignore", stdout: "pipe", stderr: "pipe", cwd: "/tmp" });
      try {
        const reader = server.stdout.getReader();
        let out = "";
        while (!out.includes("\n")) {
          const chunk = await reader.read();
          if (chunk.done) break;
          out += new TextDecoder().decode(chunk.value);
        }
        const refused = /REFUSED (\d+) (\d+)/.exec(out);
        if (refused) {
          // This kernel does not let the owner name another process (EINVAL): the threat cannot arise. `del` still
          // removes the half-started device, and signals nobody.
          kernelChecksPid = true;
          expect(Number(refused[2])).toBe(22);
          const del = cli(["del", "-n", refused[1]!]);
          expect([del.status, del.stderr]).toEqual([0, ""]);
          await Bun.sleep(500);
          expect(victimAlive()).toBe(true);
        } else {
          const devId = Number(/STARTED (\d+)/.exec(out)?.[1] ?? NaN);
          if (!Number.isInteger(devId)) throw new Error(`the fake server did not start: ${out} ${await new Response(server.stderr).text()}`);
          const listed = JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0];
          expect(listed.daemonPid).toBe(victim.pid);
          expect(readFileSync(`/proc/${victim.pid}/cmdline`, "utf8")).toContain("ublk-bun");

          const del = cli(["del", "-n", String(devId)]);
          expect(del.stderr).toBe("");
          expect(del.status).toBe(0);
          expect(existsSync(`/dev/ublkc${devId}`)).toBe(false);
          await Bun.sleep(500);
          expect(victimAlive()).toBe(true);
        }
      } finally {
        server.kill("SIGKILL");
        await server.exited;
      }

      // Again with `del -a` (where the kernel lets the owner name another process).
      if (!kernelChecksPid) {
        const second = Bun.spawn(["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups", process.execPath, serverPath, String(victim.pid)],
          { stdin: "ignore", stdout: "pipe", stderr: "pipe", cwd: "/tmp" });
        try {
          await waitFor("the second fake server", () => ublkNodes().some((name) => name.startsWith("ublkb")), 120_000);
          const all = cli(["del", "-a"]);
          expect(all.stderr).toBe("");
          expect(all.status).toBe(0);
          expect(ublkNodes()).toEqual([]);
          await Bun.sleep(500);
          expect(victimAlive()).toBe(true);
        } finally {
          second.kill("SIGKILL");
          await second.exited;
        }
      }
    } finally {
      victim.kill("SIGKILL");
      rmSync(serverDir, { recursive: true, force: true });
    }

    // Our own daemon is still stopped by del: through its record, and through its lock when the record is gone.
    for (const removeRecordFirst of [false, true]) {
      const ownId = addDevice(["-t", "null"]);
      const daemonPid = daemonPidOf(ownId);
      const record = JSON.parse(readFileSync(`/run/ublk-bun/${ownId}.json`, "utf8"));
      expect(record.pid).toBe(daemonPid);
      expect(Number.isInteger(record.pidStartTicks)).toBe(true);
      if (removeRecordFirst) rmSync(`/run/ublk-bun/${ownId}.json`);
      const own = cli(["del", "-n", String(ownId)]);
      expect(own.stderr).toBe("");
      expect(own.status).toBe(0);
      expect(readdirSync("/proc")).not.toContain(String(daemonPid));
      expectClean();
    }
  });

  test("a user cannot touch root's device, and recovery flags are refused with one line", () => {
    const rootId = addDevice(["-t", "null"]);
    const del = asUser(["del", "-n", String(rootId)]);
    expect(del.status).not.toBe(0);
    expect(del.stderr.trim().split("\n")).toHaveLength(1);
    expect(del.stderr).toMatch(/permission denied|no ublk device/);
    expect(existsSync(`/dev/ublkc${rootId}`)).toBe(true);
    const list = asUser(["list"]);
    expect(list.status).toBe(0);
    expect(list.stdout).not.toContain(`dev id ${rootId}:`); // someone else's device is not shown

    const recovery = asUser(["add", "-t", "null", "--unprivileged", "-i", "1"]);
    expect(recovery.status).not.toBe(0);
    expect(recovery.stderr.trim()).toBe("ublk-bun: --unprivileged: the kernel allows no recovery (-r, -i, -e) for unprivileged devices");
    const userCopy = asUser(["add", "-t", "null", "--unprivileged", "-u"]);
    expect(userCopy.status).not.toBe(0);
    expect(userCopy.stderr.trim()).toBe("ublk-bun: --unprivileged: the kernel allows no USER_COPY (-u) for unprivileged devices");
    expect(cli(["del", "-n", String(rootId)]).status).toBe(0);
    expectClean();
  });
});
