/**
 * The target interface: what a block device's bytes are. A target is a plain object (see targets/null.ts)
 * with two halves:
 * - `prepare` runs once, in the process that creates the device, and turns user options into a
 *   TargetRecord: a JSON-safe description that is at once the CLI's result, the start message of every queue
 *   Worker and the recovery record on disk. Nothing else travels between processes and threads.
 * - `openQueue` runs in each queue Worker and returns the handler that serves that queue's I/O.
 */
import type { Ring } from "../ffi/ring.ts";

export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** JSON-safe description of a prepared target. */
export interface TargetRecord {
  /** Registry name ("null", "memory", "file") or the module specifier of a user-written target. */
  type: string;
  /** Device size in bytes (a multiple of the logical block size). */
  sizeBytes: number;
  /** log2 of the logical block size (9 = 512 B … 12 = 4 KiB). */
  logicalBlockShift: number;
  /** log2 of the physical block size (≥ logicalBlockShift). */
  physicalBlockShift: number;
  /** UBLK_ATTR_* bits: read-only, rotational, volatile cache, FUA. */
  attrs: number;
  /** Discard / write-zeroes support; absent when the target has neither. */
  discard?: { granularityBytes: number; maxSectors: number; maxWriteZeroesSectors: number };
  /** Target-specific settings (file path, shm name …). */
  options: { [key: string]: JsonValue };
  /**
   * The target keeps the disk image mapped and gives its queues a dataAddress(), or ignores data (null): a new
   * device then uses USER_COPY (when the kernel has it and no data mode was asked for), so each request is one
   * kernel copy, or none.
   */
  prefersUserCopy?: boolean;
  /**
   * The target can serve reads and writes from the ring's registered buffers (QueueContext.zeroCopy): a new
   * device is then zero copy when the kernel has AUTO_BUF_REG (6.16 on) and no data mode was asked for. With
   * prefersUserCopy too, a zero-copy device also gets USER_COPY (and a device that is not zero copy neither), so
   * the target can copy small requests itself (QueueContext.readRequest / writeRequest) and serve large ones from
   * their pages.
   */
  prefersZeroCopy?: boolean;
}

/** Options a user gave for a new device, before the target validates them. */
export interface TargetOptions {
  /** Requested size in bytes; targets pick a default when absent. */
  sizeBytes?: number;
  /** Requested logical block size in bytes. */
  logicalBlockBytes?: number;
  /** Free-form target options (CLI flags such as `file`, `buffered`). */
  [key: string]: JsonValue | undefined;
}

/** What a queue Worker gives a target's queue handler. Built once per queue, never per I/O. */
export interface QueueContext {
  devId: number;
  qId: number;
  queueDepth: number;
  /** Bytes reserved per tag; a request never carries more. */
  maxIoBufBytes: number;
  /** Tag t's data lives at `bufferAddress + t * maxIoBufBytes` (mmapped, page aligned, never moves). */
  bufferAddress: number;
  /** The whole buffer area as bytes: tag t's data starts at index t * maxIoBufBytes. */
  buffers: Uint8Array;
  /** The queue's own io_uring: a target may submit its own SQEs on it (user_data high word = TARGET_USER_DATA);
   * they go to the kernel with the queue's next io_uring_enter. */
  ring: Ring;
  /** A free SQE on `ring` (word index in ring.sqe32), submitting what is queued first if the SQ is full. */
  getSqe(): number;
  /** True when this queue is being rebuilt by `recover` after the previous server died. */
  recovering: boolean;
  /** True on a USER_COPY device (-u): the queue moves request data with pread/pwrite on /dev/ublkcN. */
  userCopy: boolean;
  /**
   * True on a zero-copy device (AUTO_BUF_REG): a request's pages are the ring's registered buffer number `tag`,
   * from address 0, while the target holds the request; its data goes to and from them with READ_FIXED /
   * WRITE_FIXED SQEs on `ring` (Ring.prepReadFixed / prepWriteFixed), not through `bufferAddress`, which the
   * kernel then neither fills nor reads.
   */
  zeroCopy: boolean;
  /**
   * On a USER_COPY device (userCopy): copies `lengthBytes` of tag's request data, from `byteOffset` in the request,
   * into native memory at `address` (readRequest: a write's data) or from there (writeRequest: a read's data), with
   * pread / pwrite on /dev/ublkcN. Returns the bytes copied or -errno.
   */
  readRequest(tag: number, address: number, lengthBytes: number, byteOffset: number): number;
  writeRequest(tag: number, address: number, lengthBytes: number, byteOffset: number): number;
  /**
   * Completes `tag` later with bytes done or -errno, for requests whose handleIo returned IO_PENDING (the result
   * is checked as handleIo's is). Once per request: a completion for a tag that holds no pending request (a
   * second or late call) is refused with a log line. The queue cannot tell a late call apart once the kernel has
   * given the tag a new request that is itself pending, so never keep a tag after completing it.
   */
  complete(tag: number, result: number): void;
}

/** Returned by handleIo when the request will be completed later through QueueContext.complete. */
export const IO_PENDING = 0x7fffffff;
/** user_data high word of SQEs a target submits on the queue ring; their CQEs go to onTargetCqe. */
export const TARGET_USER_DATA = 1;

