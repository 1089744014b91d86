/**
 * One ublk device served by this process: ADD_DEV, /dev/ublkcN, one Worker per queue, SET_PARAMS and
 * START_DEV — in that order, START_DEV only once every queue has FETCHed every tag, because START_DEV
 * scans partitions synchronously and that I/O must already be served from the queue threads.
 * `stop()` undoes it all. The daemon, the CLI's --foreground mode and the embedding API all use this class.
 */
import { close, eventfd, getpid, O_RDWR, open } from "../ffi/libc.ts";
import { EACCES, EBUSY, EINVAL, ENOENT, ErrnoError, errnoText } from "../ffi/errno.ts";
import {
  UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_S_DEV_FAIL_IO, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED, UBLK_S_NAMES, UBLK_F_NEED_GET_DATA, UBLK_F_PER_IO_DAEMON, UBLK_F_QUIESCE, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_COPY, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_REISSUE,
} from "../ffi/uapi/ublk_cmd.ts";
import { Ctrl, cpusOf, type DeviceParams, type DevInfo } from "./ctrl.ts";
import type { QueueAttach, QueueReply, QueueStart } from "./queue-worker.ts";
import { noticeQueue, QUEUE_NOTICE_DELETING, QUEUE_NOTICE_RESUME, QUEUE_NOTICE_STOP } from "./queue-stop.ts";
import { processAlive } from "./daemon-env.ts";
import { debug } from "./debug.ts";
import { newQueueWorker } from "./queue-workers.ts";
import type { PollSetting } from "./options.ts";
import { loadTarget } from "../targets/registry.ts";
import type { TargetRecord } from "../targets/types.ts";

/** How often a recovery asks again while the kernel is still tearing the dead server down (QUIESCED not yet,
 * /dev/ublkcN not yet released): the application's I/O waits meanwhile, and each ask is one cheap command. */
const RECOVERY_POLL_MS = 2;
/** How long a new queue may take to load its target and FETCH every tag (a Worker starts in 0.1–1 s under TCG). */
const QUEUE_FETCH_TIMEOUT_MS = 30_000;
/** After the stop eventfd: how long a queue may take to leave its loop. More than the queue's own wait for
 * requests its target still holds (STOP_DRAIN_MS, 2 s), so it fails them itself before it is terminated. */
const QUEUE_EXIT_TIMEOUT_MS = 5_000;

/** How the device talks to the kernel; a JSON-safe part of the device record. */
export interface DeviceConfig {
  /** -1: the kernel picks. */
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  /** UBLK_F_* asked for (USER_RECOVERY, REISSUE, USER_COPY, NEED_GET_DATA …). */
  flags: number;
  /** How long a queue thread spins for its next request before it sleeps: µs (0: sleep at once), or "auto"
   * (absent too): spin only while requests come one at a time, and back off when spinning stops paying. */
  pollUs?: PollSetting;
  /** Zero copy (AUTO_BUF_REG): absent, when the kernel has it, the target prefers it and no data mode was asked
   * for; false: never (the copy path, for comparison); true: required (the device is refused otherwise). */
  zeroCopy?: boolean;
  /** Batch commands (BATCH_IO, Linux ≥ 7.0): absent, where batchIoFlags picks them; false: per-tag commands (for
   * comparison); true: required (refused otherwise). */
  batchIo?: boolean;
}

/** What a caller of Device.recover may add to its steps. */
export interface RecoverySteps {
  /** How long to wait for the kernel to quiesce the device and release the dead server's /dev/ublkcN (60 s). */
  waitTimeoutMs?: number;
  /** Awaited once the Workers are started and before anything is asked of the device, with a promise of the
   * Workers being ready: the daemon takes the device's lock there; a standby first waits for its daemon to die.
   * May return the target record to recover with instead of the one given (a spare's may have been resized). */
  awaitTurn?: (prepared: Promise<void>) => Promise<TargetRecord | void>;
  /** Awaited once every queue has FETCHed, before END_USER_RECOVERY: until then the device stays quiesced, its I/O
   * held, and only resuming it is left to do. May return the target record as it is now: checked again. */
  awaitResume?: () => Promise<TargetRecord | void>;
  /** QueueStart.warmUpRounds for every queue (a spare has the time to compile its request path ahead). */
  warmUpRounds?: number;
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
  /** While a recovery waits for the kernel to quiesce the device: about once a second, the state it is in. */
  onWaiting?(elapsedMs: number, state: string): void;
}

