/**
 * How a queue hands tags to the kernel and gets requests back, picked once when the queue attaches:
 * - per tag: one FETCH_REQ per tag at start, one COMMIT_AND_FETCH_REQ per served request, whose completion is
 *   that tag's next request (and NEED_GET_DATA where the device asked for it);
 * - batch (UBLK_F_BATCH_IO, Linux ≥ 7.0): one PREP_IO_CMDS gives the kernel every tag, one multishot FETCH_IO_CMDS
 *   delivers the tags of new requests in bulk (u16 each, written into a provided buffer), and the results of a whole
 *   round go back in one COMMIT_IO_CMDS. Per-tag commands are refused on such a device (EOPNOTSUPP).
 * The queue loop (lib/queue-worker.ts) calls the transport around its target; it never asks which one it has.
 */
import { EIO, ENOBUFS, ErrnoError, errnoName } from "../ffi/errno.ts";
import { setU64 } from "../ffi/layout.ts";
import { memoryAt, mmapAnonymous, munmap } from "../ffi/libc.ts";
import { type BufferGroup, Ring } from "../ffi/ring.ts";
import { IORING_CQE_BUFFER_SHIFT, IORING_CQE_F_BUFFER, IORING_CQE_F_MORE, IORING_URING_CMD_MULTISHOT, IOSQE_BUFFER_SELECT } from "../ffi/uapi/io_uring.ts";
import {
  UBLK_BATCH_F_HAS_BUF_ADDR, UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_SUPPORT_ZERO_COPY, UBLK_F_USER_COPY, UBLK_IO_RES_ABORT,
  UBLK_IO_RES_NEED_GET_DATA, UBLK_IO_RES_OK, UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_U_IO_FETCH_IO_CMDS,
  UBLK_U_IO_FETCH_REQ, UBLK_U_IO_NEED_GET_DATA, UBLK_U_IO_PREP_IO_CMDS, ublk_batch_io, ublk_elem_header, ublksrv_io_cmd,
} from "../ffi/uapi/ublk_cmd.ts";
import type { DataMode } from "./data-mode.ts";

/** user_data high word of the transport's commands. */
export const IO_CMD_USER_DATA = 0;

export interface CommandTransport {
  /** Gives the kernel every tag but `heldTag` (-1: none); the caller submits. */
  start(heldTag: number): void;
  /** Gives the kernel the tag start() held back; the caller submits. */
  resume(tag: number): void;
  /** A served request's result (checked, its data moved): the tag goes back to the kernel with the next submit. */
  commit(tag: number, result: number): void;
  /** Before each submit: what commit() gathered becomes commands (batch: one COMMIT_IO_CMDS). */
  flush(): void;
  /** Forgets commands gathered but never flushed (the warm-up's, whose SQEs are dropped unsent). */
  dropUnflushed(): void;
  /** A completion of one of the transport's commands; returns how many requests it delivered (served through
   * `serve`). Throws when the kernel refused a command: the queue cannot go on as if a tag were merely gone. */
  onCqe(userDataLow: number, res: number, cqeFlags: number): number;
  /** Whether the kernel will hand us no more requests (the queue is being torn down) and every result we had is
   * with it: the queue may leave. */
  retired(): boolean;
  /** For the debug log: how far retirement got. */
  describe(): string;
  /** Releases the transport's memory; once the ring is closed. */
  close(): void;
}

/** What a transport needs of its queue. */
export interface TransportQueue {
  ring: Ring;
  /** /dev/ublkcN (-1 during the warm-up, whose commands are never sent). */
  charFd: number;
  qId: number;
  depth: number;
  devFlags: number;
  dataMode: DataMode;
  /** Serves the request now in tag's descriptor. */
  serve(tag: number): void;
  /** nextSqe that throws when the ring is unusable. */
  nextSqe(): number;
}

export function pickTransport(queue: TransportQueue): CommandTransport {
  return (queue.devFlags & UBLK_F_BATCH_IO) !== 0 ? batchTransport(queue) : perTagTransport(queue);
}

/** How `list` names the commands a device's queues use, from its flags. */
export function transportName(devFlags: number): string {
  return (devFlags & UBLK_F_BATCH_IO) !== 0 ? "batch commands" : "per-tag commands";
}

/** What a completed FETCH / COMMIT_AND_FETCH / NEED_GET_DATA asks of the queue. */
export const IO_CQE_SERVE = 0, IO_CQE_GET_DATA = 1, IO_CQE_RETIRE = 2, IO_CQE_FAILED = 3;

