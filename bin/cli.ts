#!/usr/bin/env bun
/**
 * The ublk-bun command line: parse, call lib/, print. Flags and `list` output follow ublksrv's so existing
 * scripts keep working. Every failure is one line on stderr and a non-zero exit.
 */
import { cac } from "cac";
import { UBLK_F_AUTO_BUF_REG, UBLK_F_BATCH_IO, UBLK_F_NO_AUTO_PART_SCAN, UBLK_F_UNPRIVILEGED_DEV, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_FAIL_IO, UBLK_F_USER_RECOVERY_REISSUE } from "../ffi/uapi/ublk_cmd.ts";
import {
  CLI_NAMES, DEFAULT_NR_HW_QUEUES, DEFAULT_QUEUE_DEPTH, parseDevId, parseDeviceShape, parseSize, parseSwitch, single, UsageError,
} from "../lib/options.ts";
import type { DaemonSpec } from "../lib/serving.ts";
import type { TargetOptions } from "../targets/types.ts";
import packageJson from "../package.json" with { type: "json" };

type Flags = Record<string, unknown>;

// Each command loads what it needs when it runs: `recover` starts its daemon before anything else is loaded
// (every millisecond until the new daemon runs is the application's stall).
const admin = () => import("../lib/admin.ts");

const cli = cac("ublk-bun");

