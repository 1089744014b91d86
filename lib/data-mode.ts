/**
 * How a queue's request data moves between the kernel and the target, picked once when the queue attaches:
 * - buffers: each tag has a buffer in the daemon, named in its FETCH / COMMIT_AND_FETCH; the kernel copies a
 *   write's data into it before handing us the request and a read's data out of it at commit;
 * - user copy (UBLK_F_USER_COPY): the commands name no buffer; the queue copies a write's data in with pread and
 *   a read's out with pwrite on /dev/ublkcN, to and from the tag's buffer or the target's own memory
 *   (QueueHandler.dataAddress);
 * - no data: user copy with a target that ignores the data (null): nothing is copied either way;
 * - zero copy (UBLK_F_AUTO_BUF_REG): the commands' SQEs name a slot of the ring's buffer table (slot = tag), where the
 *   kernel registers the request's own pages before handing it to us and unregisters them at commit; the target
 *   reads and writes them with READ_FIXED / WRITE_FIXED (QueueContext.zeroCopy), and nothing is copied here.
 * The queue loop (lib/queue-worker.ts) calls the mode around its target; it never asks which mode it has.
 */
import { pread, pwrite } from "../ffi/libc.ts";
import { EIO } from "../ffi/errno.ts";
import {
  UBLK_F_AUTO_BUF_REG, UBLK_F_NEED_GET_DATA, UBLK_F_USER_COPY, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, ublk_auto_buf_reg, ublkUserCopyOffset,
} from "../ffi/uapi/ublk_cmd.ts";
import type { QueueHandler } from "../targets/types.ts";
import { transportName } from "./command-transport.ts";

export interface DataMode {
  /** The buffer address tag's FETCH / COMMIT_AND_FETCH carries in ublksrv_io_cmd.addr (0 for none). */
  commandAddress(tag: number): number;
  /** What the command's SQE carries in its own `addr` (0 but with zero copy: a ublk_auto_buf_reg). */
  sqeAddress(tag: number): number;
  /** Before the target serves tag's request: a write's data is brought in. 0, or -errno to fail the request. */
  beforeTarget(tag: number, op: number, startSector: number, nrSectors: number): number;
  /** After the target's result (already checked): a read's data goes out. Returns the result to commit. */
  afterTarget(tag: number, op: number, result: number): number;
}

/** Where the queue's tag buffers are: tag t's at bufferAddress + t * tagStrideBytes (a stride of 0: all share one). */
export interface TagBuffers {
  bufferAddress: number;
  tagStrideBytes: number;
}

export function buffersMode({ bufferAddress, tagStrideBytes }: TagBuffers): DataMode {
  return {
    commandAddress: (tag) => bufferAddress + tag * tagStrideBytes,
    sqeAddress: () => 0,
    beforeTarget: () => 0,
    afterTarget: (_tag, _op, result) => result,
  };
}

/** The SQE addr of a zero-copy command (its ublksrv_io_cmd.addr must be 0): ublk_auto_buf_reg { index = tag,
 * flags 0 (no FALLBACK: a request whose pages cannot be registered fails in the kernel with EIO rather than reach
 * a target that has no buffer for it) }. */
const AUTO_BUF_REG_INDEX_SHIFT = ublk_auto_buf_reg.index * 8;

/** Nothing copied here either: as noDataMode, with the slot in each command's SQE. */
export function zeroCopyMode(): DataMode {
  return { ...noDataMode(), sqeAddress: (tag) => tag << AUTO_BUF_REG_INDEX_SHIFT };
}

export function noDataMode(): DataMode {
  return {
    commandAddress: () => 0,
    sqeAddress: () => 0,
    beforeTarget: () => 0,
    afterTarget: (_tag, _op, result) => result,
  };
}

/** USER_COPY: `lengthBytes` of tag's request data from `byteOffset` into memory at `address` (pread on /dev/ublkcN),
 * and back (pwrite). Bytes copied or -errno. */
export function readRequest(charFd: number, qId: number, tag: number, address: number, lengthBytes: number, byteOffset: number): number {
  return pread(charFd, address, lengthBytes, ublkUserCopyOffset(qId, tag, byteOffset));
}
export function writeRequest(charFd: number, qId: number, tag: number, address: number, lengthBytes: number, byteOffset: number): number {
  return pwrite(charFd, address, lengthBytes, ublkUserCopyOffset(qId, tag, byteOffset));
}

export function userCopyMode(charFd: number, qId: number, depth: number, { bufferAddress, tagStrideBytes }: TagBuffers,
                             handler: QueueHandler): DataMode {
  const dataAddressOf = handler.dataAddress?.bind(handler);
  /** Where each tag's request data is copied from/to (its buffer, or the target's own memory). */
  const tagDataAddress = new Float64Array(depth);
  return {
    commandAddress: () => 0,
    sqeAddress: () => 0,
    beforeTarget(tag, op, startSector, nrSectors) {
      const isData = op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE;
      tagDataAddress[tag] = (dataAddressOf !== undefined && isData ? dataAddressOf(tag, op, startSector, nrSectors) : 0) ||
        bufferAddress + tag * tagStrideBytes;
      if (op !== UBLK_IO_OP_WRITE) return 0;
      const lengthBytes = nrSectors << 9;
      return readRequest(charFd, qId, tag, tagDataAddress[tag]!, lengthBytes, 0) === lengthBytes ? 0 : -EIO;
    },
    afterTarget(tag, op, result) {
      if (op !== UBLK_IO_OP_READ || result <= 0) return result;
      return writeRequest(charFd, qId, tag, tagDataAddress[tag]!, result, 0) === result ? result : -EIO;
    },
  };
}

/** How `list` names a device's data path, from its flags: the data mode, then the commands (lib/command-transport.ts). */
export function dataPathName(devFlags: number): string {
  const userCopy = (devFlags & UBLK_F_USER_COPY) !== 0;
  const mode = (devFlags & UBLK_F_AUTO_BUF_REG) !== 0 ? (userCopy ? "zero copy and user copy" : "zero copy") : userCopy ? "user copy"
    : (devFlags & UBLK_F_NEED_GET_DATA) !== 0 ? "copy (NEED_GET_DATA)" : "copy";
  return `${mode}, ${transportName(devFlags)}`;
}

/** The mode for a queue, from the device's flags (dev_info.flags): zero copy, user copy (no data if the target
 * ignores it), else buffers. */
export function pickDataMode(devFlags: number, charFd: number, qId: number, depth: number, buffers: TagBuffers,
                             handler: QueueHandler): DataMode {
  if ((devFlags & UBLK_F_AUTO_BUF_REG) !== 0) return zeroCopyMode();
  if ((devFlags & UBLK_F_USER_COPY) === 0) return buffersMode(buffers);
  return handler.ignoresData === true ? noDataMode() : userCopyMode(charFd, qId, depth, buffers, handler);
}
