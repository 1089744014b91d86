// The CLI's handling of what users type, checked before anything reaches the kernel (so it runs on any host).
import { describe, expect, test } from "bun:test";
import { join } from "node:path";

const CLI = join(import.meta.dir, "../../bin/ublk-bun.ts");

function run(...args: string[]) {
  const result = Bun.spawnSync([process.execPath, CLI, ...args], { stdin: "ignore" });
  return { status: result.exitCode, stdout: result.stdout.toString(), stderr: result.stderr.toString() };
}

/** One line on stderr, nothing on stdout, exit 1. */
function expectRefused(args: string[], message: string): void {
  const result = run(...args);
  expect(result.stderr).toBe(`ublk-bun: ${message}\n`);
  expect(result.stdout).toBe("");
  expect(result.status).toBe(1);
}

describe("options as typed", () => {
  test("an unknown option is named as the user typed it", () => {
    // cac alone would say "Unknown option `--suchFlag`" (its negation and camel-casing).
    expectRefused(["add", "--no-such-flag"], "add: unknown option --no-such-flag (try: ublk-bun add --help)");
    expectRefused(["add", "-t", "null", "--foo-bar=3"], "add: unknown option --foo-bar (try: ublk-bun add --help)");
    expectRefused(["del", "-x"], "del: unknown option -x (try: ublk-bun del --help)");
    expectRefused(["list", "--queues", "2"], "list: unknown option --queues (try: ublk-bun list --help)");
  });
  test("an option missing its value says what it needs", () => {
    expectRefused(["add", "-t", "null", "-n", "-5"], `-n needs a device id, not "-5"`);
    expectRefused(["list", "-n", "-5"], `-n needs a device id, not "-5"`);
    expectRefused(["del", "-n"], "-n needs a device id");
    expectRefused(["add", "-t", "null", "-s"], "-s needs a size");
    expectRefused(["add", "-t", "null", "--poll-us", "-1"], `--poll-us needs a number of µs or auto, not "-1"`);
  });
  test("values out of range name the flag", () => {
    expectRefused(["add", "-t", "null", "-d", "65537"], "-d: 65537 is out of range (1..4096)");
    expectRefused(["add", "-t", "null", "-s", "1000", "-b", "4096"], "-s: size must be a multiple of the logical block size (4096)");
    expectRefused(["list", "-n", "x"], `-n: "x" is not a whole number`);
    expectRefused(["add", "-t", "null", "-z", "2"], "-z: 2 is out of range (0..1)");
    expectRefused(["add", "-t", "null", "-i", "1", "--standby", "2"], "--standby: 2 is out of range (0..1)");
    expectRefused(["add", "-t", "null", "--standby", "1"], "--standby needs -r 1, -i 1 or -e 1");
  });
  test("zero copy wanted with another data mode is refused before anything is asked of the kernel", () => {
    expectRefused(["add", "-t", "null", "-z", "1", "-u"], "-z 1: zero copy cannot be combined with -u, --need-get-data or --unprivileged");
    expectRefused(["add", "-t", "null", "--zero-copy=1", "--unprivileged"], "-z 1: zero copy cannot be combined with -u, --need-get-data or --unprivileged");
  });
  test("known spellings still parse: bundled switches, --flag=value, help", () => {
    // -u and -g are both known switches: the bundle gets past the option check to add's own rule.
    expectRefused(["add", "-t", "null", "-ug"], "-u and --need-get-data cannot be combined");
    expectRefused(["add", "-t", "null", "--depth=0"], "-d: 0 is out of range (1..4096)");
    const help = run("add", "--help");
    expect(help.status).toBe(0);
    expect(help.stdout).toContain("--recovery-reissue");
  });
});