cli
  .command("add", "Create a ublk block device served by a new daemon (prints its list block)")
  .option("-t, --type <type>", "Target: null, memory, file (loop), nbd, or a path to a target module")
  .option("-n, --number <id>", "Device id (default: the kernel picks)")
  .option("-q, --queues <count>", `Hardware queues (default ${DEFAULT_NR_HW_QUEUES})`)
  .option("-d, --depth <depth>", `Queue depth, 1..4096 (default ${DEFAULT_QUEUE_DEPTH})`)
  .option("-s, --size <size>", "Device size, e.g. 1G (default: the target's)")
  .option("-b, --logical-block-size <bytes>", "Logical block size: 512, 1024, 2048 or 4096")
  .option("--max-io-size <size>", "Largest request, 4K..32M (default 512K)")
  .option("--poll-us <us|auto>", "Spin this long for each queue's next request before sleeping; auto: only while requests come one at a time (default auto)")
  .option("-r, --recovery <0|1>", "USER_RECOVERY: survive a daemon crash (in-flight I/O fails)")
  .option("-i, --recovery-reissue <0|1>", "USER_RECOVERY + REISSUE: in-flight I/O is reissued after recover")
  .option("-u, --user-copy", "USER_COPY data mode (pread/pwrite on /dev/ublkcN)")
  .option("-g, --need-get-data", "NEED_GET_DATA data mode")
  .option("-z, --zero-copy <0|1>", "Zero copy (AUTO_BUF_REG, kernel ≥ 6.16): the file target with O_DIRECT and the nbd target over TCP read and write the request's own pages (default: when the kernel has it; 0: the copy path)")
  .option("--batch <0|1>", "Batch commands (BATCH_IO, kernel ≥ 7.0): one command for many requests (default: when the kernel has them; 0: per-tag commands)")
  .option("-f, --file <path>", "file target: the backing file or block device")
  .option("--buffered", "file target: use the page cache instead of O_DIRECT")
  .option("--read-only", "file target: serve the backing store read-only")
  .option("--grow", "file target: extend a regular file to -s SIZE")
  .option("--nbd <uri>", "nbd target: the export, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
  .option("-o, --option <key=value>", "An option for a user-written target (repeatable)")
  .option("--unprivileged", "UNPRIVILEGED_DEV: a device owned by the calling user (needs /dev/ublk-control open to them and the udev rule)")
  .option("-e, --recovery-fail-io <0|1>", "USER_RECOVERY + FAIL_IO: I/O fails fast while no daemon (kernel ≥ 6.13)")
  .option("--no-part-scan", "NO_AUTO_PART_SCAN: do not scan the new disk for partitions (kernel ≥ 7.0)")
  .option("--auto-recover", "Watch the daemon and recover the device by itself when it dies (needs -r 1, -i 1 or -e 1)")
  .option("--standby [0|1]", "A warm spare daemon that `recover` hands the device to at once (one more process, ~15 MiB; default with -r 1, -i 1 or -e 1; 0: none)")
  .option("--foreground", "Serve from this process until SIGINT/SIGTERM instead of starting a daemon")
  .option("--json", "Print the device as JSON")
  .action((flags: Flags) => run(() => add(flags)));

cli
  .command("del", "Stop and delete a device (or all with -a); refuses one that is open or mounted")
  .option("-n, --number <id>", "Device id")
  .option("-a, --all", "Every ublk device and record")
  .option("--force", "Delete even a device that is open or mounted (its users get I/O errors)")
  .action((flags: Flags) => run(() => del(flags)));

cli
  .command("resize", "Change a live device's size (UPDATE_SIZE, kernel ≥ 6.16)")
  .option("-n, --number <id>", "Device id")
  .option("-s, --size <size>", "The new size, e.g. 2G")
  .action((flags: Flags) => run(() => resize(flags)));

cli
  .command("restart", "Replace a device's daemon without failing I/O (QUIESCE_DEV, kernel ≥ 6.16; needs -r 1 or -i 1)")
  .option("-n, --number <id>", "Device id")
  .option("--json", "Print the device as JSON")
  .action((flags: Flags) => run(() => restart(flags)));

cli
  .command("recover", "Re-attach a new daemon to a device whose daemon died (USER_RECOVERY)")
  .option("-n, --number <id>", "Device id")
  .option("--json", "Print the device as JSON")
  .action((flags: Flags) => run(() => recover(flags)));

cli
  .command("list", "Show devices like ublksrv's list")
  .option("-n, --number <id>", "Only this device")
  .option("--json", "JSON output")
  .action((flags: Flags) => run(() => list(flags)));

cli
  .command("features", "Show the kernel's ublk feature flags")
  .option("--json", "JSON output")
  .action((flags: Flags) => run(() => features(flags)));

cli.command("help", "Show this help").action(() => cli.outputHelp());
cli.help();
cli.version(packageJson.version);

async function add(flags: Flags): Promise<void> {
  const type = single("-t", flags.type);
  if (type === undefined || type === true || String(type) === "") throw new UsageError("add: -t TYPE is required (null, or a path to a target module)");
  const { sizeBytes, logicalBlockBytes, ...shape } = parseDeviceShape({
    devId: single("-n", flags.number), queues: single("-q", flags.queues), depth: single("-d", flags.depth),
    maxIoBytes: single("--max-io-size", flags.maxIoSize), pollUs: single("--poll-us", flags.pollUs),
    sizeBytes: single("-s", flags.size), logicalBlockBytes: single("-b", flags.logicalBlockSize),
  }, CLI_NAMES);
  const userCopy = flags.userCopy === true, needGetData = flags.needGetData === true;
  if (userCopy && needGetData) throw new UsageError("-u and --need-get-data cannot be combined");
  // -z absent: zero copy wherever it can be (config.zeroCopy undefined).
  const zeroCopyText = single("-z", flags.zeroCopy);
  const zeroCopy = zeroCopyText === undefined ? undefined : parseSwitch("-z", zeroCopyText);
  const { BATCH_IO_UNAVAILABLE, BATCH_IO_WITH_GET_DATA, dataModeFlags, recoveryFlags, ZERO_COPY_UNAVAILABLE, ZERO_COPY_WITH_DATA_MODE } =
    await import("../lib/device.ts");
  if (zeroCopy && (userCopy || needGetData || flags.unprivileged === true)) throw new UsageError(ZERO_COPY_WITH_DATA_MODE);
  const batchText = single("--batch", flags.batch);
  const batchIo = batchText === undefined ? undefined : parseSwitch("--batch", batchText);
  if (batchIo && needGetData) throw new UsageError(BATCH_IO_WITH_GET_DATA);
  const { Ctrl } = await import("../lib/ctrl.ts");
  const { canonicalType, loadTarget } = await import("../targets/registry.ts");
  const config = {
    ...shape,
    flags: recoveryFlags(parseSwitch("-r", single("-r", flags.recovery)), parseSwitch("-i", single("-i", flags.recoveryReissue))) |
      dataModeFlags(userCopy ? "user-copy" : needGetData ? "need-get-data" : "copy"),
    ...(zeroCopy === undefined ? {} : { zeroCopy }),
    ...(batchIo === undefined ? {} : { batchIo }),
  };
  const failIo = parseSwitch("-e", single("-e", flags.recoveryFailIo));
  if (flags.autoRecover && (config.flags & UBLK_F_USER_RECOVERY) === 0 && !failIo) throw new UsageError("--auto-recover needs -r 1, -i 1 or -e 1");
  if (flags.autoRecover && flags.foreground) throw new UsageError("--auto-recover and --foreground cannot be combined");
  const recoverable = (config.flags & UBLK_F_USER_RECOVERY) !== 0 || failIo;
  const standbyText = single("--standby", flags.standby);
  const standbyAsked = standbyText === undefined ? undefined : standbyText === true || parseSwitch("--standby", standbyText);
  if (standbyAsked && !recoverable) throw new UsageError("--standby needs -r 1, -i 1 or -e 1");
  if (standbyAsked && flags.autoRecover) throw new UsageError("--standby and --auto-recover cannot be combined (the supervisor keeps its own standby)");
  // A recoverable device keeps a warm spare unless told not to: `recover` then starts no runtime of its own. Not
  // with --auto-recover (its supervisor keeps one) nor --foreground (whoever runs it, systemd say, restarts it).
  const standby = standbyAsked ?? (recoverable && flags.autoRecover !== true && flags.foreground !== true);
  if (flags.unprivileged === true) {
    // ublk_drv clears the recovery flags of unprivileged devices (a user's daemon could stall recovery forever).
    if ((config.flags & UBLK_F_USER_RECOVERY) !== 0 || failIo) throw new UsageError("--unprivileged: the kernel allows no recovery (-r, -i, -e) for unprivileged devices");
    if (userCopy) throw new UsageError("--unprivileged: the kernel allows no USER_COPY (-u) for unprivileged devices");
    config.flags |= UBLK_F_UNPRIVILEGED_DEV;
  }
  // Fail fast, before any process is started: driver present, rights, target options valid.
  const ctrl = Ctrl.open();
  try {
    // cac turns --no-part-scan into partScan: false.
    if (flags.partScan === false) {
      if ((ctrl.getFeatures() & UBLK_F_NO_AUTO_PART_SCAN) === 0) {
        throw new UsageError("--no-part-scan: this kernel's ublk_drv has no NO_AUTO_PART_SCAN (it needs Linux ≥ 7.0)");
      }
      config.flags |= UBLK_F_NO_AUTO_PART_SCAN;
    }
    if (zeroCopy === true && (ctrl.getFeatures() & UBLK_F_AUTO_BUF_REG) === 0) throw new UsageError(ZERO_COPY_UNAVAILABLE);
    if (batchIo === true && (ctrl.getFeatures() & UBLK_F_BATCH_IO) === 0) throw new UsageError(BATCH_IO_UNAVAILABLE);
    if (failIo) {
      if ((ctrl.getFeatures() & UBLK_F_USER_RECOVERY_FAIL_IO) === 0) {
        throw new UsageError("-e 1: this kernel's ublk_drv has no USER_RECOVERY_FAIL_IO (it needs Linux ≥ 6.13)");
      }
      config.flags = (config.flags & ~UBLK_F_USER_RECOVERY_REISSUE) | UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO;
    }
  } finally {
    ctrl.close();
  }
  const targetType = canonicalType(String(type));
  const target = await loadTarget(targetType);
  const targetOptions: TargetOptions = { ...userTargetOptions(flags.option), sizeBytes, logicalBlockBytes };
  if (flags.file !== undefined) targetOptions.file = String(single("-f", flags.file));
  if (flags.nbd !== undefined) targetOptions.nbd = String(single("--nbd", flags.nbd));
  for (const key of ["buffered", "readOnly", "grow"] as const) if (flags[key] === true) targetOptions[key] = true;
  const record = await target.prepare(targetOptions);
  const spec: DaemonSpec = { config, target: { ...record, type: targetType }, ...(standby ? { standby: true } : {}) };
  try {
    await serve(spec, flags);
  } catch (error) {
    // The daemon removed the device; what prepare() made outside it (a /dev/shm file …) goes too.
    await target.destroy?.(spec.target);
    throw error;
  }
}

/** `-o key=value` pairs for user-written targets; values that look like numbers or booleans become them. */
function userTargetOptions(value: unknown): TargetOptions {
  const options: TargetOptions = {};
  for (const pair of value === undefined ? [] : Array.isArray(value) ? value : [value]) {
    const match = /^([A-Za-z_][\w-]*)=(.*)$/.exec(String(pair));
    if (!match) throw new UsageError(`-o: "${pair}" is not key=value`);
    const raw = match[2]!;
    options[match[1]!] = raw === "true" ? true : raw === "false" ? false : raw !== "" && Number.isFinite(Number(raw)) ? Number(raw) : raw;
  }
  return options;
}

async function serve(spec: DaemonSpec, flags: Flags): Promise<void> {
  const { addDevice, formatListing, listDevices, listingJson, runForeground, SUPERVISOR_PATH } = await admin();
  const show = (devId: number) => {
    const [listing] = listDevices(devId);
    console.log(flags.json ? JSON.stringify(listingJson(listing!), null, 2) : formatListing(listing!));
  };
  if (flags.foreground) {
    await runForeground(spec, (ready) => show(ready.devId));
    return;
  }
  const ready = flags.autoRecover ? await addDevice(spec, SUPERVISOR_PATH) : await addDevice(spec);
  show(ready.devId);
}

async function recover(flags: Flags): Promise<void> {
  if (flags.number === undefined || flags.number === true) throw new UsageError("recover: -n ID is required");
  const devId = parseDevId("-n", single("-n", flags.number));
  const { recoverCommand } = await import("../lib/recover-command.ts");
  await recoverCommand(devId, flags.json === true);
}

async function del(flags: Flags): Promise<void> {
  const force = flags.force === true;
  if (flags.force !== undefined && flags.force !== true) throw new UsageError("--force takes no value");
  const { allDevIds, deleteDevice, findOrphans } = await admin();
  const { stopIfUnused } = await import("../lib/safe-delete.ts");
  if (flags.all) {
    if (flags.number !== undefined) throw new UsageError("del: give -n ID or -a, not both");
    const failures: string[] = [];
    for (const devId of allDevIds()) {
      try {
        if (!force) stopIfUnused(devId);
        await deleteDevice(devId);
      } catch (error) { failures.push((error as Error).message); }
    }
    for (const orphan of await findOrphans()) {
      try { await orphan.remove(); } catch (error) { failures.push(`${orphan.description}: ${(error as Error).message}`); }
    }
    if (failures.length > 0) throw new Error(failures.join("; "));
    return;
  }
  if (flags.number === undefined || flags.number === true) throw new UsageError("del: -n ID or -a is required");
  const devId = parseDevId("-n", single("-n", flags.number));
  if (!force) stopIfUnused(devId);
  await deleteDevice(devId);
}

async function resize(flags: Flags): Promise<void> {
  if (flags.number === undefined || flags.number === true) throw new UsageError("resize: -n ID is required");
  if (flags.size === undefined || flags.size === true) throw new UsageError("resize: -s SIZE is required");
  const devId = parseDevId("-n", single("-n", flags.number));
  const sizeBytes = parseSize("-s", single("-s", flags.size));
  const { resizeDevice } = await import("../lib/resize.ts");
  const result = await resizeDevice(devId, sizeBytes);
  console.log(`device ${devId}: ${result.oldSizeBytes} -> ${result.newSizeBytes} bytes`);
}

async function restart(flags: Flags): Promise<void> {
  if (flags.number === undefined || flags.number === true) throw new UsageError("restart: -n ID is required");
  const devId = parseDevId("-n", single("-n", flags.number));
  const { restartDevice } = await import("../lib/restart.ts");
  const { formatListing, listDevices, listingJson } = await admin();
  const result = await restartDevice(devId);
  console.log(`device ${devId}: daemon pid ${result.oldPid} handed over to pid ${result.newPid}; I/O stalled at most ${Math.round(result.stallMs)} ms`);
  const [listing] = listDevices(devId);
  console.log(flags.json ? JSON.stringify(listingJson(listing!), null, 2) : formatListing(listing!));
}

async function list(flags: Flags): Promise<void> {
  const devId = flags.number === undefined ? undefined : parseDevId("-n", single("-n", flags.number));
  const { findOrphans, formatListing, listDevices, listingJson } = await admin();
  const listings = listDevices(devId);
  if (flags.json) console.log(JSON.stringify(listings.map(listingJson), null, 2));
  else for (const listing of listings) console.log(formatListing(listing));
  // Leftovers go to stderr so that stdout stays what ublksrv prints; "del -a" removes them.
  if (devId === undefined) for (const orphan of await findOrphans()) console.error(`orphan: ${orphan.description} (del -a removes it)`);
}

async function features(flags: Flags): Promise<void> {
  const { kernelFeatures } = await admin();
  const { mask, names } = kernelFeatures();
  if (flags.json) console.log(JSON.stringify({ mask, names }));
  else {
    console.log(`ublk_drv features: 0x${mask.toString(16)}`);
    for (const name of names) console.log(`\t${name}`);
  }
}

/** Runs a command; any error becomes one line on stderr and exit status 1. */
function run(command: () => void | Promise<void>): void {
  Promise.resolve().then(command).then(
    () => process.exit(0),
    (error: unknown) => fail(error),
  );
}

function fail(error: unknown): never {
  const message = error instanceof Error ? error.message : String(error);
  console.error(`ublk-bun: ${message.split("\n")[0]}`);
  process.exit(1);
}

/** What each option placeholder stands for, for "-n needs a device id". */
const VALUE_NOUNS: Record<string, string> = {
  id: "a device id", type: "a target type", count: "a number of queues", depth: "a queue depth", size: "a size",
  bytes: "a block size in bytes", "us|auto": "a number of µs or auto", "0|1": "0 or 1", path: "a path", "key=value": "key=value", uri: "an NBD URI",
};

/**
 * Checks the options as typed, before cac parses them: cac reports an unknown option after its own negation and
 * camel-casing (`--no-such-flag` becomes "`--suchFlag`"), and reads `-n -5` as two flags.
 */
function checkTypedOptions(args: string[]): void {
  const commandName = args.find((arg) => !arg.startsWith("-"));
  const command = cli.commands.find((candidate) => candidate.name === commandName || candidate.aliasNames.includes(commandName ?? ""));
  if (!command) return; // no command, or an unknown one: reported after parsing
  const known = new Map<string, { takesValue: boolean; placeholder: string }>();
  for (const option of [...cli.globalCommand.options, ...command.options]) {
    const placeholder = /<([^>]+)>/.exec(option.rawName)?.[1] ?? "";
    for (const flag of option.rawName.match(/(?<![\w<])--?[A-Za-z][\w-]*/g) ?? []) known.set(flag, { takesValue: option.required === true, placeholder });
  }
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === "--") return;
    if (!arg.startsWith("-") || arg === "-") continue;
    const equals = arg.indexOf("=");
    const flag = equals > 0 ? arg.slice(0, equals) : arg;
    const option = known.get(flag);
    if (!option) {
      // Bundled short switches (-ug) are fine when each one is a known switch.
      const bundled = /^-[A-Za-z]{2,}$/.test(flag) && [...flag.slice(1)].every((letter) => known.get(`-${letter}`)?.takesValue === false);
      if (bundled) continue;
      throw new UsageError(`${command.name}: unknown option ${flag} (try: ublk-bun ${command.name} --help)`);
    }
    if (!option.takesValue || equals > 0) continue;
    const value = args[i + 1];
    if (value === undefined || value.startsWith("-")) {
      const noun = VALUE_NOUNS[option.placeholder] ?? "a value";
      throw new UsageError(`${flag} needs ${noun}${value === undefined ? "" : `, not "${value}"`}`);
    }
    i++;
  }
}

try {
  checkTypedOptions(process.argv.slice(2));
  cli.parse(process.argv, { run: false });
  if (!cli.matchedCommand) {
    if (cli.args.length > 0) fail(new UsageError(`unknown command "${cli.args[0]}" (try: ublk-bun help)`));
    if (!cli.options.help && !cli.options.version) {
      cli.outputHelp();
      process.exit(1);
    }
  } else {
    await cli.runMatchedCommand();
  }
} catch (error) {
  fail(error);
}