/** Serves one queue. Every method runs on that queue's Worker thread. */
export interface QueueHandler {
  /**
   * Required. Serves one request: `op` is UBLK_IO_OP_*, `opFlags` the UBLK_IO_F_* bits, the data is in the
   * tag's buffer (written data already there; read data to be put there). Returns bytes done, -errno, or
   * IO_PENDING. Called on the hot path: no allocation, no Promise for synchronous targets.
   * Results: READ / WRITE 0 < bytes ≤ nrSectors × 512 (fewer: the kernel asks again for the rest) or -errno;
   * FLUSH / DISCARD / WRITE_ZEROES 0 or -errno. Anything else (0 bytes for a write, NaN, a fraction) fails the
   * request with EIO and a log line naming the target, and so does a throw: one request fails, not the daemon.
   */
  handleIo(tag: number, op: number, opFlags: number, startSector: number, nrSectors: number): number;
  /** Optional. A CQE for an SQE the target put on the queue ring (user_data low word as it set it). A throw
   * here is not tied to a request: it ends the daemon. */
  onTargetCqe?(userDataLow: number, result: number): void;
  /**
   * Optional. True when IO_PENDING requests are completed from JS callbacks (timers, Promises, sockets): the
   * queue then returns to the event loop between bounded waits. Targets that complete only from onTargetCqe
   * leave it unset and the queue blocks in io_uring_enter.
   */
  needsEventLoop?: boolean;
  /**
   * Optional. True when the target never reads or writes request data (null): all tags then share one buffer,
   * so large writes do not grow the daemon's memory by depth × request size, and on a USER_COPY device the
   * queue copies nothing.
   */
  ignoresData?: boolean;
  /**
   * Optional; USER_COPY devices only. Where a READ's or WRITE's bytes live in the target's own memory (a mapped
   * disk image): the queue then copies between the device and there directly — one copy instead of two through
   * the tag's buffer — and handleIo only confirms. Return 0 to use the tag's buffer for this request.
   */
  dataAddress?(tag: number, op: number, startSector: number, nrSectors: number): number;
  /**
   * Optional. The device is being deleted: before the kernel lets it go, it waits for every request the target
   * holds. Fail now (complete with -EIO) those that wait for what may never come — a server that is gone; the
   * others are still served as usual.
   */
  onDeleting?(): void;
  /** Optional. The queue is going away: release what openQueue took. */
  close?(): void;
}

/** A target type, looked up by name in targets/registry.ts or loaded from a user module's default export. */
export interface Target {
  /** Required. Short name shown in `list` and used with `-t`. */
  name: string;
  /** Required. One line for `ublk-bun help`. */
  description: string;
  /** Required; creating process. Validates options and returns the record (throw Error with a one-line message). */
  prepare(options: TargetOptions): TargetRecord | Promise<TargetRecord>;
  /** Required; queue Worker. Opens what serving one queue needs (files, mappings) and returns its handler. */
  openQueue(record: TargetRecord, queue: QueueContext): QueueHandler | Promise<QueueHandler>;
  /**
   * Optional; the recovering daemon, before it tells the kernel that recovery starts. Throws an Error with a
   * one-line message when what the record points to outside the server (a backing file, an shm file) is no longer
   * the object the device was created with: the device then stays QUIESCED, for another `recover` once it is put
   * back, or `del`. (openQueue checks again, but on 6.12 a queue failing after START_USER_RECOVERY leaves a device
   * that can only be deleted: the dead attempt's memory map stays the one the kernel accepts.)
   */
  checkRecord?(record: TargetRecord): void | Promise<void>;
  /**
   * Optional; the serving daemon's main thread, once its queues are attached (after creating the device, or
   * recovering it). Takes what must stay exclusive for as long as this daemon serves — a block device's O_EXCL
   * claim — and returns an fd the daemon keeps open until it stops (-1: nothing). Not in openQueue: a standby
   * daemon opens its queues while the serving daemon still holds the claim.
   */
  claim?(record: TargetRecord): number | Promise<number>;
  /**
   * Optional; the process running `resize` (without it the target cannot be resized). Growing: called before
   * the kernel is told — make the backing store hold `newSizeBytes` (`record.sizeBytes` is still the old
   * size), or throw an Error with a one-line reason to refuse. Shrinking: called after the kernel was told
   * (it sends nothing past `newSizeBytes` any more) — release what lies beyond, or nothing; it should not
   * throw. Running queues learn of a grow from the first request past the old end (see targets/mapping.ts).
   */
  resize?(record: TargetRecord, newSizeBytes: number): void | Promise<void>;
  /** Optional; the process that deletes the device. Removes state kept outside the server (shm files …). */
  destroy?(record: TargetRecord): void | Promise<void>;
  /**
   * Optional; `list` and `del -a`. State this target left outside any server (a crash between creating it and
   * writing the record, a record removed by hand) that no record in `inUse` refers to.
   */
  orphans?(inUse: TargetRecord[]): TargetOrphan[];
}

/** Something a target left behind: shown by `list`, removed by `del -a`. */
export interface TargetOrphan {
  description: string;
  remove(): void;
}