interface QueueWorker {
  worker: Worker;
  info: QueueInfo;
  stopFd: number;
  exited: Promise<void>;
  /** Set once we end it ourselves; a Worker that ends without it has died. */
  stopping: boolean;
  /** Set once it was given /dev/ublkcN: from then on it polls its stop eventfd. */
  attached: boolean;
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
    /** What the target keeps exclusive while we serve (Target.claim), or -1. */
    private readonly claimFd = -1,
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
    let flags = config.flags;
    try {
      // ublk_drv refuses USER_COPY and zero copy on unprivileged devices (EINVAL): they keep the copy mode.
      const dataModeChosen = (flags & (UBLK_F_USER_COPY | UBLK_F_NEED_GET_DATA | UBLK_F_UNPRIVILEGED_DEV)) !== 0;
      const features = ctrl.getFeatures();
      flags |= zeroCopyFlags(config.zeroCopy, target, dataModeChosen, features);
      flags |= batchIoFlags(config.batchIo, flags, features);
      // A target that prefers both (nbd) gets USER_COPY beside zero copy only: it copies its small requests itself.
      const userCopyWanted = target.prefersUserCopy === true && (target.prefersZeroCopy !== true || (flags & UBLK_F_AUTO_BUF_REG) !== 0);
      if (userCopyWanted && !dataModeChosen && (features & UBLK_F_USER_COPY) !== 0) flags |= UBLK_F_USER_COPY;
      // A recoverable device can also be handed to a new server without failing a request (`restart`) — but for batch
      // commands (see batchIoFlags).
      if ((flags & UBLK_F_USER_RECOVERY) !== 0 && (features & UBLK_F_QUIESCE) !== 0 && (flags & UBLK_F_BATCH_IO) === 0) flags |= UBLK_F_QUIESCE;
      info = ctrl.addDev({ devId: config.devId, nrHwQueues: config.nrHwQueues, queueDepth: config.queueDepth,
        maxIoBufBytes: config.maxIoBufBytes, flags });
    } catch (error) {
      ctrl.close();
      throw error;
    }
    events.onAdded?.(info.devId);
    let charFd = -1, claimFd = -1;
    let queues: QueueWorker[] = [];
    let devStarted = false;
    try {
      charFd = await openCharDevice(info.devId);
      const launched = launchQueues(ctrl, info, target, false, events, config.pollUs ?? "auto");
      queues = launched.queues;
      await launched.attach(charFd);
      claimFd = await claimFor(target);
      ctrl.setParams(info.devId, paramsOf(target, info));
      await pauseForTest("before-start-dev");
      ctrl.startDev(info.devId, getpid());
      devStarted = true;
      await launched.goLive();
      const started = ctrl.getDevInfo(info.devId);
      return new Device(ctrl, started, grantedConfig({ ...config, flags }, info), target, charFd, queues, claimFd);
    } catch (error) {
      // A started disk goes first, so that DEL_DEV does not wait behind it.
      if (devStarted) try { ctrl.stopDev(info.devId, { timeoutMs: 10_000 }); } catch { /* DEL_DEV below still tries */ }
      await stopQueues(queues);
      if (claimFd >= 0) close(claimFd);
      if (charFd >= 0) close(charFd);
      try { ctrl.delDev(info.devId, { timeoutMs: 10_000 }); } catch { /* reported below: the first error matters */ }
      ctrl.close();
      throw error;
    }
  }

  /**
   * Re-attaches a new server to a device whose server died (USER_RECOVERY): starts the queue Workers at once
   * (they load while the kernel works), waits until the kernel has quiesced the device, START_USER_RECOVERY
   * (retrying EBUSY until the dead server's /dev/ublkcN is released), checks the kernel's params against the
   * record, hands the queues /dev/ublkcN (each FETCHes every tag) and, from this thread — never a queue thread —
   * END_USER_RECOVERY with our pid (see RecoverySteps for the waits a caller can add). On failure the device stays
   * quiesced, ready for another attempt.
   */
  static async recover(config: DeviceConfig, target: TargetRecord, events: DeviceEvents = {}, steps: RecoverySteps = {}): Promise<Device> {
    const { waitTimeoutMs = 60_000, awaitTurn, awaitResume } = steps;
    const devId = config.devId;
    const ctrl = Ctrl.open();
    let charFd = -1, claimFd = -1;
    let launched: LaunchedQueues | undefined;
    try {
      let info = ctrl.getDevInfo(devId);
      const targetModule = loadTarget(target.type);
      targetModule.catch(() => { /* awaited below */ });
      // Waiting to resume, each queue holds one tag back where the kernel would otherwise serve it early
      // (QueueStart.holdLastTag): the kernels that cancel a command per io, not per queue daemon.
      const holdLastTag = awaitResume !== undefined && (ctrl.getFeatures() & UBLK_F_PER_IO_DAEMON) !== 0;
      launched = launchQueues(ctrl, info, target, true, events, config.pollUs ?? "auto",
        { warmUpRounds: steps.warmUpRounds, holdLastTag });
      let current = (await awaitTurn?.(launched.prepared)) ?? target;
      debug(`device ${devId}: our turn to recover`);
      info = ctrl.getDevInfo(devId);
      checkRecoverable(info, config);
      // Polled tightly: every millisecond here is the application's stall.
      let reportedS = 0;
      info = await waitForState(ctrl, devId, RECOVERABLE_STATES, waitTimeoutMs, "QUIESCED or FAIL_IO (the old server must have exited)",
        (elapsedMs, now) => {
          if (elapsedMs < (reportedS + 1) * 1000) return;
          reportedS = Math.floor(elapsedMs / 1000);
          events.onWaiting?.(elapsedMs, UBLK_S_NAMES[now.state] ?? String(now.state));
        }, RECOVERY_POLL_MS);
      debug(`device ${devId}: ${UBLK_S_NAMES[info.state]}`);
      // Before the kernel hears of this recovery: a backing store that is no longer the recorded one is refused
      // while the device can still be recovered later (see Target.checkRecord).
      await (await targetModule).checkRecord?.(current);
      await pauseForTest("before-start-recovery");
      await startUserRecoveryRetrying(ctrl, devId, waitTimeoutMs);
      debug(`device ${devId}: START_USER_RECOVERY done`);
      await pauseForTest("after-start-recovery");
      checkParams(ctrl.getParams(devId), current, info);
      charFd = await openCharDevice(devId, waitTimeoutMs, RECOVERY_POLL_MS);
      debug(`device ${devId}: /dev/ublkc${devId} open`);
      const queues = await launched.attach(charFd);
      debug(`device ${devId}: every queue fetched`);
      if (awaitResume) {
        const resumedWith = await awaitResume();
        if (resumedWith && resumedWith !== current) {
          checkParams(ctrl.getParams(devId), resumedWith, info);
          current = resumedWith;
        }
        // The spare may have waited long: its backing store must still be the recorded one (see above). Checked
        // before this process claims it: the check opens it as the claim does (O_EXCL on a block device).
        await (await targetModule).checkRecord?.(current);
      }
      claimFd = await claimFor(current);
      await pauseForTest("before-end-recovery");
      // The queues that held a tag back FETCH it now. END_USER_RECOVERY is sent at once, not after their replies:
      // the kernel waits for those FETCHes itself, and the replies' trip through this thread's event loop is
      // the application's stall. A queue that fails to resume is reported rather than END's timeout.
      const resumed = awaitResume ? launched.resume() : undefined;
      resumed?.catch(() => { /* awaited below */ });
      try {
        ctrl.endUserRecovery(devId, getpid(), resumed ? { timeoutMs: QUEUE_FETCH_TIMEOUT_MS } : undefined);
      } catch (error) {
        await resumed;
        throw error;
      }
      await resumed;
      debug(`device ${devId}: END_USER_RECOVERY done`);
      // A queue that died meanwhile fails this recovery; once we exit the kernel quiesces the device again.
      await launched.goLive();
      const live = ctrl.getDevInfo(devId);
      // A record written before records held the granted sizes is healed by the next record write.
      return new Device(ctrl, live, grantedConfig(config, info), current, charFd, queues, claimFd);
    } catch (error) {
      await stopQueues(launched?.queues ?? []);
      if (claimFd >= 0) close(claimFd);
      if (charFd >= 0) close(charFd);
      ctrl.close();
      throw error;
    }
  }

  /** STOP_DEV, let every queue drain and exit, release /dev/ublkcN, DEL_DEV. Safe to call twice. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      // STOP_DEV waits for every request we hold: a target waiting for a server that is gone fails them first.
      for (const queue of this.queues) if (queue.attached) noticeQueue(queue.stopFd, QUEUE_NOTICE_DELETING);
      debug(`device ${this.info.devId}: STOP_DEV`);
      try {
        this.ctrl.stopDev(this.info.devId);
      } catch (error) {
        console.error(`ublk-bun: ${(error as Error).message}`);
      }
      debug(`device ${this.info.devId}: stopping queues`);
      await stopQueues(this.queues, 5_000);
      close(this.charFd);
      if (this.claimFd >= 0) close(this.claimFd);
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

  /**
   * Lets go of the device without stopping it, for a new server to take over (`restart`). QUIESCE_DEV holds
   * new requests back and, once every queue has an idle tag, aborts the FETCHes we have pending; each queue
   * commits what it still holds, sees its tags retired and exits; /dev/ublkcN is closed. Never STOP_DEV or
   * DEL_DEV: the kernel then marks the device QUIESCED for `recover`, and the held requests go to the new
   * server. When QUIESCE_DEV fails (EBUSY: no tag fell idle within `waitMs`) we let go all the same — the
   * device is left canceling and only a new server can clear that — and throw: what this server still held
   * is then reissued (-i 1) or failed (-r 1), as after a crash.
   */
  handOver(waitMs = 10_000): Promise<void> {
    this.stopping ??= (async () => {
      // Before QUIESCE_DEV: the queues are about to end by themselves, and that is not a failure.
      for (const queue of this.queues) queue.stopping = true;
      let failure: unknown;
      try {
        this.ctrl.quiesceDev(this.info.devId, waitMs);
        debug(`device ${this.info.devId}: QUIESCE_DEV done`);
      } catch (error) {
        failure = error;
      }
      await stopQueues(this.queues, failure ? 0 : 5_000);
      close(this.charFd);
      if (this.claimFd >= 0) close(this.claimFd);
      this.ctrl.close();
      if (failure) throw failure;
    })();
    return this.stopping;
  }

  /** The kernel's current view of the device. */
  refreshInfo(): DevInfo {
    return this.ctrl.getDevInfo(this.info.devId);
  }
}

