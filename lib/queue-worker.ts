/**
 * A queue Worker: owns one ublk hardware queue. It maps the queue's descriptors, gives every tag a buffer,
 * hands every tag to the kernel, then loops: wait for completions → read each request's descriptor → let the
 * target serve it → commit the result. How tags go to the kernel and come back is the command transport's
 * (lib/command-transport.ts: per-tag FETCH / COMMIT_AND_FETCH, or batch commands); all commits that are ready go
 * to the kernel in one io_uring_enter. The kernel ties a per-tag queue to the thread that FETCHed it, so every
 * command of this queue comes from here.
 *
 * Protocol with the device (lib/device.ts): it posts one QueueStart; we load the target, build the ring and
 * buffers and open the target's queue, answer "prepared", and wait for /dev/ublkcN (in QueueStart, or a later
 * QueueAttach: a recovering daemon prepares its queues while the kernel is still quiescing the device); then
 * we map the descriptors, FETCH every tag and answer "fetched" once every tag is with the kernel, then "exited" when all tags are retired (-ENODEV after STOP_DEV) or the stop eventfd fires,
 * and no request is left with the target. An exception here reaches the device as a Worker error, and the
 * daemon exits at once; a target's mistakes on one request (a throw, a bad result, a second completion) fail
 * or drop that request instead, with a log line.
 */
import {
  gettid, MAP_POPULATE, MAP_SHARED, memoryAt, mmap, mmapAnonymous, munmap, PROT_READ, read,
  prctl, PR_SET_IO_FLUSHER, schedSetaffinity, setThreadName,
} from "../ffi/libc.ts";
import { EIO, ETIME, ErrnoError } from "../ffi/errno.ts";
import { CQE_FLAGS, CQE_RES, CQE_USER_DATA_HI, CQE_USER_DATA_LO, Ring } from "../ffi/ring.ts";
import {
  IORING_SETUP_COOP_TASKRUN, IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_TASKRUN_FLAG, POLLIN,
} from "../ffi/uapi/io_uring.ts";
import {
  UBLK_F_AUTO_BUF_REG, UBLK_F_USER_COPY, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, ublkDescAreaBytes,
  ublkDescMmapOffset, ublksrv_io_desc,
} from "../ffi/uapi/ublk_cmd.ts";
import { loadTarget } from "../targets/registry.ts";
import { debug } from "./debug.ts";
import type { PollSetting } from "./options.ts";
import { readNotices } from "./queue-stop.ts";
import type { QueuePreload } from "./queue-workers.ts";
import { PollPolicy } from "./poll-policy.ts";
import { type DataMode, pickDataMode, readRequest, type TagBuffers, writeRequest } from "./data-mode.ts";
import { type CommandTransport, IO_CMD_USER_DATA, pickTransport, type TransportQueue } from "./command-transport.ts";
import { IO_PENDING, TARGET_USER_DATA, type QueueContext, type QueueHandler, type TargetRecord } from "../targets/types.ts";

/** The message that starts a queue Worker. JSON-safe. */
export interface QueueStart {
  devId: number;
  qId: number;
  queueDepth: number;
  maxIoBufBytes: number;
  /** /dev/ublkcN, opened once by the device (a second open() is refused); fds are shared by all threads.
   * Absent: it comes later in a QueueAttach, and the queue prepares everything else meanwhile. */
  charFd?: number;
  /** dev_info.flags as the kernel set them. */
  devFlags: number;
  target: TargetRecord;
  /** CPUs this queue should run on (GET_QUEUE_AFFINITY, when several), as cpu_set_t bytes; empty = leave as is. */
  cpuMask: number[];
  recovering: boolean;
  /** An eventfd the device writes lib/queue-stop.ts's notices to: the device is being deleted, or this queue must
   * leave its loop (e.g. a start that failed before START_DEV). */
  stopFd: number;
  /** DeviceConfig.pollUs: how long to spin for the next request before sleeping in the ring, or "auto". */
  pollUs: PollSetting;
  /** How many times the request path runs on stand-ins before the queue attaches (see serveUntilRetired); 1 if absent. */
  warmUpRounds?: number;
  /** A spare that re-attaches before `recover` asks: FETCH every tag but the last, which waits for
   * QUEUE_NOTICE_RESUME. On kernels that cancel per io (UBLK_F_PER_IO_DAEMON; 7.3 checked) a queue with every tag
   * FETCHed is ready and is sent new requests before END_USER_RECOVERY; one tag short, it is not, and the kernel
   * holds them as USER_RECOVERY promises until the operator's `recover`. Older kernels (6.12) hold every request
   * until END_USER_RECOVERY anyway, and there a task that dies with a queue part-FETCHed leaves commands its ring
   * can never cancel (/dev/ublkcN stays busy for good): they FETCH every tag. */
  holdLastTag?: boolean;
}

