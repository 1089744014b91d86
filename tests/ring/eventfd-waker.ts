// Worker used by ring.test.ts: waits for an eventfd number, sleeps briefly, then writes to it from this thread.
import { write } from "../../ffi/libc.ts";

declare const self: Worker;
self.onmessage = (event: MessageEvent<{ fd: number; delayMs: number }>) => {
  setTimeout(() => {
    const one = new BigUint64Array([1n]);
    const written = write(event.data.fd, one, 8);
    self.postMessage(written);
  }, event.data.delayMs);
};
