/**
 * An io_uring instance driven from TypeScript with no liburing: the SQ ring, CQ ring and SQE array are
 * mmapped and accessed through typed arrays, and every pointer into them is derived from the offsets the
 * kernel returns in io_uring_params (nothing hard-coded). The ring knows nothing of ublk.
 *
 * Hot-path shape: `getSqe()` returns the word index of a free SQE in `sqe32`; the prep helpers fill it with
 * u32 stores; `submit()` publishes the tail and enters the kernel. Completions are read straight from
 * `cqe32` between `cqHead()` and `cqTail()`, then released with `cqAdvanceTo()`. user_data is handled as two
 * u32 halves, so no BigInt is ever created.
 */
import {
  IORING_ENTER_EXT_ARG, IORING_ENTER_GETEVENTS, IORING_ENTER_REGISTERED_RING, IORING_FEAT_EXT_ARG, IORING_FEAT_SINGLE_MMAP, IORING_OFF_CQ_RING,
  IORING_OFF_SQ_RING, IORING_OFF_SQES, IORING_OP_ASYNC_CANCEL, IORING_OP_FALLOCATE, IORING_OP_FSYNC, IORING_OP_NOP,
  IORING_OP_POLL_ADD, IORING_OP_READ, IORING_OP_READ_FIXED, IORING_OP_RECV, IORING_OP_SEND, IORING_OP_SEND_ZC, IORING_OP_SENDMSG, IORING_OP_TIMEOUT, IORING_OP_URING_CMD, IORING_OP_WRITE,
  IORING_OP_WRITE_FIXED, IORING_RECVSEND_FIXED_BUF, IORING_REGISTER_BUFFERS2, IORING_REGISTER_FILES, IORING_RSRC_REGISTER_SPARSE,
  IORING_REGISTER_PBUF_RING, IORING_REGISTER_USE_REGISTERED_RING, IORING_SETUP_CQE32, IORING_SETUP_COOP_TASKRUN, IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_NO_MMAP, IORING_SETUP_REGISTERED_FD_ONLY, IORING_SETUP_SINGLE_ISSUER, IORING_UNREGISTER_RING_FDS,
  IORING_SETUP_SQE128, IORING_SETUP_SUBMIT_ALL, IORING_SETUP_TASKRUN_FLAG, IORING_SQ_CQ_OVERFLOW, IORING_SQ_TASKRUN,
  __NR_io_uring_enter, __NR_io_uring_register, __NR_io_uring_setup, __kernel_timespec, io_cqring_offsets,
  io_sqring_offsets, io_uring_buf, io_uring_buf_reg, io_uring_getevents_arg, io_uring_params, io_uring_rsrc_register,
  io_uring_rsrc_update,
} from "./uapi/io_uring.ts";
import { EAGAIN, EBUSY, EINTR, EINVAL, ErrnoError } from "./errno.ts";
import { setU64 } from "./layout.ts";
import { close, MAP_POPULATE, MAP_SHARED, memoryAt, mmap, mmapAnonymous, munmap, PAGE_BYTES, PROT_READ, PROT_WRITE, syscall } from "./libc.ts";

export interface RingOptions {
  /** SQ size; the kernel rounds it up to a power of two. */
  entries: number;
  /** IORING_SETUP_* flags wanted. SINGLE_ISSUER / DEFER_TASKRUN / COOP_TASKRUN / TASKRUN_FLAG / SUBMIT_ALL
   * are dropped one by one if the kernel refuses them; SQE128 / CQE32 are required when asked. */
  flags?: number;
  /** A ring only the creating thread uses (a queue's): no file descriptor and no mapping of the kernel's — its
   * SQ/CQ memory is ours (NO_MMAP) and it is known by an index among the thread's registered rings
   * (REGISTERED_FD_ONLY, Linux ≥ 6.5). The kernel then lets go of it when this thread exits, not once the whole
   * process has torn down its memory and files: a killed server's commands are cancelled that much sooner
   * (measured: the teardown of a Bun process took 2–12 ms under emulation). Falls back to a plain ring. */
  privateToThread?: boolean;
}

/** Flags we may drop, in this order, when io_uring_setup answers EINVAL (each newer than the next). */
const OPTIONAL_SETUP_FLAGS = [
  IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_TASKRUN_FLAG, IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_SUBMIT_ALL,
];

const TWO_POW_32 = 4294967296;
/** -EAGAIN / -EBUSY with no completion to reap: how often submit() enters again, a millisecond apart, before it
 * gives the error to the caller (the kernel was short of memory or request slots that long). */
