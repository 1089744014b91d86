// spawnServer (lib/server-process.ts) starts daemons with Bun.spawn and reads their status lines on fd 3: every line
// reaches the caller, the end of the pipe is reported once, a released server keeps running without us, and neither
// path leaves the pipe's fd open (a supervisor spawns a daemon per recovery for as long as it lives).
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const dir = mkdtempSync(join(tmpdir(), "ublk-bun-spawn-"));
process.env.UBLK_BUN_RUN_DIR = dir;
const { spawnServer } = await import("../../lib/server-process.ts");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A stand-in daemon: writes `lines` on fd 3 (split mid-line, as a pipe may deliver them), then lives `lifeMs`. */
function entry(name: string, lines: string[], lifeMs: number): string {
  const path = join(dir, `${name}.ts`);
  const text = lines.join("\n") + "\n";
  writeFileSync(path, `import { writeSync } from "node:fs";
writeSync(3, ${JSON.stringify(text.slice(0, 5))});
setTimeout(() => writeSync(3, ${JSON.stringify(text.slice(5))}), 20);
setTimeout(() => {}, ${lifeMs});
if (process.env.UBLK_BUN_DAEMON_SPEC !== ${JSON.stringify(JSON.stringify({ mode: "recover", devId: 7 }))}) process.exit(3);
`);
  return path;
}
const openFds = () => readdirSync("/proc/self/fd").length;

test("each status line arrives whole; the end is reported once, with no fd left open", async () => {
  const before = openFds();
  for (let round = 0; round < 3; round++) {
    const lines: string[] = [];
    let ends = 0;
    const ended = new Promise<void>((resolve) => {
      spawnServer({ mode: "recover", devId: 7 }, entry("exits", ["ADDED 7", "WAITING 12 LIVE"], 0), {},
        (line) => lines.push(line), () => { ends++; resolve(); });
    });
    await ended;
    await Bun.sleep(30);
    expect(lines).toEqual(["ADDED 7", "WAITING 12 LIVE"]);
    expect(ends).toBe(1);
  }
  expect(openFds()).toBe(before);
});

test("a released server runs on, its exit is not reported, and its pipe is closed", async () => {
  const before = openFds();
  let ended = false;
  let readyResolve!: () => void;
  const ready = new Promise<void>((resolve) => { readyResolve = resolve; });
  const child = spawnServer({ mode: "recover", devId: 7 }, entry("serves", ["READY {}"], 400), {},
    (line) => { if (line === "READY {}") readyResolve(); }, () => { ended = true; });
  await ready;
  child.release();
  await Bun.sleep(50);
  expect(child.exitCode).toBeNull();
  expect(child.pid).toBeGreaterThan(0);
  while (child.exitCode === null) await Bun.sleep(20);
  expect(child.exitCode).toBe(0); // it saw its spec in the environment
  await Bun.sleep(30);
  expect(ended).toBe(false);
  expect(openFds()).toBe(before); // (Bun holds a pidfd of its own while the child runs)
});
