/**
 * libc through bun:ffi, opened once per thread (each Worker loads its own copy of this module).
 * Every wrapper returns its value or `-errno`, as liburing does, so callers test `< 0` and never read errno
 * themselves. errno is per thread, so its location is taken when this module loads in each thread and read
 * right after the failing call, before any other libc call can overwrite it.
 * This file and ffi/ring.ts are the only users of bun:ffi in the project.
 */
import { dlopen, FFIType, ptr, read as readMemory, toArrayBuffer, type Pointer } from "bun:ffi";
import { EINVAL } from "./errno.ts";
import { struct } from "./layout.ts";

const { i32, u32, i64, u64, ptr: pointer, i64_fast: i64Fast } = FFIType;
const lib = dlopen("libc.so.6", {
  // syscall() is variadic; on x86_64 integer arguments travel in the same registers either way.
  syscall: { args: [i64, i64, i64, i64, i64, i64, i64], returns: i64Fast },
  mmap: { args: [pointer, u64, i32, i32, i32, i64], returns: i64Fast },
  munmap: { args: [pointer, u64], returns: i32 },
  open: { args: [pointer, i32, u32], returns: i32 },
  close: { args: [i32], returns: i32 },
  read: { args: [i32, pointer, u64], returns: i64Fast },
  write: { args: [i32, pointer, u64], returns: i64Fast },
  pread: { args: [i32, pointer, u64, i64], returns: i64Fast },
  pwrite: { args: [i32, pointer, u64, i64], returns: i64Fast },
  fsync: { args: [i32], returns: i32 },
  fallocate: { args: [i32, i32, i64, i64], returns: i32 },
  flock: { args: [i32, i32], returns: i32 },
  memcpy: { args: [pointer, pointer, u64], returns: pointer },
  memset: { args: [pointer, i32, u64], returns: pointer },
  ioctl: { args: [i32, u64, pointer], returns: i32 },
  eventfd: { args: [u32, i32], returns: i32 },
  prctl: { args: [i32, u64, u64, u64, u64], returns: i32 },
  getpid: { args: [], returns: i32 },
  gettid: { args: [], returns: i32 },
  sched_setaffinity: { args: [i32, u64, pointer], returns: i32 },
  getrusage: { args: [i32, pointer], returns: i32 },
  socket: { args: [i32, i32, i32], returns: i32 },
  connect: { args: [i32, pointer, u32], returns: i32 },
  socketpair: { args: [i32, i32, i32, pointer], returns: i32 },
  send: { args: [i32, pointer, u64, i32], returns: i64Fast },
  recv: { args: [i32, pointer, u64, i32], returns: i64Fast },
  setsockopt: { args: [i32, i32, i32, pointer, u32], returns: i32 },
  shutdown: { args: [i32, i32], returns: i32 },
  inet_pton: { args: [i32, pointer, pointer], returns: i32 },
  __errno_location: { args: [], returns: pointer },
});
const fn = lib.symbols;
const errnoLocation = fn.__errno_location() as Pointer;

function errno(): number {
  return readMemory.i32(errnoLocation, 0);
}
/** Turns libc's `-1 and errno` into `-errno`. */
function check(result: number | bigint): number {
  // i64_fast gives a number for every value these calls return (sizes, addresses below 2^47).
  return result === -1 ? -errno() : (result as number);
}

/** Something the kernel may read during one call: a typed array (moved by the GC only between calls) or an address. */
export type BufferArg = NodeJS.TypedArray | number;

// Linux constants used with these calls (x86_64 values).
export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_NONBLOCK = 0o4000;
export const O_DIRECT = 0o40000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_POPULATE = 0x8000;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const PR_SET_NAME = 15;
export const PR_SET_IO_FLUSHER = 57;
export const PAGE_BYTES = 4096;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const RWF_DSYNC = 0x02;
/** ioctl(BLKGETSIZE64): a block device's size in bytes, into a u64. */
export const BLKGETSIZE64 = 0x80081272;
/** ioctl(BLKROGET): whether a block device is read-only, into an int. */
export const BLKROGET = 0x125e;
/** ioctl(BLKSSZGET): a block device's logical block size, into an int. */
export const BLKSSZGET = 0x1268;

