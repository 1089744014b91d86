// One NBD connection (targets/nbd-connection.ts) on a real io_uring, its server played on the other end of a
// socketpair: replies out of order, several per receive, split anywhere (inside a header, inside a read's data),
// a read's data longer than the staging buffer, error replies, a reply to no request.
import { afterEach, describe, expect, test } from "bun:test";
import { AF_UNIX, close, memoryAt, mmapAnonymous, MSG_DONTWAIT, MSG_WAITALL, munmap, recv, send, setsockopt, SO_RCVTIMEO, SOCK_STREAM, SOL_SOCKET, socketpair } from "../../ffi/libc.ts";
import { CQE_RES, CQE_USER_DATA_HI, CQE_USER_DATA_LO, Ring } from "../../ffi/ring.ts";
import { EAGAIN, EIO, ENOSPC } from "../../ffi/errno.ts";
import { type NbdConnection, openConnection } from "../../targets/nbd-connection.ts";
import {
  byteSwap32, NBD_CMD_READ, NBD_CMD_WRITE, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, nbd_request, nbd_simple_reply,
} from "../../targets/nbd-protocol.ts";
import { TARGET_USER_DATA } from "../../targets/types.ts";

const DEPTH = 8, MAX_IO_BYTES = 128 << 10, HEADER_STRIDE_BYTES = 32;

interface Harness {
  ring: Ring;
  connection: NbdConnection;
  peerFd: number;
  buffers: Uint8Array;
  results: Map<number, number>;
  tagCommand: Uint8Array;
  tagLengthBytes: Uint32Array;
  headers: Uint32Array;
}
let open: Harness | null = null;
const mappings: Array<[number, number]> = [];

afterEach(() => {
  if (!open) return;
  open.connection.close();
  close(open.peerFd);
  open.ring.close();
  open = null;
  for (const [address, bytes] of mappings.splice(0)) munmap(address, bytes);
});

function mapped(bytes: number): number {
  const address = mmapAnonymous(bytes);
  expect(address).toBeGreaterThan(0);
  mappings.push([address, bytes]);
  return address;
}

/** Zero copy: how the harness copies to and from a request's pages (standing in for pread / pwrite on /dev/ublkcN). */
interface RequestCopies {
  readRequest(tag: number, address: number, lengthBytes: number, byteOffset: number): number;
  writeRequest(tag: number, address: number, lengthBytes: number, byteOffset: number): number;
}

function harness(zeroCopy: RequestCopies | null = null): Harness {
  const ring = Ring.create({ entries: 64 });
  const pair = socketpair(AF_UNIX, SOCK_STREAM);
  if (typeof pair === "number") throw new Error(`socketpair: ${pair}`);
  // The played server never waits more than 5 s for the connection: a bug fails the test instead of hanging it.
  setsockopt(pair[1], SOL_SOCKET, SO_RCVTIMEO, new BigInt64Array([5n, 0n]));
  const bufferAddress = mapped(DEPTH * MAX_IO_BYTES);
  const headersAddress = mapped(4096);
  const results = new Map<number, number>();
  const tagCommand = new Uint8Array(DEPTH), tagLengthBytes = new Uint32Array(DEPTH);
  const connection = openConnection({
    ring, getSqe: () => ring.getSqe(), depth: DEPTH, headersAddress, headerStrideBytes: HEADER_STRIDE_BYTES, bufferAddress,
    maxIoBufBytes: MAX_IO_BYTES, tagCommand, tagLengthBytes, where: "queue 0: test", outageTimeoutMs: 60_000,
    zeroCopy: zeroCopy !== null, readRequest: zeroCopy?.readRequest ?? (() => -EIO), writeRequest: zeroCopy?.writeRequest ?? (() => -EIO),
    complete(tag, result) {
      expect(results.has(tag)).toBe(false); // once per request
      results.set(tag, result);
    },
    connect() {
      throw new Error("nbd: no server (test)");
    },
  }, 0, 1, pair[0]);
  open = { ring, connection, peerFd: pair[1], buffers: new Uint8Array(memoryAt(bufferAddress, DEPTH * MAX_IO_BYTES)), results,
    tagCommand, tagLengthBytes, headers: new Uint32Array(memoryAt(headersAddress, 4096)) };
  return open;
}

/** Runs the ring until nothing more completes within `waitMs` (twice), handing the connection its CQEs. */
function pump(h: Harness, waitMs = 20): void {
  for (let idle = 0; idle < 2;) {
    h.ring.submit(0);
    h.ring.submit(1, waitMs);
    let head = h.ring.cqHead();
    const tail = h.ring.cqTail();
    if (head === tail) {
      idle++;
      continue;
    }
    idle = 0;
    while (head !== tail) {
      const at = h.ring.cqeBase(head);
      expect(h.ring.cqe32[at + CQE_USER_DATA_HI]! >>> 0).toBe(TARGET_USER_DATA);
      h.connection.onCqe(h.ring.cqe32[at + CQE_USER_DATA_LO]! >>> 0, h.ring.cqe32[at + CQE_RES]!);
      head = (head + 1) >>> 0;
    }
    h.ring.cqAdvanceTo(head);
  }
}

