#!/usr/bin/env bun
/**
 * `npm test`: type check, unit and ring tests on this host, then the kernel suite against a real ublk_drv —
 * here when /dev/ublk-control exists and we are root, otherwise inside the qemu VM (tests/vm/vm.sh), once per
 * kernel: Debian trixie's 6.12 and the newest trixie-backports kernel, one after the other.
 * If neither is possible it fails: the kernel suite is never skipped silently.
 * Ends with one line "tests: N passed, N failed, N skipped" summing every bun test run, after one sub-total
 * line per VM kernel.
 *
 *   bun tests/run.ts              everything
 *   bun tests/run.ts --kernel     only the kernel suite (this is what runs inside the VM)
 *   bun tests/run.ts --host       only type check + unit + ring tests
 *   KERNEL_TESTS="tests/kernel/a.test.ts …" narrows the kernel suite.
 *   UBLK_BUN_VM_KERNELS="trixie backports" picks the VM kernels (vm.sh --kernel), in that order.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

const root = join(import.meta.dir, "..");
const args = new Set(process.argv.slice(2));
const kernelOnly = args.has("--kernel");
const hostOnly = args.has("--host");
const totals = { passed: 0, failed: 0, skipped: 0 };
const failedSteps: string[] = [];
/** Why each test failed, repeated at the end: CI shows only the tail of a long run. */
const failureDetails = new Set<string>();

/** bun test prints a failing test's error and stack just before its "(fail) name" line. */
function collectFailures(text: string): void {
  const lines = text.split("\n");
  let blockStart = 0;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    if (/^failed tests:$|^\d+ tests? failed:$/.test(line)) break; // summaries repeat the names without the reasons
    if (/^\(fail\) /.test(line)) {
      const why = lines.slice(blockStart, i)
        .filter((l) => /^(error|Expected|Received|\s+at .*\.test\.ts)|^\s*[-+] /.test(l))
        .slice(0, 8);
      failureDetails.add([line, ...why.map((l) => `    ${l.trim()}`)].join("\n"));
    }
    if (/^\((pass|fail|skip)\) |^tests\/.*\.test\.ts:$/.test(line)) blockStart = i + 1;
  }
}

type Counts = typeof totals;

/**
 * Runs a command, streaming its output, and adds any bun-test counts it prints to the totals. Returns this
 * step's own counts, whether it succeeded and its output.
 */
async function step(name: string, command: string[], env: Record<string, string> = {}): Promise<{ ok: boolean; counts: Counts; text: string }> {
  console.log(`\n=== ${name}: ${command.join(" ")}`);
  const child = Bun.spawn(command, { cwd: root, stdout: "pipe", stderr: "pipe", stdin: "ignore", env: { ...process.env, ...env } });
  let text = "";
  const pump = async (stream: ReadableStream<Uint8Array>, sink: NodeJS.WriteStream) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      const part = decoder.decode(chunk, { stream: true });
      text += part;
      sink.write(part);
    }
  };
  await Promise.all([pump(child.stdout, process.stdout), pump(child.stderr, process.stderr)]);
  const status = await child.exited;
  // bun test's summary lines: " 12 pass", " 1 skip", " 0 fail" (nested runs print our own total line instead).
  const counts: Counts = { passed: 0, failed: 0, skipped: 0 };
  const nested = [...text.matchAll(/^tests: (\d+) passed, (\d+) failed, (\d+) skipped$/gm)].at(-1);
  if (nested) {
    counts.passed = Number(nested[1]); counts.failed = Number(nested[2]); counts.skipped = Number(nested[3]);
  } else {
    for (const [, count, kind] of text.matchAll(/^\s*(\d+) (pass|fail|skip)$/gm)) {
      if (kind === "pass") counts.passed += Number(count);
      else if (kind === "fail") counts.failed += Number(count);
      else counts.skipped += Number(count);
    }
  }
  totals.passed += counts.passed; totals.failed += counts.failed; totals.skipped += counts.skipped;
  collectFailures(text);
  if (status !== 0) failedSteps.push(`${name} (exit ${status})`);
  return { ok: status === 0, counts, text };
}

const formatCounts = (counts: Counts) => `${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`;

function kernelHere(): boolean {
  return existsSync("/dev/ublk-control") && process.getuid?.() === 0;
}

const bun = process.execPath;
const kernelFiles = (process.env.KERNEL_TESTS ?? "tests/kernel").split(/\s+/).filter(Boolean);
const VM_KERNELS = ["trixie", "backports"];
const vmKernels = (process.env.UBLK_BUN_VM_KERNELS ?? VM_KERNELS.join(" ")).split(/[\s,]+/).filter(Boolean);
const unknownKernel = vmKernels.find((kernel) => !VM_KERNELS.includes(kernel));
if (unknownKernel !== undefined || vmKernels.length === 0) {
  console.error(`tests/run.ts: UBLK_BUN_VM_KERNELS must list ${VM_KERNELS.join(" and/or ")}, got "${process.env.UBLK_BUN_VM_KERNELS}"`);
  process.exit(2);
}
/** One line per VM kernel, printed before the total. */
const subtotals: string[] = [];

if (!kernelOnly) {
  await step("type check", [join(root, "node_modules/.bin/tsc"), "--noEmit", "-p", "."]);
  await step("unit + ring tests", [bun, "test", "--timeout", "60000", "tests/unit", "tests/ring"]);
}
if (!hostOnly) {
  if (kernelHere()) {
    // Which kernel this is, for the reader of a log that holds several runs (the VM runs one per kernel).
    console.log(`kernel: Linux ${readFileSync("/proc/sys/kernel/osrelease", "utf8").trim()}`);
    await step("kernel tests (this host's ublk_drv)", [bun, "test", "--timeout", "600000", ...kernelFiles]);
  } else if (process.env.UBLK_BUN_VM === "1") {
    failedSteps.push("kernel tests: inside the VM but /dev/ublk-control is missing (ublk_drv did not load)");
  } else if (process.platform === "linux" && process.arch === "x64" && process.getuid?.() === 0) {
    const env = process.env.KERNEL_TESTS ? ["--env", `KERNEL_TESTS=${process.env.KERNEL_TESTS}`] : [];
    for (const kernel of vmKernels) {
      const startedMs = Date.now();
      const { counts, text } = await step(`kernel tests (qemu VM, ${kernel} kernel)`,
        ["bash", "tests/vm/vm.sh", "--kernel", kernel, ...env, "--", "bun tests/run.ts --kernel"]);
      const release = /^kernel: Linux (\S+)$/m.exec(text)?.[1] ?? "did not boot";
      subtotals.push(`kernel ${kernel} (${release}): ${formatCounts(counts)} in ${((Date.now() - startedMs) / 60_000).toFixed(1)} min`);
    }
  } else {
    failedSteps.push("kernel tests: no /dev/ublk-control here and the VM needs root on x86_64 Linux " +
      "(sudo npm test, or modprobe ublk_drv on a kernel that has it)");
  }
}

console.log("");
if (failureDetails.size > 0) console.log(`failed tests:\n${[...failureDetails].join("\n")}`);
for (const failure of failedSteps) console.log(`FAILED: ${failure}`);
for (const line of subtotals) console.log(line);
console.log(`tests: ${formatCounts(totals)}`);
process.exit(failedSteps.length === 0 && totals.failed === 0 ? 0 : 1);
