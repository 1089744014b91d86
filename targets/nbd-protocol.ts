/**
 * The NBD wire protocol as a client speaks it (doc/proto.md of the NBD project): constants and struct layouts in
 * the spec's spelling, the NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), and the fixed
 * newstyle handshake. Everything on the wire is big-endian. The handshake runs on a blocking socket before a
 * queue serves (or in `add`), so it may allocate; the transmission phase lives in targets/nbd.ts.
 */
import { lookup } from "node:dns/promises";
import { struct } from "../ffi/layout.ts";
import {
  AF_INET, AF_INET6, AF_UNIX, close, connect, inetPton, IPPROTO_TCP, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_WAITALL, recv, send, setsockopt,
  SO_RCVTIMEO, SO_SNDTIMEO, SOCK_STREAM, socket, SOL_SOCKET, TCP_NODELAY,
} from "../ffi/libc.ts";
import { EAGAIN, errnoText } from "../ffi/errno.ts";

export const NBD_DEFAULT_PORT = 10809;

// Handshake.
/** "NBDMAGIC", the first 8 bytes every server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": a newstyle server; also the prefix of every option the client sends. */
export const IHAVEOPT = 0x49484156454f5054n;
/** What an oldstyle server sends instead of IHAVEOPT. */
export const NBD_OLDSTYLE_MAGIC = 0x00420281861253n;
export const NBD_REP_MAGIC = 0x3e889045565a9n;
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_GO = 7;
export const NBD_REP_ACK = 1;
export const NBD_REP_INFO = 3;
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags (per export).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

// Transmission.
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;

/** A request: 28 bytes, followed by the data of a write. `cookie` (the spec's former `handle`) comes back in the reply. */
export const nbd_request = struct("nbd_request", 28, {
  magic: [0, 4], flags: [4, 2], type: [6, 2], cookie: [8, 8], offset: [16, 8], length: [24, 4],
});
/** A simple reply: 16 bytes, followed by the data of a successful read. */
export const nbd_simple_reply = struct("nbd_simple_reply", 16, { magic: [0, 4], error: [4, 4], cookie: [8, 8] });

/** The server's error values (the spec fixes them to Linux's numbers); anything else becomes EIO. */
const NBD_ERRORS = new Set([1 /* EPERM */, 5 /* EIO */, 12 /* ENOMEM */, 22 /* EINVAL */, 28 /* ENOSPC */,
  75 /* EOVERFLOW */, 95 /* ENOTSUP */, 108 /* ESHUTDOWN */]);
/** The -errno a request completes with for a reply's `error` (0: success). */
export function replyResult(error: number): number {
  return error === 0 ? 0 : NBD_ERRORS.has(error) ? -error : -5;
}

/** Four bytes in network order, from and to a host-order u32 (for typed-array stores on a little-endian CPU). */
export function byteSwap32(value: number): number {
  return (((value & 0xff) << 24) | ((value & 0xff00) << 8) | ((value >>> 8) & 0xff00) | (value >>> 24)) >>> 0;
}

// ---- URI -----------------------------------------------------------------------------------------------

export type NbdAddress = { kind: "tcp"; host: string; port: number } | { kind: "unix"; path: string };
export interface NbdUri {
  address: NbdAddress;
  exportName: string;
}

/** Where a sockaddr_un's path ends: 108 bytes including the NUL. */
const UNIX_PATH_MAX = 108;

/**
 * Parses nbd://HOST[:PORT][/EXPORT] and nbd+unix:///[EXPORT]?socket=PATH (the NBD URI spec's forms without TLS).
 * The export name is the path after the first slash, percent-decoded. Throws an Error with a one-line message.
 */
export function parseNbdUri(text: string): NbdUri {
  const bad = (why: string) => new Error(`nbd: "${text}" ${why}`);
  const scheme = /^([a-z+]+):\/\//i.exec(text)?.[1]?.toLowerCase();
  if (scheme === "nbds" || scheme === "nbds+unix") throw bad("asks for TLS, which this target does not support (use nbd:// or nbd+unix://)");
  if (scheme !== "nbd" && scheme !== "nbd+unix") throw bad("is not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)");
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw bad("is not a valid URI");
  }
  if (url.username !== "" || url.password !== "") throw bad("has a user name or password, which NBD URIs without TLS do not take");
  if (url.hash !== "") throw bad("has a #fragment");
  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ""));
  } catch {
    throw bad("has a badly percent-encoded export name");
  }
  const query = [...url.searchParams.keys()];
  if (scheme === "nbd") {
    if (query.length > 0) throw bad(`has a query (${query.join(", ")}) that nbd:// does not take`);
    if (url.hostname === "") throw bad("names no host (nbd://HOST[:PORT]/EXPORT)");
    const port = url.port === "" ? NBD_DEFAULT_PORT : Number(url.port);
    if (port === 0) throw bad("has port 0");
    // The WHATWG parser keeps an IPv6 literal's brackets.
    return { address: { kind: "tcp", host: url.hostname.replace(/^\[(.*)\]$/, "$1"), port }, exportName };
  }
  if (url.host !== "") throw bad("names a host; nbd+unix:// takes none (nbd+unix:///EXPORT?socket=PATH)");
  const unknown = query.filter((key) => key !== "socket");
  if (unknown.length > 0) throw bad(`has query parameters nbd+unix:// does not take (${unknown.join(", ")})`);
  const path = url.searchParams.get("socket");
  if (path === null || path === "") throw bad("names no socket (nbd+unix:///EXPORT?socket=PATH)");
  if (Buffer.byteLength(path) >= UNIX_PATH_MAX) throw bad(`has a socket path longer than ${UNIX_PATH_MAX - 1} bytes`);
  return { address: { kind: "unix", path }, exportName };
}