const BUSY_RETRIES = 100;
/** Submits nextSqe() tries while the SQ stays full although each one succeeded. */
const FULL_SQ_SUBMITS = 4;
// Word indices inside one SQE (see io_uring_sqe in uapi/io_uring.ts).
const W_OPCODE_FLAGS = 0, W_FD = 1, W_OFF_LO = 2, W_OFF_HI = 3, W_ADDR_LO = 4, W_ADDR_HI = 5, W_LEN = 6;
const W_RW_FLAGS = 7, W_USER_DATA_LO = 8, W_USER_DATA_HI = 9, W_BUF_INDEX = 10, W_FILE_INDEX = 11;
/** Where a register call's argument goes in the scratch page: clear of the getevents argument and its timespec. */
const REGISTER_ARG_BYTE = 256;
const W_ADDR3_LO = 12, W_ADDR3_HI = 13, W_PAD2_LO = 14, W_PAD2_HI = 15;
/** Word index of the uring_cmd payload (`cmd[]`, byte 48) inside an SQE. */
export const SQE_CMD_WORD = 12;
/** Word indices inside one CQE. */
export const CQE_USER_DATA_LO = 0, CQE_USER_DATA_HI = 1, CQE_RES = 2, CQE_FLAGS = 3;

export class Ring {
  /** The ring's file descriptor, or with `registeredRing` its index among this thread's registered rings. */
  readonly fd: number;
  /** Whether `fd` is a registered-ring index (RingOptions.privateToThread). */
  readonly registeredRing: boolean;
  /** The IORING_SETUP_* flags the kernel accepted. */
  readonly flags: number;
  readonly features: number;
  readonly sqEntries: number;
  readonly cqEntries: number;
  /** 16 words per SQE, 32 with SQE128. */
  readonly sqeWords: number;
  /** 4 words per CQE, 8 with CQE32. */
  readonly cqeWords: number;
  /** Every SQE, as u32 words. */
  readonly sqe32: Uint32Array;
  /** Every CQE, as i32 words (res is signed). */
  readonly cqe32: Int32Array;

  private readonly sqRing: Uint32Array;
  private readonly cqRing: Uint32Array;
  private readonly sqHeadIndex: number;
  private readonly sqTailIndex: number;
  private readonly sqFlagsIndex: number;
  private readonly cqHeadIndex: number;
  private readonly cqTailIndex: number;
  private readonly cqOverflowIndex: number;
  private readonly sqMask: number;
  private readonly cqMask: number;
  /** Our copy of the SQ tail: SQEs up to here are filled; the kernel sees them once we store the tail. */
  private sqeTail = 0;
  /** Rings with DEFER_TASKRUN only post completions while we are inside io_uring_enter(GETEVENTS). */
  private readonly alwaysGetEvents: boolean;
  private readonly scratch: Uint32Array;
  private readonly scratchAddress: number;
  private readonly mappings: Array<[address: number, lengthBytes: number]> = [];
  private closed = false;

  /** Creates a ring; throws an ErrnoError when the kernel refuses it. */
  static create(options: RingOptions): Ring {
    return new Ring(options);
  }

