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
 * Zero copy (QueueContext.zeroCopy, kernel ≥ 6.16): a request's data is its own pages, registered by the kernel as the
 * ring's buffer `tag`, which only fixed-buffer SQEs reach. A read's data is received with READ_FIXED straight into
 * them, so a RECV of replies may take several replies only while no read is in flight or about to be sent (a pending
 * RECV that could swallow a read's data is cancelled before the read goes out). Writes leave as one linked chain:
 * SENDMSG of the headers up to a write's, SEND_ZC of its pages, and so on; with MSG_WAITALL a chain is sent whole
 * or the connection failed.
 *
 * When the connection drops it keeps its requests and reconnects on a timer on the ring (back-off from
 * RECONNECT_MIN_MS doubling to RECONNECT_MAX_MS); once connected again it sends them again (reads, writes, flush,
 * trim and write-zeroes may all be repeated). New requests wait with them. If no server is back within the
 * queue's timeout, the held requests fail with EIO and so do new ones, at once, until a later attempt connects.
 */
import { close, iovec, memcpy, memoryAt, mmapAnonymous, msghdr, MSG_MORE, MSG_NOSIGNAL, MSG_WAITALL, PAGE_BYTES, SHUT_RDWR, shutdown } from "../ffi/libc.ts";
import { ECANCELED, EIO } from "../ffi/errno.ts";
import { setU64 } from "../ffi/layout.ts";
import type { Ring } from "../ffi/ring.ts";
import { __kernel_timespec, IOSQE_IO_LINK } from "../ffi/uapi/io_uring.ts";
import { NBD_CMD_READ, NBD_CMD_WRITE, NBD_SIMPLE_REPLY_MAGIC, nbd_request, nbd_simple_reply, replyResult, sendDisconnect } from "./nbd-protocol.ts";
import { TARGET_USER_DATA } from "./types.ts";

/** Connections per queue at most: their index takes 4 bits of the SQEs' user_data. */
export const MAX_CONNECTIONS = 16;
/** Requests one SENDMSG carries at most: two iovecs each, within IOV_MAX (1024). */
const MAX_BATCH_REQUESTS = 256;
/** Zero copy: writes one chain carries at most (two SQEs each, and the chain must fit the SQ whole: a link never
 * spans two submissions). */
const MAX_CHAIN_WRITES = 16;
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
const KIND_SEND = 1, KIND_RECV = 2, KIND_TIMER = 3, KIND_SEND_PAGES = 4, KIND_CANCEL = 5;
/** A zero-copy RECV that may take more than a header: a kind of its own, so its cancel can hit no later RECV. */
const KIND_WIDE_RECV = 6;
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
  /** Zero copy: tag t's data is the ring's registered buffer t (from 0), not at bufferAddress. */
  zeroCopy: boolean;
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
  /** SQEs of the zero-copy chain in flight whose result has not come yet, and the last one while it is built. */
  let chainResultsDue = 0, chainLast = -1;
  /** Bytes of replies received into the staging buffer and not yet parsed (a partial reply header at most). */
  let stagedBytes = 0;
  /** Reads whose data is received straight into their pages (all with zero copy; else those longer than
   * LARGE_READ_BYTES), sent and not yet answered; and reads waiting to be sent. */
  let directReadsInFlight = 0, readsQueued = 0;
  const isDirectRead = (tag: number) => tagCommand[tag] === NBD_CMD_READ && (zeroCopy || tagLengthBytes[tag]! > LARGE_READ_BYTES);
  /** Zero copy: the RECV in flight may take more than a header (a read must not be sent meanwhile), and whether
   * its cancel was asked for. */
  let wideRecvPosted = false, wideRecvCancelled = false;
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
      const headerOnly = directReadsInFlight > 0 || (zeroCopy && readsQueued > 0);
      wideRecvPosted = zeroCopy && !headerOnly;
      const wantedBytes = (headerOnly ? REPLY_BYTES : STAGING_BYTES) - stagedBytes;
      ring.prepRecv(base, fd, stagingAddress + stagedBytes, wantedBytes, 0, userData(wideRecvPosted ? KIND_WIDE_RECV : KIND_RECV), TARGET_USER_DATA);
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
    if (tagCommand[tag] === NBD_CMD_READ) readsQueued--;
    if (isDirectRead(tag)) directReadsInFlight++;
    addIovec(queue.headersAddress + tag * queue.headerStrideBytes, nbd_request.SIZE);
    return tag;
  }

  function addIovec(address: number, lengthBytes: number): void {
    const at = (IOV_WORD + iovCount++ * IOV_WORDS) * 4;
    setU64(words, at + iovec.iov_base, address);
    setU64(words, at + iovec.iov_len, lengthBytes);
    sendRemainingBytes += lengthBytes;
  }

  /** Sends the queued requests (up to a batch) unless a send is in flight: in one SENDMSG, or with zero copy as a chain. */
  function startSend(): void {
    if (sending || sendQueueCount === 0 || !connected) return;
    iovFirst = 0;
    iovCount = 0;
    sendRemainingBytes = 0;
    if (zeroCopy) return startChain();
    for (let taken = 0; taken < MAX_BATCH_REQUESTS && sendQueueCount > 0; taken++) {
      const tag = takeQueued();
      if (tagCommand[tag] === NBD_CMD_WRITE) addIovec(dataAddress(tag), tagLengthBytes[tag]!);
    }
    sending = true;
    postSendmsg(0, iovCount, 0);
  }

  /** Zero copy: SENDMSG of headers up to a write's, linked to SEND_ZC of its pages, and so on, as one chain. */
  function startChain(): void {
    if (wideRecvPosted && readsQueued > 0) {
      // A read's data must not land in the staging buffer: the RECV that could take it ends first (onCqe sends on).
      if (!wideRecvCancelled) ring.prepCancel(queue.getSqe(), userData(KIND_WIDE_RECV), TARGET_USER_DATA, 0, userData(KIND_CANCEL), TARGET_USER_DATA);
      wideRecvCancelled = true;
      return;
    }
    if (ring.sqSpace() < 2) ring.submit();
    const maxWrites = Math.min(MAX_CHAIN_WRITES, (ring.sqSpace() - 1) >> 1);
    if (maxWrites < 1) return drop("the ring's submission queue stays full");
    let slot = 0, writes = 0;
    chainLast = -1;
    for (let taken = 0; taken < MAX_BATCH_REQUESTS && sendQueueCount > 0; taken++) {
      const next = sendQueue[sendQueueHead]!;
      if (tagCommand[next] === NBD_CMD_WRITE && writes === maxWrites) break;
      const tag = takeQueued();
      if (tagCommand[tag] !== NBD_CMD_WRITE) continue;
      addToChain(postSendmsg(slot++, iovCount, MSG_MORE));
      iovFirst = iovCount;
      const lengthBytes = tagLengthBytes[tag]!;
      sendRemainingBytes += lengthBytes;
      const base = queue.getSqe();
      ring.prepSendZcFixed(base, fd, tag, 0, lengthBytes, MSG_NOSIGNAL | MSG_WAITALL | MSG_MORE, userData(KIND_SEND_PAGES), TARGET_USER_DATA);
      addToChain(base);
      writes++;
    }
    if (iovFirst < iovCount) addToChain(postSendmsg(slot, iovCount, 0));
    else ring.setOpFlags(chainLast, MSG_NOSIGNAL | MSG_WAITALL); // the last SEND_ZC: nothing more to wait for
    sending = true;
  }

  /** The SQE at `base` follows the chain's last one (IOSQE_IO_LINK on that). */
  function addToChain(base: number): void {
    if (chainLast >= 0) ring.setSqeFlags(chainLast, IOSQE_IO_LINK);
    chainLast = base;
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
  }

  function enqueue(tag: number): void {
    tagState[tag] = TAG_QUEUED;
    if (tagCommand[tag] === NBD_CMD_READ) readsQueued++;
    const slot = sendQueueHead + sendQueueCount;
    sendQueue[slot >= depth ? slot - depth : slot] = tag;
    sendQueueCount++;
  }

  function finish(tag: number, result: number): void {
    if (tagState[tag] === TAG_SENT && isDirectRead(tag)) directReadsInFlight--;
    tagState[tag] = TAG_IDLE;
    queue.complete(tag, result);
  }

  /** Fails every request the connection holds with EIO; returns how many. */
  function failAll(): number {
    let failed = 0;
    sendQueueCount = readsQueued = 0;
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
    recvDoneBytes = stagedBytes = directReadsInFlight = chainResultsDue = 0;
    wideRecvPosted = wideRecvCancelled = false;
    sendQueueHead = sendQueueCount = readsQueued = 0;
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
      // With zero copy nothing past the header was asked for while a read was out (postRecv, startChain).
      if (zeroCopy && stagedBytes > at) return drop("a read's data reached the staging buffer");
      const copiedBytes = Math.min(lengthBytes, stagedBytes - at);
      if (copiedBytes > 0) memcpy(dataAddress(tag), stagingAddress + at, copiedBytes);
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
      enqueue(tag);
      startSend();
      return true;
    },

    onCqe(userDataLow, result) {
      const kind = userDataLow & KIND_MASK;
      if (kind === KIND_TIMER) return onTimer();
      if (kind === KIND_CANCEL) return; // its RECV's own completion says what happened (if it had not ended already)
      if (!connected || userDataLow >>> GENERATION_SHIFT !== generation) return; // from a socket that has dropped
      if (kind === KIND_SEND_PAGES && result === 0) return; // SEND_ZC's notification: its pages are released
      if (kind !== KIND_RECV && kind !== KIND_WIDE_RECV) {
        if (result <= 0) return drop(result === 0 ? "the connection closed" : `sending failed (${-result})`);
        sendRemainingBytes -= result;
        if (zeroCopy) {
          // The chain's sends wait for all their bytes: one that ended short broke the chain (the rest fail).
          if (--chainResultsDue > 0) return;
          if (sendRemainingBytes !== 0) return drop("a send ended short");
        } else if (sendRemainingBytes > 0) {
          return continueSend(result);
        }
        sending = false;
        startSend();
        return;
      }
      if (wideRecvPosted) {
        wideRecvPosted = wideRecvCancelled = false;
        if (result === -ECANCELED) {
          postRecv();
          return startSend();
        }
      }
      if (result <= 0) return drop(result === 0 ? "the server closed the connection" : `receiving failed (${-result})`);
      if (recvTag < 0) {
        stagedBytes += result;
        onStaged();
        return startSend(); // a read may have waited for a wide RECV to end
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
