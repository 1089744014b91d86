/**
 * `add --standby`: a warm spare for the operator's `recover`. The serving daemon starts a standby daemon (runtime,
 * target and queue Workers loaded, owning nothing) in a session of its own, so that it outlives a crash. Once the
 * serving daemon has died, the spare listens on a unix socket in the run directory (0700: only its owner can
 * connect) for `recover -n ID`, recovers the device and reports to it what a daemon reports on its status pipe
 * (WAITING / READY / ERROR lines). `recover` thus starts no daemon of its own: one runtime start less before the
 * application's I/O resumes. The spare then starts its own spare. A spare whose device went away, or was
 * recovered by someone else, exits; the serving daemon ends its spare when it stops or hands over, `del` too.
 * The spare does not wait for `recover` to begin: once the kernel has quiesced the device it re-attaches up to
 * the last step (START_USER_RECOVERY, every tag FETCHed), the device still quiesced and its I/O held, and the
 * request only resumes it (END_USER_RECOVERY). A spare killed in between leaves the device as a daemon killed
 * during a recovery does: quiesced, for the next `recover`.
 */
import type { Socket } from "bun";
import type { ServerProcess } from "./server-process.ts";
import { existsSync, unlinkSync } from "node:fs";
import { processAlive, standbySocketPath } from "./daemon-env.ts";
import { RECOVER_REQUEST } from "./standby-client.ts";
import { readStatusLine } from "./status-lines.ts";
import { readRecord, readStandby, removeStandby, writeStandby, type DeviceRecord } from "./records.ts";

/** How often a spare whose daemon died checks that it is still wanted. */
const WANTED_CHECK_MS = 1_000;

/** Where status lines go: the `recover` that asked, until ERROR, or until READY and the LISTING after it. */
export interface Asker {
  write(line: string): void;
  /** Writes `line` last (if any) and closes. */
  end(line?: string): void;
}

/**
 * In the spare, after its daemon `watchPid` died: resolves once `recover` asks on the socket (`onAsker` gets the
 * asker first); rejects, and the spare exits, when the device or its record is gone or another daemon serves it.
 */
export function recoverAsked(devId: number, watchPid: number, onAsker: (asker: Asker) => void): Promise<void> {
  const path = standbySocketPath(devId);
  try { unlinkSync(path); } catch { /* none left over */ }
  return new Promise<void>((resolve, reject) => {
    let asked = false;
    const server = Bun.listen<Reply>({
      unix: path,
      socket: {
        open(socket) {
          socket.data = { pending: new Uint8Array(0), ending: false };
        },
        data(socket, chunk) {
          if (asked || !chunk.toString("utf8").startsWith(RECOVER_REQUEST)) {
            send(socket, "ERROR recover: this standby already recovers the device\n", true);
            return;
          }
          asked = true;
          finish();
          onAsker({
            write: (line) => send(socket, line + "\n", line.startsWith("ERROR ")),
            end: (line) => send(socket, line === undefined ? "" : line + "\n", true),
          });
          resolve();
        },
        drain: flush,
      },
    });
    const wanted = setInterval(() => {
      let record: DeviceRecord | null;
      try {
        record = readRecord(devId);
      } catch {
        return; // unusable, not gone: the spare stays, and tells `recover` why it cannot go on
      }
      const why = !existsSync(`/sys/class/ublk-char/ublkc${devId}`) || !record ? "the device was deleted"
        : record.pid !== watchPid && processAlive(record.pid) ? `daemon pid ${record.pid} serves the device now` : "";
      if (!why) return;
      finish();
      reject(new Error(`standby for device ${devId}: ${why}; not needed any more`));
    }, WANTED_CHECK_MS);
    /** No more askers; the one being answered keeps its connection. */
    function finish() {
      clearInterval(wanted);
      server.stop(false);
      try { unlinkSync(path); } catch { /* gone */ }
    }
  });
}

/** What is still to be written to an asker (a READY line holds the whole record: more than one write may take). */
interface Reply {
  pending: Uint8Array;
  /** Close once everything is written. */
  ending: boolean;
}

function send(socket: Socket<Reply>, text: string, end: boolean): void {
  const bytes = new TextEncoder().encode(text);
  const joined = new Uint8Array(socket.data.pending.length + bytes.length);
  joined.set(socket.data.pending);
  joined.set(bytes, socket.data.pending.length);
  socket.data.pending = joined;
  socket.data.ending ||= end;
  flush(socket);
}

function flush(socket: Socket<Reply>): void {
  const reply = socket.data;
  if (reply.pending.length > 0) {
    const written = socket.write(reply.pending);
    if (written > 0) reply.pending = reply.pending.subarray(written);
  }
  if (reply.pending.length === 0 && reply.ending) socket.end();
}

/** The spare a serving daemon keeps (see keepStandby). */
export interface KeptStandby {
  /** Ends the spare (SIGKILL: it owns nothing) and forgets its note. */
  stop(): void;
}

/**
 * In the serving daemon (READY, its record written): starts the spare and notes it for `list` and `del` once it
 * is loaded. A spare that fails is logged and not replaced: `recover` then starts a daemon as without --standby.
 */
export async function keepStandby(record: DeviceRecord, log: (message: string) => void): Promise<KeptStandby> {
  const { DAEMON_PATH, spawnServer } = await import("./server-process.ts");
  const devId = record.devId;
  let ended = false;
  const child: ServerProcess = spawnServer({
    mode: "standby", watchPid: process.pid, waitForRecover: true, standby: true,
    config: record.config, target: record.target, createdAt: record.createdAt,
  }, DAEMON_PATH, {}, (line) => readStatusLine(line, {
    onStandby() {
      writeStandby(devId, child.pid);
      log(`device ${devId}: standby pid ${child.pid} is ready`);
    },
    onReady() { /* the spare serves: its daemon (this process) has died, so this is never heard */ },
    onError: (message) => log(`device ${devId}: standby pid ${child.pid}: ${message}`),
  }), (error) => {
    if (ended) return;
    ended = true;
    log(`device ${devId}: standby pid ${child.pid} ended${error ? `: ${error}` : ""}; recover will start a daemon`);
    forget(devId, child.pid);
  });
  child.unref();
  return {
    stop() {
      ended = true;
      if (child.exitCode === null) {
        try { child.kill("SIGKILL"); } catch { /* gone meanwhile */ }
      }
      forget(devId, child.pid);
    },
  };
}

/** Removes the standby note of `devId` if it names `pid` (a newer spare's note stays). */
export function forget(devId: number, pid: number): void {
  if (readStandby(devId)?.pid === pid) removeStandby(devId);
}
