/**
 * The memory target: a RAM disk whose bytes live in a file under /dev/shm, mapped by every queue Worker.
 * Keeping them outside the server process means a crashed daemon's data is still there for `recover`.
 * The whole size is reserved when the device is created (fallocate), so a full tmpfs can never surprise a
 * write later (a mapped write to a page tmpfs cannot supply would kill the daemon with SIGBUS).
 */
import { closeSync, existsSync, fstatSync, lstatSync, openSync, readdirSync, readFileSync, statfsSync, unlinkSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { close, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, memcpy, memset, O_NOFOLLOW, O_RDWR, open, PROT_READ, PROT_WRITE } from "../ffi/libc.ts";
import { ELOOP, ErrnoError, ENOSPC, errnoText } from "../ffi/errno.ts";
import { UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES } from "../ffi/uapi/ublk_cmd.ts";
import { EINVAL, EIO, EOPNOTSUPP } from "../ffi/errno.ts";
import { FileMapping } from "./mapping.ts";
import type { QueueHandler, Target, TargetOrphan, TargetRecord } from "./types.ts";

const MEMORY_DEFAULT_BYTES = 256 * 1024 ** 2;
const SHM_PREFIX = "ublk-bun-memory-";
/** An unreferenced file younger than this may belong to an `add` that has not written its record yet. */
const ORPHAN_MIN_AGE_MS = 60_000;

/** Where the shared files go; UBLK_BUN_SHM_DIR overrides it. */
function shmDir(): string {
  return process.env.UBLK_BUN_SHM_DIR || "/dev/shm";
}

export const memoryTarget: Target = {
  name: "memory",
  description: "RAM disk kept in a /dev/shm file, so its data survives a daemon crash (default 256 MiB)",
  prepare(options): TargetRecord {
    const sizeBytes = options.sizeBytes ?? MEMORY_DEFAULT_BYTES;
    const logicalBlockShift = Math.log2(options.logicalBlockBytes ?? 512);
    const dir = shmDir();
    const stats = statfsSync(dir);
    const availableBytes = stats.bavail * stats.bsize;
    if (sizeBytes > availableBytes) {
      throw new Error(`memory: ${sizeBytes} bytes asked but ${dir} has only ${availableBytes} bytes free`);
    }
    const shmPath = join(dir, `${SHM_PREFIX}${randomUUID()}`);
    const fd = openSync(shmPath, "wx", 0o600);
    try {
      const reserved = fallocate(fd, 0, 0, sizeBytes);
      if (reserved < 0) {
        throw new Error(-reserved === ENOSPC
          ? `memory: ${dir} cannot hold ${sizeBytes} bytes (no space left)`
          : `memory: cannot reserve ${sizeBytes} bytes in ${dir}: ${errnoText(-reserved)}`);
      }
    } catch (error) {
      closeSync(fd);
      unlinkSync(shmPath);
      throw error;
    }
    const ownerUid = fstatSync(fd).uid;
    closeSync(fd);
    return {
      type: "memory",
      sizeBytes,
      logicalBlockShift,
      physicalBlockShift: Math.max(logicalBlockShift, 12),
      attrs: 0,
      discard: { granularityBytes: 4096, maxSectors: 1 << 16, maxWriteZeroesSectors: 1 << 16 },
      options: { shmPath, ownerUid },
      prefersUserCopy: true,
    };
  },

  checkRecord(record) {
    close(openShm(record));
  },

  openQueue(record, queue): QueueHandler {
    const shmPath = String(record.options.shmPath);
    const fd = openShm(record);
    // The fd stays open: after a `resize` grow the mapping follows the file (see targets/mapping.ts).
    let mapping: FileMapping;
    try {
      mapping = new FileMapping(fd, shmPath, record.sizeBytes, PROT_READ | PROT_WRITE);
    } catch (error) {
      close(fd);
      throw error;
    }
    const { bufferAddress, maxIoBufBytes, userCopy } = queue;
    return {
      // With USER_COPY the queue copies between the device and the mapped image itself: reads and writes
      // are then already done when handleIo sees them.
      dataAddress: userCopy ? (_tag, _op, startSector, nrSectors) => {
        const base = mapping.cover((startSector + nrSectors) * 512);
        return base === 0 ? 0 : base + startSector * 512;
      } : undefined,
      handleIo(tag, op, _opFlags, startSector, nrSectors) {
        const lengthBytes = nrSectors * 512;
        const base = mapping.cover(startSector * 512 + lengthBytes);
        if (base === 0) return -EIO; // past the end of the file: it was shrunk behind our back
        const at = base + startSector * 512;
        switch (op) {
          case UBLK_IO_OP_READ:
            if (!userCopy) memcpy(bufferAddress + tag * maxIoBufBytes, at, lengthBytes);
            return lengthBytes;
          case UBLK_IO_OP_WRITE:
            if (!userCopy) memcpy(at, bufferAddress + tag * maxIoBufBytes, lengthBytes);
            return lengthBytes;
          case UBLK_IO_OP_FLUSH:
            return 0; // nothing volatile: every write is already in the shared pages
          case UBLK_IO_OP_DISCARD:
          case UBLK_IO_OP_WRITE_ZEROES:
            memset(at, 0, lengthBytes);
            return 0;
          default:
            return op > UBLK_IO_OP_WRITE_ZEROES ? -EOPNOTSUPP : -EINVAL;
        }
      },
      close() {
        mapping.close();
        close(fd);
      },
    };
  },

  /**
   * Grow: reserve the new bytes in the shm file (zeroed: a tail released by an earlier shrink may hold old
   * data) before the kernel is told, so a write there can never meet a full tmpfs. Shrink (after the kernel
   * was told): punch the tail out, which gives the memory back; the file keeps its length, so a queue's
   * mapping never reaches past the end of the file (that would be SIGBUS on a request still in flight).
   */
  resize(record, newSizeBytes) {
    const shmPath = String(record.options.shmPath);
    const fd = open(shmPath, O_RDWR);
    if (fd < 0) throw new Error(`memory: cannot open ${shmPath}: ${errnoText(-fd)}`);
    try {
      const fileBytes = fstatSync(fd).size;
      if (newSizeBytes > record.sizeBytes) {
        const staleEndBytes = Math.min(fileBytes, newSizeBytes);
        if (staleEndBytes > record.sizeBytes) {
          const punched = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, record.sizeBytes, staleEndBytes - record.sizeBytes);
          if (punched < 0) throw new Error(`memory: cannot clear ${shmPath} past ${record.sizeBytes}: ${errnoText(-punched)}`);
        }
        const reserved = fallocate(fd, 0, 0, newSizeBytes);
        if (reserved < 0) {
          throw new Error(-reserved === ENOSPC
            ? `memory: ${shmDir()} cannot hold ${newSizeBytes} bytes (no space left)`
            : `memory: cannot reserve ${newSizeBytes} bytes in ${shmPath}: ${errnoText(-reserved)}`);
        }
      } else if (fileBytes > newSizeBytes) {
        const punched = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, newSizeBytes, fileBytes - newSizeBytes);
        if (punched < 0) throw new Error(`memory: cannot release ${shmPath} past ${newSizeBytes}: ${errnoText(-punched)}`);
      }
    } finally {
      close(fd);
    }
  },

  destroy(record) {
    // Only ever remove a file this target created: a record is data, and data can be wrong.
    const shmPath = String(record.options.shmPath ?? "");
    const ours = shmPath.startsWith(join(shmDir(), SHM_PREFIX)) && !shmPath.includes("/../");
    if (ours && existsSync(shmPath)) unlinkSync(shmPath);
  },

  orphans(inUse) {
    const dir = shmDir();
    const used = new Set(inUse.map((record) => String(record.options.shmPath ?? "")));
    let names: string[];
    try { names = readdirSync(dir).filter((name) => name.startsWith(SHM_PREFIX)); } catch { return []; }
    const found: TargetOrphan[] = [];
    for (const name of names) {
      const path = join(dir, name);
      let stat;
      try { stat = lstatSync(path); } catch { continue; }
      if (used.has(path) || !stat.isFile() || Date.now() - stat.mtimeMs < ORPHAN_MIN_AGE_MS || mappedByAnyProcess(path)) continue;
      found.push({ description: `${path} (${stat.size} bytes of memory-target data that no device uses)`, remove: () => unlinkSync(path) });
    }
    return found;
  },
};

