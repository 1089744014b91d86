// The NBD wire protocol as the nbd target speaks it: the URI forms, the struct layouts and constants pinned to the
// spec's literals (doc/proto.md of the NBD project), and the handshake against scripted servers.
import { describe, expect, test } from "bun:test";
import {
  byteSwap32, clientHandshake, IHAVEOPT, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
  NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
  nbd_request, nbd_simple_reply, NBDMAGIC, parseNbdUri, replyResult, resolveAddress, type WireIo,
} from "../../targets/nbd-protocol.ts";

describe("NBD URIs", () => {
  test("nbd:// with and without port and export; IPv6 literals; percent-decoded export names", () => {
    expect(parseNbdUri("nbd://example.org/disk")).toEqual({ address: { kind: "tcp", host: "example.org", port: 10809 }, exportName: "disk" });
    expect(parseNbdUri("nbd://127.0.0.1:2000/")).toEqual({ address: { kind: "tcp", host: "127.0.0.1", port: 2000 }, exportName: "" });
    expect(parseNbdUri("nbd://127.0.0.1")).toEqual({ address: { kind: "tcp", host: "127.0.0.1", port: 10809 }, exportName: "" });
    expect(parseNbdUri("nbd://[::1]:10810/a%20b/c")).toEqual({ address: { kind: "tcp", host: "::1", port: 10810 }, exportName: "a b/c" });
  });
  test("nbd+unix:///EXPORT?socket=PATH", () => {
    expect(parseNbdUri("nbd+unix:///vm?socket=/run/nbd.sock")).toEqual({ address: { kind: "unix", path: "/run/nbd.sock" }, exportName: "vm" });
    expect(parseNbdUri("nbd+unix://?socket=/tmp/s")).toEqual({ address: { kind: "unix", path: "/tmp/s" }, exportName: "" });
  });
  test("refused with one line that says why", () => {
    const cases: Array<[string, RegExp]> = [
      ["", /is not an NBD URI/],
      ["/tmp/sock", /is not an NBD URI/],
      ["http://host/x", /is not an NBD URI/],
      ["nbds://host/x", /TLS/],
      ["nbds+unix:///x?socket=/s", /TLS/],
      ["nbd://", /names no host/],
      ["nbd://host:99999/x", /not a valid URI/],
      ["nbd://host:0/x", /port 0/],
      ["nbd://user:secret@host/x", /user name or password/],
      ["nbd://host/x?tls=on", /query/],
      ["nbd://host/x#part", /fragment/],
      ["nbd://host/%zz", /percent-encoded/],
      ["nbd+unix:///x", /names no socket/],
      ["nbd+unix:///x?socket=", /names no socket/],
      ["nbd+unix://host/x?socket=/s", /names a host/],
      ["nbd+unix:///x?socket=/s&tls=on", /does not take \(tls\)/],
      [`nbd+unix:///x?socket=/${"a".repeat(107)}`, /longer than 107 bytes/],
    ];
    for (const [text, why] of cases) {
      let message = "";
      try {
        parseNbdUri(text);
      } catch (error) {
        message = (error as Error).message;
      }
      expect({ text, message }).toEqual({ text, message: expect.stringMatching(why) });
      expect(message.split("\n")).toHaveLength(1);
    }
  });
  test("a password is never echoed back", () => {
    expect(() => parseNbdUri("nbd://user:secret@host/x")).toThrow(/^nbd: "nbd:\/\/user:secret@host\/x"/);
  });
  test("sockaddr bytes: sockaddr_un, sockaddr_in, sockaddr_in6 (family little-endian, port big-endian)", async () => {
    const unix = await resolveAddress({ kind: "unix", path: "/s" });
    expect([unix.byteLength, ...unix.subarray(0, 5)]).toEqual([110, 1, 0, 0x2f, 0x73, 0]);
    expect([...await resolveAddress({ kind: "tcp", host: "127.0.0.1", port: 10809 })]).toEqual([2, 0, 0x2a, 0x39, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    const six = await resolveAddress({ kind: "tcp", host: "::1", port: 10809 });
    expect([six.byteLength, six[0], six[1], six[2], six[3], six[23]]).toEqual([28, 10, 0, 0x2a, 0x39, 1]);
  });
});

describe("NBD wire layout", () => {
  test("request and simple reply headers", () => {
    expect({ ...nbd_request }).toEqual({ SIZE: 28, magic: 0, flags: 4, type: 6, cookie: 8, offset: 16, length: 24 });
    expect({ ...nbd_simple_reply }).toEqual({ SIZE: 16, magic: 0, error: 4, cookie: 8 });
  });
  test("magics, commands and flags", () => {
    expect([NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC]).toEqual([0x25609513, 0x67446698]);
    expect([NBDMAGIC, IHAVEOPT, NBD_REP_MAGIC]).toEqual([0x4e42444d41474943n, 0x49484156454f5054n, 0x0003e889045565a9n]);
    expect([NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES]).toEqual([0, 1, 3, 4, 6]);
    expect([NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE]).toEqual([1, 2]);
    expect([NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_TRIM,
      NBD_FLAG_SEND_WRITE_ZEROES]).toEqual([1, 2, 4, 8, 16, 32, 64]);
  });
  test("byteSwap32 turns host-order u32 stores into network order", () => {
    const words = new Uint32Array(1);
    words[0] = byteSwap32(NBD_REQUEST_MAGIC);
    expect([...new Uint8Array(words.buffer)]).toEqual([0x25, 0x60, 0x95, 0x13]);
    expect(byteSwap32(0xffffffff)).toBe(0xffffffff);
    expect(byteSwap32(byteSwap32(0x80000001))).toBe(0x80000001);
  });
  test("reply errors become -errno; unknown ones EIO", () => {
    expect([0, 1, 5, 28, 95, 108, 9999].map(replyResult)).toEqual([0, -1, -5, -28, -95, -108, -5]);
  });
});

/** A server played from a script: what it sends, and everything the client wrote, for comparison. */
function scriptedServer(chunks: Uint8Array[]): WireIo & { written: number[] } {
  const incoming = Buffer.concat(chunks);
  let position = 0;
  const written: number[] = [];
  return {
    written,
    read(lengthBytes) {
      if (position + lengthBytes > incoming.length) throw new Error("the server closed the connection during the handshake");
      const out = new Uint8Array(incoming.subarray(position, position + lengthBytes));
      position += lengthBytes;
      return out;
    },
    write(bytes) {
      written.push(...bytes);
    },
  };
}

function be(bits: 16 | 32 | 64, value: number | bigint): Buffer {
  const out = Buffer.alloc(bits / 8);
  if (bits === 16) out.writeUInt16BE(Number(value));
  else if (bits === 32) out.writeUInt32BE(Number(value));
  else out.writeBigUInt64BE(BigInt(value));
  return out;
}
const greeting = (handshakeFlags: number) => Buffer.concat([be(64, NBDMAGIC), be(64, IHAVEOPT), be(16, handshakeFlags)]);
const optionReply = (type: number, data: Buffer) => Buffer.concat([be(64, NBD_REP_MAGIC), be(32, 7), be(32, type), be(32, data.length), data]);
const infoExport = (sizeBytes: number, flags: number) => optionReply(3, Buffer.concat([be(16, 0), be(64, sizeBytes), be(16, flags)]));
const infoBlockSize = (min: number, preferred: number, max: number) => optionReply(3, Buffer.concat([be(16, 3), be(32, min), be(32, preferred), be(32, max)]));

describe("NBD handshake", () => {
  test("fixed newstyle with NBD_OPT_GO: the bytes the client sends, and what it learns", () => {
    const server = scriptedServer([greeting(3), infoExport(1 << 30, 0x6d), infoBlockSize(512, 4096, 1 << 25), optionReply(1, Buffer.alloc(0))]);
    expect(clientHandshake(server, "disk")).toEqual({
      sizeBytes: 1 << 30, transmissionFlags: 0x6d, minimumBlockBytes: 512, preferredBlockBytes: 4096, maximumPayloadBytes: 1 << 25,
    });
    expect(Buffer.from(server.written).toString("hex")).toBe(
      "00000003" + // client flags: FIXED_NEWSTYLE | NO_ZEROES
      "49484156454f5054" + "00000007" + "0000000c" + // IHAVEOPT, NBD_OPT_GO, 12 bytes of data
      "00000004" + Buffer.from("disk").toString("hex") + "0001" + "0003"); // name, one info request: BLOCK_SIZE
  });
  test("a server without NBD_OPT_GO (ERR_UNSUP): NBD_OPT_EXPORT_NAME, then size, flags and 124 zeroes", () => {
    const server = scriptedServer([greeting(1), optionReply(0x80000001, Buffer.alloc(0)), be(64, 4 << 20), be(16, 0x03), Buffer.alloc(124)]);
    expect(clientHandshake(server, "x")).toMatchObject({ sizeBytes: 4 << 20, transmissionFlags: 3, maximumPayloadBytes: 32 << 20 });
    expect(Buffer.from(server.written).subarray(4 + 16 + 4 + 1 + 4).toString("hex")).toBe("49484156454f5054" + "00000001" + "00000001" + "78");
  });
  test("refusals: no such export, TLS required, oldstyle, not NBD, a server that closes mid-handshake", () => {
    const cases: Array<[Uint8Array[], RegExp]> = [
      [[greeting(3), optionReply(0x80000006, Buffer.from("unknown export"))], /no export "disk" \(unknown export\)/],
      [[greeting(3), optionReply(0x80000005, Buffer.alloc(0))], /requires TLS/],
      [[be(64, NBDMAGIC), be(64, 0x00420281861253n), Buffer.alloc(2)], /oldstyle/],
      [[Buffer.from("HTTP/1.1 400 Bad\r\n\r\n")], /not an NBD server/],
      [[greeting(3)], /closed the connection/],
      [[greeting(3), infoExport(1 << 20, 0)], /closed the connection/],
      [[greeting(3), optionReply(1, Buffer.alloc(0))], /without NBD_INFO_EXPORT/],
      [[greeting(3), infoExport(1 << 20, 0), optionReply(1, Buffer.alloc(0))], /NBD_FLAG_HAS_FLAGS/],
      [[greeting(0)], /closed the connection after NBD_OPT_EXPORT_NAME \(no export "disk"\?\)/],
    ];
    for (const [chunks, why] of cases) {
      expect(() => clientHandshake(scriptedServer(chunks), "disk")).toThrow(why);
    }
  });
});