/** The target's claim for as long as we serve (Target.claim), or -1. */
async function claimFor(target: TargetRecord): Promise<number> {
  return (await (await loadTarget(target.type)).claim?.(target)) ?? -1;
}

/** ublk params for a target record: sizes and block sizes from the target, request size from the device. */
export function paramsOf(target: TargetRecord, info: Pick<DevInfo, "maxIoBufBytes" | "flags">): DeviceParams {
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
  // Zero copy: the target's O_DIRECT I/O uses the request's own pages, which must then be block aligned (a copy
  // lands in our page-aligned buffer; without this the kernel lets 4-byte aligned buffers through).
  if ((info.flags & UBLK_F_AUTO_BUF_REG) !== 0) params.dmaAlignMask = Math.max(512, 1 << target.logicalBlockShift) - 1;
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
export async function openCharDevice(devId: number, timeoutMs = 10_000, pollMs = 50): Promise<number> {
  const path = `/dev/ublkc${devId}`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const fd = open(path, O_RDWR);
    if (fd >= 0) return fd;
    // EBUSY: the old daemon's fd is still closing. EACCES/ENOENT: udev has not yet made the node of an
    // unprivileged device ours (or created it).
    const retry = -fd === EBUSY || -fd === EACCES || -fd === ENOENT;
    if (!retry || Date.now() > deadline) {
      const hint = -fd === EACCES && process.getuid?.() !== 0 ? ` as uid ${process.getuid?.()} (an unprivileged device needs the udev rule in the README to give you its nodes)` : "";
      throw new ErrnoError(`open ${path}`, -fd, `open ${path}: ${errnoText(-fd)}${hint}`);
    }
    await Bun.sleep(pollMs);
  }
}

