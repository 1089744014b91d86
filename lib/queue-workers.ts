/**
 * Where queue Workers come from. A daemon's entry starts them before its own modules load (lib/daemon.ts):
 * a Worker takes as long to start as the rest of the daemon, and a recovery waits for both, so they overlap.
 * No imports: this loads first.
 */
const QUEUE_WORKER_URL = new URL("./queue-worker.ts", import.meta.url).href;

/** Asks a Worker to load its target ahead of its start message (see queue-worker.ts). */
export interface QueuePreload {
  type: "preload";
  targetType: string;
}

const early: Worker[] = [];

/** Starts `count` Workers now; with `targetType`, each also loads that target while it waits. */
export function startQueueWorkersEarly(count: number, targetType?: string): void {
  for (let i = 0; i < count; i++) {
    const worker = new Worker(QUEUE_WORKER_URL);
    if (targetType) worker.postMessage({ type: "preload", targetType } satisfies QueuePreload);
    early.push(worker);
  }
}

/** A Worker for the next queue: an early one while any is left, else a new one. */
export function newQueueWorker(): Worker {
  return early.shift() ?? new Worker(QUEUE_WORKER_URL);
}

/** Ends the early Workers no queue took (the device has fewer queues than foreseen, or did not start). */
export function dropEarlyQueueWorkers(): void {
  for (const worker of early.splice(0)) worker.terminate();
}
