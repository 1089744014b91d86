/**
 * One connection of an NBD queue (targets/nbd.ts): its socket on the queue's io_uring, the requests it carries
 * (the queue's tags t with t % count = index), their sends, their replies, and its reconnects.
 *
 * Sends: a stream socket carries one send at a time here (two SENDs in flight on one socket may interleave their
 * bytes when the first is partial), so requests that arrive while a SENDMSG is in flight wait in a FIFO and
 * leave together with the next one — header and a write's data in one gather, up to MAX_BATCH_REQUESTS.
 *
 * Replies (simple replies, in any order, matched by cookie = tag) are received in bulk: one RECV takes what the
 * socket holds into a staging buffer, which may be several replies with a read's data — copied to the tag's
 * buffer. Only a read whose data has not all arrived yet is received straight into its tag's buffer. At QD1 a
 * read's reply is then one RECV, and at depth one RECV carries many replies.
 *
 * Zero copy (QueueContext.zeroCopy, kernel ≥ 6.16, with USER_COPY beside it): a request's data is its own pages,
 * registered by the kernel as the ring's buffer `tag`, which only fixed-buffer SQEs reach; the queue's buffers are
 * left out. A small request's data is copied as before, but by the kernel with pread / pwrite on /dev/ublkcN
 * (QueueContext.readRequest / writeRequest): a write's at submit, a read's from the staging buffer. A read's data
 * not yet arrived (all of a large one's) is received with READ_FIXED straight into its pages, and a large write's
 * leaves them by SEND_ZC: the send is then a linked chain — SENDMSG of what comes before, SEND_ZC of the pages, and
 * so on — sent whole (MSG_WAITALL throughout) or the connection failed.
 *
 * When the connection drops it keeps its requests and reconnects on a timer on the ring (back-off from
 * RECONNECT_MIN_MS doubling to RECONNECT_MAX_MS); once connected again it sends them again (reads, writes, flush,
 * trim and write-zeroes may all be repeated). New requests wait with them. If no server is back within the
 * queue's timeout, the held requests fail with EIO and so do new ones, at once, until a later attempt connects.
 */
import { close, iovec, memcpy, memoryAt, mmapAnonymous, msghdr, MSG_MORE, MSG_NOSIGNAL, MSG_WAITALL, PAGE_BYTES, SHUT_RDWR, shutdown } from "../ffi/libc.ts";
import { EIO } from "../ffi/errno.ts";
import { setU64 } from "../ffi/layout.ts";
import type { Ring } from "../ffi/ring.ts";
import { __kernel_timespec, IOSQE_IO_LINK } from "../ffi/uapi/io_uring.ts";
import { NBD_CMD_READ, NBD_CMD_WRITE, NBD_SIMPLE_REPLY_MAGIC, nbd_request, nbd_simple_reply, replyResult, sendDisconnect } from "./nbd-protocol.ts";
import { TARGET_USER_DATA } from "./types.ts";

/** Connections per queue at most: their index takes 4 bits of the SQEs' user_data. */
export const MAX_CONNECTIONS = 16;
/** Requests one SENDMSG carries at most: two iovecs each, within IOV_MAX (1024). */
const MAX_BATCH_REQUESTS = 256;
/** Zero copy: large writes one chain carries at most (two SQEs each, and the chain must fit the SQ whole: a link
 * never spans two submissions). */
const MAX_CHAIN_WRITES = 16;
/** Zero copy: a write longer than this leaves its pages by SEND_ZC; a shorter one is copied, as SEND_ZC's page
 * references and notification cost more than the copy (measured on 7.3: 4k randwrite QD64 0.76× the copy path when
 * every write went by SEND_ZC, 128k 1.23×). */
const LARGE_WRITE_BYTES = 16 * 1024;
/** Bytes one RECV of replies takes at most; a read's data beyond is received into its tag's buffer. */
const STAGING_BYTES = 64 * 1024;
/** While a read longer than this is in flight, a RECV of replies takes one header at most: its data would
 * otherwise be copied through the staging buffer, which costs more than the RECV it saves. */
const LARGE_READ_BYTES = 16 * 1024;
/** How long one reconnect attempt may block the queue, and the back-off between attempts. */
const RECONNECT_TIMEOUT_MS = 2_000;
const RECONNECT_MIN_MS = 100;
const RECONNECT_MAX_MS = 5_000;

