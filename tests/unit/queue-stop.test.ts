// The notices a device writes to a queue's stop eventfd add up there: each must still read apart (lib/queue-stop.ts).
import { expect, test } from "bun:test";
import { QUEUE_NOTICE_DELETING, QUEUE_NOTICE_RESUME, QUEUE_NOTICE_STOP, readNotices } from "../../lib/queue-stop.ts";

test("each notice alone, several together, and one written twice read apart", () => {
  expect(readNotices(QUEUE_NOTICE_DELETING)).toEqual({ deleting: true, resume: false, stop: false });
  expect(readNotices(QUEUE_NOTICE_RESUME)).toEqual({ deleting: false, resume: true, stop: false });
  expect(readNotices(QUEUE_NOTICE_STOP)).toEqual({ deleting: false, resume: false, stop: true });
  expect(readNotices(QUEUE_NOTICE_RESUME + QUEUE_NOTICE_DELETING)).toEqual({ deleting: true, resume: true, stop: false });
  expect(readNotices(2 * QUEUE_NOTICE_DELETING)).toEqual({ deleting: true, resume: false, stop: false });
  expect(readNotices(2 * QUEUE_NOTICE_RESUME)).toEqual({ deleting: false, resume: true, stop: false });
  expect(readNotices(QUEUE_NOTICE_STOP + QUEUE_NOTICE_DELETING + QUEUE_NOTICE_RESUME)).toEqual({ deleting: true, resume: true, stop: true });
  expect(readNotices(2 * QUEUE_NOTICE_STOP).stop).toBe(true);
});
