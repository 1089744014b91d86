/**
 * Validation of what users type: sizes, counts, ids. Pure functions that throw UsageError with a one-line
 * message naming the flag, so the CLI can print it and exit non-zero before anything is created.
 */
import { UBLK_MAX_NR_QUEUES, UBLK_MAX_QUEUE_DEPTH } from "../ffi/uapi/ublk_cmd.ts";

/** Defaults of a new device (ublksrv's, but for the depth: 128 as kublk). */
export const DEFAULT_QUEUE_DEPTH = 128;
export const DEFAULT_NR_HW_QUEUES = 1;
export const DEFAULT_MAX_IO_BUF_BYTES = 512 * 1024;

export class UsageError extends Error {
  override readonly name = "UsageError";
}

/** The kernel numbers ublk devices with minor numbers: 20 bits. */
export const MAX_DEV_ID = (1 << 20) - 1;
/** Device sizes stay exact as JS numbers (and far beyond any real disk). */
export const MAX_SIZE_BYTES = 2 ** 53 - 1;

const SIZE_UNITS: Record<string, number> = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4, p: 1024 ** 5 };

/** Parses "4096", "512K", "10G", "1.5GiB", "2TB" (binary units). Throws UsageError naming `flag`. */
export function parseSize(flag: string, value: unknown): number {
  const text = String(value ?? "").trim();
  const match = /^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$/i.exec(text);
  if (!match) throw new UsageError(`${flag}: "${text}" is not a size (use e.g. 4096, 512K, 10G, 1T)`);
  const bytes = Number(match[1]) * SIZE_UNITS[match[2]!.toLowerCase()]!;
  if (!Number.isInteger(bytes)) throw new UsageError(`${flag}: "${text}" is not a whole number of bytes`);
  if (bytes <= 0) throw new UsageError(`${flag}: size must be greater than zero`);
  if (bytes > MAX_SIZE_BYTES) throw new UsageError(`${flag}: "${text}" is too large`);
  return bytes;
}

/** Parses a decimal integer in [min, max]. */
export function parseInteger(flag: string, value: unknown, min: number, max: number): number {
  const text = String(value ?? "").trim();
  if (!/^-?\d+$/.test(text)) throw new UsageError(`${flag}: "${text}" is not a whole number`);
  const number = Number(text);
  if (number < min || number > max) throw new UsageError(`${flag}: ${text} is out of range (${min}..${max})`);
  return number;
}

/** Parses the 0|1 switches ublksrv uses (-r 1, -i 0). */
export function parseSwitch(flag: string, value: unknown): boolean {
  if (value === undefined || value === false) return false;
  if (value === true) throw new UsageError(`${flag} needs a value: 0 or 1`);
  return parseInteger(flag, value, 0, 1) === 1;
}

export const parseDevId = (flag: string, value: unknown) => parseInteger(flag, value, 0, MAX_DEV_ID);
export const parseNrQueues = (flag: string, value: unknown) => parseInteger(flag, value, 1, UBLK_MAX_NR_QUEUES);
export const parseQueueDepth = (flag: string, value: unknown) => parseInteger(flag, value, 1, UBLK_MAX_QUEUE_DEPTH);
/** How long a queue thread spins for its next request before it sleeps: µs, or "auto" (see lib/queue-worker.ts). */
export type PollSetting = number | "auto";
/** Up to one second: longer would only burn a CPU between bursts. */
const MAX_POLL_US = 1_000_000;
/** "auto", or whole µs up to MAX_POLL_US. */
export function parsePollUs(flag: string, value: unknown): PollSetting {
  const text = String(value ?? "").trim();
  if (text === "auto") return "auto";
  if (!/^-?\d+$/.test(text)) throw new UsageError(`${flag}: "${text}" is neither auto nor a whole number of µs`);
  return parseInteger(flag, text, 0, MAX_POLL_US);
}
/** Whether a value read back (from a device record) is a poll setting. */
export const isPollSetting = (value: unknown): value is PollSetting =>
  value === "auto" || (Number.isInteger(value) && (value as number) >= 0 && (value as number) <= MAX_POLL_US);

