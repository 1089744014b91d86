// UBLK_F_UNPRIVILEGED_DEV: a user without root adds, uses and deletes their own device. The kernel then checks
// every control command against the user's rights on /dev/ublkcN; giving the user the nodes is udev's job
// (the rule in the README), which this test does itself since the test VM has no udev.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { addDevice, cleanUp, CLI, cli, expectClean, ROOT } from "./helpers.ts";

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