/** Queues tag's request as targets/nbd.ts does (the header fields the connection and the peer read); `accepted`:
 * what submit is expected to say. */
function request(h: Harness, tag: number, command: number, lengthBytes: number, accepted = true): void {
  const at = (tag * HEADER_STRIDE_BYTES) / 4;
  h.headers[at + nbd_request.magic / 4] = byteSwap32(NBD_REQUEST_MAGIC);
  h.headers[at + nbd_request.flags / 4] = byteSwap32(command); // flags 0, then the type
  h.headers[at + nbd_request.cookie / 4] = 0;
  h.headers[at + nbd_request.cookie / 4 + 1] = byteSwap32(tag);
  h.headers[at + nbd_request.length / 4] = byteSwap32(lengthBytes);
  h.tagCommand[tag] = command;
  h.tagLengthBytes[tag] = lengthBytes;
  expect(h.connection.submit(tag)).toBe(accepted);
}

/** Reads what the connection sent: `count` requests (28-byte headers, a write's data after its header). */
function readRequests(h: Harness, count: number): Array<{ command: number; tag: number; lengthBytes: number; data?: Uint8Array }> {
  const requests = [];
  const header = new Uint8Array(nbd_request.SIZE);
  for (let i = 0; i < count; i++) {
    expect(recv(h.peerFd, header, nbd_request.SIZE, MSG_WAITALL)).toBe(nbd_request.SIZE);
    const view = new DataView(header.buffer);
    expect(view.getUint32(nbd_request.magic)).toBe(NBD_REQUEST_MAGIC);
    const request = { command: view.getUint16(nbd_request.type), tag: Number(view.getBigUint64(nbd_request.cookie)),
      lengthBytes: view.getUint32(nbd_request.length) };
    let data: Uint8Array | undefined;
    if (request.command === NBD_CMD_WRITE) {
      data = new Uint8Array(request.lengthBytes);
      expect(recv(h.peerFd, data, data.byteLength, MSG_WAITALL)).toBe(data.byteLength);
    }
    requests.push({ ...request, data });
  }
  return requests;
}

function reply(tag: number, error: number, data?: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(nbd_simple_reply.SIZE + (data?.byteLength ?? 0));
  const view = new DataView(bytes.buffer);
  view.setUint32(nbd_simple_reply.magic, NBD_SIMPLE_REPLY_MAGIC);
  view.setUint32(nbd_simple_reply.error, error);
  view.setBigUint64(nbd_simple_reply.cookie, BigInt(tag));
  if (data) bytes.set(data, nbd_simple_reply.SIZE);
  return bytes;
}

const pattern = (tag: number, lengthBytes: number) => Uint8Array.from({ length: lengthBytes }, (_, i) => (i * 31 + tag * 7 + (i >> 9)) & 0xff);

/** Sends `stream` to the connection in pieces of `pieceBytes` (0: 1 to 23 bytes, varying), running the ring between pieces. */
function deliver(h: Harness, stream: Uint8Array, pieceBytes: number): void {
  let seed = 12345;
  for (let at = 0; at < stream.byteLength;) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    const bytes = pieceBytes === 0 ? 1 + ((seed >>> 16) % 23) : pieceBytes;
    const piece = stream.subarray(at, Math.min(at + bytes, stream.byteLength));
    const sent = send(h.peerFd, piece, piece.byteLength, MSG_DONTWAIT);
    if (sent === -EAGAIN) {
      pump(h, 0);
      continue;
    }
    expect(sent).toBeGreaterThan(0);
    at += sent;
    if (bytes < 4096) pump(h, 0);
  }
  pump(h);
}

