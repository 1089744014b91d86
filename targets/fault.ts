/**
 * The fault-injection target: wraps another target and, by option, delays requests, fails a share of them
 * with an errno, or kills the whole daemon after N requests — for tests, and for users testing their own
 * stack above a misbehaving disk.
 *
 *   ublk-bun add -t fault -o base=memory -s 64M -o failPercent=1 -o failErrno=5
 *   ublk-bun add -t fault -o base=null -o delayMs=2 -o delayJitterMs=3
 *   ublk-bun add -t fault -o base=memory -i 1 -o crashAfter=5000      (SIGKILL of the daemon, like kill -9)
 */
import { EIO } from "../ffi/errno.ts";
import { loadTarget } from "./registry.ts";
import { IO_PENDING, type JsonValue, type QueueHandler, type Target, type TargetRecord } from "./types.ts";

interface FaultOptions {
  base: string;
  delayMs: number;
  delayJitterMs: number;
  failPercent: number;
  failErrno: number;
  crashAfter: number;
  crashWhenRecovering: boolean;
}

function faultOptions(options: { [key: string]: JsonValue | undefined }): FaultOptions {
  const number = (key: string, fallback: number, min: number, max: number) => {
    const value = options[key] === undefined ? fallback : Number(options[key]);
    if (!Number.isFinite(value) || value < min || value > max) throw new Error(`fault: -o ${key}=${options[key]} is out of range (${min}..${max})`);
    return value;
  };
  return {
    base: String(options.base ?? "null"),
    delayMs: number("delayMs", 0, 0, 60_000),
    delayJitterMs: number("delayJitterMs", 0, 0, 60_000),
    failPercent: number("failPercent", 0, 0, 100),
    failErrno: number("failErrno", EIO, 1, 4095),
    crashAfter: Math.floor(number("crashAfter", 0, 0, Number.MAX_SAFE_INTEGER)),
    crashWhenRecovering: options.crashWhenRecovering === true,
  };
}

/** The wrapped target's own record, as stored inside ours. */
function baseRecord(record: TargetRecord): TargetRecord {
  return record.options.baseRecord as unknown as TargetRecord;
}

export const faultTarget: Target = {
  name: "fault",
  description: "wraps another target (-o base=memory) to delay (-o delayMs, delayJitterMs), fail (-o failPercent, failErrno) " +
    "or crash the daemon after N requests (-o crashAfter)",
  async prepare(options): Promise<TargetRecord> {
    const fault = faultOptions(options);
    if (fault.base === "fault") throw new Error("fault: -o base=fault would wrap itself");
    const base = await loadTarget(fault.base);
    const inner = await base.prepare(options);
    const { base: _base, ...settings } = fault;
    return { ...inner, type: "fault", options: { ...settings, baseType: inner.type, baseRecord: inner as unknown as JsonValue } };
  },

  async openQueue(record, queue): Promise<QueueHandler> {
    const fault = faultOptions(record.options);
    const innerRecord = baseRecord(record);
    const base = await loadTarget(innerRecord.type);
    const inner = await base.openQueue(innerRecord, queue);
    const crashAfter = queue.recovering && !fault.crashWhenRecovering ? 0 : fault.crashAfter;
    const failShare = fault.failPercent / 100;
    const delayed = fault.delayMs > 0 || fault.delayJitterMs > 0;
    let served = 0;
    return {
      needsEventLoop: delayed || inner.needsEventLoop === true,
      handleIo(tag, op, opFlags, startSector, nrSectors) {
        served++;
        if (crashAfter > 0 && served >= crashAfter) process.kill(process.pid, "SIGKILL");
        if (failShare > 0 && Math.random() < failShare) return -fault.failErrno;
        if (!delayed) return inner.handleIo(tag, op, opFlags, startSector, nrSectors);
        setTimeout(() => {
          const result = inner.handleIo(tag, op, opFlags, startSector, nrSectors);
          if (result !== IO_PENDING) queue.complete(tag, result);
        }, fault.delayMs + Math.random() * fault.delayJitterMs);
        return IO_PENDING;
      },
      // Where the inner target keeps its data: on a USER_COPY device (memory) the queue copies there directly,
      // and a target that ignores data (null) gets no copy at all.
      dataAddress: inner.dataAddress?.bind(inner),
      ignoresData: inner.ignoresData,
      onTargetCqe: inner.onTargetCqe?.bind(inner),
      onDeleting: inner.onDeleting?.bind(inner),
      close: inner.close?.bind(inner),
    };
  },

  async claim(record) {
    const innerRecord = baseRecord(record);
    const base = await loadTarget(innerRecord.type);
    return (await base.claim?.(innerRecord)) ?? -1;
  },

  async checkRecord(record) {
    const innerRecord = baseRecord(record);
    const base = await loadTarget(innerRecord.type);
    await base.checkRecord?.(innerRecord);
  },

  async destroy(record) {
    const innerRecord = baseRecord(record);
    const base = await loadTarget(innerRecord.type);
    await base.destroy?.(innerRecord);
  },
};

export default faultTarget;
