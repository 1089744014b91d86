/**
 * The NBD target: the device's bytes live on an NBD server (nbdkit, qemu-nbd, nbd-server …), reached at
 * `--nbd nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`. `add` shakes hands once to learn the
 * export's size and what it supports; each queue then opens connections of its own (`-o connections=N`, 1 by
 * default; tag t goes on connection t % N) and serves on the queue's io_uring: targets/nbd-connection.ts sends,
 * receives and reconnects. Several connections to one export need the server's promise that they see one
 * another's writes and flushes (NBD_FLAG_CAN_MULTI_CONN), as the kernel's own client does.
 */
import { close, memoryAt, mmapAnonymous, PAGE_BYTES } from "../ffi/libc.ts";
import { EIO, EOPNOTSUPP } from "../ffi/errno.ts";
import {
  UBLK_ATTR_FUA, UBLK_ATTR_READ_ONLY, UBLK_ATTR_ROTATIONAL, UBLK_ATTR_VOLATILE_CACHE, UBLK_IO_F_FUA, UBLK_IO_F_NOUNMAP,
  UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
} from "../ffi/uapi/ublk_cmd.ts";
import { connectionOf, MAX_CONNECTIONS, type NbdConnection, openConnection } from "./nbd-connection.ts";
import {
  byteSwap32, connectExport, describeAddress, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_REQUEST_MAGIC, nbd_request,
  type NbdExport, type NbdUri, parseNbdUri, resolveAddress, sendDisconnect,
} from "./nbd-protocol.ts";
import { IO_PENDING, type QueueHandler, type Target, type TargetRecord } from "./types.ts";

/** Bytes reserved per tag for its request header (28 used). */
const HEADER_STRIDE_BYTES = 32;
/** Discard / write-zeroes requests up to 1 GiB: the length is a u32 on the wire. */
const MAX_ZERO_SECTORS = 1 << 21;
/** How long requests wait for a server that went away, by default (-o timeout=S). */
const DEFAULT_TIMEOUT_S = 30;

/** The export as the record describes it, checked against every later handshake (reconnect, recover). */
function sameExport(record: TargetRecord, found: NbdExport): string {
  if (found.sizeBytes < record.sizeBytes) return `the export shrank to ${found.sizeBytes} bytes (the device has ${record.sizeBytes})`;
  const readOnly = (found.transmissionFlags & NBD_FLAG_READ_ONLY) !== 0;
  if (readOnly && (record.attrs & UBLK_ATTR_READ_ONLY) === 0) return "the export became read-only";
  return "";
}