describe("nbd connection", () => {
  // Tag: command, length. 70 KiB is more than the staging buffer holds; tag 5's read and tag 7's write fail on
  // the server (error replies carry no data; a reply split inside its header must not take another's error field).
  const REQUESTS: Array<[number, number]> = [[NBD_CMD_READ, 4096], [NBD_CMD_READ, 512], [NBD_CMD_WRITE, 8192], [NBD_CMD_READ, 70 << 10],
    [NBD_CMD_READ, 4096], [NBD_CMD_READ, 4096], [NBD_CMD_READ, 128 << 10], [NBD_CMD_WRITE, 4096]];

  for (const [name, pieceBytes] of [["all at once", 1 << 20], ["in 7-byte pieces", 7], ["in pieces of 1 to 23 bytes", 0], ["in 4 KiB + 5 pieces", 4101]] as const) {
    test(`replies out of order, ${name}: every request completed once, with its result and data`, () => {
      const h = harness();
      REQUESTS.forEach(([command, lengthBytes], tag) => request(h, tag, command, lengthBytes));
      pump(h);
      const sent = readRequests(h, REQUESTS.length);
      expect(sent.map((r) => r.tag).sort()).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
      const order = [6, 3, 1, 5, 0, 7, 2, 4];
      const stream = Buffer.concat(order.map((tag) => {
        const [command, lengthBytes] = REQUESTS[tag]!;
        if (tag === 5) return reply(tag, 5 /* EIO */);
        if (tag === 7) return reply(tag, 28 /* ENOSPC */);
        return command === NBD_CMD_READ ? reply(tag, 0, pattern(tag, lengthBytes)) : reply(tag, 0);
      }));
      deliver(h, stream, pieceBytes);
      expect(Object.fromEntries(h.results)).toEqual(Object.fromEntries(REQUESTS.map(([command, lengthBytes], tag) =>
        [tag, tag === 5 ? -EIO : tag === 7 ? -ENOSPC : command === NBD_CMD_READ || command === NBD_CMD_WRITE ? lengthBytes : 0])));
      for (const [tag, [command, lengthBytes]] of REQUESTS.entries()) {
        if (command !== NBD_CMD_READ || tag === 5) continue;
        const got = h.buffers.subarray(tag * MAX_IO_BYTES, tag * MAX_IO_BYTES + lengthBytes);
        expect({ tag, same: Buffer.from(got).equals(Buffer.from(pattern(tag, lengthBytes))) }).toEqual({ tag, same: true });
      }
    });
  }

  test("a reply to a cookie no request has drops the connection and keeps the requests for the next one", () => {
    const h = harness();
    const logged: string[] = [];
    const error = console.error;
    console.error = (line: string) => logged.push(line);
    try {
      request(h, 2, NBD_CMD_READ, 4096);
      pump(h);
      readRequests(h, 1);
      deliver(h, reply(3, 0), 64);
    } finally {
      console.error = error;
    }
    expect(h.results.size).toBe(0); // held for a reconnect, not failed
    expect(logged.join("\n")).toMatch(/replied to cookie 3, which no request has; reconnecting, 1 requests wait/);
  });

  test("zero copy, small requests: a write's data is copied from the request at submit, a read's into it from the staging buffer; a failed copy fails only its request", () => {
    // The requests' own pages, as the kernel would copy them with pread / pwrite on /dev/ublkcN. Tag 3's copy-in
    // and tag 4's copy-out fail.
    const pages = new Map<number, Uint8Array>();
    const h = harness({
      readRequest(tag, address, lengthBytes, byteOffset) {
        if (tag === 3) return -EIO;
        new Uint8Array(memoryAt(address, lengthBytes)).set(pages.get(tag)!.subarray(byteOffset, byteOffset + lengthBytes));
        return lengthBytes;
      },
      writeRequest(tag, address, lengthBytes, byteOffset) {
        if (tag === 4) return -EIO;
        pages.get(tag)!.set(new Uint8Array(memoryAt(address, lengthBytes)), byteOffset);
        return lengthBytes;
      },
    });
    const small: Array<[number, number]> = [[NBD_CMD_WRITE, 4096], [NBD_CMD_READ, 4096], [NBD_CMD_READ, 512], [NBD_CMD_WRITE, 8192], [NBD_CMD_READ, 4096]];
    small.forEach(([command, lengthBytes], tag) => {
      pages.set(tag, command === NBD_CMD_WRITE ? pattern(tag, lengthBytes) : new Uint8Array(lengthBytes));
      request(h, tag, command, lengthBytes, tag !== 3); // a write whose data cannot be had is refused at once
    });
    pump(h);
    const sent = readRequests(h, 4);
    expect(sent.map((r) => r.tag)).toEqual([0, 1, 2, 4]);
    expect(Buffer.from(sent[0]!.data!).equals(Buffer.from(pattern(0, 4096)))).toBe(true);
    // All replies at once: each read's data is in the staging buffer whole (a piece still to come would be read
    // into the request's registered pages, which this ring has not).
    deliver(h, Buffer.concat([reply(4, 0, pattern(4, 4096)), reply(2, 0, pattern(2, 512)), reply(0, 0), reply(1, 0, pattern(1, 4096))]), 1 << 20);
    expect(Object.fromEntries(h.results)).toEqual({ 0: 4096, 1: 4096, 2: 512, 4: -EIO });
    for (const tag of [1, 2]) expect({ tag, same: Buffer.from(pages.get(tag)!).equals(Buffer.from(pattern(tag, small[tag]![1]))) }).toEqual({ tag, same: true });
    // A read's data goes to its pages only, not through the queue's buffer as on the copy path.
    expect(h.buffers.subarray(1 * MAX_IO_BYTES, 1 * MAX_IO_BYTES + 4096).every((byte) => byte === 0)).toBe(true);
  });
});