  private constructor(options: RingOptions) {
    // One page of our own for the setup params, wait arguments and timespecs: the kernel reads and writes it
    // during calls, and unlike a small JS typed array it never moves.
    this.scratchAddress = mmapAnonymous(PAGE_BYTES);
    if (this.scratchAddress < 0) throw ringError("mmap", this.scratchAddress);
    this.mappings.push([this.scratchAddress, PAGE_BYTES]);
    this.scratch = new Uint32Array(memoryAt(this.scratchAddress, PAGE_BYTES));

    let flags = options.flags ?? 0;
    let fd = -EINVAL;
    /** Our memory for the rings (cq_off.user_addr) and the SQEs (sq_off.user_addr) of a private ring, else 0. */
    let ringsAddress = 0, sqesAddress = 0, ringsBytes = 0;
    if (options.privateToThread) {
      // The kernel rounds the SQ up to a power of two and makes the CQ twice that; the rings region is a header
      // (under a page), the CQEs and the SQ index array.
      const sqEntries = 2 ** Math.ceil(Math.log2(Math.max(1, options.entries)));
      ringsBytes = pageAligned(PAGE_BYTES + 2 * sqEntries * (flags & IORING_SETUP_CQE32 ? 32 : 16) + sqEntries * 4);
      const sqesBytes = pageAligned(sqEntries * (flags & IORING_SETUP_SQE128 ? 128 : 64));
      ringsAddress = mmapAnonymous(ringsBytes);
      sqesAddress = ringsAddress < 0 ? -1 : mmapAnonymous(sqesBytes);
      if (ringsAddress >= 0) this.mappings.push([ringsAddress, ringsBytes]);
      if (sqesAddress >= 0) this.mappings.push([sqesAddress, sqesBytes]);
      if (ringsAddress < 0 || sqesAddress < 0) {
        this.close();
        throw ringError("mmap", ringsAddress < 0 ? ringsAddress : sqesAddress);
      }
    }
    for (let attempt = 0; ; attempt++) {
      const p = this.scratch;
      p.fill(0, 0, io_uring_params.SIZE / 4);
      p[io_uring_params.flags / 4] = flags | (ringsAddress > 0 ? IORING_SETUP_NO_MMAP | IORING_SETUP_REGISTERED_FD_ONLY : 0);
      if (ringsAddress > 0) {
        setU64(p, io_uring_params.sq_off + io_sqring_offsets.user_addr, sqesAddress);
        setU64(p, io_uring_params.cq_off + io_cqring_offsets.user_addr, ringsAddress);
      }
      fd = syscall(__NR_io_uring_setup, options.entries, this.scratchAddress);
      if (fd !== -EINVAL) break;
      if (ringsAddress > 0) {
        // A kernel before 6.5: a plain ring, mapped from the kernel.
        for (const [address, lengthBytes] of this.mappings.splice(1)) munmap(address, lengthBytes);
        ringsAddress = sqesAddress = 0;
        continue;
      }
      const droppable = OPTIONAL_SETUP_FLAGS.find((flag) => (flags & flag) !== 0);
      if (droppable === undefined) break;
      // DEFER_TASKRUN is only valid with SINGLE_ISSUER; dropping SINGLE_ISSUER drops it too.
      flags &= ~droppable;
      if (droppable === IORING_SETUP_SINGLE_ISSUER) flags &= ~IORING_SETUP_DEFER_TASKRUN;
    }
    this.registeredRing = ringsAddress > 0 && fd >= 0;
    if (fd < 0) {
      this.fd = -1;
      this.close();
      throw ringError("io_uring_setup", fd);
    }
    this.fd = fd;
    this.flags = flags;
    const p = this.scratch;
    const word = (byteOffset: number) => p[byteOffset / 4]!;
    this.sqEntries = word(io_uring_params.sq_entries);
    this.cqEntries = word(io_uring_params.cq_entries);
    this.features = word(io_uring_params.features);
    const sq = io_uring_params.sq_off, cq = io_uring_params.cq_off;
    const sqOff = { head: word(sq + io_sqring_offsets.head), tail: word(sq + io_sqring_offsets.tail),
      mask: word(sq + io_sqring_offsets.ring_mask), flags: word(sq + io_sqring_offsets.flags),
      array: word(sq + io_sqring_offsets.array) };
    const cqOff = { head: word(cq + io_cqring_offsets.head), tail: word(cq + io_cqring_offsets.tail),
      mask: word(cq + io_cqring_offsets.ring_mask), overflow: word(cq + io_cqring_offsets.overflow),
      cqes: word(cq + io_cqring_offsets.cqes) };

    const sqeBytes = flags & IORING_SETUP_SQE128 ? 128 : 64;
    const cqeBytes = flags & IORING_SETUP_CQE32 ? 32 : 16;
    this.sqeWords = sqeBytes / 4;
    this.cqeWords = cqeBytes / 4;
    let sqRingBytes = sqOff.array + this.sqEntries * 4;
    let cqRingBytes = cqOff.cqes + this.cqEntries * cqeBytes;
    const singleMmap = (this.features & IORING_FEAT_SINGLE_MMAP) !== 0;
    if (singleMmap) sqRingBytes = cqRingBytes = Math.max(sqRingBytes, cqRingBytes);

    try {
      if (this.registeredRing && (sqOff.array + this.sqEntries * 4 > ringsBytes || cqOff.cqes + this.cqEntries * cqeBytes > ringsBytes)) {
        throw new Error(`io_uring_setup: the kernel's ring layout (SQ array at ${sqOff.array}, CQEs at ${cqOff.cqes}) outgrows the memory given it`);
      }
      const sqRingAddress = this.registeredRing ? ringsAddress : this.map(sqRingBytes, IORING_OFF_SQ_RING);
      const cqRingAddress = this.registeredRing || singleMmap ? sqRingAddress : this.map(cqRingBytes, IORING_OFF_CQ_RING);
      sqesAddress = this.registeredRing ? sqesAddress : this.map(this.sqEntries * sqeBytes, IORING_OFF_SQES);
      this.sqRing = new Uint32Array(memoryAt(sqRingAddress, sqRingBytes));
      this.cqRing = new Uint32Array(memoryAt(cqRingAddress, cqRingBytes));
      this.sqe32 = new Uint32Array(memoryAt(sqesAddress, this.sqEntries * sqeBytes));
      this.cqe32 = new Int32Array(memoryAt(cqRingAddress + cqOff.cqes, this.cqEntries * cqeBytes));
    } catch (error) {
      this.close();
      throw error;
    }
    this.sqHeadIndex = sqOff.head / 4;
    this.sqTailIndex = sqOff.tail / 4;
    this.sqFlagsIndex = sqOff.flags / 4;
    this.cqHeadIndex = cqOff.head / 4;
    this.cqTailIndex = cqOff.tail / 4;
    this.cqOverflowIndex = cqOff.overflow / 4;
    this.sqMask = this.sqRing[sqOff.mask / 4]!;
    this.cqMask = this.cqRing[cqOff.mask / 4]!;
    // SQ array slot i always names SQE i, so filling SQE (tail & mask) and moving the tail is enough.
    for (let i = 0; i < this.sqEntries; i++) this.sqRing[sqOff.array / 4 + i] = i;
    this.sqeTail = this.sqRing[this.sqTailIndex]!;
    this.alwaysGetEvents = (flags & IORING_SETUP_DEFER_TASKRUN) !== 0;
  }