export function syscall(nr: number, a = 0, b = 0, c = 0, d = 0, e = 0, f = 0): number {
  return check(fn.syscall(nr, a, b, c, d, e, f));
}

/** Maps `lengthBytes`; returns the address or -errno. */
export function mmap(lengthBytes: number, prot: number, flags: number, fd: number, offsetBytes: number): number {
  return check(fn.mmap(null, lengthBytes, prot, flags, fd, offsetBytes));
}
export function munmap(address: number, lengthBytes: number): number {
  return check(fn.munmap(address as Pointer, lengthBytes));
}
/** Page-aligned, zeroed private memory that never moves: what the kernel may read or write between calls. */
export function mmapAnonymous(lengthBytes: number): number {
  return mmap(lengthBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

export function open(path: string, flags: number, mode = 0): number {
  const cPath = Buffer.from(`${path}\0`, "utf8");
  return check(fn.open(cPath, flags | O_CLOEXEC, mode));
}
export function close(fd: number): number {
  return check(fn.close(fd));
}
export function read(fd: number, buffer: BufferArg, lengthBytes: number): number {
  return check(fn.read(fd, buffer as Pointer, lengthBytes));
}
export function write(fd: number, buffer: BufferArg, lengthBytes: number): number {
  return check(fn.write(fd, buffer as Pointer, lengthBytes));
}
export function pread(fd: number, buffer: BufferArg, lengthBytes: number, offsetBytes: number): number {
  return check(fn.pread(fd, buffer as Pointer, lengthBytes, offsetBytes));
}
export function pwrite(fd: number, buffer: BufferArg, lengthBytes: number, offsetBytes: number): number {
  return check(fn.pwrite(fd, buffer as Pointer, lengthBytes, offsetBytes));
}
export function fsync(fd: number): number {
  return check(fn.fsync(fd));
}
/** fallocate(2): `mode` 0 reserves blocks; FALLOC_FL_* punch holes or zero ranges. */
export function fallocate(fd: number, mode: number, offsetBytes: number, lengthBytes: number): number {
  return check(fn.fallocate(fd, mode, offsetBytes, lengthBytes));
}
export const LOCK_EX = 2;
export const LOCK_NB = 4;
/** flock(2): an advisory lock the kernel drops when the process dies, however it dies. */
export function flock(fd: number, operation: number): number {
  return check(fn.flock(fd, operation));
}
/** pidfd_open(2) and pidfd_send_signal(2) (Linux 5.3; one syscall number on every architecture): a pidfd names one
 * process for as long as it is open, so a check made after opening it cannot be outrun by a recycled pid. */
const SYS_pidfd_send_signal = 424;
const SYS_pidfd_open = 434;
export function pidfdOpen(pid: number): number {
  return syscall(SYS_pidfd_open, pid, 0);
}
export function pidfdSendSignal(pidfd: number, signal: number): number {
  return syscall(SYS_pidfd_send_signal, pidfd, signal, 0, 0);
}
/** Copies between two native addresses (mmapped memory); cannot fail. */
export function memcpy(destinationAddress: number, sourceAddress: number, lengthBytes: number): void {
  fn.memcpy(destinationAddress as Pointer, sourceAddress as Pointer, lengthBytes);
}
/** Fills native memory at `address` with `byte`. */
export function memset(address: number, byte: number, lengthBytes: number): void {
  fn.memset(address as Pointer, byte, lengthBytes);
}
export function ioctl(fd: number, request: number, arg: BufferArg): number {
  return check(fn.ioctl(fd, request, arg as Pointer));
}
export function eventfd(initialValue: number, flags: number): number {
  return check(fn.eventfd(initialValue, flags | EFD_CLOEXEC));
}
export function prctl(option: number, arg2 = 0, arg3 = 0, arg4 = 0, arg5 = 0): number {
  return check(fn.prctl(option, arg2, arg3, arg4, arg5));
}
/** Names the calling thread (15 bytes at most) for ps, top and /proc/PID/task/TID/comm. */
export function setThreadName(name: string): number {
  const cName = Buffer.from(`${name.slice(0, 15)}\0`, "utf8");
  return prctl(PR_SET_NAME, Number(ptr(cName)));
}
export function getpid(): number {
  return fn.getpid();
}
export function gettid(): number {
  return fn.gettid();
}
/** Pins thread `tid` (0 = the calling thread) to the CPUs set in `cpuMask` (a cpu_set_t as bytes). */
export function schedSetaffinity(tid: number, cpuMask: Uint8Array): number {
  if (cpuMask.byteLength === 0) return -EINVAL;
  return check(fn.sched_setaffinity(tid, cpuMask.byteLength, cpuMask));
}

// Sockets (x86_64 values).
export const AF_UNIX = 1;
export const AF_INET = 2;
export const AF_INET6 = 10;
export const SOCK_STREAM = 1;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_RCVTIMEO = 20;
export const SO_SNDTIMEO = 21;
export const IPPROTO_TCP = 6;
export const TCP_NODELAY = 1;
export const SHUT_RDWR = 2;
export const MSG_DONTWAIT = 0x40;
export const MSG_WAITALL = 0x100;
/** A send on a connection the peer closed fails with EPIPE instead of raising SIGPIPE. */
export const MSG_NOSIGNAL = 0x4000;
/** More data follows: the socket holds this send's bytes back to fill a segment with what comes next. */
export const MSG_MORE = 0x8000;
/** struct msghdr and struct iovec (x86_64), as sendmsg reads them. */
export const msghdr = struct("msghdr", 56, {
  msg_name: [0, 8], msg_namelen: [8, 4], msg_iov: [16, 8], msg_iovlen: [24, 8], msg_control: [32, 8],
  msg_controllen: [40, 8], msg_flags: [48, 4],
});
export const iovec = struct("iovec", 16, { iov_base: [0, 8], iov_len: [8, 8] });

export function socket(domain: number, type: number, protocol = 0): number {
  return check(fn.socket(domain, type | SOCK_CLOEXEC, protocol));
}
/** socketpair(2): two connected sockets, or -errno. */
export function socketpair(domain: number, type: number): [number, number] | number {
  const fds = new Int32Array(2);
  const result = check(fn.socketpair(domain, type | SOCK_CLOEXEC, 0, fds));
  return result < 0 ? result : [fds[0]!, fds[1]!];
}
/** connect(2) to a struct sockaddr held in `address` (bytes). */
export function connect(fd: number, address: Uint8Array): number {
  return check(fn.connect(fd, address, address.byteLength));
}
export function send(fd: number, buffer: BufferArg, lengthBytes: number, flags: number): number {
  return check(fn.send(fd, buffer as Pointer, lengthBytes, flags));
}
export function recv(fd: number, buffer: BufferArg, lengthBytes: number, flags: number): number {
  return check(fn.recv(fd, buffer as Pointer, lengthBytes, flags));
}
/** setsockopt(2) with the option value given as bytes. */
export function setsockopt(fd: number, level: number, name: number, value: NodeJS.TypedArray): number {
  return check(fn.setsockopt(fd, level, name, value, value.byteLength));
}
export function shutdown(fd: number, how: number): number {
  return check(fn.shutdown(fd, how));
}
/** inet_pton(3): the binary address (4 or 16 bytes) of `text` in `family`, or null when it is not one. */
export function inetPton(family: number, text: string): Uint8Array | null {
  const out = new Uint8Array(16);
  const result = fn.inet_pton(family, Buffer.from(`${text}\0`, "utf8"), out);
  return result === 1 ? out.subarray(0, family === AF_INET ? 4 : 16) : null;
}

/** struct rusage (x86_64): only the field we read. */
export const rusage = struct("rusage", 144, { ru_nivcsw: [136, 8] });
const RUSAGE_THREAD = 1;
const rusageWords = new Int32Array(rusage.SIZE / 4);
/** How many times the calling thread was preempted (ru_nivcsw; its low word is enough to compare two readings). */
export function threadPreemptions(): number {
  fn.getrusage(RUSAGE_THREAD, rusageWords);
  return rusageWords[rusage.ru_nivcsw / 4]!;
}

/** An ArrayBuffer over `lengthBytes` of native memory at `address` (no copy; valid while it stays mapped). */
export function memoryAt(address: number, lengthBytes: number): ArrayBuffer {
  return toArrayBuffer(address as Pointer, 0, lengthBytes);
}
/** The current address of a typed array's bytes: valid for one call only, as the GC may move small arrays. */
export function addressOf(view: NodeJS.TypedArray): number {
  return ptr(view);
}
