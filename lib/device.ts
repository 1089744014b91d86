/**
 * One ublk device served by this process: ADD_DEV, /dev/ublkcN, one Worker per queue, SET_PARAMS and
 * START_DEV — in that order, START_DEV only once every queue has FETCHed every tag, because START_DEV
 * scans partitions synchronously and that I/O must already be served from the queue threads.
 * `stop()` undoes it all. The daemon, the CLI's --foreground mode and the embedding API all use this class.
 */
import { close, eventfd, getpid, O_RDWR, open } from "../ffi/libc.ts";
import { EBUSY, ErrnoError } from "../ffi/errno.ts";
import {
  UBLK_F_NEED_GET_DATA, UBLK_F_USER_COPY, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_REISSUE,
} from "../ffi/uapi/ublk_cmd.ts";
import { Ctrl, cpusOf, type DeviceParams, type DevInfo } from "./ctrl.ts";
import type { QueueReply, QueueStart } from "./queue-worker.ts";
import { wakeQueueForStop } from "./queue-worker.ts";
import type { TargetRecord } from "../targets/types.ts";

export const DEFAULT_QUEUE_DEPTH = 128;

/** Step-by-step log on stderr when UBLK_BUN_DEBUG is set (the daemon's stderr is its log file). */
export function debug(message: string): void {
  if (process.env.UBLK_BUN_DEBUG) console.error(`${new Date().toISOString()} ublk-bun[${process.pid}]: ${message}`);
}
export const DEFAULT_NR_HW_QUEUES = 1;
export const DEFAULT_MAX_IO_BUF_BYTES = 512 * 1024;

/** How the device talks to the kernel; a JSON-safe part of the device record. */
export interface DeviceConfig {
  /** -1: the kernel picks. */
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  /** UBLK_F_* asked for (USER_RECOVERY, REISSUE, USER_COPY, NEED_GET_DATA …). */
  flags: number;
}

/** Where a queue runs: reported by its Worker, shown by `list`. */
export interface QueueInfo {
  qId: number;
  tid: number;
  cpus: number[];
}

export interface DeviceEvents {
  /** A queue Worker died or threw after start. Default: print it and exit the process (the kernel then
   * quiesces a recoverable device, and `recover` can take over); never keep serving half a device. */
  onFatal?(error: Error): void;
  /** Called with the device id as soon as ADD_DEV succeeded (the daemon reports it so a failed start can be cleaned up). */
  onAdded?(devId: number): void;
}

interface QueueWorker {
  worker: Worker;
  info: QueueInfo;
  stopFd: number;
  exited: Promise<void>;
}

export class Device {
  private stopping: Promise<void> | undefined;

  private constructor(
    private readonly ctrl: Ctrl,
    readonly info: DevInfo,
    readonly config: DeviceConfig,
    readonly target: TargetRecord,
    private readonly charFd: number,
    private readonly queues: QueueWorker[],
  ) {}

  get devId(): number {
    return this.info.devId;
  }
  /** The block device path, /dev/ublkbN. */
  get path(): string {
    return `/dev/ublkb${this.info.devId}`;
  }
  get queueInfo(): QueueInfo[] {
    return this.queues.map((queue) => queue.info);
  }

  /** Creates, serves and starts a device. On any failure everything created so far is removed again. */
  static async create(config: DeviceConfig, target: TargetRecord, events: DeviceEvents = {}): Promise<Device> {
    const ctrl = Ctrl.open();
    let info: DevInfo;
    try {
      info = ctrl.addDev({ devId: config.devId, nrHwQueues: config.nrHwQueues, queueDepth: config.queueDepth,
        maxIoBufBytes: config.maxIoBufBytes, flags: config.flags });
    } catch (error) {
      ctrl.close();
      throw error;
    }
    events.onAdded?.(info.devId);
    let charFd = -1;
    let queues: QueueWorker[] = [];
    try {
      charFd = await openCharDevice(info.devId);
      queues = await startQueues(ctrl, info, target, charFd, false, events);
      ctrl.setParams(info.devId, paramsOf(target, info));
      ctrl.startDev(info.devId, getpid());
      const started = ctrl.getDevInfo(info.devId);
      return new Device(ctrl, started, { ...config, devId: info.devId }, target, charFd, queues);
    } catch (error) {
      await stopQueues(queues);
      if (charFd >= 0) close(charFd);
      try { ctrl.delDev(info.devId, { timeoutMs: 10_000 }); } catch { /* reported below: the first error matters */ }
      ctrl.close();
      throw error;
    }
  }

  /** STOP_DEV, let every queue drain and exit, release /dev/ublkcN, DEL_DEV. Safe to call twice. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      debug(`device ${this.info.devId}: STOP_DEV`);
      try {
        this.ctrl.stopDev(this.info.devId);
      } catch (error) {
        console.error(`ublk-bun: ${(error as Error).message}`);
      }
      debug(`device ${this.info.devId}: stopping queues`);
      await stopQueues(this.queues, 5_000);
      close(this.charFd);
      debug(`device ${this.info.devId}: DEL_DEV`);
      try {
        this.ctrl.delDev(this.info.devId);
        debug(`device ${this.info.devId}: deleted`);
      } finally {
        this.ctrl.close();
      }
    })();
    return this.stopping;
  }

  /** The kernel's current view of the device. */
  refreshInfo(): DevInfo {
    return this.ctrl.getDevInfo(this.info.devId);
  }
}

