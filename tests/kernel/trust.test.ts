// What root trusts: a backing file or shm file must be the very object the device was created with, at every
// queue start and recover; a block device used as backing stays claimed while served; and root loads a
// user-written target module only from files no other user can change.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, chownSync, closeSync, constants, copyFileSync, lstatSync, mkdirSync, mkdtempSync, openSync, renameSync, rmSync, symlinkSync, unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { addDevice, cleanUp, cli, cliOk, daemonPidOf, expectClean, ROOT, waitFor } from "./helpers.ts";

const work = mkdtempSync("/tmp/ublk-bun-trust-");

beforeAll(() => cleanUp());
afterAll(() => {
  cleanUp();
  rmSync(work, { recursive: true, force: true });
});

function stateOf(devId: number): string {
  return JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].state;
}

/** kill -9 the daemon and wait until the kernel has quiesced the device. */
async function killDaemon(devId: number): Promise<void> {
  process.kill(daemonPidOf(devId), "SIGKILL");
  await waitFor("QUIESCED", () => stateOf(devId) === "QUIESCED", 120_000);
}

/** `recover` must fail with one line matching `message` and leave the device QUIESCED. */
function expectRefusedRecover(devId: number, message: RegExp): void {
  const run = cli(["recover", "-n", String(devId)]);
  expect(run.status).not.toBe(0);
  expect(run.stderr.trim().split("\n")).toHaveLength(1);
  expect(run.stderr).toMatch(message);
  expect(stateOf(devId)).toBe("QUIESCED");
}

function sizedFile(path: string, sizeBytes: number): void {
  writeFileSync(path, Buffer.alloc(sizeBytes, 0x11));
}

describe("backing stores are the same object at every open", () => {
  test("file target: a replaced file and a symlink to another file are refused by recover; the original recovers", async () => {
    const path = join(work, "disk.img");
    const other = join(work, "other.img");
    sizedFile(path, 16 << 20);
    sizedFile(other, 16 << 20);
    const devId = addDevice(["-t", "file", "-f", path, "-i", "1"]);
    await killDaemon(devId);

    renameSync(path, `${path}.orig`);
    sizedFile(path, 16 << 20); // same size, another inode
    expectRefusedRecover(devId, new RegExp(`${path} is not what this device was created with`));
    unlinkSync(path);
    symlinkSync(other, path);
    expectRefusedRecover(devId, new RegExp(`${path} is not what this device was created with`));

    unlinkSync(path);
    renameSync(`${path}.orig`, path);
    const recovered = cli(["recover", "-n", String(devId)]);
    expect(recovered.stderr).toBe("");
    expect(recovered.status).toBe(0);
    expect(stateOf(devId)).toBe("LIVE");
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("file target: a device refused by recover can still be deleted", async () => {
    const path = join(work, "gone.img");
    sizedFile(path, 16 << 20);
    const devId = addDevice(["-t", "file", "-f", path, "-i", "1"]);
    await killDaemon(devId);
    unlinkSync(path);
    sizedFile(path, 16 << 20);
    expectRefusedRecover(devId, /is not what this device was created with/);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("file target: a loop device as backing is claimed (O_EXCL) while served and released after del", () => {
    const image = join(work, "loop.img");
    sizedFile(image, 16 << 20);
    const losetup = Bun.spawnSync(["losetup", "-f", "--show", image]);
    expect(losetup.exitCode).toBe(0);
    const loop = losetup.stdout.toString().trim();
    try {
      const devId = addDevice(["-t", "file", "-f", loop]);
      let code = "";
      try {
        closeSync(openSync(loop, constants.O_RDONLY | constants.O_EXCL));
      } catch (error) {
        code = (error as NodeJS.ErrnoException).code ?? "";
      }
      expect(code).toBe("EBUSY");
      cliOk(["del", "-n", String(devId)]);
      closeSync(openSync(loop, constants.O_RDONLY | constants.O_EXCL)); // released
      expectClean();
    } finally {
      Bun.spawnSync(["losetup", "-d", loop]);
    }
  });

  test("memory target: the shm file replaced by a symlink, a file of another size or of another owner is refused", async () => {
    const devId = addDevice(["-t", "memory", "-s", "16M", "-i", "1"]);
    const shmPath = String(JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].target.options.shmPath);
    await killDaemon(devId);
    renameSync(shmPath, `${shmPath}.orig`);
    try {
      const rootFile = join(work, "root-file");
      sizedFile(rootFile, 16 << 20);
      symlinkSync(rootFile, shmPath);
      expectRefusedRecover(devId, new RegExp(`${shmPath} is a symlink`));
      unlinkSync(shmPath);

      sizedFile(shmPath, 8 << 20);
      expectRefusedRecover(devId, new RegExp(`${shmPath} has ${8 << 20} bytes, fewer than`));
      unlinkSync(shmPath);

      copyFileSync(`${shmPath}.orig`, shmPath);
      chownSync(shmPath, 65534, 65534);
      expectRefusedRecover(devId, new RegExp(`${shmPath} is owned by uid 65534`));
      unlinkSync(shmPath);
    } finally {
      rmSync(shmPath, { force: true });
      renameSync(`${shmPath}.orig`, shmPath);
    }
    const recovered = cli(["recover", "-n", String(devId)]);
    expect(recovered.stderr).toBe("");
    expect(recovered.status).toBe(0);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });
});

describe("root loads target modules only from trusted files", () => {
  const moduleText = `export { default } from "${ROOT}/targets/null.ts";\n`;

  test("a module in a directory writable by all, or owned by another user, is refused; in a root-owned 0755 directory it works", () => {
    const openDir = join(work, "open");
    mkdirSync(openDir);
    chmodSync(openDir, 0o777); // writable by everyone, not sticky
    const exposed = join(openDir, "target.ts");
    writeFileSync(exposed, moduleText);
    chmodSync(exposed, 0o644);

    const safeDir = join(work, "safe");
    mkdirSync(safeDir);
    chmodSync(safeDir, 0o755);
    const foreign = join(safeDir, "target.ts");
    writeFileSync(foreign, moduleText);
    chmodSync(foreign, 0o644);
    chownSync(foreign, 65534, 65534);

    for (const [module, reason] of [[exposed, `directory ${openDir} is writable by other users`], [foreign, "the file is owned by uid 65534"]] as const) {
      const run = cli(["add", "-t", module, "-s", "16M"]);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toContain(`refusing target module ${module} as root: ${reason}`);
      expectClean();
    }

    // The same modules, moved to a root-owned 0755 directory (or given back to root), are loaded.
    const moved = join(safeDir, "moved.ts");
    renameSync(exposed, moved);
    chownSync(foreign, 0, 0);
    expect(lstatSync(foreign).uid).toBe(0);
    for (const module of [moved, foreign]) {
      const devId = addDevice(["-t", module, "-s", "16M"]);
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });
});