/**
 * Opens the record's shm file. /dev/shm is writable by everyone: the file must still be the one prepare() made —
 * not a symlink (to a file of root's), not a file of another owner, not another size (a shorter file would SIGBUS
 * the mapping). Returns the fd; throws a one-line Error.
 */
function openShm(record: TargetRecord): number {
  const shmPath = String(record.options.shmPath);
  const fd = open(shmPath, O_RDWR | O_NOFOLLOW);
  if (fd < 0 && -fd === ELOOP) throw new ErrnoError(`open ${shmPath}`, ELOOP, `memory: ${shmPath} is a symlink; refusing it`);
  if (fd < 0) throw new ErrnoError(`open ${shmPath}`, -fd, `memory: cannot open ${shmPath}: ${errnoText(-fd)} (was it removed?)`);
  const stat = fstatSync(fd);
  const ownerUid = typeof record.options.ownerUid === "number" ? record.options.ownerUid : process.geteuid?.() ?? 0;
  const problem = !stat.isFile() ? "is not a regular file"
    : stat.uid !== ownerUid ? `is owned by uid ${stat.uid}, not ${ownerUid}`
    // Larger is fine: a shrink (resize) keeps the file's length and only releases the pages past the new end.
    : stat.size < record.sizeBytes ? `has ${stat.size} bytes, fewer than the device's ${record.sizeBytes}` : "";
  if (problem !== "") {
    close(fd);
    throw new Error(`memory: ${shmPath} ${problem}; refusing it`);
  }
  return fd;
}

/** True when some process maps `path` (a daemon whose record is unreadable still serves from it). */
function mappedByAnyProcess(path: string): boolean {
  for (const pid of readdirSync("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      if (readFileSync(`/proc/${pid}/maps`, "utf8").includes(path)) return true;
    } catch { /* gone, or not ours to read */ }
  }
  return false;
}

export default memoryTarget;
