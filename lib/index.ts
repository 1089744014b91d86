/**
 * ublk-bun as a library: serve a block device from your own Bun program and target.
 *
 *   const device = await createDevice({ target: "/path/to/my-target.ts", sizeBytes: 1 << 30 });
 *   console.log(device.path); // /dev/ublkbN
 *   await device.stop();
 *
 * Each queue runs in its own Worker, which loads the target module itself: a target is named by module path
 * (or built-in name), or passed as an object together with the module that exports it. See targets/types.ts.
 */
import { dataModeFlags, recoveryFlags, type QueueInfo } from "./device.ts";
import { startServing } from "./serving.ts";
import { Ctrl } from "./ctrl.ts";
import { resizeDevice } from "./resize.ts";
import { UBLK_F_NO_AUTO_PART_SCAN } from "../ffi/uapi/ublk_cmd.ts";
import { canonicalType, loadTarget, registerTarget } from "../targets/registry.ts";
import type { Target, TargetOptions, TargetRecord } from "../targets/types.ts";
import type { DevInfo } from "./ctrl.ts";
import { API_NAMES, parseChoice, parseDeviceShape, type PollSetting } from "./options.ts";

export interface CreateDeviceOptions {
  /**
   * "null", "memory", "file", the path (or file: URL) of a module whose default export is a Target, or a
   * Target object — then `module` must name the module it lives in, for the queue Workers to load.
   */
  target: string | URL | Target;
  /** The module that exports `target` when `target` is an object (e.g. import.meta.path). */
  module?: string | URL;
  /** Options for the target's prepare(): sizeBytes, logicalBlockBytes, file, … */
  targetOptions?: TargetOptions;
  /** Device id to ask for; the kernel picks one when absent. */
  devId?: number;
  /** Hardware queues, each served by its own Worker (default 1). */
  queues?: number;
  /** Tags per queue (default 128). */
  depth?: number;
  /** Largest request in bytes (default 512 KiB). */
  maxIoBytes?: number;
  /** How long each queue spins for its next request before it sleeps: µs (0: sleep at once, as ublksrv), or
   * "auto" (default): spin up to 100 µs only while requests come one at a time (QD1), backing off when it misses. */
  pollUs?: PollSetting;
  /** "none" (default), "recover" (USER_RECOVERY) or "reissue" (USER_RECOVERY + REISSUE). */
  recovery?: "none" | "recover" | "reissue";
  /** How request data moves (default "copy": the kernel copies into each tag's buffer). */
  dataMode?: "copy" | "user-copy" | "need-get-data";
  /** Zero copy (AUTO_BUF_REG, kernel ≥ 6.16). Default: where the kernel has it and the target can (the file target
   * with O_DIRECT) and dataMode is "copy"; false: never; true: required (refused otherwise). */
  zeroCopy?: boolean;
  /** Batch commands (BATCH_IO, kernel ≥ 7.0): one command for many requests. Default: where the kernel has them and
   * dataMode is not "need-get-data"; false: per-tag commands; true: required (refused otherwise). */
  batchIo?: boolean;
  /** Do not scan the new disk for partitions (NO_AUTO_PART_SCAN, kernel ≥ 7.0; refused before). */
  noPartScan?: boolean;
  /** A queue died after start. Default: print and exit the process (never serve half a device). */
  onFatal?(error: Error): void;
}

export interface BlockDevice {
  readonly devId: number;
  /** /dev/ublkbN */
  readonly path: string;
  readonly target: TargetRecord;
  readonly queues: QueueInfo[];
  /** The kernel's current view (state, daemon pid, flags). */
  info(): DevInfo;
  /**
   * Changes the size of the live device (UPDATE_SIZE, kernel ≥ 6.16), as `ublk-bun resize`: the target grows
   * its backing store first, the record is updated, then the kernel; /dev/ublkbN shows the new size at once.
   */
  resize(sizeBytes: number): Promise<void>;
  /** Stops and deletes the device, its record and the target's outside state. */
  stop(): Promise<void>;
}