  private map(lengthBytes: number, offset: number): number {
    const address = mmap(lengthBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, this.fd, offset);
    if (address < 0) throw ringError("mmap io_uring", address);
    this.mappings.push([address, lengthBytes]);
    return address;
  }

  /** Unmaps everything and closes the ring; safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // A private ring first lets go of its registered index (its memory stays pinned until the kernel is done).
    if (this.registeredRing) {
      const s = this.scratch;
      s.fill(0, 0, io_uring_rsrc_update.SIZE / 4);
      s[io_uring_rsrc_update.offset / 4] = this.fd;
      this.register(IORING_UNREGISTER_RING_FDS, this.scratchAddress, 1);
    } else if (this.fd >= 0) close(this.fd);
    for (const [address, lengthBytes] of this.mappings.splice(0)) munmap(address, lengthBytes);
  }

  // ---- submission -------------------------------------------------------------------------------------

  /** SQEs filled but not yet consumed by the kernel. */
  sqPending(): number {
    return (this.sqeTail - Atomics.load(this.sqRing, this.sqHeadIndex)) >>> 0;
  }

  /** Whether the kernel flagged task work for us (TASKRUN_FLAG rings), such as a completion a DEFER_TASKRUN ring
   * posts only once we enter. Read from shared memory: no system call. */
  taskWorkPending(): boolean {
    return (Atomics.load(this.sqRing, this.sqFlagsIndex) & IORING_SQ_TASKRUN) !== 0;
  }
  /** Space left in the SQ. */
  sqSpace(): number {
    return this.sqEntries - this.sqPending();
  }

  /**
   * Word index in `sqe32` of the next free SQE, or -1 when the SQ is full (submit, then retry).
   * The SQE keeps whatever it held before: the prep helpers overwrite every field.
   */
  getSqe(): number {
    // Acquire: the kernel must have finished reading an SQE before we reuse its slot.
    const head = Atomics.load(this.sqRing, this.sqHeadIndex);
    if (((this.sqeTail - head) >>> 0) >= this.sqEntries) return -1;
    const base = (this.sqeTail & this.sqMask) * this.sqeWords;
    this.sqeTail = (this.sqeTail + 1) >>> 0;
    return base;
  }

  /** Where the next SQE will be filled: a mark for dropSqesSince(). */
  sqeMark(): number {
    return this.sqeTail;
  }

  /** Drops the SQEs filled since `mark`, none of them submitted since (throws otherwise): the kernel never sees
   * them. Lets code that prepares commands run once before its commands can be sent (so it is compiled). */
  dropSqesSince(mark: number): void {
    const unpublished = (this.sqeTail - Atomics.load(this.sqRing, this.sqTailIndex)) >>> 0;
    if (((this.sqeTail - mark) >>> 0) > unpublished) throw new Error("Ring.dropSqesSince: SQEs after the mark were submitted");
    this.sqeTail = mark;
  }

  /**
   * Like getSqe(), but when the SQ is full it submits what is queued to make room. Returns -errno when the
   * kernel refuses that submit (after submit()'s own retries): the ring is then unusable and the caller must
   * stop, not spin.
   */
  nextSqe(): number {
    for (let attempt = 0; ; attempt++) {
      const base = this.getSqe();
      if (base >= 0) return base;
      if (attempt === FULL_SQ_SUBMITS) return -EBUSY;
      const submitted = this.submit();
      if (submitted < 0) return submitted;
    }
  }