/** ublk params for a target record: sizes and block sizes from the target, request size from the device. */
export function paramsOf(target: TargetRecord, info: Pick<DevInfo, "maxIoBufBytes">): DeviceParams {
  const params: DeviceParams = {
    basic: {
      attrs: target.attrs,
      logicalBsShift: target.logicalBlockShift,
      physicalBsShift: target.physicalBlockShift,
      ioOptShift: target.physicalBlockShift,
      ioMinShift: target.logicalBlockShift,
      maxSectors: Math.floor(info.maxIoBufBytes / 512),
      chunkSectors: 0,
      devSectors: Math.floor(target.sizeBytes / 512),
      virtBoundaryMask: 0,
    },
  };
  if (target.discard) {
    params.discard = {
      discardAlignment: 0,
      discardGranularity: target.discard.granularityBytes,
      maxDiscardSectors: target.discard.maxSectors,
      maxWriteZeroesSectors: target.discard.maxWriteZeroesSectors,
      maxDiscardSegments: 1,
    };
  }
  return params;
}

/** Opens /dev/ublkcN, retrying EBUSY: a dead server's descriptor is released asynchronously by the kernel. */
export async function openCharDevice(devId: number, timeoutMs = 10_000): Promise<number> {
  const path = `/dev/ublkc${devId}`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const fd = open(path, O_RDWR);
    if (fd >= 0) return fd;
    if (-fd !== EBUSY || Date.now() > deadline) throw new ErrnoError(`open ${path}`, -fd);
    await Bun.sleep(50);
  }
}

/** Starts one Worker per queue and resolves once every queue has FETCHed every tag. */
export async function startQueues(ctrl: Ctrl, info: DevInfo, target: TargetRecord, charFd: number, recovering: boolean,
                                  events: DeviceEvents): Promise<QueueWorker[]> {
  const queues: QueueWorker[] = [];
  const ready: Promise<void>[] = [];
  let started = false;
  const fatal = (error: Error) => {
    if (!started) return; // before start, the failure rejects create()/recover() instead
    if (events.onFatal) events.onFatal(error);
    else {
      console.error(`ublk-bun: device ${info.devId}: ${error.message}; exiting so the kernel can quiesce the device`);
      process.exit(1);
    }
  };
  for (let qId = 0; qId < info.nrHwQueues; qId++) {
    let cpuMask: number[] = [];
    try { cpuMask = [...ctrl.getQueueAffinity(info.devId, qId)]; } catch { /* affinity is advice only */ }
    const stopFd = eventfd(0, 0);
    if (stopFd < 0) {
      await stopQueues(queues);
      throw new ErrnoError("eventfd", -stopFd);
    }
    const worker = new Worker(new URL("./queue-worker.ts", import.meta.url).href);
    const queue: QueueWorker = { worker, info: { qId, tid: 0, cpus: cpusOf(Uint8Array.from(cpuMask)) }, stopFd, exited: Promise.resolve() };
    let exitedResolve!: () => void;
    queue.exited = new Promise<void>((resolve) => { exitedResolve = resolve; });
    ready.push(new Promise<void>((resolve, reject) => {
      worker.onmessage = (event: MessageEvent<QueueReply>) => {
        const reply = event.data;
        if (reply.type === "fetched") {
          queue.info.tid = reply.tid;
          resolve();
        } else if (reply.type === "exited") {
          exitedResolve();
        }
      };
      worker.onerror = (event: ErrorEvent) => {
        const error = new Error(`queue ${qId}: ${event.message}`);
        exitedResolve();
        reject(error);
        fatal(error);
      };
      worker.addEventListener("close", () => {
        exitedResolve();
        reject(new Error(`queue ${qId}: worker ended before it was ready`));
      });
    }));
    const start: QueueStart = { devId: info.devId, qId, queueDepth: info.queueDepth, maxIoBufBytes: info.maxIoBufBytes,
      charFd, devFlags: info.flags, target, cpuMask, recovering, stopFd };
    worker.postMessage(start);
    queues.push(queue);
  }
  try {
    await Promise.all(ready);
  } catch (error) {
    await stopQueues(queues);
    throw error;
  }
  started = true;
  return queues;
}

/** Wakes every queue out of its loop (if STOP_DEV has not already retired it) and ends the Workers. */
export async function stopQueues(queues: QueueWorker[], graceMs = 0): Promise<void> {
  if (graceMs > 0) {
    // After STOP_DEV the kernel retires every tag with -ENODEV and the queues exit by themselves.
    await Promise.race([Promise.all(queues.map((queue) => queue.exited)), Bun.sleep(graceMs)]);
  }
  for (const queue of queues) wakeQueueForStop(queue.stopFd);
  await Promise.race([Promise.all(queues.map((queue) => queue.exited)), Bun.sleep(2_000)]);
  for (const queue of queues) {
    queue.worker.terminate();
    close(queue.stopFd); // only now: the Worker polled it until it ended
  }
  queues.length = 0;
}

/** ublksrv's -r / -i flags as UBLK_F_* bits. */
export function recoveryFlags(recovery: boolean, reissue: boolean): number {
  if (reissue) return UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
  return recovery ? UBLK_F_USER_RECOVERY : 0;
}

/** The data-copy mode flags. */
export function dataModeFlags(mode: "copy" | "user-copy" | "need-get-data"): number {
  if (mode === "user-copy") return UBLK_F_USER_COPY;
  if (mode === "need-get-data") return UBLK_F_NEED_GET_DATA;
  return 0;
}