/** Logical block sizes the kernel accepts: 512 B to one page, powers of two. */
export function parseLogicalBlockBytes(flag: string, value: unknown): number {
  const bytes = parseInteger(flag, value, 512, 4096);
  if ((bytes & (bytes - 1)) !== 0) throw new UsageError(`${flag}: ${bytes} is not a power of two (512, 1024, 2048 or 4096)`);
  return bytes;
}

/** Maximum request size: a multiple of 4 KiB between 4 KiB and 32 MiB (the kernel's per-tag limit). */
export function parseMaxIoBytes(flag: string, value: unknown): number {
  const bytes = parseSize(flag, value);
  if (bytes % 4096 !== 0 || bytes < 4096 || bytes > 32 * 1024 * 1024) {
    throw new UsageError(`${flag}: must be a multiple of 4K between 4K and 32M`);
  }
  return bytes;
}

/** Rejects a value given more than once (mri makes arrays of repeated flags). */
export function single(flag: string, value: unknown): unknown {
  if (Array.isArray(value)) throw new UsageError(`${flag} given more than once`);
  return value;
}

/** A new device's shape as typed — CLI flags or createDevice() options — before validation. */
export interface DeviceShapeInput {
  devId?: unknown;
  queues?: unknown;
  depth?: unknown;
  maxIoBytes?: unknown;
  pollUs?: unknown;
  sizeBytes?: unknown;
  logicalBlockBytes?: unknown;
}

/** The name each input goes by in messages: the CLI's flag or the API's option. */
export type DeviceShapeNames = { [K in keyof DeviceShapeInput]-?: string };
export const CLI_NAMES: DeviceShapeNames = {
  devId: "-n", queues: "-q", depth: "-d", maxIoBytes: "--max-io-size", pollUs: "--poll-us", sizeBytes: "-s", logicalBlockBytes: "-b",
};
export const API_NAMES: DeviceShapeNames = {
  devId: "devId", queues: "queues", depth: "depth", maxIoBytes: "maxIoBytes", pollUs: "pollUs",
  sizeBytes: "targetOptions.sizeBytes", logicalBlockBytes: "targetOptions.logicalBlockBytes",
};

export interface DeviceShape {
  /** -1: the kernel picks. */
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  pollUs: PollSetting;
  /** Absent: the target's default. */
  sizeBytes?: number;
  logicalBlockBytes?: number;
}

/** Validates a new device's shape with one set of rules for the CLI and the embedding API, defaults filled in. */
export function parseDeviceShape(input: DeviceShapeInput, names: DeviceShapeNames): DeviceShape {
  const logicalBlockBytes = input.logicalBlockBytes === undefined ? undefined : parseLogicalBlockBytes(names.logicalBlockBytes, input.logicalBlockBytes);
  const sizeBytes = input.sizeBytes === undefined ? undefined : parseSize(names.sizeBytes, input.sizeBytes);
  if (sizeBytes !== undefined && sizeBytes % (logicalBlockBytes ?? 512) !== 0) {
    throw new UsageError(`${names.sizeBytes}: size must be a multiple of the logical block size (${logicalBlockBytes ?? 512})`);
  }
  return {
    devId: input.devId === undefined ? -1 : parseDevId(names.devId, input.devId),
    nrHwQueues: input.queues === undefined ? DEFAULT_NR_HW_QUEUES : parseNrQueues(names.queues, input.queues),
    queueDepth: input.depth === undefined ? DEFAULT_QUEUE_DEPTH : parseQueueDepth(names.depth, input.depth),
    maxIoBufBytes: input.maxIoBytes === undefined ? DEFAULT_MAX_IO_BUF_BYTES : parseMaxIoBytes(names.maxIoBytes, input.maxIoBytes),
    pollUs: input.pollUs === undefined ? "auto" : parsePollUs(names.pollUs, input.pollUs),
    ...(sizeBytes === undefined ? {} : { sizeBytes }),
    ...(logicalBlockBytes === undefined ? {} : { logicalBlockBytes }),
  };
}

/** One of `allowed`, or a UsageError listing them. */
export function parseChoice<T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  if (allowed.includes(value as T)) return value as T;
  throw new UsageError(`${name}: ${JSON.stringify(value)} is not one of ${allowed.map((choice) => `"${choice}"`).join(", ")}`);
}