/** Hands a prepared queue /dev/ublkcN (charFd ≥ 0), or tells it to leave without attaching (-1). */
export interface QueueAttach {
  type: "attach";
  charFd: number;
}

export type QueueReply =
  | { type: "prepared"; qId: number }
  | { type: "fetched"; qId: number; tid: number }
  /** The tag held back (QueueStart.holdLastTag) is FETCHed too: the queue is ready. */
  | { type: "resumed"; qId: number }
  | { type: "exited"; qId: number; servedIos: number }
  /** Sent just before the Worker throws: the error's one-line message (the Worker's error event carries a
   * formatted stack with source lines instead). */
  | { type: "failed"; qId: number; message: string };

/** user_data high word of the stop eventfd poll (the transport's commands: IO_CMD_USER_DATA, the target's SQEs:
 * TARGET_USER_DATA). */
const STOP_USER_DATA = 2;

/** Where each tag is. A request is completed once: only a tag with the target can be committed. */
const TAG_WITH_KERNEL = 0; // FETCHed or committed: the kernel owns it until it hands us the next request
const TAG_IN_HANDLER = 1; // handleIo is running for it (it may complete() from inside)
const TAG_PENDING = 2; // handleIo returned IO_PENDING: complete() is expected
const TAG_CLOSED = 3; // the queue has gone: nothing may be committed any more

/** After a stop, how long the queue waits for requests the target still holds before it fails them with EIO. */
const STOP_DRAIN_MS = 2_000;
/** A target's misbehaviour is logged at once, then at most once per this interval (with a count), per kind. */
const COMPLAINT_INTERVAL_MS = 1_000;
/** The largest errno: a negative result below -MAX_ERRNO is not an error number. */
const MAX_ERRNO = 4095;

/**
 * Checks a target's result before it goes to the kernel: READ / WRITE give 0 < bytes ≤ the request's bytes or
 * -errno; every other op 0 or -errno. Anything else (0 bytes for a write — which the kernel would requeue
 * forever —, NaN, undefined, a fraction) is not a result. Exported for tests.
 */
export function isValidResult(op: number, requestBytes: number, result: number): boolean {
  if ((result | 0) !== result) return false; // NaN, undefined, fractions, beyond 32 bits
  if (result < 0) return result >= -MAX_ERRNO;
  return op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE ? result > 0 && result <= requestBytes : result === 0;
}

/** A log for one kind of target misbehaviour: the first line at once, then one a second at most, with a count. */
function complaintLog(): (line: string) => void {
  let quietUntilMs = 0, suppressed = 0;
  return (line) => {
    const nowMs = performance.now();
    if (nowMs < quietUntilMs) {
      suppressed++;
      return;
    }
    console.error(suppressed > 0 ? `${line} (and ${suppressed} more like it)` : line);
    suppressed = 0;
    quietUntilMs = nowMs + COMPLAINT_INTERVAL_MS;
  };
}

const OP_NAMES = ["READ", "WRITE", "FLUSH", "DISCARD", "WRITE_SAME", "WRITE_ZEROES"];

/** Serves the warm-up's stand-in requests (see serveUntilRetired): done at once, nothing touched. */
const STAND_IN_HANDLER: QueueHandler = { handleIo: () => 0 };

