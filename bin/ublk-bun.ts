#!/usr/bin/env bun
/**
 * The ublk-bun command. `recover -n ID` is part of the application's stall, so it runs before the rest of the
 * CLI (cac, option checks) loads: to the device's `add --standby` spare if one listens, else a new daemon. Every
 * other command, and every other spelling of `recover`, is bin/cli.ts.
 */
const args = process.argv.slice(2);
const json = args.length === 4 && args[3] === "--json";
const devIdText = (args.length === 3 || json) && args[0] === "recover" && (args[1] === "-n" || args[1] === "--number") ? args[2]! : "";
if (/^\d{1,7}$/.test(devIdText)) {
  const { recoverCommand } = await import("../lib/recover-command.ts");
  try {
    await recoverCommand(Number(devIdText), json);
    process.exit(0);
  } catch (error) {
    console.error(`ublk-bun: ${((error as Error).message ?? String(error)).split("\n")[0]}`);
    process.exit(1);
  }
}
await import("./cli.ts");
export {}; // a module: top-level await
