/**
 * What a device tells a queue through the queue's stop eventfd (polled on the queue's ring). An eventfd adds up
 * what is written, so the two notices stay apart: a sum of QUEUE_NOTICE_STOP or more is a stop.
 */
import { write } from "../ffi/libc.ts";

/** The device is being deleted. Written before STOP_DEV, which waits for every request the server holds: the
 * target hears of it (QueueHandler.onDeleting) and fails the requests that wait for what may never come. */
export const QUEUE_NOTICE_DELETING = 1;
/** Leave the loop. */
export const QUEUE_NOTICE_STOP = 2;

export function noticeQueue(stopFd: number, notice: number): void {
  write(stopFd, new BigUint64Array([BigInt(notice)]), 8);
}