/** What a queue holds; released on every way out of serveQueue. */
interface QueueResources {
  ring?: Ring;
  transport?: CommandTransport;
  handler?: QueueHandler;
  descAddress: number;
  descBytes: number;
  bufferAddress: number;
  bufferBytes: number;
  /** Requests failed at stop while the target still held them: their buffers stay mapped (a late write by the
   * target must not touch unmapped memory) until the process exits. */
  abandonedRequests: number;
  /** Each tag's TAG_* state: closed on the way out, so a late complete() never reaches the closed ring. */
  tagState?: Uint8Array;
}

/** Serves one queue until it is retired. Exported for tests; a Worker calls it from onmessage. */
export async function serveQueue(start: QueueStart, reply: (message: QueueReply) => void, attached: Promise<number>): Promise<void> {
  const held: QueueResources = { descAddress: -1, descBytes: 0, bufferAddress: -1, bufferBytes: 0, abandonedRequests: 0 };
  let servedIos: number;
  try {
    servedIos = await serveUntilRetired(start, reply, held, attached);
  } finally {
    if (held.tagState) {
      for (const state of held.tagState) if (state === TAG_PENDING) held.abandonedRequests++; // left by an exception
      held.tagState.fill(TAG_CLOSED);
    }
    if (held.abandonedRequests > 0) {
      debug(`queue ${start.qId}: ${held.abandonedRequests} requests abandoned; their buffers stay mapped until exit`);
    }
    try {
      held.handler?.close?.();
    } catch (error) {
      console.error(`ublk-bun: queue ${start.qId}: the target's close() threw: ${(error as Error).message}`);
    }
    held.ring?.close(); // cancels any FETCH still with the kernel (when stopped before START_DEV)
    held.transport?.close();
    if (held.descAddress >= 0) munmap(held.descAddress, held.descBytes);
    if (held.bufferAddress >= 0 && held.abandonedRequests === 0) munmap(held.bufferAddress, held.bufferBytes);
  }
  reply({ type: "exited", qId: start.qId, servedIos });
}