/**
 * Classifies the result of a tag's io command. Only UBLK_IO_RES_ABORT (-ENODEV: the queue is being torn down)
 * retires a tag; any other negative result means the kernel refused our command (a bug on one side or the
 * other), and the queue must not go on as if the tag were merely gone.
 */
export function classifyIoCqe(res: number): number {
  if (res === UBLK_IO_RES_OK) return IO_CQE_SERVE;
  if (res === UBLK_IO_RES_NEED_GET_DATA) return IO_CQE_GET_DATA;
  if (res === UBLK_IO_RES_ABORT) return IO_CQE_RETIRE;
  return IO_CQE_FAILED;
}

/** "queue 0 tag 1: the kernel refused its io command with EBUSY (-16)". */
function refused(subject: string, command: string, res: number): ErrnoError {
  return new ErrnoError(`${subject}: ${command}`, -res, `${subject}: the kernel refused ${command} with ${errnoName(-res)} (${res})`);
}

/** One command per tag; user_data low = the tag. */
export function perTagTransport({ ring, charFd, qId, depth, dataMode, serve, nextSqe }: TransportQueue): CommandTransport {
  const sqe = ring.sqe32;
  const CMD_QID_TAG = ublksrv_io_cmd.q_id / 4, CMD_RESULT = ublksrv_io_cmd.result / 4;
  let retiredTags = 0;

  function queueIoCmd(cmdOp: number, tag: number, result: number): void {
    const base = nextSqe();
    const cmd = ring.prepUringCmd(base, charFd, cmdOp, tag, IO_CMD_USER_DATA);
    ring.setSqeAddress(base, dataMode.sqeAddress(tag));
    sqe[cmd + CMD_QID_TAG] = qId | (tag << 16);
    sqe[cmd + CMD_RESULT] = result;
    setU64(sqe, cmd * 4 + ublksrv_io_cmd.addr, dataMode.commandAddress(tag));
  }

  return {
    start(heldTag) {
      for (let tag = 0; tag < depth; tag++) if (tag !== heldTag) queueIoCmd(UBLK_U_IO_FETCH_REQ, tag, 0);
      // A held tag never reaches the kernel until resumed, so the kernel can never retire it: it counts as retired.
      if (heldTag >= 0) retiredTags = 1;
    },
    resume(tag) {
      queueIoCmd(UBLK_U_IO_FETCH_REQ, tag, 0);
      retiredTags--;
    },
    commit: (tag, result) => queueIoCmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result),
    flush() {},
    dropUnflushed() {},
    onCqe(tag, res) {
      const action = classifyIoCqe(res);
      if (action === IO_CQE_SERVE) {
        serve(tag);
        return 1;
      }
      if (action === IO_CQE_GET_DATA) queueIoCmd(UBLK_U_IO_NEED_GET_DATA, tag, 0);
      else if (action === IO_CQE_RETIRE) retiredTags++;
      else throw refused(`queue ${qId} tag ${tag}`, "its io command", res);
      return 1;
    },
    retired: () => retiredTags === depth,
    describe: () => `${retiredTags}/${depth} tags retired`,
    close() {},
  };
}

/** user_data low words of the batch commands: FETCH, COMMIT + which commit array, PREP + how many tags it gave. */
const BATCH_FETCH = 1, BATCH_COMMIT = 2, BATCH_PREP = 0x10000;
/** The provided-buffer group FETCH_IO_CMDS writes tags into; the queue's ring has no other group. */
const FETCH_BUFFER_GROUP = 0;
/** The kernel writes at most 128 tags (256 bytes) per completion, whatever the buffer's size. */
const FETCH_BUFFER_BYTES = 256;

/**
 * Batch commands. Element arrays live in memory of ours that the kernel reads during the command's issue:
 * PREP's one, and two for COMMIT that alternate — one gathers this round's results while the other may still be
 * in flight. Fewer than `depth` results are ever outstanding (each tag is committed once per request), so one
 * array of `depth` elements always has room.
 */