  /**
   * Publishes filled SQEs and enters the kernel: submits them, and with `waitNr` > 0 waits until that many
   * completions are ready (or `timeoutMs` passes, giving -ETIME). Returns the number submitted or -errno.
   * EINTR is retried. -EBUSY / -EAGAIN mean the kernel cannot take more now (CQ backlog or memory): they are
   * returned when completions are ready (reap them and call again), and retried here, a millisecond apart and
   * a bounded number of times, while the CQ is empty — there is nothing the caller could reap.
   */
  submit(waitNr = 0, timeoutMs = -1): number {
    // Release: the SQE stores above must be visible before the kernel can see the new tail.
    Atomics.store(this.sqRing, this.sqTailIndex, this.sqeTail);
    let enterFlags = 0;
    if (waitNr > 0 || this.alwaysGetEvents || (Atomics.load(this.sqRing, this.sqFlagsIndex) & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN)) !== 0) {
      enterFlags |= IORING_ENTER_GETEVENTS;
    }
    let argAddress = 0, argBytes = 0;
    if (timeoutMs >= 0 && waitNr > 0) {
      if ((this.features & IORING_FEAT_EXT_ARG) === 0) return -EINVAL;
      argAddress = this.waitArgument(timeoutMs);
      argBytes = io_uring_getevents_arg.SIZE;
      enterFlags |= IORING_ENTER_EXT_ARG;
    }
    for (let busyRetries = 0; ;) {
      const toSubmit = this.sqPending();
      if (toSubmit === 0 && enterFlags === 0) return 0;
      const result = this.enter(toSubmit, waitNr, enterFlags, argAddress, argBytes);
      if (result === -EINTR) continue;
      if ((result === -EAGAIN || result === -EBUSY) && this.cqReady() === 0 && busyRetries < BUSY_RETRIES) {
        busyRetries++;
        Bun.sleepSync(1);
        continue;
      }
      return result;
    }
  }

  /** io_uring_enter(2) on this ring; a method of its own so a test can stand in for the kernel's answer. */
  private enter(toSubmit: number, waitNr: number, enterFlags: number, argAddress: number, argBytes: number): number {
    return syscall(__NR_io_uring_enter, this.fd, toSubmit, waitNr, this.registeredRing ? enterFlags | IORING_ENTER_REGISTERED_RING : enterFlags, argAddress, argBytes);
  }

  /** Fills the scratch page with an io_uring_getevents_arg pointing at a relative timespec. */
  private waitArgument(timeoutMs: number): number {
    const argByte = 64, tsByte = 128;
    const s = this.scratch;
    s.fill(0, argByte / 4, (argByte + io_uring_getevents_arg.SIZE) / 4);
    setU64(s, argByte + io_uring_getevents_arg.ts, this.scratchAddress + tsByte);
    const seconds = Math.floor(timeoutMs / 1000);
    s[tsByte / 4 + __kernel_timespec.tv_sec / 4] = seconds;
    s[tsByte / 4 + __kernel_timespec.tv_sec / 4 + 1] = 0;
    s[tsByte / 4 + __kernel_timespec.tv_nsec / 4] = Math.round((timeoutMs - seconds * 1000) * 1e6);
    s[tsByte / 4 + __kernel_timespec.tv_nsec / 4 + 1] = 0;
    return this.scratchAddress + argByte;
  }

  /** A table of `count` empty registered-buffer slots (filled by the kernel, e.g. ublk's AUTO_BUF_REG); 0 or -errno. */
  registerSparseBuffers(count: number): number {
    const argWord = REGISTER_ARG_BYTE / 4;
    const s = this.scratch;
    s.fill(0, argWord, argWord + io_uring_rsrc_register.SIZE / 4);
    s[argWord + io_uring_rsrc_register.nr / 4] = count;
    s[argWord + io_uring_rsrc_register.flags / 4] = IORING_RSRC_REGISTER_SPARSE;
    return this.register(IORING_REGISTER_BUFFERS2, this.scratchAddress + REGISTER_ARG_BYTE, io_uring_rsrc_register.SIZE);
  }

  /** Registers `fds` as the ring's fixed files 0..n-1 (IOSQE_FIXED_FILE then names one by index); 0 or -errno. */
  registerFiles(fds: readonly number[]): number {
    if (REGISTER_ARG_BYTE + fds.length * 4 > PAGE_BYTES) return -EINVAL;
    for (let i = 0; i < fds.length; i++) this.scratch[REGISTER_ARG_BYTE / 4 + i] = fds[i]!;
    return this.register(IORING_REGISTER_FILES, this.scratchAddress + REGISTER_ARG_BYTE, fds.length);
  }

  /**
   * A provided-buffer group (IORING_REGISTER_PBUF_RING): `count` (a power of two) buffers of `bufferBytes` each,
   * all handed to the kernel. A request with IOSQE_BUFFER_SELECT and this group (setBufferGroup) takes one; its CQE
   * names it (cqe.flags >>> IORING_CQE_BUFFER_SHIFT), and the caller gives it back with BufferGroup.recycle once
   * read. Throws an ErrnoError when the kernel refuses (before 5.19). The memory stays mapped until the process
   * exits: the kernel may write into a buffer until it has cancelled the last request that selects from the group.
   */
  registerBufferGroup(groupId: number, count: number, bufferBytes: number): BufferGroup {
    if (count < 1 || count > 32768 || (count & (count - 1)) !== 0) throw ringError(`a buffer group of ${count}`, -EINVAL);
    const entriesBytes = pageAligned(count * io_uring_buf.SIZE);
    const address = mmapAnonymous(entriesBytes + count * bufferBytes);
    if (address < 0) throw ringError(`mmap a buffer group of ${count} × ${bufferBytes} bytes`, address);
    const group = new BufferGroup(groupId, address, count, address + entriesBytes, bufferBytes);
    const argWord = REGISTER_ARG_BYTE / 4;
    this.scratch.fill(0, argWord, argWord + io_uring_buf_reg.SIZE / 4);
    setU64(this.scratch, REGISTER_ARG_BYTE + io_uring_buf_reg.ring_addr, address);
    this.scratch[argWord + io_uring_buf_reg.ring_entries / 4] = count;
    this.scratch[argWord + io_uring_buf_reg.bgid / 4] = groupId & 0xffff; // flags 0: the kernel uses our memory
    const registered = this.register(IORING_REGISTER_PBUF_RING, this.scratchAddress + REGISTER_ARG_BYTE, 1);
    if (registered < 0) throw ringError(`io_uring_register (buffer group ${groupId})`, registered);
    return group;
  }

  /** io_uring_register(2); returns its result or -errno. */
  register(opcode: number, argAddress: number, nrArgs: number): number {
    return syscall(__NR_io_uring_register, this.fd, this.registeredRing ? opcode + IORING_REGISTER_USE_REGISTERED_RING : opcode, argAddress, nrArgs);
  }

  // ---- completion -------------------------------------------------------------------------------------

  /** Our CQ head: the next CQE to read. */
  cqHead(): number {
    return this.cqRing[this.cqHeadIndex]!;
  }
  /** The kernel's CQ tail; CQEs in [cqHead, cqTail) are ready. */
  cqTail(): number {
    // Acquire: CQE contents written by the kernel are visible once we see the tail that covers them.
    return Atomics.load(this.cqRing, this.cqTailIndex);
  }
  /** Completions ready to read. */
  cqReady(): number {
    return (this.cqTail() - this.cqHead()) >>> 0;
  }
  /** Word index in `cqe32` of the CQE at ring position `position` (a head value). */
  cqeBase(position: number): number {
    return (position & this.cqMask) * this.cqeWords;
  }
  /** Releases every CQE before `position` to the kernel. */
  cqAdvanceTo(position: number): void {
    // Release: the kernel must see the new head only after our reads of those CQEs are done.
    Atomics.store(this.cqRing, this.cqHeadIndex, position >>> 0);
  }
  /** CQEs the kernel could not post (only grows on kernels without IORING_FEAT_NODROP). */
  cqOverflowCount(): number {
    return Atomics.load(this.cqRing, this.cqOverflowIndex);
  }

  /**
   * Waits for one completion and returns its word index in `cqe32` (read it, then `cqAdvanceTo(cqHead()+1)`),
   * or -errno (-ETIME after `timeoutMs`). For control paths; the hot path reads CQEs in batches.
   */
  waitCqe(timeoutMs = -1): number {
    for (;;) {
      if (this.cqReady() > 0) return this.cqeBase(this.cqHead());
      const result = this.submit(1, timeoutMs);
      if (result < 0 && this.cqReady() === 0) return result;
    }
  }

  // ---- prep helpers (u32 stores only) -------------------------------------------------------------------

  /** Writes the fields every opcode shares and clears the rest of the 64-byte SQE. */
  prep(base: number, opcode: number, fd: number, address: number, lengthBytes: number, offset: number,
       userDataLow: number, userDataHigh: number): void {
    const s = this.sqe32;
    s[base + W_OPCODE_FLAGS] = opcode;
    s[base + W_FD] = fd;
    s[base + W_OFF_LO] = offset >>> 0;
    s[base + W_OFF_HI] = Math.floor(offset / TWO_POW_32) >>> 0;
    s[base + W_ADDR_LO] = address >>> 0;
    s[base + W_ADDR_HI] = Math.floor(address / TWO_POW_32) >>> 0;
    s[base + W_LEN] = lengthBytes;
    s[base + W_RW_FLAGS] = 0;
    s[base + W_USER_DATA_LO] = userDataLow;
    s[base + W_USER_DATA_HI] = userDataHigh;
    s[base + W_BUF_INDEX] = 0;
    s[base + W_FILE_INDEX] = 0;
    s[base + W_ADDR3_LO] = 0;
    s[base + W_ADDR3_HI] = 0;
    s[base + W_PAD2_LO] = 0;
    s[base + W_PAD2_HI] = 0;
  }

  /** Sets IOSQE_* flags on a prepared SQE. */
  setSqeFlags(base: number, sqeFlags: number): void {
    this.sqe32[base + W_OPCODE_FLAGS] = (this.sqe32[base + W_OPCODE_FLAGS]! & ~0xff00) | ((sqeFlags & 0xff) << 8);
  }
  /** Names the provided-buffer group a prepared SQE with IOSQE_BUFFER_SELECT takes its buffer from (buf_group). */
  setBufferGroup(base: number, groupId: number): void {
    this.sqe32[base + W_BUF_INDEX] = groupId & 0xffff; // buf_group (u16); personality 0
  }
  /** Sets a prepared SQE's `addr` (an address, or what a command puts there, as ublk's AUTO_BUF_REG does). */
  setSqeAddress(base: number, address: number): void {
    this.sqe32[base + W_ADDR_LO] = address >>> 0;
    this.sqe32[base + W_ADDR_HI] = Math.floor(address / TWO_POW_32);
  }
  /** Sets the per-opcode flags word (rw_flags, fsync_flags, poll32_events, timeout_flags, cancel_flags …). */
  setOpFlags(base: number, opFlags: number): void {
    this.sqe32[base + W_RW_FLAGS] = opFlags;
  }

  prepNop(base: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_NOP, -1, 0, 0, 0, userDataLow, userDataHigh);
  }
  /** read(2) at `offsetBytes` (-1: the file position) into native memory at `address`. */
  prepRead(base: number, fd: number, address: number, lengthBytes: number, offsetBytes: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_READ, fd, address, lengthBytes, offsetBytes, userDataLow, userDataHigh);
  }
  prepWrite(base: number, fd: number, address: number, lengthBytes: number, offsetBytes: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_WRITE, fd, address, lengthBytes, offsetBytes, userDataLow, userDataHigh);
  }
  /** read(2) into registered buffer `bufIndex`, from `address` within it (a kernel-registered buffer starts at 0). */
  prepReadFixed(base: number, fd: number, bufIndex: number, address: number, lengthBytes: number, offsetBytes: number,
                userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_READ_FIXED, fd, address, lengthBytes, offsetBytes, userDataLow, userDataHigh);
    this.sqe32[base + W_BUF_INDEX] = bufIndex; // buf_index (u16); personality 0
  }
  prepWriteFixed(base: number, fd: number, bufIndex: number, address: number, lengthBytes: number, offsetBytes: number,
                 userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_WRITE_FIXED, fd, address, lengthBytes, offsetBytes, userDataLow, userDataHigh);
    this.sqe32[base + W_BUF_INDEX] = bufIndex;
  }
  /** fsync(2); `fsyncFlags` = IORING_FSYNC_DATASYNC for fdatasync. */
  prepFsync(base: number, fd: number, fsyncFlags: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_FSYNC, fd, 0, 0, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_RW_FLAGS] = fsyncFlags;
  }
  /** fallocate(2): the kernel takes the mode in `len` and the length in `addr`. */
  prepFallocate(base: number, fd: number, mode: number, offsetBytes: number, lengthBytes: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_FALLOCATE, fd, lengthBytes, mode, offsetBytes, userDataLow, userDataHigh);
  }
  /** send(2) of `lengthBytes` at `address` on socket `fd`, with MSG_* `msgFlags`. */
  prepSend(base: number, fd: number, address: number, lengthBytes: number, msgFlags: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_SEND, fd, address, lengthBytes, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_RW_FLAGS] = msgFlags;
  }
  /** recv(2) of up to `lengthBytes` into `address` from socket `fd`, with MSG_* `msgFlags` (MSG_WAITALL: all of it). */
  prepRecv(base: number, fd: number, address: number, lengthBytes: number, msgFlags: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_RECV, fd, address, lengthBytes, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_RW_FLAGS] = msgFlags;
  }
  /** send(2) with zero copy of `lengthBytes` of registered buffer `bufIndex`, from `address` within it (a
   * kernel-registered buffer starts at 0). Two CQEs: the result (IORING_CQE_F_MORE set), then a notification with
   * res 0 once the kernel no longer needs the pages. */
  prepSendZcFixed(base: number, fd: number, bufIndex: number, address: number, lengthBytes: number, msgFlags: number,
                  userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_SEND_ZC, fd, address, lengthBytes, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_OPCODE_FLAGS] = IORING_OP_SEND_ZC | (IORING_RECVSEND_FIXED_BUF << 16); // ioprio: send flags
    this.sqe32[base + W_RW_FLAGS] = msgFlags;
    this.sqe32[base + W_BUF_INDEX] = bufIndex;
  }
  /** sendmsg(2) of the struct msghdr at `msghdrAddress` (stable memory, with its iovecs, until the CQE). */
  prepSendmsg(base: number, fd: number, msghdrAddress: number, msgFlags: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_SENDMSG, fd, msghdrAddress, 1, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_RW_FLAGS] = msgFlags;
  }
  /** One-shot poll for `pollEvents` (POLLIN …) on `fd`. */
  prepPollAdd(base: number, fd: number, pollEvents: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_POLL_ADD, fd, 0, 0, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_RW_FLAGS] = pollEvents;
  }
  /** A timeout that fires after `timespecAddress` (a __kernel_timespec in stable memory) or `count` completions. */
  prepTimeout(base: number, timespecAddress: number, count: number, timeoutFlags: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_TIMEOUT, -1, timespecAddress, 1, count, userDataLow, userDataHigh);
    this.sqe32[base + W_RW_FLAGS] = timeoutFlags;
  }
  /** Cancels the request whose user_data is (targetLow, targetHigh). */
  prepCancel(base: number, targetLow: number, targetHigh: number, cancelFlags: number, userDataLow: number, userDataHigh = 0): void {
    this.prep(base, IORING_OP_ASYNC_CANCEL, -1, 0, 0, 0, userDataLow, userDataHigh);
    const s = this.sqe32;
    s[base + W_ADDR_LO] = targetLow;
    s[base + W_ADDR_HI] = targetHigh;
    s[base + W_RW_FLAGS] = cancelFlags;
  }
  /**
   * IORING_OP_URING_CMD with `cmdOp`; clears the command payload (16 bytes, or 80 with SQE128) and returns
   * the word index in `sqe32` where the caller writes it.
   */
  prepUringCmd(base: number, fd: number, cmdOp: number, userDataLow: number, userDataHigh = 0): number {
    this.prep(base, IORING_OP_URING_CMD, fd, 0, 0, 0, userDataLow, userDataHigh);
    this.sqe32[base + W_OFF_LO] = cmdOp; // cmd_op shares the `off` field; its upper half is padding.
    this.sqe32.fill(0, base + SQE_CMD_WORD, base + this.sqeWords);
    return base + SQE_CMD_WORD;
  }
}

