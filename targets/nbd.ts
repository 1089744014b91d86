/**
 * The NBD target: the device's bytes live on an NBD server (nbdkit, qemu-nbd, nbd-server …), reached at
 * `--nbd nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`. `add` shakes hands once to learn the
 * export's size and what it supports; each queue then opens a connection of its own and serves on the queue's
 * io_uring: requests are pipelined up to the queue depth, sent with SENDMSG (header and a write's data in one
 * gather, several requests per send), and the replies — simple replies, in any order, matched by cookie = tag —
 * are received one at a time, a read's data straight into the tag's buffer.
 *
 * A stream socket carries one send at a time here: two SENDs in flight on one socket may interleave their bytes
 * when the first is partial. Requests that arrive while a send is in flight wait in a FIFO and leave together
 * with the next SENDMSG.
 *
 * When the connection drops, the queue keeps the requests it carried and reconnects on a timer on its ring (back-off
 * from RECONNECT_MIN_MS doubling to RECONNECT_MAX_MS); once connected again it sends them again (reads, writes,
 * flush, trim and write-zeroes may all be repeated). New requests wait with them. If no server is back within
 * `-o timeout=S` (default 30 s), the held requests fail with EIO and so do new ones, at once, until a later attempt
 * connects.
 */
import {
  close, iovec, memoryAt, mmapAnonymous, msghdr, MSG_NOSIGNAL, MSG_WAITALL, PAGE_BYTES, SHUT_RDWR, shutdown,
} from "../ffi/libc.ts";
import { EIO, EOPNOTSUPP } from "../ffi/errno.ts";
import { __kernel_timespec } from "../ffi/uapi/io_uring.ts";
import {
  UBLK_ATTR_FUA, UBLK_ATTR_READ_ONLY, UBLK_ATTR_ROTATIONAL, UBLK_ATTR_VOLATILE_CACHE, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
  UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
} from "../ffi/uapi/ublk_cmd.ts";
import {
  byteSwap32, connectExport, describeAddress, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, nbd_request,
  nbd_simple_reply, type NbdExport, type NbdUri, parseNbdUri, replyResult, resolveAddress, sendDisconnect,
} from "./nbd-protocol.ts";
import { IO_PENDING, TARGET_USER_DATA, type QueueHandler, type Target, type TargetRecord } from "./types.ts";

/** Bytes reserved per tag for its request header (28 used). */
const HEADER_STRIDE_BYTES = 32;
/** Requests one SENDMSG carries at most: two iovecs each, within IOV_MAX (1024). */
const MAX_BATCH_REQUESTS = 256;
/** Discard / write-zeroes requests up to 1 GiB: the length is a u32 on the wire. */
const MAX_ZERO_SECTORS = 1 << 21;
/** A queue's reconnect: how long one attempt may block the queue, and the back-off between attempts. */
const RECONNECT_TIMEOUT_MS = 2_000;
/** How long requests wait for a server that went away, by default (-o timeout=S). */
const DEFAULT_TIMEOUT_S = 30;
const RECONNECT_MIN_MS = 100;
const RECONNECT_MAX_MS = 5_000;

/** user_data low word of the target's SQEs: the kind in the low 2 bits, the connection's generation above, so
 * a completion from a connection that has since dropped is recognised and ignored. */
const KIND_SEND = 1, KIND_RECV = 2, KIND_TIMER = 3;

/** Where each tag's request is. */
const TAG_IDLE = 0; // not with us (or completed)
const TAG_QUEUED = 1; // waiting for the send in flight to finish, or for a connection
const TAG_SENT = 2; // handed to a SENDMSG: a reply may come any time

