// lib/poll-policy.ts: when a queue thread spins before it sleeps (--poll-us). Fixed windows as given; auto spins
// only after a run of one-at-a-time requests, for the next request or (while the target holds one) for the target,
// and skips 2^(misses-1) - 1 chances after consecutive misses.
import { expect, test } from "bun:test";
import { AUTO_POLL_MS, AUTO_TARGET_POLL_MS, PollPolicy } from "../../lib/poll-policy.ts";

/** Serves `n` rounds of one request each, nothing else waiting; returns the last window. */
function serial(policy: PollPolicy, n: number, targetHolds = false): number {
  let windowMs = 0;
  for (let i = 0; i < n; i++) windowMs = policy.windowMs(1, false, targetHolds ? 1 : 0);
  return windowMs;
}

test("a fixed --poll-us is the window every time, and only counted", () => {
  const policy = new PollPolicy(250);
  expect(policy.windowMs(64, true, 64)).toBe(0.25);
  policy.spun(false);
  expect(policy.windowMs(1, false, 0)).toBe(0.25);
  expect([policy.spinHits, policy.spinMisses]).toEqual([0, 1]);
});

test("auto spins after 32 requests served one at a time; overlapping requests end the run", () => {
  const policy = new PollPolicy("auto");
  expect(serial(policy, 31)).toBe(0);
  expect(serial(policy, 1)).toBe(AUTO_POLL_MS);
  expect(policy.windowMs(1, false, 1)).toBe(AUTO_TARGET_POLL_MS); // the target holds a request: its own, longer spin
  expect(policy.windowMs(2, false, 0)).toBe(0); // two at once: not a one-at-a-time stream
  expect(serial(policy, 31)).toBe(0);
  expect(policy.windowMs(1, true, 0)).toBe(0); // another request already waiting: not one at a time either
  expect(serial(policy, 32)).toBe(AUTO_POLL_MS);
  // One new request a round while the target holds many (their completions come singly): not one at a time.
  expect(policy.windowMs(1, false, 64)).toBe(0);
  for (let i = 0; i < 40; i++) expect(policy.windowMs(1, false, 64)).toBe(0);
  expect(serial(policy, 32, true)).toBe(AUTO_TARGET_POLL_MS);
});

test("auto backs off after consecutive misses, per kind of wait, and a hit ends it", () => {
  const policy = new PollPolicy("auto");
  serial(policy, 32);
  const skippedAfter = (misses: number) => {
    for (let i = 0; i < misses; i++) {
      while (policy.windowMs(1, false, 0) === 0) { /* a skipped chance */ }
      policy.spun(false);
    }
    let skipped = 0;
    while (policy.windowMs(1, false, 0) === 0) skipped++;
    return skipped;
  };
  expect(skippedAfter(1)).toBe(0);
  policy.spun(true);
  expect(skippedAfter(2)).toBe(1);
  policy.spun(true);
  expect(skippedAfter(3)).toBe(3);
  // The target's wait keeps its own streak: still none.
  policy.spun(true);
  expect(policy.windowMs(1, false, 1)).toBe(AUTO_TARGET_POLL_MS);
  expect(policy.spinMisses).toBe(6);
});