/** A queue ended because the kernel retired all its tags (-ENODEV: the device was stopped), not by a failure. */
export class QueueRetiredError extends Error {
  constructor(qId: number) {
    super(`queue ${qId}: the kernel retired its tags (the device was stopped)`);
  }
}

/** Queue Workers started ahead of /dev/ublkcN (see launchQueues). */
export interface LaunchedQueues {
  queues: QueueWorker[];
  /** Every queue has its target loaded, its ring and buffers built and waits for /dev/ublkcN; rejects with the
   * first queue's failure. */
  prepared: Promise<void>;
  /** Hands every queue /dev/ublkcN; resolves once each has FETCHed every tag (bounded by QUEUE_FETCH_TIMEOUT_MS).
   * On failure the Workers are stopped and it rejects with the first queue's one-line reason. */
  attach(charFd: number): Promise<QueueWorker[]>;
  /** Once the kernel has the device (START_DEV or END_USER_RECOVERY done): throws the failure of a queue that
   * ended meanwhile; from then on a queue's end goes to `events.onFatal`. */
  goLive(): Promise<void>;
  /** Queues that held a tag back (QueueStart.holdLastTag) FETCH it; resolves once every queue has (bounded by
   * QUEUE_FETCH_TIMEOUT_MS), rejects with the first queue's failure. */
  resume(): Promise<void>;
}