const MULTI_CONN_MISSING = "the server does not let several connections share the export (no NBD_FLAG_CAN_MULTI_CONN): use -q 1 and -o connections=1";

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
    const tcp = uri.address.kind === "tcp";
    const timeoutS = options.timeout ?? DEFAULT_TIMEOUT_S;
    if (typeof timeoutS !== "number" || !(timeoutS > 0 && timeoutS <= 86_400)) {
      throw new Error(`nbd: -o timeout=${String(timeoutS)}: give the seconds requests wait for a server that went away (0 < S ≤ 86400)`);
    }
    const connections = options.connections ?? 1;
    if (typeof connections !== "number" || !Number.isInteger(connections) || connections < 1 || connections > MAX_CONNECTIONS) {
      throw new Error(`nbd: -o connections=${String(connections)}: give the connections per queue, 1 to ${MAX_CONNECTIONS}`);
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
    if (connections > 1 && (flags & NBD_FLAG_CAN_MULTI_CONN) === 0) throw new Error(`nbd: ${where}: ${MULTI_CONN_MISSING}`);
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
      options: { uri: options.nbd, timeoutS, connections, transmissionFlags: flags, maximumPayloadBytes: found.maximumPayloadBytes },
      // Zero copy where the kernel has it, with USER_COPY beside it for small requests (targets/nbd-connection.ts);
      // a large write's pages leave by SEND_ZC, which TCP sockets take and unix sockets do not.
      prefersZeroCopy: tcp,
      prefersUserCopy: tcp,
    };
  },

  async openQueue(record, queue): Promise<QueueHandler> {
    const uri: NbdUri = parseNbdUri(String(record.options.uri));
    const where = `queue ${queue.qId}: ${describeAddress(uri.address)}`;
    const sockaddr = await resolveAddress(uri.address);
    const { queueDepth: depth, maxIoBufBytes } = queue;
    const count = Math.min(Number(record.options.connections ?? 1), depth);

    /** A connection in the transmission phase to the export the record describes. */
    function connect(timeoutMs?: number): { fd: number; export: NbdExport } {
      return checked(connectExport(uri, sockaddr, timeoutMs));
    }
    /** `connection` if its export is the record's; else it is closed and the reason thrown. */
    function checked(connection: { fd: number; export: NbdExport }): { fd: number; export: NbdExport } {
      const found = connection.export;
      const problem = sameExport(record, found) || (found.maximumPayloadBytes < maxIoBufBytes ? `the server takes requests up to ` +
        `${found.maximumPayloadBytes} bytes, less than the device's ${maxIoBufBytes}; add --max-io-size ${found.maximumPayloadBytes}` : "") ||
        ((count > 1 || queue.qId > 0) && (found.transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) === 0 ? MULTI_CONN_MISSING : "");
      if (problem !== "") {
        close(connection.fd);
        throw new Error(`nbd: ${where}: ${problem}`);
      }
      return connection;
    }
    /**
     * A socket for a new connection, or -1 with the reason when the server does not answer a recovering queue:
     * the connection then waits for it as after a drop (the application's requests are held, not failed, while
     * the server restarts too). An export that changed is refused either way.
     */
    function initialSocket(): { fd: number; unreachable: string; flags: number } {
      let connection;
      try {
        connection = connectExport(uri, sockaddr);
      } catch (error) {
        if (!queue.recovering) throw error;
        // What the server said at `add` (the record) stands in until it answers.
        const address = describeAddress(uri.address); // `where` names it already
        const why = (error as Error).message.replace(/^nbd: /, "").replace(` to ${address}`, "").replace(`${address}: `, "");
        return { fd: -1, unreachable: why, flags: Number(record.options.transmissionFlags ?? 0) };
      }
      return { fd: checked(connection).fd, unreachable: "", flags: connection.export.transmissionFlags };
    }
    const first = initialSocket();
    const flags = first.flags;
    const canFlush = (flags & NBD_FLAG_SEND_FLUSH) !== 0, canFua = (flags & NBD_FLAG_SEND_FUA) !== 0;
    const canTrim = (flags & NBD_FLAG_SEND_TRIM) !== 0, canZero = (flags & NBD_FLAG_SEND_WRITE_ZEROES) !== 0;

    // The request headers, one per tag, read by the kernel while a send is in flight: mmapped, so the GC never
    // moves them (and never unmapped: a send of a dropped connection may complete after close()).
    const headersBytes = Math.ceil((depth * HEADER_STRIDE_BYTES) / PAGE_BYTES) * PAGE_BYTES;
    const headersAddress = mmapAnonymous(headersBytes);
    if (headersAddress < 0) {
      if (first.fd >= 0) close(first.fd);
      throw new Error(`nbd: ${where}: cannot map ${headersBytes} bytes`);
    }
    const words = new Uint32Array(memoryAt(headersAddress, headersBytes));
    const HEADER_WORDS = HEADER_STRIDE_BYTES / 4;
    // Every header's magic is the same: written once.
    for (let tag = 0; tag < depth; tag++) words[tag * HEADER_WORDS + nbd_request.magic / 4] = byteSwap32(NBD_REQUEST_MAGIC);
    const tagCommand = new Uint8Array(depth), tagLengthBytes = new Uint32Array(depth);
    const shared = {
      ring: queue.ring, getSqe: queue.getSqe, complete: queue.complete, depth, headersAddress, headerStrideBytes: HEADER_STRIDE_BYTES,
      bufferAddress: queue.bufferAddress, maxIoBufBytes, tagCommand, tagLengthBytes, where,
      connect: (timeoutMs?: number) => connect(timeoutMs).fd,
      outageTimeoutMs: Number(record.options.timeoutS ?? DEFAULT_TIMEOUT_S) * 1000,
      zeroCopy: queue.zeroCopy, readRequest: queue.readRequest, writeRequest: queue.writeRequest,
    };
    const connections: NbdConnection[] = [];
    try {
      // openConnection owns the fd it is given from the start (it closes it when it fails).
      connections.push(openConnection(shared, 0, count, first.fd, first.unreachable));
      while (connections.length < count) {
        const next = initialSocket();
        connections.push(openConnection(shared, connections.length, count, next.fd, next.unreachable));
      }
    } catch (error) {
      for (const connection of connections) connection.close();
      throw error;
    }
    const TWO_POW_32 = 4294967296;

    return {
      handleIo(tag, op, opFlags, startSector, nrSectors) {
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
        return connections[count === 1 ? 0 : tag % count]!.submit(tag) ? IO_PENDING : -EIO;
      },

      onTargetCqe(userDataLow, result) {
        connections[connectionOf(userDataLow)]!.onCqe(userDataLow, result);
      },

      onDeleting() {
        for (const connection of connections) connection.onDeleting();
      },

      close() {
        for (const connection of connections) connection.close();
      },
    };
  },
};

export default nbdTarget;
