// Targets that hold data: memory, file, a user-written module and the README's embedding example.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { close, ioctl, O_RDWR, open } from "../../ffi/libc.ts";
import { addDevice, cleanUp, cli, cliOk, expectClean, fio, ROOT, verify } from "./helpers.ts";

const work = mkdtempSync("/tmp/ublk-bun-targets-");
beforeAll(() => cleanUp());
afterAll(() => {
  cleanUp();
  rmSync(work, { recursive: true, force: true });
});

function verifyMatrix(addArgs: string[]): void {
  for (const queues of [1, 2]) {
    const devId = addDevice([...addArgs, "-q", String(queues)]);
    try {
      for (const [rw, bs] of [["randwrite", "4k"], ["write", "128k"]]) {
        for (const depth of [1, 32]) {
          const [name, status, errors] = verify(devId, rw!, bs!, depth, bs === "4k" ? "8m" : "32m");
          expect({ queues, name, status, errors }).toEqual({ queues, name, status: 0, errors: 0 });
        }
      }
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
  }
}

const BLKDISCARD = 0x1277, BLKZEROOUT = 0x127f;
/** Discards or zeroes [offset, offset+length) of a block device through its ioctl, as blkdiscard does. */
function blockRangeIoctl(path: string, request: number, offsetBytes: number, lengthBytes: number): number {
  const fd = open(path, O_RDWR);
  const range = new BigUint64Array([BigInt(offsetBytes), BigInt(lengthBytes)]);
  const result = ioctl(fd, request, range);
  close(fd);
  return result;
}

function readDevice(path: string, offsetBytes: number, lengthBytes: number): Buffer {
  const dd = Bun.spawnSync(["dd", `if=${path}`, "bs=4096", `skip=${offsetBytes / 4096}`, `count=${lengthBytes / 4096}`, "iflag=direct"]);
  expect(dd.exitCode).toBe(0);
  return Buffer.from(dd.stdout);
}

function writePattern(path: string, offsetBytes: number, lengthBytes: number): void {
  const pattern = join(work, "pattern");
  writeFileSync(pattern, Buffer.alloc(lengthBytes, 0xa5));
  const dd = Bun.spawnSync(["dd", `if=${pattern}`, `of=${path}`, "bs=4096", `seek=${offsetBytes / 4096}`, "oflag=direct", "conv=notrunc"]);
  expect(dd.exitCode).toBe(0);
}

function expectDiscardAndZeroes(devId: number): void {
  const path = `/dev/ublkb${devId}`;
  writePattern(path, 0, 1 << 20);
  expect(readDevice(path, 0, 1 << 20).every((byte) => byte === 0xa5)).toBe(true);
  expect(blockRangeIoctl(path, BLKDISCARD, 0, 256 * 1024)).toBe(0);
  expect(blockRangeIoctl(path, BLKZEROOUT, 512 * 1024, 256 * 1024)).toBe(0);
  const back = readDevice(path, 0, 1 << 20);
  expect(back.subarray(0, 256 * 1024).every((byte) => byte === 0)).toBe(true);
  expect(back.subarray(256 * 1024, 512 * 1024).every((byte) => byte === 0xa5)).toBe(true);
  expect(back.subarray(512 * 1024, 768 * 1024).every((byte) => byte === 0)).toBe(true);
  expect(back.subarray(768 * 1024).every((byte) => byte === 0xa5)).toBe(true);
}

describe("memory target", () => {
  test("fio crc32c verify: 4k random and 128k sequential, QD1/QD32, 1 and 2 queues", () => {
    verifyMatrix(["-t", "memory", "-s", "64M"]);
    expectClean();
    expect(readdirSync("/dev/shm").filter((name) => name.startsWith("ublk-bun-memory-"))).toEqual([]);
  });

  test("by default USER_COPY copies straight between the device and the image; -g goes through tag buffers; both verify", () => {
    verifyMatrix(["-t", "memory", "-s", "64M", "-g"]);
    const devId = addDevice(["-t", "memory", "-s", "16M"]);
    expect(JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].flags & (1 << 7)).toBe(1 << 7); // USER_COPY chosen
    try {
      writePattern(`/dev/ublkb${devId}`, 1 << 20, 64 * 1024);
      const shmPath = JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].target.options.shmPath as string;
      const image = readFileSync(shmPath);
      expect(image.subarray(1 << 20, (1 << 20) + 64 * 1024).every((byte) => byte === 0xa5)).toBe(true);
      expect(readDevice(`/dev/ublkb${devId}`, 1 << 20, 64 * 1024).every((byte) => byte === 0xa5)).toBe(true);
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("discard and write-zeroes read back as zeros", () => {
    const devId = addDevice(["-t", "memory", "-s", "16M"]);
    try {
      expectDiscardAndZeroes(devId);
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("more than /dev/shm holds is refused", () => {
    const run = cli(["add", "-t", "memory", "-s", "1T"]);
    expect(run.status).not.toBe(0);
    expect(run.stderr.trim().split("\n")).toHaveLength(1);
    expect(run.stderr).toMatch(/memory: .* free|cannot hold/);
    expectClean();
    expect(readdirSync("/dev/shm").filter((name) => name.startsWith("ublk-bun-memory-"))).toEqual([]);
  });
});

describe("file target", () => {
  const backing = join(work, "backing.img");
  beforeAll(() => {
    writeFileSync(backing, Buffer.alloc(0));
    Bun.spawnSync(["truncate", "-s", "64M", backing]);
  });

  // The three ways the file target moves data: a file in memory (tmpfs/ramfs, as here) mapped and copied by the
  // kernel with USER_COPY; the same inline through the page cache (-g rules out USER_COPY); O_DIRECT through
  // the queue's ring (a block device).
  test("fio crc32c verify: 4k random and 128k sequential, QD1/QD32, 1 and 2 queues", () => {
    const devId = addDevice(["-t", "file", "-f", backing]);
    expect(JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0].flags & (1 << 7)).toBe(1 << 7); // USER_COPY chosen
    cliOk(["del", "-n", String(devId)]);
    verifyMatrix(["-t", "file", "-f", backing]);
    expectClean();
  });

  test("the same verify runs inline through the page cache and with O_DIRECT through the ring", () => {
    verifyMatrix(["-t", "file", "-f", backing, "-g"]);
    const loopPath = Bun.spawnSync(["losetup", "-f", "--show", backing]).stdout.toString().trim();
    expect(loopPath).toStartWith("/dev/loop");
    try {
      verifyMatrix(["-t", "file", "-f", loopPath]);
    } finally {
      Bun.spawnSync(["losetup", "-d", loopPath]);
    }
    expectClean();
  });

  test("bytes written through the device are the backing file's bytes (cmp), also via -t loop --buffered", () => {
    for (const extra of [[], ["--buffered"]]) {
      const devId = addDevice(["-t", extra.length ? "loop" : "file", "-f", backing, ...extra]);
      try {
        const result = fio(["--name=fill", `--filename=/dev/ublkb${devId}`, "--rw=randwrite", "--bs=16k", "--direct=1", "--ioengine=io_uring",
          "--iodepth=8", "--size=64M", "--io_size=16M", "--randseed=" + (extra.length + 7), "--refill_buffers=1"]);
        expect(result.status).toBe(0);
        expect(Bun.spawnSync(["sync"]).exitCode).toBe(0);
        const device = Bun.spawnSync(["cmp", `/dev/ublkb${devId}`, backing]);
        expect(device.exitCode).toBe(0);
      } finally {
        cliOk(["del", "-n", String(devId)]);
      }
    }
    expectClean();
  });

  test("discard and write-zeroes read back as zeros", () => {
    const devId = addDevice(["-t", "file", "-f", backing]);
    try {
      expectDiscardAndZeroes(devId);
    } finally {
      cliOk(["del", "-n", String(devId)]);
    }
    expectClean();
  });

  test("a read-only block device is refused unless --read-only is given", () => {
    const loopPath = Bun.spawnSync(["losetup", "-r", "-f", "--show", backing]).stdout.toString().trim();
    expect(loopPath).toStartWith("/dev/loop");
    try {
      const run = cli(["add", "-t", "file", "-f", loopPath]);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(/is not writable \(EROFS\); add --read-only/);
      expectClean();
    } finally {
      Bun.spawnSync(["losetup", "-d", loopPath]);
    }
  });

  test("a loop block device as backing, read-only serving", () => {
    const losetup = Bun.spawnSync(["losetup", "-f", "--show", backing]);
    const loopPath = losetup.stdout.toString().trim();
    expect(loopPath).toStartWith("/dev/loop");
    try {
      const devId = addDevice(["-t", "file", "-f", loopPath, "--read-only"]);
      try {
        const listed = JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0];
        expect(listed.devSectors).toBe((64 << 20) / 512);
        expect(listed.params.basic.attrs & 1).toBe(1); // UBLK_ATTR_READ_ONLY, as the kernel reports it
        expect(readFileSync(`/sys/block/ublkb${devId}/ro`, "utf8").trim()).toBe("1");
        expect(Bun.spawnSync(["cmp", "-n", String(4 << 20), `/dev/ublkb${devId}`, backing]).exitCode).toBe(0);
      } finally {
        cliOk(["del", "-n", String(devId)]);
      }
    } finally {
      Bun.spawnSync(["losetup", "-d", loopPath]);
    }
    expectClean();
  });

  test("bad input: a symlink to a block device another program holds exclusively", async () => {
    const loopPath = Bun.spawnSync(["losetup", "-f", "--show", backing]).stdout.toString().trim();
    expect(loopPath).toStartWith("/dev/loop");
    // Like a mounted disk: someone has it open with O_EXCL.
    const holder = Bun.spawn([process.execPath, "-e",
      `require("fs").openSync(${JSON.stringify(loopPath)}, require("fs").constants.O_RDONLY | require("fs").constants.O_EXCL); console.log("held"); setTimeout(() => {}, 60000);`],
      { stdout: "pipe" });
    try {
      const reader = holder.stdout.getReader();
      expect(new TextDecoder().decode((await reader.read()).value)).toContain("held");
      const link = join(work, "disk-link");
      rmSync(link, { force: true });
      symlinkSync(loopPath, link);
      const run = cli(["add", "-t", "file", "-f", link]);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(/is in use \(mounted or held by another driver\)/);
      expectClean();
    } finally {
      holder.kill("SIGKILL");
      await holder.exited;
      Bun.spawnSync(["losetup", "-d", loopPath]);
    }
  });

  const odd = join(work, "odd.img");
  const cases: Array<[string, () => string[], RegExp]> = [
    ["missing backing file", () => ["-f", join(work, "nope.img")], /no such file or directory/],
    ["directory as backing file", () => ["-f", work], /is a directory/],
    ["no -f", () => [], /-f PATH is required/],
    ["size larger than the file", () => ["-f", backing, "-s", "1G"], /larger than .* add --grow/],
    ["size not a multiple of the block size", () => { writeFileSync(odd, Buffer.alloc(1000)); return ["-f", odd]; }, /not a multiple of the 512-byte block size/],
  ];
  for (const [name, args, message] of cases) {
    test(`bad input: ${name}`, () => {
      const run = cli(["add", "-t", "file", ...args()]);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(message);
      expectClean();
    });
  }

  test("--grow extends a file to -s", () => {
    const small = join(work, "small.img");
    writeFileSync(small, Buffer.alloc(1 << 20));
    const devId = addDevice(["-t", "file", "-f", small, "-s", "8M", "--grow"]);
    cliOk(["del", "-n", String(devId)]);
    expect(readFileSync(small).length).toBe(8 << 20);
    expectClean();
  });

  test("-s is checked against the block size O_DIRECT raises it to (a file system on a 4K-sector disk)", () => {
    const image = join(work, "4k-sectors.img");
    const mountPoint = join(work, "4k-mnt");
    Bun.spawnSync(["truncate", "-s", "64M", image]);
    const loop = Bun.spawnSync(["/usr/sbin/losetup", "-b", "4096", "-f", "--show", image]).stdout.toString().trim();
    expect(loop).toMatch(/^\/dev\/loop\d+$/);
    mkdirSync(mountPoint, { recursive: true });
    try {
      expect(Bun.spawnSync(["mke2fs", "-q", "-b", "4096", loop]).exitCode).toBe(0);
      expect(Bun.spawnSync(["mount", "-t", "ext4", loop, mountPoint]).exitCode).toBe(0);
      try {
        const file = join(mountPoint, "disk.img");
        writeFileSync(file, Buffer.alloc(1 << 20));
        const refused = (args: string[], message: RegExp) => {
          const run = cli(["add", "-t", "file", "-f", file, ...args]);
          expect(run.stderr).toMatch(message);
          expect(run.stderr.trim().split("\n")).toHaveLength(1);
          expect(run.status).toBe(1);
          expectClean();
        };
        // 512-byte multiples that are not 4 KiB multiples: fine for -b 512, not for O_DIRECT on this disk.
        refused(["-s", String((1 << 19) + 512)], /-s 524800 is not a multiple of the 4096-byte block size \(O_DIRECT on .* needs 4096-byte blocks/);
        refused(["-s", String((2 << 20) + 512), "--grow"], /-s 2097664 is not a multiple of the 4096-byte block size/);
        expect(statSync(file).size).toBe(1 << 20); // the refused --grow was undone
        writeFileSync(file, Buffer.alloc((1 << 20) + 512));
        refused([], /has 1049088 bytes, not a multiple of the 4096-byte block size/);
        // Through the page cache 512-byte blocks are fine.
        const devId = addDevice(["-t", "file", "-f", file, "--buffered", "-s", String((1 << 19) + 512)]);
        expect(cliOk(["list", "-n", String(devId)])).toContain("block size 512 dev_capacity 1025");
        cliOk(["del", "-n", String(devId)]);
        writeFileSync(file, Buffer.alloc(1 << 20));
        const direct = addDevice(["-t", "file", "-f", file]);
        expect(cliOk(["list", "-n", String(direct)])).toContain("block size 4096 dev_capacity 2048");
        cliOk(["del", "-n", String(direct)]);
        expectClean();
      } finally {
        cli(["del", "-a"]); // a device left by a failed expectation would keep the file system busy
        Bun.spawnSync(["umount", mountPoint]);
      }
    } finally {
      Bun.spawnSync(["/usr/sbin/losetup", "-d", loop]);
    }
  });
});

describe("user-written targets", () => {
  const moduleDir = join(work, "my-targets");
  beforeAll(() => {
    mkdirSync(moduleDir, { recursive: true });
    // An async XOR target: bytes are kept XORed in a /dev/shm file and every request completes from a timer.
    writeFileSync(join(moduleDir, "async-xor.ts"), `
import { closeSync, openSync, readSync, writeSync, ftruncateSync, unlinkSync, existsSync } from "node:fs";
import { IO_PENDING, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, type Target } from "${ROOT}/lib/index.ts";
const target: Target = {
  name: "async-xor",
  description: "test target",
  prepare(options) {
    const sizeBytes = options.sizeBytes ?? 32 << 20;
    const path = "/dev/shm/async-xor-" + process.pid;
    const fd = openSync(path, "w"); ftruncateSync(fd, sizeBytes); closeSync(fd);
    return { type: "async-xor", sizeBytes, logicalBlockShift: 9, physicalBlockShift: 12, attrs: 0, options: { path, key: Number(options.key ?? 90) } };
  },
  openQueue(record, queue) {
    const fd = openSync(String(record.options.path), "r+");
    const key = Number(record.options.key);
    return {
      needsEventLoop: true,
      handleIo(tag, op, _flags, startSector, nrSectors) {
        const data = queue.buffers.subarray(tag * queue.maxIoBufBytes, tag * queue.maxIoBufBytes + nrSectors * 512);
        setTimeout(() => {
          if (op === UBLK_IO_OP_READ) { readSync(fd, data, 0, data.length, startSector * 512); for (let i = 0; i < data.length; i++) data[i] ^= key; }
          if (op === UBLK_IO_OP_WRITE) { const copy = Uint8Array.from(data, (b) => b ^ key); writeSync(fd, copy, 0, copy.length, startSector * 512); }
          queue.complete(tag, op <= UBLK_IO_OP_WRITE ? data.length : 0);
        }, 1);
        return IO_PENDING;
      },
      close() { closeSync(fd); },
    };
  },
  destroy(record) { const path = String(record.options.path); if (existsSync(path)) unlinkSync(path); },
};
export default target;
`);
    writeFileSync(join(moduleDir, "not-a-target.ts"), "export const answer = 42;\n");
  });

  // With --poll-us the queue loop must still come back to the event loop for the target's callbacks.
  for (const pollUs of ["0", "100"]) {
    test(`an async target from a temp directory passes the verify runs (--poll-us ${pollUs}); its bytes really are XORed`, () => {
      const devId = addDevice(["-t", join(moduleDir, "async-xor.ts"), "-s", "32M", "-o", "key=90", "-q", "2", "--poll-us", pollUs]);
      try {
        const listed = JSON.parse(cliOk(["list", "-n", String(devId), "--json"]))[0];
        expect(listed.target.type).toBe(join(moduleDir, "async-xor.ts"));
        expect(listed.target.options.key).toBe(90);
        for (const [rw, bs] of [["randwrite", "4k"], ["write", "128k"]]) {
          const [name, status, errors] = verify(devId, rw!, bs!, 16, "8m");
          expect({ name, status, errors }).toEqual({ name, status: 0, errors: 0 });
        }
        writePattern(`/dev/ublkb${devId}`, 0, 4096);
        const stored = readFileSync(String(listed.target.options.path)).subarray(0, 4096);
        expect(stored.every((byte) => byte === (0xa5 ^ 90))).toBe(true);
      } finally {
        cliOk(["del", "-n", String(devId)]);
      }
      expectClean();
      expect(readdirSync("/dev/shm").filter((name) => name.startsWith("async-xor-"))).toEqual([]);
    });
  }

  test("relative module paths work from the module's directory", () => {
    const run = Bun.spawnSync([process.execPath, join(ROOT, "bin/ublk-bun.ts"), "add", "-t", "./async-xor.ts", "-s", "8M"], { cwd: moduleDir });
    expect(run.exitCode).toBe(0);
    const devId = Number(/^dev id (\d+):/m.exec(run.stdout.toString())![1]);
    cliOk(["del", "-n", String(devId)]);
    expectClean();
  });

  test("bad modules: unknown path, a module without a target", () => {
    for (const [args, message] of [
      [["-t", join(moduleDir, "missing.ts")], /cannot load target module/],
      [["-t", join(moduleDir, "not-a-target.ts")], /does not export a target/],
    ] as const) {
      const run = cli(["add", ...args]);
      expect(run.status).not.toBe(0);
      expect(run.stderr.trim().split("\n")).toHaveLength(1);
      expect(run.stderr).toMatch(message);
    }
    expectClean();
  });
});

describe("embedding", () => {
  test("the README's example serves a device that passes a verify run and stops on SIGINT", async () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const code = /<!-- embedding-example -->\s*```ts\n([\s\S]*?)```/.exec(readme)![1]!;
    const dir = join(work, "embed");
    mkdirSync(join(dir, "node_modules"), { recursive: true });
    if (!existsSync(join(dir, "node_modules/ublk-bun"))) symlinkSync(ROOT, join(dir, "node_modules/ublk-bun"));
    writeFileSync(join(dir, "xor-disk.ts"), code);
    const server = Bun.spawn([process.execPath, join(dir, "xor-disk.ts")], { cwd: dir, stdout: "pipe", stderr: "pipe" });
    const reader = server.stdout.getReader();
    let out = "";
    const deadline = Date.now() + 60_000;
    while (!out.includes("\n") && Date.now() < deadline) {
      const chunk = await Promise.race([reader.read(), Bun.sleep(deadline - Date.now()).then(() => null)]);
      if (!chunk || chunk.done) break;
      out += new TextDecoder().decode(chunk.value);
    }
    if (!out.includes("serving")) {
      server.kill("SIGKILL");
      throw new Error(`the example did not start: ${out} ${await new Response(server.stderr).text()}`);
    }
    const path = /serving (\/dev\/ublkb\d+)/.exec(out)?.[1];
    expect(path).toBeDefined();
    const devId = Number(path!.slice("/dev/ublkb".length));
    const [name, status, errors] = verify(devId, "randwrite", "4k", 8, "8m");
    expect({ name, status, errors }).toEqual({ name, status: 0, errors: 0 });
    server.kill("SIGINT");
    expect(await server.exited).toBe(0);
    expectClean();
  });
});
