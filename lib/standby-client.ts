/**
 * `recover` through a device's `add --standby` spare (lib/standby.ts), with Bun's sockets and no node module
 * (node:fs alone costs half a bare Bun start): bin/ublk-bun.ts hands the device over before it loads the rest
 * of the CLI, while the application waits.
 */
import { daemonLogPath, standbySocketPath } from "./run-dir.ts";
import type { DeviceRecord } from "./records.ts";
import { lineReader, readStatusLine, type SentListing } from "./status-lines.ts";

/** What `recover` writes on a spare's socket. */
export const RECOVER_REQUEST = "RECOVER";
/** After READY, how long `recover` waits for the spare's LISTING before it builds the list block itself. */
const LISTING_WAIT_MS = 2_000;

/** How long `add` waits for the daemon's READY (TCG VMs are slow; START_DEV scans partitions). Tests shorten it. */
export function readyTimeoutMs(): number {
  const fromEnv = Number(process.env.UBLK_BUN_READY_TIMEOUT_MS);
  return Number.isInteger(fromEnv) && fromEnv > 0 ? fromEnv : 120_000;
}

/** What a spare answered: the record once it serves (with its list block, when it sent one), or why not. */
export interface StandbyAnswer {
  record?: DeviceRecord;
  listing?: SentListing;
  error?: string;
}

/**
 * Hands the recovery to the device's warm spare (lib/standby.ts) when one listens: its status lines come back on
 * the socket. Neither record nor error when none listens: the caller then starts a daemon. A spare that took the
 * request and went away without an answer may have recovered the device or not: that is an error (a second
 * `recover` finds out), never a second daemon racing the first.
 */
export async function recoverThroughStandby(devId: number, onWaiting?: (elapsedMs: number, state: string) => void): Promise<StandbyAnswer> {
  const path = standbySocketPath(devId);
  return await new Promise((resolve) => {
    let answered = false;
    let asked = false;
    let record: DeviceRecord | undefined;
    let timer = setTimeout(() => finish({ error: `the standby daemon did not report READY within ${readyTimeoutMs() / 1000} s` }), readyTimeoutMs());
    const wentAway = () => finish(record ? { record } : asked ? { error: `the standby daemon of device ${devId} went away before it answered (see ${daemonLogPath()})` } : {});
    function finish(value: StandbyAnswer) {
      if (answered) return;
      answered = true;
      clearTimeout(timer);
      resolve(value);
    }
    const readLines = lineReader((line) => readStatusLine(line, {
      onWaiting,
      onReady(served) {
        // The device serves: from here nothing can fail; the list block follows at once, or we build it.
        record = served;
        clearTimeout(timer);
        timer = setTimeout(() => finish({ record }), LISTING_WAIT_MS);
      },
      onListing: (listing) => finish(record ? { record, listing } : { error: "the standby daemon sent a list block before READY" }),
      onError: (message) => finish({ error: message }),
    }));
    Bun.connect({
      unix: path,
      socket: {
        open: (socket) => {
          asked = true;
          socket.write(`${RECOVER_REQUEST}\n`);
        },
        data: (_socket, chunk) => readLines(chunk),
        close: () => wentAway(),
        error: () => wentAway(),
        connectError: () => finish({}),
      },
    }).catch(() => finish({}));
  });
}