export function batchTransport({ ring, charFd, qId, depth, devFlags, dataMode, serve, nextSqe }: TransportQueue): CommandTransport {
  // Copy mode names each tag's buffer in its elements; with user copy or zero copy there is none to name.
  const hasBufferAddress = (devFlags & (UBLK_F_USER_COPY | UBLK_F_AUTO_BUF_REG | UBLK_F_SUPPORT_ZERO_COPY)) === 0;
  const elemBytes = ublk_elem_header.SIZE + (hasBufferAddress ? 8 : 0);
  const elemWords = elemBytes / 4;
  const headerFlags = hasBufferAddress ? UBLK_BATCH_F_HAS_BUF_ADDR : 0;
  // Zero copy: the kernel registers tag t's pages in slot t of the ring's buffer table, as in per-tag mode.
  const zeroCopy = (devFlags & UBLK_F_AUTO_BUF_REG) !== 0;
  const arrayBytes = depth * elemBytes;
  // The warm-up's commands are never sent: its arrays need not be memory the kernel can read.
  const arraysAddress = charFd < 0 ? 0 : mmapAnonymous(3 * arrayBytes);
  if (arraysAddress < 0) throw new ErrnoError(`mmap ${3 * arrayBytes} bytes of batch arrays for queue ${qId}`, -arraysAddress);
  const elements = charFd < 0 ? new Uint32Array(3 * arrayBytes / 4) : new Uint32Array(memoryAt(arraysAddress, 3 * arrayBytes));
  const PREP_ARRAY = 0; // then the commit arrays 1 and 2
  // A completion takes a whole buffer, however few tags it carries (often one), and the kernel may post one per
  // request before we read any: with a buffer per tag the FETCH never runs out (ENOBUFS ends it and costs a re-arm).
  const fetchBuffers: BufferGroup | null = charFd < 0 ? null
    : ring.registerBufferGroup(FETCH_BUFFER_GROUP, 2 ** Math.ceil(Math.log2(Math.max(2, depth))), FETCH_BUFFER_BYTES);
  const fetchedTags = fetchBuffers ? new Uint16Array(fetchBuffers.bytes.buffer, fetchBuffers.bytes.byteOffset, fetchBuffers.bytes.length / 2) : null;

  const sqe = ring.sqe32;
  const HEADER_QID_FLAGS = ublk_batch_io.q_id / 4, HEADER_NR_ELEM = ublk_batch_io.nr_elem / 4;
  /** The commit array results are gathered in (1 or 2), how many, and each array's elements in flight (0: free). */
  let gathering = 1, gathered = 0;
  const inFlight = [0, 0, 0];
  /** The tags every PREP that succeeded gave the kernel. */
  let preppedTags = 0;
  let fetchArmed = false, fetchEnded = false;
  let fetches = 0;

  /** Writes tag's element (at index `slot` of array `array`): its tag, buffer slot, result and buffer address. */
  function writeElement(array: number, slot: number, tag: number, result: number): void {
    const at = (array * arrayBytes) / 4 + slot * elemWords;
    elements[at] = tag | ((zeroCopy ? tag : 0) << 16); // tag, buf_index
    elements[at + 1] = result;
    if (hasBufferAddress) setU64(elements, at * 4 + ublk_elem_header.SIZE, dataMode.commandAddress(tag));
  }

  /** Queues a PREP or COMMIT of `count` elements of array `array`. */
  function queueBatch(cmdOp: number, array: number, count: number, userDataLow: number): void {
    const base = nextSqe();
    const cmd = ring.prepUringCmd(base, charFd, cmdOp, userDataLow, IO_CMD_USER_DATA);
    ring.setSqeAddress(base, arraysAddress + array * arrayBytes);
    sqe[cmd + HEADER_QID_FLAGS] = qId | (headerFlags << 16);
    sqe[cmd + HEADER_NR_ELEM] = count | (elemBytes << 16); // nr_elem, elem_bytes, reserved 0
  }

  function prep(tags: (tag: number) => boolean): void {
    let count = 0;
    for (let tag = 0; tag < depth; tag++) if (tags(tag)) writeElement(PREP_ARRAY, count++, tag, 0);
    queueBatch(UBLK_U_IO_PREP_IO_CMDS, PREP_ARRAY, count, BATCH_PREP + count);
  }

  /** Arms the multishot FETCH: the kernel then writes new requests' tags into the group's buffers, one CQE each. */
  function armFetch(): void {
    const base = nextSqe();
    const cmd = ring.prepUringCmd(base, charFd, UBLK_U_IO_FETCH_IO_CMDS, BATCH_FETCH, IO_CMD_USER_DATA);
    ring.setSqeFlags(base, IOSQE_BUFFER_SELECT);
    ring.setOpFlags(base, IORING_URING_CMD_MULTISHOT);
    ring.setBufferGroup(base, FETCH_BUFFER_GROUP);
    sqe[cmd + HEADER_QID_FLAGS] = qId; // flags 0
    sqe[cmd + HEADER_NR_ELEM] = (FETCH_BUFFER_BYTES / 2) | (2 << 16); // elem_bytes 2: u16 tags
    fetchArmed = true;
    fetches++;
  }

  function onFetchCqe(res: number, cqeFlags: number): number {
    let delivered = 0;
    if (res > 0 && (cqeFlags & IORING_CQE_F_BUFFER) !== 0) {
      const bid = cqeFlags >>> IORING_CQE_BUFFER_SHIFT;
      const first = (bid * FETCH_BUFFER_BYTES) / 2;
      delivered = res >>> 1;
      for (let i = first; i < first + delivered; i++) serve(fetchedTags![i]!);
      fetchBuffers!.recycle(bid);
    }
    if ((cqeFlags & IORING_CQE_F_MORE) !== 0) return delivered;
    fetchArmed = false;
    // Out of buffers (they are all back now) or ended with a last batch: the tags wait in the kernel; arm again.
    if (res >= 0 || res === -ENOBUFS) armFetch();
    else if (res === UBLK_IO_RES_ABORT) fetchEnded = true;
    else throw refused(`queue ${qId}`, "its FETCH_IO_CMDS", res);
    return delivered;
  }

  return {
    start(heldTag) {
      prep((tag) => tag !== heldTag);
    },
    resume(tag) {
      prep((other) => other === tag);
    },
    commit(tag, result) {
      writeElement(gathering, gathered++, tag, result);
    },
    flush() {
      // The other array must be free to gather the next round's results: if its COMMIT is still in flight, these
      // wait one more round in this one (its completion wakes the loop).
      const other = 3 - gathering;
      if (gathered === 0 || inFlight[other] !== 0) return;
      queueBatch(UBLK_U_IO_COMMIT_IO_CMDS, gathering, gathered, BATCH_COMMIT + gathering);
      inFlight[gathering] = gathered;
      gathering = other;
      gathered = 0;
    },
    dropUnflushed() {
      gathered = 0;
    },
    onCqe(userDataLow, res, cqeFlags) {
      if (userDataLow === BATCH_FETCH) return onFetchCqe(res, cqeFlags);
      if (userDataLow >= BATCH_PREP) {
        // PREP is all or nothing; the queue's FETCH may be armed only once every tag is prepped (before that the
        // kernel answers it ENODEV), so a PREP of fewer (a held tag) arms nothing until resume()'s.
        if (res !== 0) throw refused(`queue ${qId}`, `its PREP_IO_CMDS of ${userDataLow - BATCH_PREP} tags`, res);
        preppedTags += userDataLow - BATCH_PREP;
        if (preppedTags === depth && !fetchArmed) armFetch();
        return 0;
      }
      const array = userDataLow - BATCH_COMMIT;
      const count = inFlight[array]!;
      inFlight[array] = 0;
      // The kernel stops at the first element it refuses and answers the bytes it took, or -errno for none.
      if (res === UBLK_IO_RES_ABORT) fetchEnded = true;
      else if (res !== count * elemBytes) {
        const tag = elements[(array * arrayBytes) / 4 + (res > 0 ? res / elemBytes : 0) * elemWords]! & 0xffff;
        // A partial commit (res > 0) failed on the element after the last it took: reported as EIO.
        throw refused(`queue ${qId}`, `its COMMIT_IO_CMDS of ${count} results (at tag ${tag})`, res < 0 ? res : -EIO);
      }
      return 0;
    },
    // The FETCH ends (ABORT) while we may still hold requests it delivered: the queue leaves only once their results
    // are committed, or the kernel would requeue or fail them (as after a crash) — on QUIESCE_DEV's hand-over too.
    retired: () => fetchEnded && gathered === 0 && inFlight[1] === 0 && inFlight[2] === 0,
    describe: () => `FETCH_IO_CMDS armed ${fetches} times${fetchEnded ? ", ended" : ""}`,
    close() {
      // PREP and COMMIT are read while they are issued, so nothing the kernel could still read is unmapped. The
      // FETCH buffers stay (Ring.registerBufferGroup).
      if (arraysAddress > 0) munmap(arraysAddress, 3 * arrayBytes);
    },
  };
}
