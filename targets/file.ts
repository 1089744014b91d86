/**
 * The file target (also `-t loop`, as in ublksrv): serves a regular file or a block device. With O_DIRECT (the
 * default) every request becomes a READ / WRITE / FSYNC / FALLOCATE on the queue's own io_uring and completes
 * when its CQE arrives, so requests overlap. Through the page cache (--buffered, or a file system that refuses
 * O_DIRECT, with a notice) reads and writes are copied inline instead.
 */
import { type BigIntStats, closeSync, constants, fstatSync, ftruncateSync, openSync, statfsSync, statSync } from "node:fs";
import { resolve } from "node:path";
import {
  BLKGETSIZE64, BLKROGET, BLKSSZGET, close, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, ioctl,
  mmapAnonymous, munmap, O_DIRECT, O_EXCL, O_RDONLY, O_RDWR, open, PAGE_BYTES, pread, PROT_READ, PROT_WRITE, pwrite, RWF_DSYNC,
} from "../ffi/libc.ts";
import { EBUSY, EINVAL, EIO, EOPNOTSUPP, ErrnoError, errnoText } from "../ffi/errno.ts";
import { IORING_FSYNC_DATASYNC, IOSQE_FIXED_FILE } from "../ffi/uapi/io_uring.ts";
import {
  UBLK_ATTR_FUA, UBLK_ATTR_READ_ONLY, UBLK_ATTR_VOLATILE_CACHE, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP, UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
} from "../ffi/uapi/ublk_cmd.ts";
import { FileMapping } from "./mapping.ts";
import { IO_PENDING, TARGET_USER_DATA, type QueueHandler, type Target, type TargetRecord } from "./types.ts";

interface Backing {
  sizeBytes: number;
  logicalBlockBytes: number;
  isBlockDevice: boolean;
  /** A block device marked read-only (root may still open it for writing; the writes would fail). */
  readOnlyDevice: boolean;
}

/** Size and block size of an open backing file or block device. */
function inspect(fd: number, path: string): Backing {
  const stat = fstatSync(fd);
  if (stat.isBlockDevice()) {
    const size = new BigUint64Array(1);
    const blockBytes = new Int32Array(1);
    const readOnly = new Int32Array(1);
    if (ioctl(fd, BLKGETSIZE64, size) < 0 || ioctl(fd, BLKSSZGET, blockBytes) < 0 || ioctl(fd, BLKROGET, readOnly) < 0) {
      throw new Error(`file: cannot read the size of ${path}`);
    }
    return { sizeBytes: Number(size[0]), logicalBlockBytes: blockBytes[0]!, isBlockDevice: true, readOnlyDevice: readOnly[0] !== 0 };
  }
  return { sizeBytes: stat.size, logicalBlockBytes: 512, isBlockDevice: false, readOnlyDevice: false };
}

/** Whether O_DIRECT works on `path`, and with which alignment (some file systems want 4 KiB). */
function directAlignment(path: string, readOnly: boolean): number {
  const fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_DIRECT);
  if (fd < 0) return 0;
  const buffer = mmapAnonymous(PAGE_BYTES);
  try {
    for (const alignment of [512, 4096]) {
      if (pread(fd, buffer, alignment, alignment) !== -EINVAL) return alignment;
    }
    return 0;
  } finally {
    munmap(buffer, PAGE_BYTES);
    close(fd);
  }
}

/**
 * What the backing object is, kept in the record and checked at every queue start (and so at every recover): a
 * regular file by device and inode, a block device by its dev_t. A path since replaced by another file or by a
 * symlink to another disk is then refused instead of served.
 */
function identityOf(stat: BigIntStats): string {
  if (stat.isBlockDevice()) {
    // dev_t split as the kernel's new_encode_dev does.
    const major = ((stat.rdev >> 8n) & 0xfffn) | ((stat.rdev >> 32n) & ~0xfffn);
    const minor = (stat.rdev & 0xffn) | ((stat.rdev >> 12n) & ~0xffn);
    return `block device ${major}:${minor}`;
  }
  if (stat.isFile()) return `file ${stat.dev}:${stat.ino}`;
  return "neither a file nor a block device";
}

function notTheSame(path: string, recorded: string, now: string): string {
  return `file: ${path} is not what this device was created with (recorded: ${recorded}; now: ${now}); refusing it`;
}

/**
 * Opens the record's backing file as a queue serves it (a block device with O_EXCL when `claim`), and only if it
 * is the object the record names: checked on the path before opening (a swapped-in device is not even opened)
 * and on the open fd after. Returns the fd; throws a one-line Error.
 */