/** Starts one Worker per queue and resolves once every queue has FETCHed every tag. */
export async function startQueues(ctrl: Ctrl, info: DevInfo, target: TargetRecord, charFd: number, recovering: boolean,
                                  events: DeviceEvents, pollUs: PollSetting): Promise<QueueWorker[]> {
  const launched = launchQueues(ctrl, info, target, recovering, events, pollUs);
  const queues = await launched.attach(charFd);
  await launched.goLive();
  return queues;
}

/**
 * Starts one Worker per queue without /dev/ublkcN: each loads its target, builds its ring and buffers and opens
 * the target's queue, then waits for `attach`. A recovering daemon does this while the kernel quiesces the
 * device, so the Workers' start-up (the longest part of a recovery) overlaps the kernel's.
 */
export function launchQueues(ctrl: Ctrl, info: DevInfo, target: TargetRecord, recovering: boolean,
                             events: DeviceEvents, pollUs: PollSetting,
                             ahead: Pick<QueueStart, "warmUpRounds" | "holdLastTag"> = {}): LaunchedQueues {
  const queues: QueueWorker[] = [];
  const ready: Promise<void>[] = [];
  const preparedEach: Promise<void>[] = [];
  const resumedEach: Promise<void>[] = [];
  let started = false;
  let live = false;
  /** A queue that ended after attach() but before goLive(): create()/recover() fail with it. */
  let earlyFailure: Error | undefined;
  const fatal = (error: Error) => {
    if (!started) return; // before start, the failure rejects create()/recover() instead
    if (!live) {
      earlyFailure ??= error;
      return;
    }
    if (events.onFatal) events.onFatal(error);
    else {
      console.error(`ublk-bun: device ${info.devId}: ${error.message}; exiting so the kernel can quiesce the device`);
      process.exit(1);
    }
  };
  let eventfdFailure: ErrnoError | undefined;
  for (let qId = 0; qId < info.nrHwQueues; qId++) {
    let cpuMask: number[] = [];
    try { cpuMask = [...ctrl.getQueueAffinity(info.devId, qId)]; } catch { /* affinity is advice only */ }
    const stopFd = eventfd(0, 0);
    if (stopFd < 0) {
      eventfdFailure = new ErrnoError("eventfd", -stopFd);
      break;
    }
    const worker = newQueueWorker();
    const cpus = cpusOf(Uint8Array.from(cpuMask));
    // The queue thread is pinned to its CPUs only when they are several: a one-CPU set is the submitter's own
    // CPU, where the thread and the application would take turns while other CPUs idle (one fio job at QD64 on
    // a 2-queue device under qemu: 2.5x fewer IOPS pinned than free).
    if (cpus.length < 2) cpuMask = [];
    const queue: QueueWorker = { worker, info: { qId, tid: 0, cpus }, stopFd, exited: Promise.resolve(), stopping: false, attached: false };
    let exitedResolve!: () => void;
    queue.exited = new Promise<void>((resolve) => { exitedResolve = resolve; });
    let failure = "";
    let retired = false;
    let preparedResolve!: () => void;
    const prepared = new Promise<void>((resolve) => { preparedResolve = resolve; });
    let resumedResolve!: () => void, resumedReject!: (error: Error) => void;
    const resumed = new Promise<void>((resolve, reject) => { resumedResolve = resolve; resumedReject = reject; });
    resumed.catch(() => { /* awaited by resume() only when a queue holds a tag back */ });
    const fetched = new Promise<void>((resolve, reject) => {
      worker.onmessage = (event: MessageEvent<QueueReply>) => {
        const reply = event.data;
        if (reply.type === "prepared") preparedResolve();
        else if (reply.type === "resumed") resumedResolve();
        else if (reply.type === "fetched") {
          debug(`queue ${qId}: fetched every tag`);
          queue.info.tid = reply.tid;
          resolve();
        } else if (reply.type === "exited") {
          retired = true;
          exitedResolve();
        } else if (reply.type === "failed") {
          failure = reply.message;
          if (started && !live) earlyFailure ??= new Error(`queue ${qId}: ${failure}`);
        }
      };
      worker.onerror = (event: ErrorEvent) => {
        const error = new Error(`queue ${qId}: ${failure || event.message}`);
        exitedResolve();
        reject(error);
        resumedReject(error);
        fatal(error);
      };
      worker.addEventListener("close", () => {
        exitedResolve();
        reject(new Error(`queue ${qId}: worker ended before it was ready`));
        resumedReject(new Error(`queue ${qId}: ${failure || "its Worker ended"} before it resumed`));
        if (queue.stopping) return;
        // Only a queue that said "exited" without a failure ended because the kernel retired its tags (the
        // device was stopped under it); any other end is this server's failure.
        fatal(retired && !failure ? new QueueRetiredError(qId) : new Error(`queue ${qId}: ${failure || "its Worker ended unexpectedly"}`));
      });
    });
    fetched.catch(() => { /* reported by attach(); a queue that fails while nobody waits yet is not unhandled */ });
    ready.push(fetched);
    preparedEach.push(Promise.race([prepared, fetched]));
    resumedEach.push(resumed);
    const start: QueueStart = { devId: info.devId, qId, queueDepth: info.queueDepth, maxIoBufBytes: info.maxIoBufBytes,
      devFlags: info.flags, target, cpuMask, recovering, stopFd, pollUs, ...ahead };
    worker.postMessage(start);
    queues.push(queue);
  }
  const preparedAll = eventfdFailure ? Promise.reject(eventfdFailure) : Promise.all(preparedEach).then(() => undefined);
  preparedAll.catch(() => { /* reported to whoever awaits it, and by attach() */ });
  return {
    queues,
    prepared: preparedAll,
    async attach(charFd: number): Promise<QueueWorker[]> {
      if (eventfdFailure) {
        await stopQueues(queues);
        throw eventfdFailure;
      }
      for (const queue of queues) {
        queue.attached = true;
        queue.worker.postMessage({ type: "attach", charFd } satisfies QueueAttach);
      }
      try {
        await withinFetchTimeout(Promise.all(ready), "fetch its tags", "its target's openQueue never returned?");
      } catch (error) {
        await stopQueues(queues);
        throw error;
      }
      started = true;
      return queues;
    },
    async resume(): Promise<void> {
      if (!ahead.holdLastTag) return;
      for (const queue of queues) noticeQueue(queue.stopFd, QUEUE_NOTICE_RESUME);
      await withinFetchTimeout(Promise.all(resumedEach), "fetch the tag it held back", "its thread is stuck?");
    },
    async goLive(): Promise<void> {
      // START_DEV blocked this thread while the kernel sent its first requests (the partition scan): let the
      // Workers' messages from that time arrive first.
      await new Promise<void>((resolve) => setTimeout(resolve, 0));
      await pauseForTest("before-live");
      if (earlyFailure) throw earlyFailure;
      live = true;
    },
  };
}