/** The export as the record describes it, checked against every later handshake (reconnect, recover). */
function sameExport(record: TargetRecord, found: NbdExport): string {
  if (found.sizeBytes < record.sizeBytes) return `the export shrank to ${found.sizeBytes} bytes (the device has ${record.sizeBytes})`;
  const readOnly = (found.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0;
  if (readOnly && (record.attrs & UBLK_ATTR_READ_ONLY) === 0) return "the export became read-only";
  return "";
}

function attrsOf(flags: number): number {
  let attrs = 0;
  if (flags & NBD_FLAG_READ_ONLY) attrs |= UBLK_ATTR_READ_ONLY;
  if (flags & NBD_FLAG_ROTATIONAL) attrs |= UBLK_ATTR_ROTATIONAL;
  // A server that takes FLUSH may hold writes in a cache until then; FUA only means something with a cache.
  if (flags & NBD_FLAG_SEND_FLUSH) attrs |= UBLK_ATTR_VOLATILE_CACHE | (flags & NBD_FLAG_SEND_FUA ? UBLK_ATTR_FUA : 0);
  return attrs;
}

export const nbdTarget: Target = {
  name: "nbd",
  description: "an export of an NBD server (--nbd nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)",

  async prepare(options): Promise<TargetRecord> {
    if (typeof options.nbd !== "string" || options.nbd === "") throw new Error("nbd: --nbd URI is required (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)");
    const uri = parseNbdUri(options.nbd);
    const timeoutS = options.timeout ?? DEFAULT_TIMEOUT_S;
    if (typeof timeoutS !== "number" || !(timeoutS > 0 && timeoutS <= 86_400)) {
      throw new Error(`nbd: -o timeout=${String(timeoutS)}: give the seconds requests wait for a server that went away (0 < S ≤ 86400)`);
    }
    const { fd, export: found } = connectExport(uri, await resolveAddress(uri.address));
    sendDisconnect(fd);
    close(fd);
    const where = `export "${uri.exportName}" at ${describeAddress(uri.address)}`;
    const minimum = found.minimumBlockBytes;
    if (minimum > 4096 || (minimum & (minimum - 1)) !== 0) {
      throw new Error(`nbd: ${where} needs ${minimum}-byte blocks; a ublk device takes 512 to 4096`);
    }
    const logicalBlockBytes = Math.max(512, minimum, options.logicalBlockBytes ?? 512);
    // Bytes past the last whole block cannot be addressed by the device.
    const sizeBytes = found.sizeBytes - (found.sizeBytes % logicalBlockBytes);
    if (sizeBytes === 0) throw new Error(`nbd: ${where} has ${found.sizeBytes} bytes, less than one ${logicalBlockBytes}-byte block`);
    if (options.sizeBytes !== undefined && options.sizeBytes !== sizeBytes) {
      throw new Error(`nbd: -s ${options.sizeBytes} does not match the size of ${where} (${sizeBytes} bytes); the server sets it: leave -s out`);
    }
    const flags = found.transmissionFlags;
    const readOnly = (flags & NBD_FLAG_READ_ONLY) !== 0;
    const trim = !readOnly && (flags & NBD_FLAG_SEND_TRIM) !== 0;
    const zeroes = !readOnly && (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;
    const logicalBlockShift = Math.log2(logicalBlockBytes);
    const preferredShift = Math.log2(Math.min(Math.max(found.preferredBlockBytes, logicalBlockBytes), 4096));
    return {
      type: "nbd",
      sizeBytes,
      logicalBlockShift,
      physicalBlockShift: Number.isInteger(preferredShift) ? preferredShift : logicalBlockShift,
      attrs: attrsOf(flags),
      discard: trim || zeroes ? {
        granularityBytes: Math.max(4096, logicalBlockBytes),
        maxSectors: trim ? MAX_ZERO_SECTORS : 0,
        maxWriteZeroesSectors: zeroes ? MAX_ZERO_SECTORS : 0,
      } : undefined,
      options: { uri: options.nbd, timeoutS, transmissionFlags: flags, maximumPayloadBytes: found.maximumPayloadBytes },
    };
  },

  async openQueue(record, queue): Promise<QueueHandler> {
    const uri: NbdUri = parseNbdUri(String(record.options.uri));
    const where = `queue ${queue.qId}: ${describeAddress(uri.address)}`;
    const sockaddr = await resolveAddress(uri.address);
    const { ring, queueDepth: depth, bufferAddress, maxIoBufBytes } = queue;

    function connectChecked(timeoutMs?: number): { fd: number; export: NbdExport } {
      const connection = connectExport(uri, sockaddr, timeoutMs);
      const problem = sameExport(record, connection.export);
      const tooSmall = connection.export.maximumPayloadBytes < maxIoBufBytes;
      if (problem !== "" || tooSmall) {
        close(connection.fd);
        throw new Error(`nbd: ${where}: ${problem !== "" ? problem : `the server takes requests up to ` +
          `${connection.export.maximumPayloadBytes} bytes, less than the device's ${maxIoBufBytes}; add --max-io-size ${connection.export.maximumPayloadBytes}`}`);
      }
      return connection;
    }
    const first = connectChecked();
    let fd = first.fd;
    const flags = first.export.transmissionFlags;
    const canFlush = (flags & NBD_FLAG_SEND_FLUSH) !== 0, canFua = (flags & NBD_FLAG_SEND_FUA) !== 0;
    const canTrim = (flags & NBD_FLAG_SEND_TRIM) !== 0, canZero = (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;

    // Memory the kernel reads or writes while an SQE is in flight: mmapped, so the GC never moves it. Never
    // unmapped: a send or receive of a dropped connection may still complete after close() (a page or two per
    // queue, for the life of the daemon).
    const headersBytes = depth * HEADER_STRIDE_BYTES;
    const replyOffset = headersBytes, timespecOffset = headersBytes + 32, msghdrOffset = headersBytes + 64, iovOffset = headersBytes + 128;
    const areaBytes = Math.ceil((iovOffset + MAX_BATCH_REQUESTS * 2 * iovec.SIZE) / PAGE_BYTES) * PAGE_BYTES;
    const area = mmapAnonymous(areaBytes);
    if (area < 0) {
      close(fd);
      throw new Error(`nbd: ${where}: cannot map ${areaBytes} bytes`);
    }
    const words = new Uint32Array(memoryAt(area, areaBytes));
    const replyAddress = area + replyOffset, msghdrAddress = area + msghdrOffset, iovAddress = area + iovOffset;
    const timespecAddress = area + timespecOffset;
    const HEADER_WORDS = HEADER_STRIDE_BYTES / 4, REPLY_WORD = replyOffset / 4, IOV_WORD = iovOffset / 4;
    const IOV_WORDS = iovec.SIZE / 4;
    const TWO_POW_32 = 4294967296;
    // Every header's magic is the same: written once.
    for (let tag = 0; tag < depth; tag++) words[tag * HEADER_WORDS + nbd_request.magic / 4] = byteSwap32(NBD_REQUEST_MAGIC);

    function storeU64(word: number, value: number): void {
      words[word] = value >>> 0;
      words[word + 1] = Math.floor(value / TWO_POW_32);
    }

    const tagState = new Uint8Array(depth);
    const tagCommand = new Uint8Array(depth);
    const tagLengthBytes = new Uint32Array(depth);
    /** Tags waiting to be sent, oldest first (a ring of `depth` slots). */
    const sendQueue = new Uint16Array(depth);
    let sendQueueHead = 0, sendQueueCount = 0;
    /** The SENDMSG in flight: its iovecs from iovFirst to iovCount, and the bytes it has still to send. */
    let sending = false, iovFirst = 0, iovCount = 0, sendRemainingBytes = 0;
    /** The reply being received: its header (recvTag < 0) or a read's data for recvTag; bytes received so far. */
    let recvTag = -1, recvDoneBytes = 0;
    let connected = true, generation = 0;
    /** While disconnected: requests wait until this time, then fail (and new ones fail at once: `failing`). */
    let outageDeadlineMs = 0, failing = false;
    let timerArmed = false, backoffMs = RECONNECT_MIN_MS;
    const timeoutMs = Number(record.options.timeoutS ?? DEFAULT_TIMEOUT_S) * 1000;

    const userData = (kind: number) => ((generation << 2) | kind) >>> 0;

    function postRecv(): void {
      const base = queue.getSqe();
      if (recvTag < 0) {
        ring.prepRecv(base, fd, replyAddress + recvDoneBytes, nbd_simple_reply.SIZE - recvDoneBytes, MSG_WAITALL, userData(KIND_RECV), TARGET_USER_DATA);
      } else {
        ring.prepRecv(base, fd, bufferAddress + recvTag * maxIoBufBytes + recvDoneBytes, tagLengthBytes[recvTag]! - recvDoneBytes,
          MSG_WAITALL, userData(KIND_RECV), TARGET_USER_DATA);
      }
    }

    function postSend(): void {
      storeU64(msghdrOffset / 4 + msghdr.msg_iov / 4, iovAddress + iovFirst * iovec.SIZE);
      storeU64(msghdrOffset / 4 + msghdr.msg_iovlen / 4, iovCount - iovFirst);
      ring.prepSendmsg(queue.getSqe(), fd, msghdrAddress, MSG_NOSIGNAL | MSG_WAITALL, userData(KIND_SEND), TARGET_USER_DATA);
    }

    /** Sends every queued request (up to a batch) in one SENDMSG, unless a send is already in flight. */
    function startSend(): void {
      if (sending || sendQueueCount === 0 || !connected) return;
      iovFirst = 0;
      iovCount = 0;
      sendRemainingBytes = 0;
      for (let taken = 0; taken < MAX_BATCH_REQUESTS && sendQueueCount > 0; taken++) {
        const tag = sendQueue[sendQueueHead]!;
        sendQueueHead = sendQueueHead + 1 === depth ? 0 : sendQueueHead + 1;
        sendQueueCount--;
        tagState[tag] = TAG_SENT;
        let at = IOV_WORD + iovCount++ * IOV_WORDS;
        storeU64(at + iovec.iov_base / 4, area + tag * HEADER_STRIDE_BYTES);
        storeU64(at + iovec.iov_len / 4, nbd_request.SIZE);
        sendRemainingBytes += nbd_request.SIZE;
        if (tagCommand[tag] === NBD_CMD_WRITE) {
          at = IOV_WORD + iovCount++ * IOV_WORDS;
          storeU64(at + iovec.iov_base / 4, bufferAddress + tag * maxIoBufBytes);
          storeU64(at + iovec.iov_len / 4, tagLengthBytes[tag]!);
          sendRemainingBytes += tagLengthBytes[tag]!;
        }
      }
      sending = true;
      postSend();
    }

    /** A partial send: skips the iovecs (and the part of one) already sent, and sends the rest. */
    function continueSend(sentBytes: number): void {
      for (;;) {
        const at = IOV_WORD + iovFirst * IOV_WORDS;
        const lengthBytes = words[at + iovec.iov_len / 4]!;
        if (sentBytes < lengthBytes) {
          storeU64(at + iovec.iov_base / 4, words[at]! + words[at + 1]! * TWO_POW_32 + sentBytes);
          storeU64(at + iovec.iov_len / 4, lengthBytes - sentBytes);
          break;
        }
        sentBytes -= lengthBytes;
        iovFirst++;
      }
      postSend();
    }

    /** Adds `tag` to the requests waiting to be sent. */
    function enqueue(tag: number): void {
      tagState[tag] = TAG_QUEUED;
      const slot = sendQueueHead + sendQueueCount;
      sendQueue[slot >= depth ? slot - depth : slot] = tag;
      sendQueueCount++;
    }

    /** Fails every request the queue holds with EIO; returns how many. */
    function failAll(): number {
      let failed = 0;
      sendQueueCount = 0;
      for (let tag = 0; tag < depth; tag++) {
        if (tagState[tag] === TAG_IDLE) continue;
        tagState[tag] = TAG_IDLE;
        failed++;
        queue.complete(tag, -EIO);
      }
      return failed;
    }

    /** Arms the reconnect timer (a TIMEOUT SQE on the ring, so a queue blocked in io_uring_enter wakes for it). */
    function armTimer(delayMs: number): void {
      const seconds = Math.floor(delayMs / 1000);
      const at = timespecOffset / 4;
      storeU64(at + __kernel_timespec.tv_sec / 4, seconds);
      storeU64(at + __kernel_timespec.tv_nsec / 4, Math.round((delayMs - seconds * 1000) * 1e6));
      ring.prepTimeout(queue.getSqe(), timespecAddress, 0, 0, KIND_TIMER, TARGET_USER_DATA);
      timerArmed = true;
    }

    /** The connection is gone: its requests wait for the next one (every held request goes back in the send queue). */
    function drop(why: string): void {
      if (!connected) return;
      connected = false;
      generation = (generation + 1) & 0x3fffffff;
      // Ends the send and receive still in flight (their completions carry the old generation and are ignored).
      shutdown(fd, SHUT_RDWR);
      close(fd);
      sending = false;
      recvTag = -1;
      recvDoneBytes = 0;
      sendQueueHead = sendQueueCount = 0;
      let held = 0;
      for (let tag = 0; tag < depth; tag++) {
        if (tagState[tag] === TAG_IDLE) continue;
        enqueue(tag);
        held++;
      }
      console.error(`ublk-bun: nbd: ${where}: ${why}; reconnecting, ${held} requests wait up to ${timeoutMs / 1000} s`);
      outageDeadlineMs = performance.now() + timeoutMs;
      failing = false;
      backoffMs = RECONNECT_MIN_MS;
      if (!timerArmed) armTimer(backoffMs);
    }

    /** The reconnect timer fired: one connection attempt (blocking this queue up to RECONNECT_TIMEOUT_MS). */
    function onTimer(): void {
      timerArmed = false;
      if (connected) return;
      try {
        fd = connectChecked(RECONNECT_TIMEOUT_MS).fd;
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

    /** A whole reply header is in: completes the request, or starts receiving a read's data. */
    function onReplyHeader(): void {
      const magic = byteSwap32(words[REPLY_WORD + nbd_simple_reply.magic / 4]!);
      const error = byteSwap32(words[REPLY_WORD + nbd_simple_reply.error / 4]!);
      const cookieHigh = words[REPLY_WORD + nbd_simple_reply.cookie / 4]!;
      const tag = byteSwap32(words[REPLY_WORD + nbd_simple_reply.cookie / 4 + 1]!);
      if (magic !== NBD_SIMPLE_REPLY_MAGIC) return drop(`the server sent a reply with magic 0x${magic.toString(16)}`);
      if (cookieHigh !== 0 || tag >= depth || tagState[tag] !== TAG_SENT) return drop(`the server replied to cookie ${tag}, which no request has`);
      recvDoneBytes = 0;
      if (tagCommand[tag] === NBD_CMD_READ && error === 0) {
        recvTag = tag;
        postRecv();
        return;
      }
      tagState[tag] = TAG_IDLE;
      const command = tagCommand[tag]!;
      queue.complete(tag, error !== 0 ? replyResult(error) : command === NBD_CMD_READ || command === NBD_CMD_WRITE ? tagLengthBytes[tag]! : 0);
      postRecv();
    }

    postRecv();

    return {
      handleIo(tag, op, opFlags, startSector, nrSectors) {
        if (failing) return -EIO;
        let command: number, commandFlags = 0;
        let lengthBytes = nrSectors * 512, offsetBytes = startSector * 512;
        switch (op) {
          case UBLK_IO_OP_READ:
            command = NBD_CMD_READ;
            break;
          case UBLK_IO_OP_WRITE:
            command = NBD_CMD_WRITE;
            if (opFlags & UBLK_IO_F_FUA && canFua) commandFlags = NBD_CMD_FLAG_FUA;
            break;
          case UBLK_IO_OP_FLUSH:
            if (!canFlush) return 0; // no cache on the server (and the device did not say it had one)
            command = NBD_CMD_FLUSH;
            lengthBytes = offsetBytes = 0;
            break;
          case UBLK_IO_OP_DISCARD:
            if (!canTrim) return -EOPNOTSUPP;
            command = NBD_CMD_TRIM;
            break;
          case UBLK_IO_OP_WRITE_ZEROES:
            if (!canZero) return -EOPNOTSUPP;
            command = NBD_CMD_WRITE_ZEROES;
            if (opFlags & UBLK_IO_F_NOUNMAP) commandFlags = NBD_CMD_FLAG_NO_HOLE;
            break;
          default:
            return -EOPNOTSUPP;
        }
        // The request header, big-endian, as u32 stores: flags|type, cookie = tag, offset, length.
        const at = tag * HEADER_WORDS;
        words[at + nbd_request.flags / 4] = byteSwap32((commandFlags << 16) | command);
        words[at + nbd_request.cookie / 4] = 0;
        words[at + nbd_request.cookie / 4 + 1] = byteSwap32(tag);
        words[at + nbd_request.offset / 4] = byteSwap32(Math.floor(offsetBytes / TWO_POW_32));
        words[at + nbd_request.offset / 4 + 1] = byteSwap32(offsetBytes >>> 0);
        words[at + nbd_request.length / 4] = byteSwap32(lengthBytes);
        tagCommand[tag] = command;
        tagLengthBytes[tag] = lengthBytes;
        enqueue(tag);
        startSend();
        return IO_PENDING;
      },

      onTargetCqe(userDataLow, result) {
        if (userDataLow === KIND_TIMER) return onTimer();
        if (!connected || userDataLow >>> 2 !== generation) return; // from a connection that has dropped
        if ((userDataLow & 3) === KIND_SEND) {
          if (result <= 0) return drop(result === 0 ? "the connection closed" : `sending failed (${-result})`);
          sendRemainingBytes -= result;
          if (sendRemainingBytes > 0) return continueSend(result);
          sending = false;
          startSend();
          return;
        }
        if (result <= 0) return drop(result === 0 ? "the server closed the connection" : `receiving failed (${-result})`);
        recvDoneBytes += result;
        if (recvTag < 0) {
          if (recvDoneBytes < nbd_simple_reply.SIZE) return postRecv();
          onReplyHeader();
          return;
        }
        const tag = recvTag;
        if (recvDoneBytes < tagLengthBytes[tag]!) return postRecv();
        recvTag = -1;
        recvDoneBytes = 0;
        tagState[tag] = TAG_IDLE;
        queue.complete(tag, tagLengthBytes[tag]!);
        postRecv();
      },

      close() {
        if (!connected) return;
        connected = false;
        sendDisconnect(fd);
        shutdown(fd, SHUT_RDWR);
        close(fd);
      },
    };
  },
};

export default nbdTarget;