/** An optional true/false option: absent, or a boolean. */
function checkOptionalSwitch(name: string, value: unknown): void {
  if (value !== undefined && typeof value !== "boolean") throw new Error(`${name}: ${JSON.stringify(value)} is not true or false`);
}

export async function createDevice(options: CreateDeviceOptions): Promise<BlockDevice> {
  const pathOf = (where: string | URL) => (where instanceof URL ? where.pathname : where);
  // The CLI's rules, before anything is created: the kernel's fields are u16/u32 and would silently wrap.
  const targetOptions = options.targetOptions ?? {};
  const { sizeBytes, logicalBlockBytes, ...shape } = parseDeviceShape({
    devId: options.devId, queues: options.queues, depth: options.depth, maxIoBytes: options.maxIoBytes, pollUs: options.pollUs,
    sizeBytes: targetOptions.sizeBytes, logicalBlockBytes: targetOptions.logicalBlockBytes,
  }, API_NAMES);
  const recovery = parseChoice("recovery", options.recovery ?? "none", ["none", "recover", "reissue"] as const);
  const dataMode = parseChoice("dataMode", options.dataMode ?? "copy", ["copy", "user-copy", "need-get-data"] as const);
  checkOptionalSwitch("zeroCopy", options.zeroCopy);
  if (options.zeroCopy === true && dataMode !== "copy") throw new Error(`zeroCopy: cannot be combined with dataMode "${dataMode}"`);
  checkOptionalSwitch("batchIo", options.batchIo);
  if (options.batchIo === true && dataMode === "need-get-data") throw new Error(`batchIo: cannot be combined with dataMode "need-get-data"`);
  let type: string;
  let target: Target;
  if (typeof options.target === "object" && !(options.target instanceof URL)) {
    if (!options.module) throw new Error("createDevice: a Target object needs `module`, the file it is exported from");
    type = canonicalType(pathOf(options.module));
    target = options.target;
    registerTarget(type, target);
  } else {
    type = canonicalType(pathOf(options.target));
    target = await loadTarget(type);
  }
  if (options.noPartScan) {
    const ctrl = Ctrl.open();
    try {
      if ((ctrl.getFeatures() & UBLK_F_NO_AUTO_PART_SCAN) === 0) throw new Error("noPartScan: this kernel's ublk_drv has no NO_AUTO_PART_SCAN (it needs Linux ≥ 7.0)");
    } finally {
      ctrl.close();
    }
  }
  const record = { ...(await target.prepare({ ...targetOptions, sizeBytes, logicalBlockBytes })), type };
  const config = {
    ...shape,
    flags: recoveryFlags(recovery !== "none", recovery === "reissue") | dataModeFlags(dataMode) |
      (options.noPartScan ? UBLK_F_NO_AUTO_PART_SCAN : 0),
    ...(options.zeroCopy === undefined ? {} : { zeroCopy: options.zeroCopy }),
    ...(options.batchIo === undefined ? {} : { batchIo: options.batchIo }),
  };
  let served;
  try {
    served = await startServing({ config, target: record }, { onFatal: options.onFatal });
  } catch (error) {
    await target.destroy?.(record);
    throw error;
  }
  const { device } = served;
  return {
    devId: device.devId,
    path: device.path,
    target: record,
    queues: device.queueInfo,
    info: () => device.refreshInfo(),
    resize: async (sizeBytes: number) => {
      await resizeDevice(device.devId, sizeBytes);
    },
    stop: () => served.stop(),
  };
}

export type { Target, TargetOptions, TargetRecord, QueueContext, QueueHandler, JsonValue } from "../targets/types.ts";
export { IO_PENDING, TARGET_USER_DATA } from "../targets/types.ts";
export {
  UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_FLUSH, UBLK_IO_OP_DISCARD, UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_FUA,
} from "../ffi/uapi/ublk_cmd.ts";
export { ErrnoError } from "../ffi/errno.ts";
export { memcpy, memset } from "../ffi/libc.ts";
export type { QueueInfo } from "./device.ts";
export type { PollSetting } from "./options.ts";
export type { DevInfo } from "./ctrl.ts";