/** `done`, or a one-line failure after QUEUE_FETCH_TIMEOUT_MS naming what a queue did not do (and a guess why). */
async function withinFetchTimeout(done: Promise<unknown>, what: string, guess: string): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`a queue did not ${what} within ${QUEUE_FETCH_TIMEOUT_MS / 1000} s (${guess})`)), QUEUE_FETCH_TIMEOUT_MS);
  });
  try {
    await Promise.race([done, timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

/** Wakes every queue out of its loop (if STOP_DEV has not already retired it) and ends the Workers. */
export async function stopQueues(queues: QueueWorker[], graceMs = 0): Promise<void> {
  for (const queue of queues) queue.stopping = true;
  if (graceMs > 0) {
    // After STOP_DEV the kernel retires every tag with -ENODEV and the queues exit by themselves.
    await Promise.race([Promise.all(queues.map((queue) => queue.exited)), Bun.sleep(graceMs)]);
  }
  for (const queue of queues) {
    // A queue still waiting for /dev/ublkcN is told to leave without it; an attached one is woken in its ring.
    if (queue.attached) noticeQueue(queue.stopFd, QUEUE_NOTICE_STOP);
    else queue.worker.postMessage({ type: "attach", charFd: -1 } satisfies QueueAttach);
  }
  await Promise.race([Promise.all(queues.map((queue) => queue.exited)), Bun.sleep(QUEUE_EXIT_TIMEOUT_MS)]);
  for (const queue of queues) {
    queue.worker.terminate();
    close(queue.stopFd); // only now: the Worker polled it until it ended
  }
  queues.length = 0;
}

/**
 * The config as the kernel granted it: ADD_DEV lowers nr_hw_queues to the number of CPUs and rounds
 * max_io_buf_bytes down to whole pages, so the record must hold the kernel's values — a record of what was
 * asked would never match the device again at recovery.
 */
function grantedConfig(config: DeviceConfig, info: DevInfo): DeviceConfig {
  return { ...config, devId: info.devId, nrHwQueues: info.nrHwQueues, queueDepth: info.queueDepth, maxIoBufBytes: info.maxIoBufBytes };
}

/** Refuses devices that cannot be recovered, with the reason. Exported for tests. */
export function checkRecoverable(info: DevInfo, config: DeviceConfig): void {
  if ((info.flags & UBLK_F_USER_RECOVERY) === 0) {
    throw new Error(`device ${info.devId} was created without recovery (add it with -r 1 or -i 1); delete it with del -n ${info.devId}`);
  }
  // The kernel only ever lowers queues and request size at ADD_DEV; a record holding more is one written by an
  // older ublk-bun that recorded what it asked for, and still describes this device.
  if (info.nrHwQueues > config.nrHwQueues || info.queueDepth !== config.queueDepth || info.maxIoBufBytes > config.maxIoBufBytes) {
    throw new Error(`device ${info.devId}: the record (${config.nrHwQueues} queues × ${config.queueDepth}, requests ≤ ${config.maxIoBufBytes} B) ` +
      `does not match the kernel's (${info.nrHwQueues} × ${info.queueDepth}, ≤ ${info.maxIoBufBytes} B)`);
  }
  // A daemon killed a moment ago may still be a zombie (its parent has not reaped it) while the kernel tears it
  // down: it counts as dead here, and the wait for QUIESCED below follows.
  if (info.state === UBLK_S_DEV_LIVE && processAlive(info.ublksrvPid)) {
    throw new Error(`device ${info.devId} is LIVE with daemon pid ${info.ublksrvPid}; nothing to recover`);
  }
}

/** The kernel's params must describe the device the record describes (size, block size, request size). */
function checkParams(params: DeviceParams, target: TargetRecord, info: DevInfo): void {
  const expected = paramsOf(target, info).basic;
  const actual = params.basic;
  const same = actual.devSectors === expected.devSectors && actual.logicalBsShift === expected.logicalBsShift &&
    actual.maxSectors === expected.maxSectors;
  if (!same) {
    throw new Error(`device ${info.devId}: the record does not match the kernel's params ` +
      `(record: ${expected.devSectors} sectors of ${1 << expected.logicalBsShift} B; kernel: ${actual.devSectors} of ${1 << actual.logicalBsShift} B)`);
  }
}

/**
 * The states a device without its server waits in for START_USER_RECOVERY: QUIESCED, or FAIL_IO when it was
 * added with USER_RECOVERY_FAIL_IO (Linux ≥ 6.13 puts such a device there instead).
 */
export const RECOVERABLE_STATES: readonly number[] = [UBLK_S_DEV_QUIESCED, UBLK_S_DEV_FAIL_IO];

/** Polls GET_DEV_INFO until `state` (or one of `state`); throws after `timeoutMs` naming what was awaited. */
export async function waitForState(ctrl: Ctrl, devId: number, state: number | readonly number[], timeoutMs: number, what: string,
                                   onWait?: (elapsedMs: number, info: DevInfo) => void, pollMs = 50): Promise<DevInfo> {
  const started = Date.now();
  const wanted = typeof state === "number" ? [state] : state;
  for (;;) {
    const info = ctrl.getDevInfo(devId);
    if (wanted.includes(info.state)) return info;
    const elapsedMs = Date.now() - started;
    if (elapsedMs > timeoutMs) {
      throw new Error(`device ${devId} did not become ${what} within ${Math.round(timeoutMs / 1000)} s (state ${UBLK_S_NAMES[info.state] ?? info.state})`);
    }
    onWait?.(elapsedMs, info);
    await Bun.sleep(pollMs);
  }
}

/**
 * START_USER_RECOVERY, retrying EBUSY (the old server's char device is not released yet). EINVAL on a quiesced
 * device means an earlier recovery already started and died before any queue was ready: the kernel is still
 * waiting for queues, so we carry on without starting again.
 */
async function startUserRecoveryRetrying(ctrl: Ctrl, devId: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      ctrl.startUserRecovery(devId);
      return;
    } catch (error) {
      if (!(error instanceof ErrnoError)) throw error;
      if (error.errno === EINVAL) {
        debug(`device ${devId}: START_USER_RECOVERY said EINVAL: an earlier recovery was interrupted; resuming it`);
        return;
      }
      if (error.errno !== EBUSY || Date.now() > deadline) throw error;
      await Bun.sleep(RECOVERY_POLL_MS);
    }
  }
}

/** Test hook: UBLK_BUN_TEST_PAUSE=step:ms[,step:ms…] makes the server sleep at those steps (tests kill it there,
 * or order two processes). */
export async function pauseForTest(step: string): Promise<void> {
  for (const pause of (process.env.UBLK_BUN_TEST_PAUSE ?? "").split(",")) {
    const [pauseStep, pauseMs] = pause.split(":");
    if (pauseStep !== step) continue;
    debug(`pausing ${pauseMs} ms at ${step} (UBLK_BUN_TEST_PAUSE)`);
    await Bun.sleep(Number(pauseMs));
  }
}

/** Why `-z 1` cannot be had whatever the target; the CLI refuses these before it starts a daemon. */
export const ZERO_COPY_UNAVAILABLE = "-z 1: this kernel's ublk_drv has no AUTO_BUF_REG zero copy (it needs Linux ≥ 6.16)";
export const ZERO_COPY_WITH_DATA_MODE = "-z 1: zero copy cannot be combined with -u, --need-get-data or --unprivileged";

/** The zero-copy flag a new device gets (0 or UBLK_F_AUTO_BUF_REG); throws when `wanted` is true and it cannot. */
export function zeroCopyFlags(wanted: boolean | undefined, target: TargetRecord, dataModeChosen: boolean, features: number): number {
  if (wanted === false) return 0;
  const available = (features & UBLK_F_AUTO_BUF_REG) !== 0;
  if (wanted === true) {
    if (!available) throw new Error(ZERO_COPY_UNAVAILABLE);
    if (dataModeChosen) throw new Error(ZERO_COPY_WITH_DATA_MODE);
    if (target.prefersZeroCopy !== true) {
      throw new Error(`-z 1: target "${target.type}" cannot serve from the request's own pages${target.type === "file" ? " (only a file with O_DIRECT can)" : target.type === "nbd" ? " (only over TCP: nbd://)" : ""}`);
    }
  }
  return available && !dataModeChosen && target.prefersZeroCopy === true ? UBLK_F_AUTO_BUF_REG : 0;
}

/** Why `--batch 1` cannot be had; the CLI refuses these before it starts a daemon. */
export const BATCH_IO_UNAVAILABLE = "--batch 1: this kernel's ublk_drv has no BATCH_IO (it needs Linux ≥ 7.0)";
export const BATCH_IO_WITH_GET_DATA = "--batch 1: batch commands cannot carry NEED_GET_DATA (--need-get-data)";

/**
 * The batch flag a new device gets (0 or UBLK_F_BATCH_IO), given the flags chosen so far; throws when `wanted` is
 * true and it cannot. The kernel would silently drop NEED_GET_DATA on a batch device: such a device stays per tag.
 * By default a recoverable device stays per tag where the kernel has QUIESCE_DEV, which `restart` hands it over with:
 * on a batch device ublk_drv's QUIESCE_DEV sets the queues' force_abort and never clears it (7.3 read and run), so
 * every later request fails with EIO, after the recovery too. Asked for, such a device gets batch commands and no
 * QUIESCE (restart is then refused; kill + recover works).
 */
export function batchIoFlags(wanted: boolean | undefined, flags: number, features: number): number {
  if (wanted === false) return 0;
  const available = (features & UBLK_F_BATCH_IO) !== 0 && (flags & UBLK_F_NEED_GET_DATA) === 0;
  if (wanted === true && !available) throw new Error((features & UBLK_F_BATCH_IO) === 0 ? BATCH_IO_UNAVAILABLE : BATCH_IO_WITH_GET_DATA);
  const restartable = (flags & UBLK_F_USER_RECOVERY) !== 0 && (features & UBLK_F_QUIESCE) !== 0;
  return available && (wanted === true || !restartable) ? UBLK_F_BATCH_IO : 0;
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
