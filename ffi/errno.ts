/** Linux errno numbers (asm-generic/errno-base.h, errno.h) that this project names or explains. */
export const EPERM = 1;
export const ENOENT = 2;
export const ESRCH = 3;
export const EINTR = 4;
export const EIO = 5;
export const ENXIO = 6;
export const E2BIG = 7;
export const EBADF = 9;
export const EAGAIN = 11;
export const ENOMEM = 12;
export const EACCES = 13;
export const EFAULT = 14;
export const EBUSY = 16;
export const EEXIST = 17;
export const ENODEV = 19;
export const ENOTDIR = 20;
export const EISDIR = 21;
export const EINVAL = 22;
export const ENFILE = 23;
export const EMFILE = 24;
export const ENOTTY = 25;
export const EFBIG = 27;
export const ENOSPC = 28;
export const ESPIPE = 29;
export const EROFS = 30;
export const ERANGE = 34;
export const ENOSYS = 38;
export const ELOOP = 40;
export const ENODATA = 61;
export const ETIME = 62;
export const EOVERFLOW = 75;
export const EBADR = 53;
export const EOPNOTSUPP = 95;
export const ENOBUFS = 105;
export const ETIMEDOUT = 110;
export const ECANCELED = 125;

const NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG", 9: "EBADF", 11: "EAGAIN",
  12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV", 20: "ENOTDIR", 21: "EISDIR",
  22: "EINVAL", 23: "ENFILE", 24: "EMFILE", 25: "ENOTTY", 27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 30: "EROFS",
  34: "ERANGE", 38: "ENOSYS", 40: "ELOOP", 53: "EBADR", 61: "ENODATA", 62: "ETIME", 75: "EOVERFLOW", 95: "EOPNOTSUPP",
  105: "ENOBUFS", 110: "ETIMEDOUT", 125: "ECANCELED", 32: "EPIPE", 101: "ENETUNREACH", 104: "ECONNRESET", 108: "ESHUTDOWN",
  111: "ECONNREFUSED", 113: "EHOSTUNREACH", 115: "EINPROGRESS",
};

const TEXTS: Record<number, string> = {
  1: "operation not permitted", 2: "no such file or directory", 3: "no such process", 4: "interrupted",
  5: "I/O error", 6: "no such device or address", 9: "bad file descriptor", 11: "resource temporarily unavailable",
  12: "out of memory", 13: "permission denied", 14: "bad address", 16: "device or resource busy",
  17: "already exists", 19: "no such device", 20: "not a directory", 21: "is a directory", 22: "invalid argument",
  24: "too many open files", 25: "inappropriate ioctl for device", 27: "file too large", 28: "no space left on device",
  30: "read-only file system", 34: "result out of range", 38: "function not implemented", 40: "too many levels of symbolic links", 61: "no data", 62: "timer expired",
  95: "operation not supported", 105: "no buffer space available", 110: "timed out", 125: "operation canceled", 32: "broken pipe",
  101: "network is unreachable", 104: "connection reset by peer", 108: "the connection was shut down",
  111: "connection refused", 113: "no route to host", 115: "no answer in time",
};

/** "EBUSY" for 16 (sign ignored), "errno 200" for numbers we do not name. */
export function errnoName(errno: number): string {
  return NAMES[Math.abs(errno)] ?? `errno ${Math.abs(errno)}`;
}

/** A short lowercase description, e.g. "device or resource busy". */
export function errnoText(errno: number): string {
  return TEXTS[Math.abs(errno)] ?? errnoName(errno);
}

/**
 * The one error type of the control plane and CLI: which operation failed, the positive errno, and a
 * message a person can act on. Hot paths never throw it; they pass `-errno` numbers along.
 */
export class ErrnoError extends Error {
  override readonly name = "ErrnoError";
  constructor(readonly op: string, readonly errno: number, message?: string) {
    super(message ?? `${op}: ${errnoText(errno)} (${errnoName(errno)})`);
  }
  /** Throws an ErrnoError when `result` is a -errno, otherwise returns it. */
  static check(op: string, result: number): number {
    if (result < 0) throw new ErrnoError(op, -result);
    return result;
  }
}
