/**
 * A shared mapping of a target's backing file that follows the file when `resize` grows it. A queue Worker
 * cannot be told about a resize (it sleeps in io_uring_enter), but it does not need to be: the kernel sends a
 * request past the old end only after UPDATE_SIZE, and `resize` makes the file long enough before that. So
 * the first such request remaps, on the queue's own thread, which is the only user of this mapping.
 */
import { fstatSync } from "node:fs";
import { ErrnoError, errnoText } from "../ffi/errno.ts";
import { MAP_SHARED, mmap, munmap } from "../ffi/libc.ts";

export class FileMapping {
  /** Address of the file's byte 0; changes when the mapping grows. */
  address = 0;
  /** How many bytes from the file's start are mapped. */
  bytes = 0;

  constructor(private readonly fd: number, private readonly path: string, bytes: number, private readonly protection: number) {
    const address = mmap(bytes, protection, MAP_SHARED, fd, 0);
    if (address < 0) throw new ErrnoError(`mmap ${path}`, -address, `cannot map ${path}: ${errnoText(-address)}`);
    this.address = address;
    this.bytes = bytes;
  }

  /**
   * The address of byte 0 with [0, endBytes) mapped, or 0 when the file is shorter than that (the request
   * then fails with EIO rather than touching pages past the end of the file, which would be SIGBUS).
   * One comparison on the hot path; the remap happens once per grow.
   */
  cover(endBytes: number): number {
    return endBytes <= this.bytes ? this.address : this.grow(endBytes);
  }

  private grow(endBytes: number): number {
    const fileBytes = fstatSync(this.fd).size;
    if (fileBytes < endBytes) return 0;
    const address = mmap(fileBytes, this.protection, MAP_SHARED, this.fd, 0);
    if (address < 0) return 0;
    munmap(this.address, this.bytes);
    this.address = address;
    this.bytes = fileBytes;
    return address;
  }

  close(): void {
    if (this.bytes > 0) munmap(this.address, this.bytes);
    this.bytes = 0;
  }
}
