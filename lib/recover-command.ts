/**
 * `recover -n ID`, from bin/ublk-bun.ts before cac and the rest of the CLI load (every millisecond until the
 * device serves again is the application's stall): hands the device to its warm spare when one listens, or else
 * starts a daemon that recovers it. Prints the device's list block once it serves (as the spare sent it).
 */
import { recoverThroughStandby } from "./standby-client.ts";
import type { DeviceRecord } from "./records.ts";

export async function recoverCommand(devId: number, json: boolean): Promise<void> {
  let lastReportS = -1;
  const onWaiting = (elapsedMs: number, state: string) => {
    const seconds = Math.floor(elapsedMs / 1000);
    if (process.stderr.isTTY && seconds !== lastReportS) {
      lastReportS = seconds;
      process.stderr.write(`\rwaiting for device ${devId} to quiesce (state ${state}) ${seconds}s `);
    }
  };
  let spare = await recoverThroughStandby(devId, onWaiting);
  if (spare.error) throw new Error(spare.error);
  let record: DeviceRecord | undefined = spare.record;
  if (!record) {
    // Node's child_process and fs load only now: the spare's path above needs neither.
    const { DAEMON_PATH, runServer } = await import("./server-process.ts");
    const outcome = await runServer({ mode: "recover", devId }, DAEMON_PATH, {}, undefined, onWaiting);
    if (outcome.record) record = outcome.record;
    else {
      // A spare listens only once its daemon has exited: asked while the killed daemon was still exiting, it did
      // not answer, then took the device's lock before our daemon could. It recovers the device: ask it again.
      spare = await recoverThroughStandby(devId, onWaiting);
      if (!spare.record) throw new Error(spare.error ?? outcome.error);
      record = spare.record;
    }
  }
  if (lastReportS >= 0) process.stderr.write("\n");
  if (spare.listing) {
    console.log(json ? JSON.stringify(spare.listing.json, null, 2) : spare.listing.text);
    return;
  }
  const { formatListing, listDevices, listingJson } = await import("./admin.ts");
  const [listing] = listDevices(record.devId);
  console.log(json ? JSON.stringify(listingJson(listing!), null, 2) : formatListing(listing!));
}
