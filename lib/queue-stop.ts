/**
 * What a device tells a queue through the queue's stop eventfd (polled on the queue's ring). An eventfd adds up
 * what is written, so each notice has a range of its own in the sum: a notice written more than once, or several
 * written before the queue reads, still read apart.
 */
import { write } from "../ffi/libc.ts";

/** The device is being deleted. Written before STOP_DEV, which waits for every request the server holds: the
 * target hears of it (QueueHandler.onDeleting) and fails the requests that wait for what may never come. */
export const QUEUE_NOTICE_DELETING = 1;
/** A spare's queue FETCHes the tag it held back (QueueStart.holdLastTag): `recover` asked it to serve. */
export const QUEUE_NOTICE_RESUME = 2 ** 16;
/** Leave the loop. */
export const QUEUE_NOTICE_STOP = 2 ** 32;

export function noticeQueue(stopFd: number, notice: number): void {
  write(stopFd, new BigUint64Array([BigInt(notice)]), 8);
}

/** The notices in an eventfd sum (each count below 2^16 is far more than a device ever writes). */
export function readNotices(sum: number): { deleting: boolean; resume: boolean; stop: boolean } {
  return {
    deleting: sum % QUEUE_NOTICE_RESUME !== 0,
    resume: Math.floor(sum / QUEUE_NOTICE_RESUME) % QUEUE_NOTICE_RESUME !== 0,
    stop: sum >= QUEUE_NOTICE_STOP,
  };
}
