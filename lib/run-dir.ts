/** Where records, locks and the daemon log live; node modules only (lib/server-process.ts starts daemons with it). */
import { join } from "node:path";

/** The directory records live in (root: /run/ublk-bun); UBLK_BUN_RUN_DIR overrides it. */
export function runDir(): string {
  if (process.env.UBLK_BUN_RUN_DIR) return process.env.UBLK_BUN_RUN_DIR;
  const uid = process.getuid?.() ?? 0;
  // A user serving unprivileged devices keeps records in their own runtime directory.
  return uid === 0 ? "/run/ublk-bun" : join(process.env.XDG_RUNTIME_DIR || `/run/user/${uid}`, "ublk-bun");
}
