#!/usr/bin/env bun
/**
 * `npm test`: type check, unit and ring tests on this host, then the kernel suite against a real ublk_drv —
 * here when /dev/ublk-control exists and we are root, otherwise inside the qemu VM (tests/vm/vm.sh).
 * If neither is possible it fails: the kernel suite is never skipped silently.
 * Ends with one line "tests: N passed, N failed, N skipped" summing every bun test run.
 *
 *   bun tests/run.ts              everything
 *   bun tests/run.ts --kernel     only the kernel suite (this is what runs inside the VM)
 *   bun tests/run.ts --host       only type check + unit + ring tests
 *   KERNEL_TESTS="tests/kernel/a.test.ts …" narrows the kernel suite.
 */
import { existsSync } from "node:fs";
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

/** Runs a command, streaming its output, and adds any bun-test counts it prints to the totals. */
async function step(name: string, command: string[], env: Record<string, string> = {}): Promise<boolean> {
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
  const nested = [...text.matchAll(/^tests: (\d+) passed, (\d+) failed, (\d+) skipped$/gm)].at(-1);
  if (nested) {
    totals.passed += Number(nested[1]); totals.failed += Number(nested[2]); totals.skipped += Number(nested[3]);
  } else {
    for (const [, count, kind] of text.matchAll(/^\s*(\d+) (pass|fail|skip)$/gm)) {
      if (kind === "pass") totals.passed += Number(count);
      else if (kind === "fail") totals.failed += Number(count);
      else totals.skipped += Number(count);
    }
  }
  collectFailures(text);
  if (status !== 0) failedSteps.push(`${name} (exit ${status})`);
  return status === 0;
}

function kernelHere(): boolean {
  return existsSync("/dev/ublk-control") && process.getuid?.() === 0;
}

const bun = process.execPath;
const kernelFiles = (process.env.KERNEL_TESTS ?? "tests/kernel").split(/\s+/).filter(Boolean);

if (!kernelOnly) {
  await step("type check", [join(root, "node_modules/.bin/tsc"), "--noEmit", "-p", "."]);
  await step("unit + ring tests", [bun, "test", "--timeout", "60000", "tests/unit", "tests/ring"]);
}
if (!hostOnly) {
  if (kernelHere()) {
    await step("kernel tests (this host's ublk_drv)", [bun, "test", "--timeout", "600000", ...kernelFiles]);
  } else if (process.env.UBLK_BUN_VM === "1") {
    failedSteps.push("kernel tests: inside the VM but /dev/ublk-control is missing (ublk_drv did not load)");
  } else if (process.platform === "linux" && process.arch === "x64" && process.getuid?.() === 0) {
    const env = process.env.KERNEL_TESTS ? ["--env", `KERNEL_TESTS=${process.env.KERNEL_TESTS}`] : [];
    await step("kernel tests (qemu VM, real ublk_drv)", ["bash", "tests/vm/vm.sh", ...env, "--", "bun tests/run.ts --kernel"]);
  } else {
    failedSteps.push("kernel tests: no /dev/ublk-control here and the VM needs root on x86_64 Linux " +
      "(sudo npm test, or modprobe ublk_drv on a kernel that has it)");
  }
}

console.log("");
if (failureDetails.size > 0) console.log(`failed tests:\n${[...failureDetails].join("\n")}`);
for (const failure of failedSteps) console.log(`FAILED: ${failure}`);
console.log(`tests: ${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped`);
process.exit(failedSteps.length === 0 && totals.failed === 0 ? 0 : 1);