function openBacking(record: TargetRecord, claim: boolean): number {
  const path = String(record.options.path);
  const recorded = record.options.identity;
  const exclusive = claim && record.options.blockDevice === true ? O_EXCL : 0;
  const flags = (record.options.readOnly ? O_RDONLY : O_RDWR) | (record.options.direct ? O_DIRECT : 0) | exclusive;
  if (typeof recorded === "string") {
    let now = "";
    try { now = identityOf(statSync(path, { bigint: true })); } catch { /* open reports it below */ }
    if (now !== "" && now !== recorded) throw new Error(notTheSame(path, recorded, now));
  }
  const fd = open(path, flags);
  if (fd < 0) {
    const reason = -fd === EBUSY && exclusive ? "in use (mounted or held by another driver)" : errnoText(-fd);
    throw new ErrnoError(`open ${path}`, -fd, `file: cannot open ${path}: ${reason}`);
  }
  if (typeof recorded === "string") {
    const now = identityOf(fstatSync(fd, { bigint: true }));
    if (now !== recorded) {
      close(fd);
      throw new Error(notTheSame(path, recorded, now));
    }
  }
  return fd;
}

const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

function inMemoryFileSystem(path: string): boolean {
  try {
    const type = statfsSync(path).type;
    return type === TMPFS_MAGIC || type === RAMFS_MAGIC;
  } catch {
    return false;
  }
}