/**
 * The buffers of a provided-buffer group (Ring.registerBufferGroup): buffer `bid` is at bufferAddress(bid), and
 * `bytes` views them all. Each starts with the kernel; recycle() gives one back after its CQE was read.
 */
export class BufferGroup {
  /** All buffers, buffer bid's first byte at bid * bufferBytes. */
  readonly bytes: Uint8Array;
  private readonly entries: Uint32Array;
  private readonly entries16: Uint16Array;
  /** The ring's tail: the u16 in entry 0's `resv`, which the kernel reads with acquire semantics. */
  private readonly tail: Uint16Array;
  private tailCount = 0;

  constructor(readonly groupId: number, entriesAddress: number, readonly count: number, readonly buffersAddress: number,
              readonly bufferBytes: number) {
    this.bytes = new Uint8Array(memoryAt(buffersAddress, count * bufferBytes));
    this.entries = new Uint32Array(memoryAt(entriesAddress, count * io_uring_buf.SIZE));
    this.entries16 = new Uint16Array(this.entries.buffer, this.entries.byteOffset, this.entries.length * 2);
    this.tail = new Uint16Array(memoryAt(entriesAddress + io_uring_buf.resv, 2));
    for (let bid = 0; bid < count; bid++) this.place(bid);
    Atomics.store(this.tail, 0, this.tailCount);
  }

