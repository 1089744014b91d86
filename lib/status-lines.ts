/**
 * The status protocol a daemon speaks to whoever waits for it — on fd 3 to the process that started it, or on an
 * --standby spare's socket to `recover` (see lib/server-process.ts for the lines). No imports: `recover` reads it
 * before it loads anything else.
 */
import type { DeviceRecord } from "./records.ts";

/** Splits a stream into lines for `onLine`; a line may arrive in several chunks, or several in one. */
export function lineReader(onLine: (line: string) => void): (chunk: Uint8Array) => void {
  const decoder = new TextDecoder();
  let buffered = "";
  return (chunk) => {
    buffered += decoder.decode(chunk, { stream: true });
    let newline: number;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      onLine(line);
    }
  };
}

/** The device's `list` block as a spare sends it to `recover` after READY, so that `recover` loads nothing to print it. */
export interface SentListing {
  text: string;
  json: object;
}

export interface StatusHandlers {
  onAdded?(devId: number): void;
  onWaiting?(elapsedMs: number, state: string): void;
  onStandby?(): void;
  onReady(record: DeviceRecord): void;
  onListing?(listing: SentListing): void;
  onError(message: string): void;
}

/** Passes one status line to its handler; lines it does not know are ignored. */
export function readStatusLine(line: string, handlers: StatusHandlers): void {
  if (line.startsWith("ADDED ")) handlers.onAdded?.(Number(line.slice(6)));
  else if (line.startsWith("WAITING ")) {
    const [elapsedMs, state] = line.slice(8).split(" ");
    handlers.onWaiting?.(Number(elapsedMs), state ?? "?");
  } else if (line === "STANDBY") handlers.onStandby?.();
  else if (line.startsWith("READY ")) handlers.onReady(JSON.parse(line.slice(6)) as DeviceRecord);
  else if (line.startsWith("LISTING ")) handlers.onListing?.(JSON.parse(line.slice(8)) as SentListing);
  else if (line.startsWith("ERROR ")) handlers.onError(line.slice(6));
}
