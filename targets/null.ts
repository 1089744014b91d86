/**
 * The null target: every request succeeds with its full length and no data is touched, as with the kernel's
 * null_blk: on a USER_COPY device (the default) neither the kernel nor the queue copies a byte. Useful to
 * measure the server itself.
 */
import { UBLK_IO_OP_WRITE } from "../ffi/uapi/ublk_cmd.ts";
import type { QueueHandler, Target, TargetRecord } from "./types.ts";

const NULL_DEFAULT_BYTES = 250 * 1024 ** 3;

export const nullTarget: Target = {
  name: "null",
  description: "discards writes; reads leave the reader's buffer unchanged (no storage, default size 250 GiB)",
  prepare(options): TargetRecord {
    const logicalBlockShift = Math.log2(options.logicalBlockBytes ?? 512);
    return {
      type: "null",
      sizeBytes: options.sizeBytes ?? NULL_DEFAULT_BYTES,
      logicalBlockShift,
      physicalBlockShift: Math.max(logicalBlockShift, 12),
      attrs: 0,
      discard: { granularityBytes: 4096, maxSectors: 0xffffffff >>> 9, maxWriteZeroesSectors: 0xffffffff >>> 9 },
      options: {},
      // With USER_COPY (and ignoresData) nobody copies a byte: a read leaves the reader's buffer as it was.
      prefersUserCopy: true,
    };
  },
  /** Nothing is stored: any size will do. */
  resize() {},
  openQueue(): QueueHandler {
    return {
      ignoresData: true,
      handleIo(_tag, op, _opFlags, _startSector, nrSectors) {
        // Reads and writes report their length; flush, discard and write-zeroes report success.
        return op <= UBLK_IO_OP_WRITE ? nrSectors << 9 : 0;
      },
    };
  },
};

export default nullTarget;