/** user_data low word of a connection's SQEs: the kind in bits 0–2, the connection's index in bits 3–6 and its
 * generation above, so a completion from a socket that has since dropped is recognised and ignored. */
const KIND_SEND = 1, KIND_RECV = 2, KIND_TIMER = 3, KIND_SEND_PAGES = 4;
const KIND_MASK = 7, INDEX_SHIFT = 3, GENERATION_SHIFT = 7;
const GENERATION_MASK = (1 << (32 - GENERATION_SHIFT)) - 1;
/** The connection a target CQE belongs to. */
export const connectionOf = (userDataLow: number) => (userDataLow >>> INDEX_SHIFT) & (MAX_CONNECTIONS - 1);

/** Where each tag is. */
const TAG_IDLE = 0; // not with us (or completed)
const TAG_QUEUED = 1; // waiting for the send in flight to finish, or for a connection
const TAG_SENT = 2; // handed to a SENDMSG: a reply may come any time

/** What a queue's connections share: its ring, its tags' requests (headers written by the queue), and how to connect. */
export interface NbdQueue {
  ring: Ring;
  getSqe(): number;
  complete(tag: number, result: number): void;
  depth: number;
  /** Tag t's request header (nbd_request) lives at headersAddress + t * headerStrideBytes. */
  headersAddress: number;
  headerStrideBytes: number;
  /** Tag t's data lives at bufferAddress + t * maxIoBufBytes. */
  bufferAddress: number;
  maxIoBufBytes: number;
  /** NBD_CMD_* and payload length of each tag's request. */
  tagCommand: Uint8Array;
  tagLengthBytes: Uint32Array;
  /** A connected socket in the transmission phase (blocking up to timeoutMs); throws an Error with a one-line message. */
  connect(timeoutMs?: number): number;
  /** "queue Q: ADDRESS", for log lines. */
  where: string;
  /** How long requests wait for a server that went away. */
  outageTimeoutMs: number;
  /** Zero copy: tag t's data is the ring's registered buffer t (from 0), not at bufferAddress; readRequest and
   * writeRequest copy it to and from memory (QueueContext's). */
  zeroCopy: boolean;
  readRequest(tag: number, address: number, lengthBytes: number, byteOffset: number): number;
  writeRequest(tag: number, address: number, lengthBytes: number, byteOffset: number): number;
}

export interface NbdConnection {
  /** Sends tag's request (its header written); false when the connection fails requests at once. */
  submit(tag: number): boolean;
  onCqe(userDataLow: number, result: number): void;
  /** The device is being deleted: without a server, fail what is held now rather than at the timeout. */
  onDeleting(): void;
  close(): void;
}

/**
 * Serves the tags t % count = index of `queue` on `firstFd`, a socket fresh from the handshake, or, when
 * `firstFd` is -1 (a recovering queue whose server did not answer: `unreachable` says why), waits for the server
 * as after a drop: requests are held up to the queue's timeout while it reconnects.
 */
