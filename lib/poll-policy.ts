/**
 * When a queue thread spins for its next completion instead of sleeping in io_uring_enter (`--poll-us`): a fixed
 * window, or `auto` — spin only in a run of requests served one at a time, with back-off after misses and while
 * the spinning thread keeps being preempted. The queue loop asks windowMs() before each wait and reports each
 * spin's outcome to spun(); the spinning itself is the ring's (lib/queue-worker.ts).
 */
import { threadPreemptions } from "../ffi/libc.ts";
import type { PollSetting } from "./options.ts";

/**
 * --poll-us auto spins up to this long for the next request. Under TCG the next request of a QD1 stream came
 * 10–40 µs after our commit and a 50 µs window missed too often; natively it comes sooner, so a hit costs less,
 * and a miss costs at most this once before back-off.
 */
export const AUTO_POLL_MS = 0.1;
/**
 * --poll-us auto spins up to this long for the target, in a run of requests served one at a time, while the
 * request waits for the target's own I/O (a socket's reply, a disk's completion): a wake-up costs as much as the
 * spin saves there. Under TCG an nbdkit reply over loopback came 0.3–1 ms after the send: a 0.5 ms window took NBD
 * QD1 from 0.58 / 0.63 (read / write) of the kernel's client to 0.74 / 0.79, and 1 ms, which misses less and so
 * backs off less, to about 1.0 (same boot, warm daemon). Slower targets miss and back off like the next-request spin.
 */
export const AUTO_TARGET_POLL_MS = 1;
/** Requests served one at a time, in a row, before --poll-us auto spins: a stream like QD1, each request sent
 * only after the previous one completed. While requests overlap, a wake-up overlaps other work and costs little. */
const SERIAL_RUN_TO_SPIN = 32;
/** Back-off after consecutive misses: the next 2^(misses-1) - 1 chances to spin are skipped, up to 255. */
const MAX_MISS_STREAK = 9;
/** Every this many spins auto checks whether the thread was preempted in a quarter of them or more: then another
 * thread wants this CPU (often the application, which would otherwise run here and hand its requests over with
 * no IPI), and auto backs off as after many misses. */
const SPINS_PER_PREEMPTION_CHECK = 16;

/** What a spin waits for: the next request, or the target (for requests it holds). Each has its own back-off. */
const WAIT_NEXT = 0, WAIT_TARGET = 1;

export class PollPolicy {
  /** Spins that found work, spins that did not, auto's back-offs for a contended CPU: for the debug log. */
  spinHits = 0;
  spinMisses = 0;
  contendedChecks = 0;
  private readonly auto: boolean;
  private readonly fixedMs: number;
  private serialRun = 0;
  private waitKind = WAIT_NEXT;
  /** Per wait kind: consecutive misses, and the chances still to skip. */
  private readonly missStreak = new Uint8Array(2);
  private readonly spinsToSkip = new Uint16Array(2);
  private spinsSinceCheck = 0;
  private preemptionsAtCheck = threadPreemptions();

  constructor(setting: PollSetting) {
    this.auto = setting === "auto";
    this.fixedMs = setting === "auto" ? 0 : setting / 1000;
  }

  /**
   * How long to spin before sleeping this time (0: sleep at once). `batchIos`: requests the last round brought;
   * `moreWaiting`: the kernel already has work for us; `targetHeldIos`: requests of ours the target holds.
   */
  windowMs(batchIos: number, moreWaiting: boolean, targetHeldIos: number): number {
    if (!this.auto) return this.fixedMs;
    // The last batch was one request, and no other came while we served it: requests come one at a time. A target
    // holding several is not such a stream, even when their completions, and so the next requests, come singly
    // (a deep queue on a slow disk), where each wait would otherwise be a spin.
    if (batchIos > 1 || (batchIos === 1 && moreWaiting) || targetHeldIos > 1) this.serialRun = 0;
    else if (batchIos === 1) this.serialRun++;
    if (this.serialRun < SERIAL_RUN_TO_SPIN) return 0;
    const kind = this.waitKind = targetHeldIos > 0 ? WAIT_TARGET : WAIT_NEXT;
    if (this.spinsToSkip[kind]! > 0) {
      this.spinsToSkip[kind]!--;
      return 0;
    }
    return kind === WAIT_TARGET ? AUTO_TARGET_POLL_MS : AUTO_POLL_MS;
  }

  /** A spin of windowMs() ended: `found` whether work came. Auto backs off after misses and on a contended CPU. */
  spun(found: boolean): void {
    if (found) this.spinHits++;
    else this.spinMisses++;
    if (!this.auto) return;
    const kind = this.waitKind;
    this.missStreak[kind] = found ? 0 : Math.min(this.missStreak[kind]! + 1, MAX_MISS_STREAK);
    // Preemptions count only while waiting for the next request, when the application may want this CPU. While
    // a request waits for the target the application waits too, and the server being waited for preempting this
    // thread is no reason to sleep (counted there, 211 back-offs left 5 312 spins for 34 817 NBD requests at QD1).
    if (kind === WAIT_NEXT && ++this.spinsSinceCheck === SPINS_PER_PREEMPTION_CHECK) {
      const preemptions = threadPreemptions();
      if (preemptions - this.preemptionsAtCheck >= SPINS_PER_PREEMPTION_CHECK / 4) {
        this.contendedChecks++;
        this.missStreak[WAIT_NEXT] = MAX_MISS_STREAK; // a contended CPU counts as the longest run of misses
      }
      this.preemptionsAtCheck = preemptions;
      this.spinsSinceCheck = 0;
    }
    if (this.missStreak[kind]! > 0) this.spinsToSkip[kind] = (1 << (this.missStreak[kind]! - 1)) - 1;
  }
}
