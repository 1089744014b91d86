#!/usr/bin/env bun
/**
 * The ublk-bun command. `recover -n ID` on a device kept by an `add --standby` spare is part of the application's
 * stall, so it goes to the spare before the rest of the CLI (cac, option checks, admin) loads; every other
 * command, and a device without a spare, is bin/cli.ts.
 */
const args = process.argv.slice(2);
const devIdText = args.length === 3 && args[0] === "recover" && (args[1] === "-n" || args[1] === "--number") ? args[2]! : "";
if (/^\d{1,7}$/.test(devIdText)) {
  const { recoverThroughStandby } = await import("../lib/standby-client.ts");
  const outcome = await recoverThroughStandby(Number(devIdText));
  if (outcome.error) {
    console.error(`ublk-bun: ${outcome.error.split("\n")[0]}`);
    process.exit(1);
  }
  if (outcome.record) {
    const { formatListing, listDevices } = await import("../lib/admin.ts");
    console.log(formatListing(listDevices(outcome.record.devId)[0]!));
    process.exit(0);
  }
}
await import("./cli.ts");
export {}; // a module: top-level await