async function serveUntilRetired(start: QueueStart, reply: (message: QueueReply) => void, held: QueueResources,
                                 attached: Promise<number>): Promise<number> {
  const { qId, queueDepth: depth, maxIoBufBytes, stopFd } = start;
  /** /dev/ublkcN: set once the queue is attached, before the first command. */
  let charFd = -1;
  // This thread serves writeback: without IO_FLUSHER its own allocations could wait on the very I/O it must
  // complete. The flag is per thread, so every queue thread sets it (needs CAP_SYS_RESOURCE; best effort).
  prctl(PR_SET_IO_FLUSHER, 1);
  setThreadName(`ublk${start.devId}q${qId}`); // so `ps -T`, top and the bench's CPU split tell queue threads apart
  if (start.cpuMask.length > 0) schedSetaffinity(0, Uint8Array.from(start.cpuMask)); // best effort

  const userCopy = (start.devFlags & UBLK_F_USER_COPY) !== 0;
  const target = await loadTarget(start.target.type);
  // Private to this thread: when the server is killed, the kernel cancels the queue's commands (and quiesces the
  // device) as this thread exits, not after the whole process is torn down.
  const ring = held.ring = Ring.create({
    entries: depth * 2,
    flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
    privateToThread: true,
  });
  // Zero copy: the kernel registers each request's pages in this ring's buffer table, at slot = tag.
  const zeroCopy = (start.devFlags & UBLK_F_AUTO_BUF_REG) !== 0;
  if (zeroCopy) {
    const registered = ring.registerSparseBuffers(depth);
    if (registered < 0) throw new ErrnoError(`io_uring_register (a buffer table of ${depth}) on queue ${qId}`, -registered);
  }
  // With TASKRUN_FLAG the kernel flags a request waiting for us in shared memory, so polling needs no system call.
  const seesTaskWork = (ring.flags & IORING_SETUP_TASKRUN_FLAG) !== 0;
  /** The queue's descriptors, 24 bytes = 6 words each; read-only for us, written by the kernel before it completes
   * a FETCH. Mapped once the queue is attached. */
  let iod = new Uint32Array(0);
  const IOD_WORDS = ublksrv_io_desc.SIZE / 4;
  const IOD_OP_FLAGS = ublksrv_io_desc.op_flags / 4, IOD_NR_SECTORS = ublksrv_io_desc.nr_sectors / 4;
  const IOD_START_LO = ublksrv_io_desc.start_sector / 4, IOD_START_HI = IOD_START_LO + 1;

  const bufferBytes = depth * maxIoBufBytes;
  const bufferAddress = mmapAnonymous(bufferBytes);
  if (bufferAddress < 0) throw new ErrnoError(`mmap ${bufferBytes} bytes of I/O buffers`, -bufferAddress);
  held.bufferAddress = bufferAddress;
  held.bufferBytes = bufferBytes;

  const cqe = ring.cqe32;
  const TWO_POW_32 = 4294967296;
  /** Op and size of the request each tag holds: to check the target's result, and for USER_COPY's copy-out. */
  const tagOp = new Uint8Array(depth);
  const tagBytes = new Uint32Array(depth);
  const tagState = held.tagState = new Uint8Array(depth); // TAG_*; all start with the kernel (FETCHed below)

  function nextSqe(): number {
    const base = ring.nextSqe();
    if (base < 0) throw new ErrnoError(`io_uring_enter (SQ full) on queue ${qId}`, -base);
    return base;
  }

  /** Tag t's buffer: at bufferAddress + t * tagStrideBytes; a stride of 0 when the target ignores the data and all
   * tags share one. */
  const buffers: TagBuffers = { bufferAddress, tagStrideBytes: maxIoBufBytes };
  /** How the requests' data moves (lib/data-mode.ts) and how tags go to the kernel and back (lib/command-transport.ts):
   * picked once the queue is attached, before its first command. */
  let dataMode!: DataMode;
  let transport!: CommandTransport;

  const targetName = `target "${start.target.type}"`;
  const complainResult = complaintLog(), complainThrow = complaintLog(), complainRefused = complaintLog();

  /** The target's result for `tag`'s request: checked, then committed (with a read's data, as the data mode moves it).
   * The tag goes back to the kernel. */
  function finish(tag: number, result: number): void {
    tagState[tag] = TAG_WITH_KERNEL;
    if (!isValidResult(tagOp[tag]!, tagBytes[tag]!, result)) {
      complainResult(`ublk-bun: queue ${qId} tag ${tag}: ${targetName} returned ${String(result)} for a ` +
        `${OP_NAMES[tagOp[tag]!] ?? `op ${tagOp[tag]}`} of ${tagBytes[tag]} bytes; failing the request with EIO`);
      result = -EIO;
    }
    transport.commit(tag, dataMode.afterTarget(tag, tagOp[tag]!, result));
  }

  /** A completion that has no request to complete: logged, never committed (it would answer whatever request
   * the kernel has since put in this tag). */
  function refuse(tag: number, result: number, why: string): void {
    complainRefused(`ublk-bun: queue ${qId} tag ${String(tag)}: ${targetName} completed a request ${why} ` +
      `(result ${String(result)}); ignored`);
  }

  let pendingAsync = 0;
  let servedIos = 0;
  const context: QueueContext = {
    devId: start.devId, qId, queueDepth: depth, maxIoBufBytes, bufferAddress,
    buffers: new Uint8Array(memoryAt(bufferAddress, bufferBytes)), ring, recovering: start.recovering, userCopy, zeroCopy, getSqe: nextSqe,
    readRequest: (tag, address, lengthBytes, byteOffset) => readRequest(charFd, qId, tag, address, lengthBytes, byteOffset),
    writeRequest: (tag, address, lengthBytes, byteOffset) => writeRequest(charFd, qId, tag, address, lengthBytes, byteOffset),
    complete(tag, result) {
      const state = tagState[tag]; // undefined for a tag out of range
      if (state === TAG_PENDING) {
        pendingAsync--;
        finish(tag, result);
      } else if (state === TAG_IN_HANDLER) finish(tag, result); // from inside handleIo, which then returns IO_PENDING
      else refuse(tag, result, state === TAG_CLOSED ? "after its queue stopped" : state === undefined ? "for no such tag" : "that was already completed");
    },
  };
  const targetHandler: QueueHandler = held.handler = await target.openQueue(start.target, context);
  /** Who serves requests: a stand-in during the warm-up below, then the target. */
  let handler = STAND_IN_HANDLER;
  const usesEventLoop = targetHandler.needsEventLoop === true;
  // With USER_COPY the kernel then copies nothing either: reads leave the reader's buffer as it was.
  if (targetHandler.ignoresData === true) buffers.tagStrideBytes = 0;

  /** Serves the request now in `tag`'s descriptor. */
  function serveRequest(tag: number): void {
    const at = tag * IOD_WORDS;
    const opFlags = iod[at + IOD_OP_FLAGS]!;
    const op = opFlags & 0xff;
    const nrSectors = iod[at + IOD_NR_SECTORS]!;
    const startSector = iod[at + IOD_START_LO]! + iod[at + IOD_START_HI]! * TWO_POW_32;
    tagOp[tag] = op;
    tagBytes[tag] = nrSectors * 512;
    tagState[tag] = TAG_IN_HANDLER;
    servedIos++;
    let result: number;
    try {
      result = runTarget(tag, op, opFlags, startSector, nrSectors);
    } catch (error) {
      // One request's failure, not the daemon's: it fails with EIO (a throw on every request would otherwise
      // crash-loop an auto-recovering daemon).
      complainThrow(`ublk-bun: queue ${qId} tag ${tag}: ${targetName} threw on a ${OP_NAMES[op] ?? `op ${op}`} at sector ` +
        `${startSector}: ${(error as Error)?.message ?? String(error)}; failing the request with EIO`);
      result = -EIO;
    }
    if (tagState[tag] !== TAG_IN_HANDLER) {
      // handleIo called complete() itself: the request is done, and only IO_PENDING may follow.
      if (result !== IO_PENDING) refuse(tag, result, "that it had already completed with complete()");
    } else if (result === IO_PENDING) {
      tagState[tag] = TAG_PENDING;
      pendingAsync++;
    } else finish(tag, result);
  }

  /** The target's part of a request (after a write's data is brought in, as the data mode does); returns its result. */
  function runTarget(tag: number, op: number, opFlags: number, startSector: number, nrSectors: number): number {
    const dataResult = dataMode.beforeTarget(tag, op, startSector, nrSectors);
    return dataResult !== 0 ? dataResult : handler.handleIo(tag, op, opFlags & ~0xff, startSector, nrSectors);
  }

  // The request path runs first for a whole batch at once: the FETCHes at attach, then — after a recovery — every
  // request the dead server held, together. Under emulation the first, uncompiled run of the FETCHes took 14–100
  // ms of a recovery's stall (2–33 ms once warmed), and a first batch of 64 reads 10–90 ms (1–3 ms once compiled).
  // So it runs here first, on stand-ins: each tag's descriptor a flush, served by a target that answers 0 and
  // committed into SQEs that are dropped unsent, with a data mode that names no descriptor yet. Once for a queue
  // started on the application's path; a spare, which has the time, runs it until it is compiled.
  const transportQueue = (attachedFd: number): TransportQueue =>
    ({ ring, charFd: attachedFd, qId, depth, devFlags: start.devFlags, dataMode, serve: serveRequest, nextSqe });
  dataMode = pickDataMode(start.devFlags, -1, qId, depth, buffers, targetHandler);
  transport = pickTransport(transportQueue(-1));
  iod = new Uint32Array(depth * IOD_WORDS);
  for (let tag = 0; tag < depth; tag++) iod[tag * IOD_WORDS + IOD_OP_FLAGS] = UBLK_IO_OP_FLUSH;
  for (let round = 0; round < (start.warmUpRounds ?? 1); round++) {
    const unsent = ring.sqeMark();
    for (let tag = 0; tag < Math.min(depth, ring.sqSpace()); tag++) serveRequest(tag);
    transport.dropUnflushed();
    ring.dropSqesSince(unsent);
  }
  handler = targetHandler;
  servedIos = 0;
  reply({ type: "prepared", qId });
  charFd = start.charFd ?? await attached;
  if (charFd < 0) return 0; // stopped before it was attached: nothing was served
  dataMode = pickDataMode(start.devFlags, charFd, qId, depth, buffers, targetHandler);
  transport = held.transport = pickTransport(transportQueue(charFd));
  debug(`queue ${qId}: attached`);
  const descBytes = ublkDescAreaBytes(depth);
  const descAddress = mmap(descBytes, PROT_READ, MAP_SHARED | MAP_POPULATE, charFd, ublkDescMmapOffset(qId));
  if (descAddress < 0) throw new ErrnoError(`mmap descriptors of queue ${qId}`, -descAddress);
  held.descAddress = descAddress;
  held.descBytes = descBytes;
  iod = new Uint32Array(memoryAt(descAddress, descBytes));

  /** The tag a spare holds back until it is asked to resume (QueueStart.holdLastTag), or -1. */
  let heldTag = start.holdLastTag ? depth - 1 : -1;
  transport.start(heldTag);
  ring.prepPollAdd(nextSqe(), stopFd, POLLIN, 0, STOP_USER_DATA);
  const submitted = ring.submit();
  if (submitted < 0) throw new ErrnoError(`FETCH on queue ${qId}`, -submitted);
  reply({ type: "fetched", qId, tid: gettid() });

  let batchIos = 0; // ublk completions in the last round
  let stopRequested = false;
  const noticeCount = new BigUint64Array(1);
  // How well completions batch and spins pay: reported in the debug log.
  let enters = 0, ioCqes = 0;

  /** Spins until the kernel has work for us or `pollMs` passes; true if work came. With TASKRUN_FLAG this reads
   * shared memory only. (Yielding the CPU now and then, with sched_yield, measured no better.) */
  function spinForWork(pollMs: number): boolean {
    const deadlineMs = performance.now() + pollMs;
    for (let rounds = 1; ; rounds++) {
      if (!seesTaskWork) {
        enters++;
        ring.submit(0);
      }
      if (ring.cqReady() > 0 || ring.taskWorkPending()) return true;
      if ((rounds & 15) === 0 && performance.now() >= deadlineMs) return false;
    }
  }

  const poll = new PollPolicy(start.pollUs);

  /** Fails with EIO every request the target still holds (a stop that could wait no longer). */
  function failHeldRequests(): void {
    for (let tag = 0; tag < depth; tag++) {
      if (tagState[tag] !== TAG_PENDING) continue;
      console.error(`ublk-bun: queue ${qId} tag ${tag}: ${targetName} still holds a request ${STOP_DRAIN_MS} ms after the stop; failing it with EIO`);
      pendingAsync--;
      held.abandonedRequests++;
      finish(tag, -EIO);
    }
    transport.flush();
    ring.submit(0);
  }

  let drainDeadlineMs = 0; // once stopping while the target holds requests: until when we wait for them
  for (;;) {
    // The previous round's results become commands first: a queue leaves only with every result sent.
    transport.flush();
    if (transport.retired() || stopRequested) {
      if (pendingAsync === 0) {
        ring.submit(0); // a stop's last results (the kernel needs them back for a hand-over)
        break;
      }
      if (drainDeadlineMs === 0) drainDeadlineMs = performance.now() + STOP_DRAIN_MS;
      else if (performance.now() >= drainDeadlineMs) {
        failHeldRequests();
        break;
      }
    }
    const pollMs = poll.windowMs(batchIos, ring.taskWorkPending(), pendingAsync);
    // Sends every commit queued by the previous round and waits for at least one completion. While requests
    // wait on JS callbacks we must come back to the event loop, so the wait is bounded (1 ms).
    // Polling first enters without waiting (with DEFER_TASKRUN that still runs the kernel's pending work for
    // us), then spins: a request that comes meanwhile is served with no sleep and no wake-up.
    let entered = 0;
    if ((usesEventLoop && pendingAsync > 0) || drainDeadlineMs > 0) {
      enters++;
      entered = ring.submit(1, 1);
    } else if (pollMs === 0) {
      enters++;
      entered = ring.submit(1);
    } else {
      // With nothing to send (a round that reaped only a batch COMMIT's completion) the first enter is skipped: the
      // spin sees the kernel's pending work in shared memory, and the enter after it runs that work.
      if (ring.sqPending() > 0 || !seesTaskWork) {
        enters++;
        entered = ring.submit(0);
      }
      if (entered >= 0 && ring.cqReady() === 0) {
        poll.spun(spinForWork(pollMs));
        enters++;
        entered = ring.submit(1);
      }
    }
    if (entered < 0 && entered !== -ETIME && ring.cqReady() === 0) {
      throw new ErrnoError(`io_uring_enter on queue ${qId}`, -entered);
    }
    batchIos = 0;
    let head = ring.cqHead();
    const tail = ring.cqTail();
    while (head !== tail) {
      const at = ring.cqeBase(head);
      const res = cqe[at + CQE_RES]!;
      const userDataLow = cqe[at + CQE_USER_DATA_LO]! >>> 0;
      const kind = cqe[at + CQE_USER_DATA_HI]!;
      head = (head + 1) >>> 0;
      if (kind === IO_CMD_USER_DATA) {
        ioCqes++;
        try {
          batchIos += transport.onCqe(userDataLow, res, cqe[at + CQE_FLAGS]!);
        } catch (error) {
          ring.cqAdvanceTo(head);
          throw error;
        }
      } else if (kind === TARGET_USER_DATA) {
        handler.onTargetCqe?.(userDataLow, res);
      } else if (kind === STOP_USER_DATA) {
        const notices = res < 0 || read(stopFd, noticeCount, 8) !== 8 ? { deleting: false, resume: false, stop: true } : readNotices(Number(noticeCount[0]));
        if (notices.stop) stopRequested = true;
        else {
          if (notices.deleting) handler.onDeleting?.();
          if (notices.resume && heldTag >= 0) {
            // Sent at once, not with this round's commits: the device waits for it to END_USER_RECOVERY, and this
            // thread may sleep in the ring below until a request comes, which none will before then.
            transport.resume(heldTag);
            const resumed = ring.submit(0);
            if (resumed < 0) throw new ErrnoError(`FETCH on queue ${qId}`, -resumed);
            heldTag = -1;
            reply({ type: "resumed", qId });
          }
          ring.prepPollAdd(nextSqe(), stopFd, POLLIN, 0, STOP_USER_DATA);
        }
      }
    }
    ring.cqAdvanceTo(head);
    if (usesEventLoop && pendingAsync > 0) await new Promise<void>((resolve) => setImmediate(resolve));
  }

  debug(`queue ${qId}: leaving loop, ${transport.describe()}, stop ${stopRequested}; served ${servedIos} requests ` +
    `in ${enters} io_uring_enter calls, ${(ioCqes / Math.max(enters, 1)).toFixed(2)} ublk CQEs per enter; ` +
    `spins: ${poll.spinHits} found a request, ${poll.spinMisses} did not; ${poll.contendedChecks} back-offs for a contended CPU`);
  return servedIos;
}

declare const self: Worker;
if (typeof self !== "undefined" && !Bun.isMainThread) {
  let attach!: (charFd: number) => void;
  const attached = new Promise<number>((resolve) => { attach = resolve; });
  self.onmessage = (event: MessageEvent<QueueStart | QueueAttach | QueuePreload>) => {
    const message = event.data;
    if ("type" in message) {
      // A failed preload is reported by the start message's own loadTarget.
      if (message.type === "preload") loadTarget(message.targetType).catch(() => {});
      else attach(message.charFd);
      return;
    }
    serveQueue(message, (reply) => self.postMessage(reply), attached).catch((error: unknown) => {
      const failed: QueueReply = { type: "failed", qId: message.qId, message: (error as Error)?.message ?? String(error) };
      self.postMessage(failed);
      // Rethrown outside the promise so the Worker's "error" event fires in the device — a little later, so the
      // "failed" message is there first.
      setTimeout(() => { throw error; }, 10);
    });
  };
}
