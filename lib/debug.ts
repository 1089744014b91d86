/** Step-by-step log on stderr when UBLK_BUN_DEBUG is set (a daemon's stderr is its log file). Never on the hot path. */
export function debug(message: string): void {
  if (process.env.UBLK_BUN_DEBUG) console.error(`${new Date().toISOString()} ublk-bun[${process.pid}]: ${message}`);
}