/** Where a connection goes, for messages. */
export function describeAddress(address: NbdAddress): string {
  return address.kind === "unix" ? `unix socket ${address.path}` : `${address.host.includes(":") ? `[${address.host}]` : address.host}:${address.port}`;
}

/**
 * The struct sockaddr to connect to, as bytes: host names are looked up (once, here: a queue reconnects to the
 * same address). Throws a one-line Error.
 */
export async function resolveAddress(address: NbdAddress): Promise<Uint8Array> {
  if (address.kind === "unix") {
    const sockaddr = new Uint8Array(2 + UNIX_PATH_MAX);
    new DataView(sockaddr.buffer).setUint16(0, AF_UNIX, true);
    sockaddr.set(Buffer.from(address.path), 2);
    return sockaddr;
  }
  let ip = address.host;
  let family = inetPton(AF_INET, ip) ? AF_INET : inetPton(AF_INET6, ip) ? AF_INET6 : 0;
  if (family === 0) {
    try {
      const found = await lookup(address.host);
      ip = found.address;
      family = found.family === 6 ? AF_INET6 : AF_INET;
    } catch {
      throw new Error(`nbd: cannot resolve host "${address.host}"`);
    }
  }
  const bytes = inetPton(family, ip)!;
  const sockaddr = new Uint8Array(family === AF_INET ? 16 : 28); // sockaddr_in / sockaddr_in6
  const view = new DataView(sockaddr.buffer);
  view.setUint16(0, family, true);
  view.setUint16(2, address.port, false);
  sockaddr.set(bytes, family === AF_INET ? 4 : 8);
  return sockaddr;
}

// ---- handshake -----------------------------------------------------------------------------------------

/** What the handshake learnt about the export. */
export interface NbdExport {
  sizeBytes: number;
  /** NBD_FLAG_* transmission flags. */
  transmissionFlags: number;
  /** NBD_INFO_BLOCK_SIZE, or the spec's defaults when the server sent none. */
  minimumBlockBytes: number;
  preferredBlockBytes: number;
  maximumPayloadBytes: number;
}

/** The byte stream a handshake runs on: a blocking socket, or a script in tests. */
export interface WireIo {
  /** Exactly `lengthBytes` bytes; throws when the stream ends or fails first. */
  read(lengthBytes: number): Uint8Array;
  write(bytes: Uint8Array): void;
}

/** When the server gives no NBD_INFO_BLOCK_SIZE: the spec's default limit on a request's payload. */
const DEFAULT_MAXIMUM_PAYLOAD_BYTES = 32 * 1024 * 1024;
/** An option reply longer than this is not one we asked for. */
const MAX_OPTION_REPLY_BYTES = 64 * 1024;

function option(optionCode: number, data: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(16 + data.byteLength);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, IHAVEOPT);
  view.setUint32(8, optionCode);
  view.setUint32(12, data.byteLength);
  bytes.set(data, 16);
  return bytes;
}

const OPTION_ERRORS: Record<number, string> = {
  [NBD_REP_ERR_POLICY]: "refused by the server's policy",
  [NBD_REP_ERR_INVALID]: "refused as invalid",
  [NBD_REP_ERR_PLATFORM]: "not supported on the server's platform",
  [NBD_REP_ERR_TLS_REQD]: "the server requires TLS, which this target does not support",
  [NBD_REP_ERR_SHUTDOWN]: "the server is shutting down",
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: "the server requires block-size negotiation",
  [NBD_REP_ERR_TOO_BIG]: "the request was too big for the server",
};

/**
 * The client's side of the fixed newstyle handshake, for export `exportName`: NBD_OPT_GO asking for
 * NBD_INFO_BLOCK_SIZE, or NBD_OPT_EXPORT_NAME when the server does not know NBD_OPT_GO (or is not fixed newstyle).
 * Leaves the stream in the transmission phase. Throws an Error with a one-line message.
 */