export function openConnection(queue: NbdQueue, index: number, count: number, firstFd: number, unreachable = ""): NbdConnection {
  const { ring, depth, tagCommand, tagLengthBytes, zeroCopy } = queue;
  const where = count === 1 ? queue.where : `${queue.where} (connection ${index + 1} of ${count})`;

  // Memory the kernel reads or writes while an SQE is in flight: mmapped, so the GC never moves it. Never
  // unmapped: a send or receive of a dropped socket may still complete after close().
  // One msghdr per SENDMSG of a chain (copy mode uses the first).
  const timespecOffset = 0, msghdrOffset = 64, MSGHDR_STRIDE = 64, iovOffset = msghdrOffset + (MAX_CHAIN_WRITES + 1) * MSGHDR_STRIDE;
  const stagingOffset = iovOffset + MAX_BATCH_REQUESTS * 2 * iovec.SIZE;
  const areaBytes = Math.ceil((stagingOffset + STAGING_BYTES) / PAGE_BYTES) * PAGE_BYTES;
  const area = mmapAnonymous(areaBytes);
  if (area < 0) {
    close(firstFd);
    throw new Error(`nbd: ${where}: cannot map ${areaBytes} bytes`);
  }
  const words = new Uint32Array(memoryAt(area, stagingOffset));
  const staging = new Uint8Array(memoryAt(area + stagingOffset, STAGING_BYTES));
  const stagingAddress = area + stagingOffset, iovAddress = area + iovOffset;
  const timespecAddress = area + timespecOffset;
  const IOV_WORD = iovOffset / 4, IOV_WORDS = iovec.SIZE / 4;
  const TWO_POW_32 = 4294967296;
  const REPLY_BYTES = nbd_simple_reply.SIZE;

  /** A big-endian u32 of the staging buffer (replies need not be aligned there). */
  function stagedU32(at: number): number {
    return ((staging[at]! << 24) | (staging[at + 1]! << 16) | (staging[at + 2]! << 8) | staging[at + 3]!) >>> 0;
  }
  const dataAddress = (tag: number) => queue.bufferAddress + tag * queue.maxIoBufBytes;

  let fd = firstFd;
  const tagState = new Uint8Array(depth);
  /** Tags waiting to be sent, oldest first (a ring of `depth` slots). */
  const sendQueue = new Uint16Array(depth);
  let sendQueueHead = 0, sendQueueCount = 0;
  /** The SENDMSG in flight: its iovecs from iovFirst to iovCount, and the bytes it has still to send. */
  let sending = false, iovFirst = 0, iovCount = 0, sendRemainingBytes = 0;
  /** The send in flight as a chain of SQEs (one SENDMSG but with zero copy's large writes): how long it is, how
   * many results have still to come, and its last SQE while it is built. */
  let chainLength = 0, chainResultsDue = 0, chainLast = -1;
  /** Bytes of replies received into the staging buffer and not yet parsed (a partial reply header at most). */
  let stagedBytes = 0;
  /** Reads longer than LARGE_READ_BYTES sent and not yet answered. */
  let largeReadsInFlight = 0;
  const isLargeRead = (tag: number) => tagCommand[tag] === NBD_CMD_READ && tagLengthBytes[tag]! > LARGE_READ_BYTES;
  /** Zero copy: the writes whose pages leave by SEND_ZC. */
  const sendsPages = (tag: number) => zeroCopy && tagCommand[tag] === NBD_CMD_WRITE && tagLengthBytes[tag]! > LARGE_WRITE_BYTES;
  /** Zero copy: a copy to a request failed (it then fails with EIO once its reply is taken; cleared as it is sent). */
  const copyFailed = new Uint8Array(depth);
  /** A read whose remaining data is being received straight into its tag's buffer (-1: none), and how far. */
  let recvTag = -1, recvDoneBytes = 0;
  let connected = firstFd >= 0, generation = 0;
  /** While disconnected: requests wait until this time, then fail (and new ones fail at once: `failing`). */
  let outageDeadlineMs = 0, failing = false;
  let timerArmed = false, backoffMs = RECONNECT_MIN_MS;
  const timeoutMs = queue.outageTimeoutMs;

  const userData = (kind: number) => (((generation << GENERATION_SHIFT) | (index << INDEX_SHIFT) | kind) >>> 0);

  function postRecv(): void {
    const base = queue.getSqe();
    if (recvTag >= 0) {
      const address = recvDoneBytes, lengthBytes = tagLengthBytes[recvTag]! - recvDoneBytes;
      if (zeroCopy) ring.prepReadFixed(base, fd, recvTag, address, lengthBytes, 0, userData(KIND_RECV), TARGET_USER_DATA);
      else ring.prepRecv(base, fd, dataAddress(recvTag) + address, lengthBytes, MSG_WAITALL, userData(KIND_RECV), TARGET_USER_DATA);
    } else {
      const wantedBytes = (largeReadsInFlight > 0 ? REPLY_BYTES : STAGING_BYTES) - stagedBytes;
      ring.prepRecv(base, fd, stagingAddress + stagedBytes, wantedBytes, 0, userData(KIND_RECV), TARGET_USER_DATA);
    }
  }

  /** Sends iovecs iovFirst to iovLast on msghdr `slot`, with MSG_* `more` (0 or MSG_MORE); returns the SQE. */
  function postSendmsg(slot: number, iovLast: number, more: number): number {
    const at = msghdrOffset + slot * MSGHDR_STRIDE;
    setU64(words, at + msghdr.msg_iov, iovAddress + iovFirst * iovec.SIZE);
    setU64(words, at + msghdr.msg_iovlen, iovLast - iovFirst);
    const base = queue.getSqe();
    ring.prepSendmsg(base, fd, area + at, MSG_NOSIGNAL | MSG_WAITALL | more, userData(KIND_SEND), TARGET_USER_DATA);
    return base;
  }

  /** Takes the oldest queued request for a send: its header's iovec added (at iovCount). */
  function takeQueued(): number {
    const tag = sendQueue[sendQueueHead]!;
    sendQueueHead = sendQueueHead + 1 === depth ? 0 : sendQueueHead + 1;
    sendQueueCount--;
    tagState[tag] = TAG_SENT;
    if (isLargeRead(tag)) largeReadsInFlight++;
    addIovec(queue.headersAddress + tag * queue.headerStrideBytes, nbd_request.SIZE);
    return tag;
  }

  function addIovec(address: number, lengthBytes: number): void {
    const at = (IOV_WORD + iovCount++ * IOV_WORDS) * 4;
    setU64(words, at + iovec.iov_base, address);
    setU64(words, at + iovec.iov_len, lengthBytes);
    sendRemainingBytes += lengthBytes;
  }

  /**
   * Sends the queued requests (up to a batch) unless a send is in flight: headers and data in one SENDMSG, but with
   * zero copy a large write's pages, which leave by SEND_ZC linked after a SENDMSG of what comes before them.
   */
  function startSend(): void {
    if (sending || sendQueueCount === 0 || !connected) return;
    iovFirst = iovCount = sendRemainingBytes = chainLength = 0;
    chainLast = -1;
    let maxPageSends = 0;
    if (zeroCopy) {
      if (ring.sqSpace() < 3) ring.submit();
      maxPageSends = Math.min(MAX_CHAIN_WRITES, (ring.sqSpace() - 1) >> 1);
      if (maxPageSends < 1) return drop("the ring's submission queue stays full");
    }
    let slot = 0, pageSends = 0;
    for (let taken = 0; taken < MAX_BATCH_REQUESTS && sendQueueCount > 0; taken++) {
      if (sendsPages(sendQueue[sendQueueHead]!) && pageSends === maxPageSends) break;
      const tag = takeQueued();
      if (tagCommand[tag] !== NBD_CMD_WRITE) continue;
      const lengthBytes = tagLengthBytes[tag]!;
      if (!sendsPages(tag)) {
        addIovec(dataAddress(tag), lengthBytes);
        continue;
      }
      addToChain(postSendmsg(slot++, iovCount, MSG_MORE));
      iovFirst = iovCount;
      sendRemainingBytes += lengthBytes;
      const base = queue.getSqe();
      ring.prepSendZcFixed(base, fd, tag, 0, lengthBytes, MSG_NOSIGNAL | MSG_WAITALL | MSG_MORE, userData(KIND_SEND_PAGES), TARGET_USER_DATA);
      addToChain(base);
      pageSends++;
    }
    if (iovFirst < iovCount) addToChain(postSendmsg(slot, iovCount, 0));
    else ring.setOpFlags(chainLast, MSG_NOSIGNAL | MSG_WAITALL); // the last SEND_ZC: nothing more to wait for
    sending = true;
  }

  /** The SQE at `base` follows the chain's last one (IOSQE_IO_LINK on that). */
  function addToChain(base: number): void {
    if (chainLast >= 0) ring.setSqeFlags(chainLast, IOSQE_IO_LINK);
    chainLast = base;
    chainLength++;
    chainResultsDue++;
  }

  /** A partial send: skips the iovecs (and the part of one) already sent, and sends the rest. */
  function continueSend(sentBytes: number): void {
    for (;;) {
      const at = IOV_WORD + iovFirst * IOV_WORDS;
      const lengthBytes = words[at + iovec.iov_len / 4]!;
      if (sentBytes < lengthBytes) {
        setU64(words, at * 4 + iovec.iov_base, words[at]! + words[at + 1]! * TWO_POW_32 + sentBytes);
        setU64(words, at * 4 + iovec.iov_len, lengthBytes - sentBytes);
        break;
      }
      sentBytes -= lengthBytes;
      iovFirst++;
    }
    postSendmsg(0, iovCount, 0);
    chainResultsDue = 1;
  }

  function enqueue(tag: number): void {
    tagState[tag] = TAG_QUEUED;
    copyFailed[tag] = 0; // a new request, or one sent again after a drop, is copied afresh
    const slot = sendQueueHead + sendQueueCount;
    sendQueue[slot >= depth ? slot - depth : slot] = tag;
    sendQueueCount++;
  }

  function finish(tag: number, result: number): void {
    if (tagState[tag] === TAG_SENT && isLargeRead(tag)) largeReadsInFlight--;
    tagState[tag] = TAG_IDLE;
    queue.complete(tag, copyFailed[tag] === 1 ? -EIO : result);
  }

  /** Fails every request the connection holds with EIO; returns how many. */
  function failAll(): number {
    let failed = 0;
    sendQueueCount = 0;
    for (let tag = index; tag < depth; tag += count) {
      if (tagState[tag] === TAG_IDLE) continue;
      failed++;
      finish(tag, -EIO);
    }
    return failed;
  }

  /** Arms the reconnect timer (a TIMEOUT SQE on the ring, so a queue blocked in io_uring_enter wakes for it). */
  function armTimer(delayMs: number): void {
    const seconds = Math.floor(delayMs / 1000);
    const at = timespecOffset / 4;
    setU64(words, at * 4 + __kernel_timespec.tv_sec, seconds);
    setU64(words, at * 4 + __kernel_timespec.tv_nsec, Math.round((delayMs - seconds * 1000) * 1e6));
    ring.prepTimeout(queue.getSqe(), timespecAddress, 0, 0, (index << INDEX_SHIFT) | KIND_TIMER, TARGET_USER_DATA);
    timerArmed = true;
  }

  /** The socket is gone: its requests wait for the next one (every held request goes back in the send queue). */
  function drop(why: string): void {
    if (!connected) return;
    connected = false;
    generation = (generation + 1) & GENERATION_MASK;
    // Ends the send and receive still in flight (their completions carry the old generation and are ignored).
    shutdown(fd, SHUT_RDWR);
    close(fd);
    sending = false;
    recvTag = -1;
    recvDoneBytes = stagedBytes = largeReadsInFlight = chainResultsDue = 0;
    sendQueueHead = sendQueueCount = 0;
    let held = 0;
    for (let tag = index; tag < depth; tag += count) {
      if (tagState[tag] === TAG_IDLE) continue;
      enqueue(tag);
      held++;
    }
    awaitServer(`${why}; reconnecting, ${held} requests wait up to ${timeoutMs / 1000} s`, performance.now() + timeoutMs);
  }

  /** No socket: requests wait until `deadlineMs` (0: the timeout from the first attempt on) while the timer tries to connect. */
  function awaitServer(why: string, deadlineMs: number): void {
    console.error(`ublk-bun: nbd: ${where}: ${why}`);
    outageDeadlineMs = deadlineMs;
    failing = false;
    backoffMs = RECONNECT_MIN_MS;
    if (!timerArmed) armTimer(backoffMs);
  }

  /** The reconnect timer fired: one connection attempt (blocking this queue up to RECONNECT_TIMEOUT_MS). */
  function onTimer(): void {
    timerArmed = false;
    if (connected) return;
    if (outageDeadlineMs === 0) outageDeadlineMs = performance.now() + timeoutMs;
    try {
      fd = queue.connect(RECONNECT_TIMEOUT_MS);
    } catch (error) {
      const nowMs = performance.now();
      if (backoffMs === RECONNECT_MIN_MS) console.error(`ublk-bun: ${(error as Error).message}; retrying`);
      if (!failing && nowMs >= outageDeadlineMs) {
        failing = true;
        const failed = failAll();
        console.error(`ublk-bun: nbd: ${where}: no server for ${timeoutMs / 1000} s; ${failed} requests failed with EIO, ` +
          "new ones fail until it is back");
      }
      backoffMs = Math.min(backoffMs * 2, RECONNECT_MAX_MS);
      armTimer(failing ? backoffMs : Math.max(1, Math.min(backoffMs, outageDeadlineMs - nowMs)));
      return;
    }
    connected = true;
    failing = false;
    console.error(`ublk-bun: nbd: ${where}: connected again; sending ${sendQueueCount} waiting requests`);
    postRecv();
    startSend();
  }

  /** Bytes arrived in the staging buffer: completes every whole reply there, copying a read's data to its tag. */
  function onStaged(): void {
    let at = 0;
    while (stagedBytes - at >= REPLY_BYTES) {
      const magic = stagedU32(at + nbd_simple_reply.magic);
      const error = stagedU32(at + nbd_simple_reply.error);
      const cookieHigh = stagedU32(at + nbd_simple_reply.cookie);
      const tag = stagedU32(at + nbd_simple_reply.cookie + 4);
      if (magic !== NBD_SIMPLE_REPLY_MAGIC) return drop(`the server sent a reply with magic 0x${magic.toString(16)}`);
      if (cookieHigh !== 0 || tag >= depth || tag % count !== index || tagState[tag] !== TAG_SENT) {
        return drop(`the server replied to cookie ${tag}, which no request has`);
      }
      at += REPLY_BYTES;
      const command = tagCommand[tag]!, lengthBytes = tagLengthBytes[tag]!;
      if (command !== NBD_CMD_READ || error !== 0) {
        finish(tag, error !== 0 ? replyResult(error) : command === NBD_CMD_WRITE ? lengthBytes : 0);
        continue;
      }
      const copiedBytes = Math.min(lengthBytes, stagedBytes - at);
      if (copiedBytes > 0 && !zeroCopy) memcpy(dataAddress(tag), stagingAddress + at, copiedBytes);
      else if (copiedBytes > 0 && queue.writeRequest(tag, stagingAddress + at, copiedBytes, 0) !== copiedBytes) copyFailed[tag] = 1;
      at += copiedBytes;
      if (copiedBytes < lengthBytes) {
        // The rest of this read's data is the next thing on the stream, and the staging buffer is used up.
        recvTag = tag;
        recvDoneBytes = copiedBytes;
        stagedBytes = 0;
        return postRecv();
      }
      finish(tag, lengthBytes);
    }
    if (at > 0) {
      staging.copyWithin(0, at, stagedBytes); // a partial header waits for its rest at the start
      stagedBytes -= at;
    }
    postRecv();
  }

  if (connected) postRecv();
  // The wait starts with the first attempt, once the queue serves: a spare opened long before it takes over
  // still gives the application the whole timeout.
  else awaitServer(`${unreachable}; reconnecting once the queue serves, requests wait up to ${timeoutMs / 1000} s`, 0);

  return {
    submit(tag) {
      if (failing) return false;
      // Zero copy: a small write's data is copied in once, here; a resend after a drop finds it still there.
      if (zeroCopy && tagCommand[tag] === NBD_CMD_WRITE && !sendsPages(tag)) {
        const lengthBytes = tagLengthBytes[tag]!;
        if (queue.readRequest(tag, dataAddress(tag), lengthBytes, 0) !== lengthBytes) return false;
      }
      enqueue(tag);
      startSend();
      return true;
    },

    onCqe(userDataLow, result) {
      const kind = userDataLow & KIND_MASK;
      if (kind === KIND_TIMER) return onTimer();
      if (!connected || userDataLow >>> GENERATION_SHIFT !== generation) return; // from a socket that has dropped
      if (kind === KIND_SEND_PAGES && result === 0) return; // SEND_ZC's notification: its pages are released
      if (kind !== KIND_RECV) {
        if (result <= 0) return drop(result === 0 ? "the connection closed" : `sending failed (${-result})`);
        sendRemainingBytes -= result;
        if (--chainResultsDue > 0) return;
        if (sendRemainingBytes > 0) {
          // A lone SENDMSG goes on from where it stopped; in a longer chain a short send broke the link (the rest
          // failed), which only a failing connection does with MSG_WAITALL.
          if (chainLength === 1) return continueSend(result);
          return drop("a send ended short");
        }
        sending = false;
        startSend();
        return;
      }
      if (result <= 0) return drop(result === 0 ? "the server closed the connection" : `receiving failed (${-result})`);
      if (recvTag < 0) {
        stagedBytes += result;
        return onStaged();
      }
      const tag = recvTag;
      recvDoneBytes += result;
      if (recvDoneBytes < tagLengthBytes[tag]!) return postRecv();
      recvTag = -1;
      recvDoneBytes = 0;
      finish(tag, tagLengthBytes[tag]!);
      postRecv();
    },

    onDeleting() {
      if (connected || failing) return;
      failing = true;
      const failed = failAll();
      console.error(`ublk-bun: nbd: ${where}: the device is being deleted while the server is gone; ${failed} requests failed with EIO`);
    },

    close() {
      if (!connected) return;
      connected = false;
      sendDisconnect(fd);
      shutdown(fd, SHUT_RDWR);
      close(fd);
    },
  };
}