  bufferAddress(bid: number): number {
    return this.buffersAddress + bid * this.bufferBytes;
  }

  /** Gives buffer `bid` back to the kernel. */
  recycle(bid: number): void {
    this.place(bid);
    // Release: the entry must be complete before the kernel can see the new tail.
    Atomics.store(this.tail, 0, this.tailCount);
  }

  /** Writes bid's entry at the tail; the tail moves in memory only when published. Entry 0's `resv` is the tail
   * itself, so the entry's last word is written as addr/len then bid alone (a u16 store). */
  private place(bid: number): void {
    const word = (this.tailCount & (this.count - 1)) * (io_uring_buf.SIZE / 4);
    setU64(this.entries, word * 4 + io_uring_buf.addr, this.bufferAddress(bid));
    this.entries[word + io_uring_buf.len / 4] = this.bufferBytes;
    this.entries16[word * 2 + io_uring_buf.bid / 2] = bid;
    this.tailCount = (this.tailCount + 1) & 0xffff;
  }
}

/** `bytes` rounded up to whole pages. */
function pageAligned(bytes: number): number {
  return Math.ceil(bytes / PAGE_BYTES) * PAGE_BYTES;
}

function ringError(op: string, negativeErrno: number): ErrnoError {
  return new ErrnoError(op, -negativeErrno);
}