export function clientHandshake(io: WireIo, exportName: string): NbdExport {
  const name = Buffer.from(exportName, "utf8");
  const quoted = `"${exportName}"`;
  const greeting = io.read(18);
  const view = new DataView(greeting.buffer, greeting.byteOffset, 18);
  if (view.getBigUint64(0) !== NBDMAGIC) throw new Error("nbd: the server is not an NBD server (no NBDMAGIC)");
  const style = view.getBigUint64(8);
  if (style === NBD_OLDSTYLE_MAGIC) throw new Error("nbd: the server speaks the oldstyle protocol, which this target does not support");
  if (style !== IHAVEOPT) throw new Error("nbd: the server sent neither a newstyle nor an oldstyle greeting");
  const handshakeFlags = view.getUint16(16);
  const fixed = (handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
  const clientFlags = new Uint8Array(4);
  new DataView(clientFlags.buffer).setUint32(0, (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
  io.write(clientFlags);

  if (fixed) {
    // NBD_OPT_GO: u32 name length, name, u16 number of info requests, u16 each.
    const data = new Uint8Array(4 + name.byteLength + 4);
    const dataView = new DataView(data.buffer);
    dataView.setUint32(0, name.byteLength);
    data.set(name, 4);
    dataView.setUint16(4 + name.byteLength, 1);
    dataView.setUint16(6 + name.byteLength, NBD_INFO_BLOCK_SIZE);
    io.write(option(NBD_OPT_GO, data));
    const found: Partial<NbdExport> = {};
    for (;;) {
      const header = io.read(20);
      const headerView = new DataView(header.buffer, header.byteOffset, 20);
      if (headerView.getBigUint64(0) !== NBD_REP_MAGIC) throw new Error("nbd: the server's option reply has a bad magic");
      if (headerView.getUint32(8) !== NBD_OPT_GO) throw new Error("nbd: the server answered an option it was not asked");
      const replyType = headerView.getUint32(12);
      const lengthBytes = headerView.getUint32(16);
      if (lengthBytes > MAX_OPTION_REPLY_BYTES) throw new Error(`nbd: the server's option reply is ${lengthBytes} bytes long`);
      const payload = lengthBytes > 0 ? io.read(lengthBytes) : new Uint8Array(0);
      const payloadView = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
      if (replyType === NBD_REP_INFO) {
        if (payload.byteLength < 2) throw new Error("nbd: the server sent an empty NBD_REP_INFO");
        const infoType = payloadView.getUint16(0);
        if (infoType === NBD_INFO_EXPORT) {
          if (payload.byteLength !== 12) throw new Error("nbd: the server's NBD_INFO_EXPORT has a bad length");
          found.sizeBytes = exportSize(payloadView.getBigUint64(2));
          found.transmissionFlags = payloadView.getUint16(10);
        } else if (infoType === NBD_INFO_BLOCK_SIZE) {
          if (payload.byteLength !== 14) throw new Error("nbd: the server's NBD_INFO_BLOCK_SIZE has a bad length");
          found.minimumBlockBytes = payloadView.getUint32(2);
          found.preferredBlockBytes = payloadView.getUint32(6);
          found.maximumPayloadBytes = payloadView.getUint32(10);
        } // other information (name, description) is of no use here
        continue;
      }
      if (replyType === NBD_REP_ACK) {
        if (found.sizeBytes === undefined) throw new Error("nbd: the server accepted NBD_OPT_GO without NBD_INFO_EXPORT");
        return withDefaults(found as Pick<NbdExport, "sizeBytes" | "transmissionFlags"> & Partial<NbdExport>);
      }
      if (replyType === NBD_REP_ERR_UNSUP && found.sizeBytes === undefined) break; // an older server: EXPORT_NAME below
      if ((replyType & NBD_REP_FLAG_ERROR) !== 0) {
        const text = new TextDecoder().decode(payload).replace(/[\r\n]+/g, " ").trim();
        const why = replyType === NBD_REP_ERR_UNKNOWN ? `the server has no export ${quoted}` :
          `NBD_OPT_GO for export ${quoted}: ${OPTION_ERRORS[replyType] ?? `error 0x${replyType.toString(16)}`}`;
        throw new Error(`nbd: ${why}${text === "" ? "" : ` (${text})`}`);
      }
      throw new Error(`nbd: the server sent an unexpected reply type ${replyType} to NBD_OPT_GO`);
    }
  }
  // NBD_OPT_EXPORT_NAME has no error reply: a server without the export closes the connection.
  io.write(option(NBD_OPT_EXPORT_NAME, name));
  let reply: Uint8Array;
  try {
    reply = io.read(noZeroes ? 10 : 134);
  } catch (error) {
    throw new Error(`nbd: the server closed the connection after NBD_OPT_EXPORT_NAME (no export ${quoted}?): ${(error as Error).message}`);
  }
  const replyView = new DataView(reply.buffer, reply.byteOffset, 10);
  return withDefaults({ sizeBytes: exportSize(replyView.getBigUint64(0)), transmissionFlags: replyView.getUint16(8) });
}

function exportSize(sizeBytes: bigint): number {
  if (sizeBytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`nbd: the export's size ${sizeBytes} is too large`);
  return Number(sizeBytes);
}

function withDefaults(found: Pick<NbdExport, "sizeBytes" | "transmissionFlags"> & Partial<NbdExport>): NbdExport {
  if ((found.transmissionFlags & NBD_FLAG_HAS_FLAGS) === 0) throw new Error("nbd: the server's transmission flags lack NBD_FLAG_HAS_FLAGS");
  return {
    sizeBytes: found.sizeBytes,
    transmissionFlags: found.transmissionFlags,
    minimumBlockBytes: found.minimumBlockBytes ?? 1,
    preferredBlockBytes: found.preferredBlockBytes ?? 4096,
    maximumPayloadBytes: found.maximumPayloadBytes ?? DEFAULT_MAXIMUM_PAYLOAD_BYTES,
  };
}

// ---- a blocking connection ------------------------------------------------------------------------------

/** How long connect and each handshake read or write may block, by default, before the attempt fails. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;

function setTimeouts(fd: number, timeoutMs: number): void {
  const timeval = new BigInt64Array([BigInt(Math.floor(timeoutMs / 1000)), BigInt((timeoutMs % 1000) * 1000)]);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, timeval);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, timeval);
}

/** A WireIo over a blocking socket; read/write errors become one-line Errors. */
function socketIo(fd: number, timeoutMs: number): WireIo {
  const failed = (what: string, result: number) =>
    new Error(result === 0 ? `the server closed the connection during ${what}` :
      -result === EAGAIN ? `the server did not answer within ${timeoutMs / 1000} s` : `${what}: ${errnoText(-result)}`);
  return {
    read(lengthBytes) {
      const bytes = new Uint8Array(lengthBytes);
      for (let done = 0; done < lengthBytes;) {
        const result = recv(fd, bytes.subarray(done), lengthBytes - done, MSG_WAITALL);
        if (result <= 0) throw failed("the handshake", result);
        done += result;
      }
      return bytes;
    },
    write(bytes) {
      for (let done = 0; done < bytes.byteLength;) {
        const result = send(fd, bytes.subarray(done), bytes.byteLength - done, MSG_NOSIGNAL);
        if (result <= 0) throw failed("the handshake", result);
        done += result;
      }
    },
  };
}

/**
 * Connects to `sockaddr` (from resolveAddress) and runs the handshake; returns the blocking socket, ready for the
 * transmission phase (no timeouts left on it), and the export. Throws a one-line Error; nothing stays open then.
 */
export function connectExport(uri: NbdUri, sockaddr: Uint8Array, timeoutMs = HANDSHAKE_TIMEOUT_MS): { fd: number; export: NbdExport } {
  const where = describeAddress(uri.address);
  const family = new DataView(sockaddr.buffer, sockaddr.byteOffset).getUint16(0, true);
  const fd = socket(family, SOCK_STREAM);
  if (fd < 0) throw new Error(`nbd: socket: ${errnoText(-fd)}`);
  try {
    setTimeouts(fd, timeoutMs); // a connect to a silent host gives up after SO_SNDTIMEO too
    const connected = connect(fd, sockaddr);
    if (connected < 0) throw new Error(`nbd: cannot connect to ${where}: ${errnoText(-connected)}`);
    let found: NbdExport;
    try {
      found = clientHandshake(socketIo(fd, timeoutMs), uri.exportName);
    } catch (error) {
      const message = (error as Error).message;
      throw new Error(message.startsWith("nbd: ") ? message.replace(/^nbd: /, `nbd: ${where}: `) : `nbd: ${where}: ${message}`);
    }
    setTimeouts(fd, 0);
    if (family !== AF_UNIX) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, new Int32Array([1])); // requests go out at once
    return { fd, export: found };
  } catch (error) {
    close(fd);
    throw error;
  }
}

/** Ends the transmission phase politely (NBD_CMD_DISC) if the socket takes it at once; the caller closes the fd. */
export function sendDisconnect(fd: number): void {
  const request = new Uint8Array(nbd_request.SIZE);
  const view = new DataView(request.buffer);
  view.setUint32(nbd_request.magic, NBD_REQUEST_MAGIC);
  view.setUint16(nbd_request.type, NBD_CMD_DISC);
  send(fd, request, request.byteLength, MSG_NOSIGNAL | MSG_DONTWAIT);
}
