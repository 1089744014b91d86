#!/usr/bin/env bun
// ns per io_uring NOP round trip through ffi/ring.ts: one at a time, and batched by 32. Prints one line.
import { Ring } from "../ffi/ring.ts";
import { IORING_SETUP_COOP_TASKRUN, IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER } from "../ffi/uapi/io_uring.ts";

const roundTrips = Number(process.env.NOPS ?? 1_000_000);
const ring = Ring.create({ entries: 64, flags: IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN });

function single(count: number): number {
  const started = Bun.nanoseconds();
  for (let i = 0; i < count; i++) {
    ring.prepNop(ring.getSqe(), i);
    ring.submit(1);
    ring.cqAdvanceTo(ring.cqHead() + 1);
  }
  return (Bun.nanoseconds() - started) / count;
}

function batched(count: number, batch: number): number {
  const started = Bun.nanoseconds();
  for (let i = 0; i < count; i += batch) {
    for (let j = 0; j < batch; j++) ring.prepNop(ring.getSqe(), i + j);
    ring.submit(batch);
    ring.cqAdvanceTo(ring.cqTail());
  }
  return (Bun.nanoseconds() - started) / count;
}

single(roundTrips / 10); // warm up the JIT
batched(roundTrips / 10, 32);
const singleNs = single(roundTrips);
const batchedNs = batched(roundTrips, 32);
ring.close();
console.log(`ring-nop: ${singleNs.toFixed(0)} ns/op single, ${batchedNs.toFixed(0)} ns/op batched by 32 (${roundTrips} round trips each)`);