export const fileTarget: Target = {
  name: "file",
  description: "serves a regular file or a block device (-f PATH [--buffered] [--read-only] [--grow]; alias: loop)",
  prepare(options): TargetRecord {
    if (typeof options.file !== "string" || options.file === "") throw new Error("file: -f PATH is required");
    const path = resolve(options.file);
    const readOnly = options.readOnly === true;
    let stat;
    try {
      stat = statSync(path);
    } catch (error) {
      throw new Error(`file: ${path}: ${errnoText((error as NodeJS.ErrnoException).errno ?? EINVAL)}`);
    }
    if (stat.isDirectory()) throw new Error(`file: ${path} is a directory`);
    if (!stat.isFile() && !stat.isBlockDevice()) throw new Error(`file: ${path} is not a regular file or a block device`);
    let fd: number;
    try {
      // O_EXCL on a block device fails with EBUSY while it is mounted or claimed by another driver.
      fd = openSync(path, (readOnly ? constants.O_RDONLY : constants.O_RDWR) | (stat.isBlockDevice() ? constants.O_EXCL : 0));
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (!readOnly && (code === "EACCES" || code === "EROFS" || code === "EPERM")) {
        throw new Error(`file: ${path} is not writable (${code}); add --read-only to serve it read-only`);
      }
      if (code === "EBUSY") throw new Error(`file: ${path} is in use (mounted or held by another driver)`);
      throw new Error(`file: cannot open ${path}: ${(error as Error).message.replace(/^\w+: /, "")}`);
    }
    let backing: Backing;
    try {
      backing = inspect(fd, path);
      const identity = identityOf(fstatSync(fd, { bigint: true }));
      if (backing.readOnlyDevice && !readOnly) throw new Error(`file: ${path} is not writable (EROFS); add --read-only to serve it read-only`);
      const logicalBlockBytes = Math.max(options.logicalBlockBytes ?? 512, backing.logicalBlockBytes);
      const sizeBytes = options.sizeBytes ?? backing.sizeBytes;
      const grows = sizeBytes > backing.sizeBytes;
      if (grows) {
        if (options.grow !== true) throw new Error(`file: -s ${sizeBytes} is larger than ${path} (${backing.sizeBytes} bytes); add --grow to extend it`);
        if (backing.isBlockDevice) throw new Error(`file: a block device cannot grow (${path} has ${backing.sizeBytes} bytes)`);
        if (readOnly) throw new Error("file: --grow and --read-only cannot be combined");
        // Grown first so that the O_DIRECT probe below reads inside the file; undone if the file is refused.
        ftruncateSync(fd, sizeBytes);
      }
      let blockBytes: number, direct: boolean, inMemory: boolean;
      try {
        if (sizeBytes === 0) throw new Error(`file: ${path} is empty; give -s SIZE --grow to size it`);
        let alignment = 0;
        // In a tmpfs file the page cache is the storage: O_DIRECT (which tmpfs accepts since 6.6) would only add a
        // trip through the ring. Such a file is mapped and served like the memory target instead: one kernel copy
        // per request with USER_COPY. (Device nodes sit on devtmpfs: not them.)
        inMemory = stat.isFile() && inMemoryFileSystem(path);
        if (options.buffered !== true && !inMemory) {
          alignment = directAlignment(path, readOnly);
          if (alignment === 0) console.error(`ublk-bun: notice: ${path} does not support O_DIRECT; using the page cache`);
        }
        direct = alignment > 0;
        // The block size the device finally gets: raised to what O_DIRECT on this file needs.
        blockBytes = Math.max(logicalBlockBytes, alignment);
        if (sizeBytes % blockBytes !== 0) {
          const raised = blockBytes > logicalBlockBytes ? ` (O_DIRECT on ${path} needs ${blockBytes}-byte blocks; --buffered allows ${logicalBlockBytes})` : "";
          throw new Error(options.sizeBytes === undefined
            ? `file: ${path} has ${sizeBytes} bytes, not a multiple of the ${blockBytes}-byte block size${raised}; give -s`
            : `file: -s ${sizeBytes} is not a multiple of the ${blockBytes}-byte block size${raised}`);
        }
      } catch (error) {
        if (grows) ftruncateSync(fd, backing.sizeBytes);
        throw error;
      }
      const logicalBlockShift = Math.log2(blockBytes);
      return {
        type: "file",
        sizeBytes,
        logicalBlockShift,
        physicalBlockShift: Math.max(logicalBlockShift, 12),
        // Writes may sit in the page cache or the disk's cache until a flush: say so, and honour FUA.
        attrs: UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA | (readOnly ? UBLK_ATTR_READ_ONLY : 0),
        discard: readOnly ? undefined : { granularityBytes: 4096, maxSectors: 1 << 21, maxWriteZeroesSectors: 1 << 21 },
        options: { path, direct, readOnly, blockDevice: backing.isBlockDevice, inMemory, identity },
        prefersUserCopy: inMemory,
        // With O_DIRECT each request goes through the ring anyway: there, straight between the file and its pages.
        prefersZeroCopy: direct,
      };
    } finally {
      closeSync(fd);
    }
  },

  claim(record) {
    return record.options.blockDevice === true ? openBacking(record, true) : -1;
  },

  checkRecord(record) {
    close(openBacking(record, true));
  },

  /**
   * Grow: a regular file is extended (ftruncate, sparse) before the kernel is told; a block device or a
   * read-only device only grows up to what the backing already has. Shrink: the file is never truncated —
   * the device just ends earlier and the tail stays in the file (grow again to see it; truncate it yourself
   * if it should go): cutting a user's file is not reversible.
   */
  resize(record, newSizeBytes) {
    if (newSizeBytes <= record.sizeBytes) return;
    const path = String(record.options.path);
    const readOnly = record.options.readOnly === true;
    let fd: number;
    try {
      fd = openSync(path, readOnly ? constants.O_RDONLY : constants.O_RDWR);
    } catch (error) {
      throw new Error(`file: cannot open ${path}: ${(error as Error).message.replace(/^\w+: /, "")}`);
    }
    try {
      const backing = inspect(fd, path);
      if (backing.sizeBytes >= newSizeBytes) return;
      if (backing.isBlockDevice) throw new Error(`file: ${path} is a block device of ${backing.sizeBytes} bytes; it cannot grow to ${newSizeBytes}`);
      if (readOnly) throw new Error(`file: the device is read-only, so ${path} (${backing.sizeBytes} bytes) cannot grow to ${newSizeBytes}`);
      ftruncateSync(fd, newSizeBytes);
    } finally {
      closeSync(fd);
    }
  },

  openQueue(record, queue): QueueHandler {
    const path = String(record.options.path);
    // A block device is kept claimed (O_EXCL) by the daemon's main thread while it serves (claim() above), so
    // that nothing mounts it under us; the queues open it plainly.
    const fd = openBacking(record, false);
    const { ring, bufferAddress, maxIoBufBytes } = queue;
    const punchMode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    const zeroMode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    /** Bytes asked of the backing file per tag, to tell a short transfer from a complete one. */
    const expectedBytes = new Int32Array(queue.queueDepth);
    // Through the page cache a read or write is mostly a memory copy: done here at once, it saves a second trip
    // through the ring per request (and tmpfs writes a hop to io-wq), as the kernel's loop driver does for
    // buffered files. With O_DIRECT the device's latency is real, so requests go through the ring and overlap.
    // Zero copy: the request's own pages are the ring's buffer `tag`, reachable only through the ring.
    const { zeroCopy } = queue;
    const inline = record.options.direct !== true && !zeroCopy;
    // The backing file as the ring's fixed file 0: each request then skips the kernel's lookup and reference
    // count of the file (atomic in a multi-threaded process). The plain fd where the kernel refuses.
    const fixedFile = !inline && ring.registerFiles([fd]) === 0;
    const ringFd = fixedFile ? 0 : fd;
    const sqeFlags = fixedFile ? IOSQE_FIXED_FILE : 0;
    /** A READ or WRITE of tag's data on the ring: from and to its pages (zero copy) or its buffer. */
    const prepData = zeroCopy
      ? (base: number, op: number, tag: number, lengthBytes: number, offsetBytes: number) => op === UBLK_IO_OP_READ
        ? ring.prepReadFixed(base, ringFd, tag, 0, lengthBytes, offsetBytes, tag, TARGET_USER_DATA)
        : ring.prepWriteFixed(base, ringFd, tag, 0, lengthBytes, offsetBytes, tag, TARGET_USER_DATA)
      : (base: number, op: number, tag: number, lengthBytes: number, offsetBytes: number) => op === UBLK_IO_OP_READ
        ? ring.prepRead(base, ringFd, bufferAddress + tag * maxIoBufBytes, lengthBytes, offsetBytes, tag, TARGET_USER_DATA)
        : ring.prepWrite(base, ringFd, bufferAddress + tag * maxIoBufBytes, lengthBytes, offsetBytes, tag, TARGET_USER_DATA);
    // A tmpfs file on a USER_COPY device: the queue copies between the device and the mapped file directly.
    // It follows the file when `resize` grows it (targets/mapping.ts).
    let mapping: FileMapping | null = null;
    if (record.options.inMemory === true && queue.userCopy) {
      try {
        mapping = new FileMapping(fd, path, record.sizeBytes, record.options.readOnly ? PROT_READ : PROT_READ | PROT_WRITE);
      } catch (error) {
        close(fd);
        throw new Error(`file: ${(error as Error).message}`);
      }
    }
    const mapped = mapping;
    return {
      dataAddress: mapped ? (_tag, _op, startSector, nrSectors) => {
        const base = mapped.cover((startSector + nrSectors) * 512);
        return base === 0 ? 0 : base + startSector * 512;
      } : undefined,
      handleIo(tag, op, opFlags, startSector, nrSectors) {
        const lengthBytes = nrSectors * 512;
        const offsetBytes = startSector * 512;
        if (mapped && (op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE)) {
          // Copied by the queue, unless the file was shorter than the request (then nothing was copied).
          return mapped.cover(offsetBytes + lengthBytes) === 0 ? -EIO : lengthBytes;
        }
        const address = bufferAddress + tag * maxIoBufBytes;
        if (inline && (op === UBLK_IO_OP_READ || (op === UBLK_IO_OP_WRITE && (opFlags & UBLK_IO_F_FUA) === 0))) {
          const done = op === UBLK_IO_OP_READ ? pread(fd, address, lengthBytes, offsetBytes) : pwrite(fd, address, lengthBytes, offsetBytes);
          return done === 0 ? -EIO : done; // short transfers are passed on; -errno as is
        }
        const base = queue.getSqe();
        expectedBytes[tag] = op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE ? lengthBytes : 0;
        switch (op) {
          case UBLK_IO_OP_READ:
            prepData(base, op, tag, lengthBytes, offsetBytes);
            break;
          case UBLK_IO_OP_WRITE:
            prepData(base, op, tag, lengthBytes, offsetBytes);
            if (opFlags & UBLK_IO_F_FUA) ring.setOpFlags(base, RWF_DSYNC);
            break;
          case UBLK_IO_OP_FLUSH:
            ring.prepFsync(base, ringFd, IORING_FSYNC_DATASYNC, tag, TARGET_USER_DATA);
            break;
          case UBLK_IO_OP_DISCARD:
            ring.prepFallocate(base, ringFd, punchMode, offsetBytes, lengthBytes, tag, TARGET_USER_DATA);
            break;
          case UBLK_IO_OP_WRITE_ZEROES:
            ring.prepFallocate(base, ringFd, opFlags & UBLK_IO_F_NOUNMAP ? zeroMode : punchMode, offsetBytes, lengthBytes, tag, TARGET_USER_DATA);
            break;
          default:
            ring.prepNop(base, tag, TARGET_USER_DATA); // keeps the SQE slot consistent; answered below
            expectedBytes[tag] = -EOPNOTSUPP;
            return IO_PENDING;
        }
        if (sqeFlags !== 0) ring.setSqeFlags(base, sqeFlags);
        return IO_PENDING;
      },
      onTargetCqe(tag, result) {
        const expected = expectedBytes[tag]!;
        if (expected < 0) result = expected;
        // A short transfer is passed on (the kernel asks again for the rest); none at all would loop forever.
        else if (expected > 0 && result === 0) result = -EIO;
        queue.complete(tag, result);
      },
      close() {
        mapped?.close();
        close(fd);
      },
    };
  },
};

export default fileTarget;
