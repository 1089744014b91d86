/**
 * The ublk control plane: one method per control command, each a URING_CMD on an SQE128 ring over
 * /dev/ublk-control with ioctl-encoded opcodes. Knows nothing of targets. Failures throw ErrnoError with a
 * message a person can act on.
 */
import { close, memoryAt, mmapAnonymous, munmap, O_RDWR, open, PAGE_BYTES } from "../ffi/libc.ts";
import { CQE_RES, CQE_USER_DATA_LO, Ring } from "../ffi/ring.ts";
import { EACCES, EBUSY, EEXIST, EINVAL, ENODEV, ENOENT, EOPNOTSUPP, EPERM, ETIME, ErrnoError, errnoName, errnoText } from "../ffi/errno.ts";
import { IORING_SETUP_SQE128 } from "../ffi/uapi/io_uring.ts";
import { setU64 } from "../ffi/layout.ts";
import {
  UBLK_F_CMD_IOCTL_ENCODE, UBLK_F_UNPRIVILEGED_DEV, UBLK_PARAM_TYPE_BASIC, UBLK_PARAM_TYPE_DEVT, UBLK_PARAM_TYPE_DISCARD, UBLK_PARAM_TYPE_DMA_ALIGN, UBLK_U_CMD_ADD_DEV,
  UBLK_U_CMD_DEL_DEV, UBLK_U_CMD_END_USER_RECOVERY, UBLK_U_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_DEV_INFO2,
  UBLK_U_CMD_GET_FEATURES, UBLK_U_CMD_GET_PARAMS, UBLK_U_CMD_GET_QUEUE_AFFINITY, UBLK_U_CMD_SET_PARAMS,
  UBLK_U_CMD_QUIESCE_DEV, UBLK_U_CMD_START_DEV, UBLK_U_CMD_START_USER_RECOVERY, UBLK_U_CMD_STOP_DEV, UBLK_U_CMD_TRY_STOP_DEV,
  UBLK_U_CMD_UPDATE_SIZE, ublk_param_basic, ublk_param_devt,
  ublk_param_discard, ublk_params, ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info,
} from "../ffi/uapi/ublk_cmd.ts";

export const DEFAULT_CONTROL_PATH = "/dev/ublk-control";
/** Where the control device is; UBLK_BUN_CONTROL overrides it (tests use it to simulate a missing driver). */
export function controlPath(): string {
  return process.env.UBLK_BUN_CONTROL || DEFAULT_CONTROL_PATH;
}

/** struct ublksrv_ctrl_dev_info, in JS form. `flags` holds the UBLK_F_* bits (all below 2^32 today). */
export interface DevInfo {
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  state: number;
  maxIoBufBytes: number;
  ublksrvPid: number;
  flags: number;
  ublksrvFlags: number;
  ownerUid: number;
  ownerGid: number;
}

export interface AddDevRequest {
  /** -1 lets the kernel pick. */
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  flags: number;
  ublksrvFlags?: number;
}

export interface BasicParams {
  attrs: number;
  logicalBsShift: number;
  physicalBsShift: number;
  ioOptShift: number;
  ioMinShift: number;
  maxSectors: number;
  chunkSectors: number;
  devSectors: number;
  virtBoundaryMask: number;
}
export interface DiscardParams {
  discardAlignment: number;
  discardGranularity: number;
  maxDiscardSectors: number;
  maxWriteZeroesSectors: number;
  maxDiscardSegments: number;
}
export interface DevtParams {
  charMajor: number;
  charMinor: number;
  diskMajor: number;
  diskMinor: number;
}
/** struct ublk_params in JS form: `basic` is always present; the others when their UBLK_PARAM_TYPE_* bit is. */
export interface DeviceParams {
  basic: BasicParams;
  discard?: DiscardParams;
  devt?: DevtParams;
  /** UBLK_PARAM_TYPE_DMA_ALIGN (6.14 on): request buffers are aligned to this mask + 1 bytes (the kernel's own
   * default is 4-byte alignment). */
  dmaAlignMask?: number;
}

const TWO_POW_32 = 4294967296;
const DEFAULT_TIMEOUT_MS = 30_000;
const BUFFER_BYTES = PAGE_BYTES;

/** Per-command time limits: START_DEV scans partitions and DEL_DEV waits for every opener to go. */
export interface CommandOptions {
  timeoutMs?: number;
}

export class Ctrl {
  private readonly ring: Ring;
  private readonly fd: number;
  /** One page the kernel reads and writes during a command (dev_info, params, cpu masks): mmapped, so it never moves. */
  private readonly bufferAddress: number;
  private readonly buffer: ArrayBuffer;
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  private sequence = 0;
  private closed = false;
  /** Which devices are UBLK_F_UNPRIVILEGED_DEV: their commands must start the buffer with /dev/ublkcN. */
  private readonly unprivileged = new Map<number, boolean>();

  /** Opens /dev/ublk-control. Throws ErrnoError with advice when the driver is missing or we lack rights. */
  static open(path = controlPath()): Ctrl {
    const fd = open(path, O_RDWR);
    if (fd < 0) {
      const errno = -fd;
      if (errno === ENOENT) {
        throw new ErrnoError("open " + path, errno,
          `${path} does not exist: ublk_drv is not loaded (modprobe ublk_drv; needs kernel ≥ 6.0 with CONFIG_BLK_DEV_UBLK)`);
      }
      if (errno === EACCES || errno === EPERM) {
        throw new ErrnoError("open " + path, errno, `cannot open ${path}: permission denied (run as root, or open it to users for --unprivileged)`);
      }
      throw new ErrnoError("open " + path, errno);
    }
    return new Ctrl(fd);
  }

  private constructor(fd: number) {
    this.fd = fd;
    try {
      this.ring = Ring.create({ entries: 4, flags: IORING_SETUP_SQE128 });
    } catch (error) {
      close(fd);
      throw error;
    }
    this.bufferAddress = mmapAnonymous(BUFFER_BYTES);
    if (this.bufferAddress < 0) {
      this.ring.close();
      close(fd);
      throw new ErrnoError("mmap", -this.bufferAddress);
    }
    this.buffer = memoryAt(this.bufferAddress, BUFFER_BYTES);
    this.u8 = new Uint8Array(this.buffer);
    this.u16 = new Uint16Array(this.buffer);
    this.u32 = new Uint32Array(this.buffer);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ring.close();
    munmap(this.bufferAddress, BUFFER_BYTES);
    close(this.fd);
  }

  /**
   * Sends one control command and waits for its completion. Returns the CQE result (>= 0) or throws.
   * `op` names the command in errors. The kernel runs these commands synchronously or on its io-wq; either
   * way we wait at most `timeoutMs` for the answer.
   */
  private command(op: string, cmdOp: number, devId: number, fields: { len?: number; addr?: number; data?: number; queueId?: number; devPathLen?: number },
                  options: CommandOptions = {}): number {
    if (fields.devPathLen) fields = { ...fields, addr: this.bufferAddress, len: fields.devPathLen + (fields.len ?? 0) };
    const base = this.ring.getSqe();
    if (base < 0) throw new ErrnoError(op, EBUSY, `${op}: control ring is full`);
    const userData = (this.sequence = (this.sequence + 1) >>> 0);
    const cmd = this.ring.prepUringCmd(base, this.fd, cmdOp, userData);
    const w = this.ring.sqe32;
    const addr = fields.addr ?? 0, data = fields.data ?? 0;
    w[cmd + ublksrv_ctrl_cmd.dev_id / 4] = devId >>> 0;
    w[cmd + ublksrv_ctrl_cmd.queue_id / 4] = ((fields.queueId ?? 0xffff) & 0xffff) | ((fields.len ?? 0) << 16);
    setU64(w, cmd * 4 + ublksrv_ctrl_cmd.addr, addr);
    setU64(w, cmd * 4 + ublksrv_ctrl_cmd.data, data);
    w[cmd + ublksrv_ctrl_cmd.dev_path_len / 4] = fields.devPathLen ?? 0;
    const submitted = this.ring.submit();
    if (submitted < 0) throw this.error(op, -submitted, devId);
    const deadline = Date.now() + (options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    for (;;) {
      const remainingMs = deadline - Date.now();
      const cqe = this.ring.waitCqe(Math.max(remainingMs, 0));
      if (cqe === -ETIME || (cqe < 0 && remainingMs <= 0)) {
        throw new ErrnoError(op, ETIME, `${op} on device ${devId}: no answer from ublk_drv after ${options.timeoutMs ?? DEFAULT_TIMEOUT_MS} ms`);
      }
      if (cqe < 0) throw this.error(op, -cqe, devId);
      const res = this.ring.cqe32[cqe + CQE_RES]!;
      const answered = this.ring.cqe32[cqe + CQE_USER_DATA_LO]! >>> 0;
      this.ring.cqAdvanceTo(this.ring.cqHead() + 1);
      if (answered !== userData) continue; // the late answer of an earlier command that timed out
      if (res < 0) throw this.error(op, -res, devId);
      return res;
    }
  }

  /** Turns an errno from a control command into advice. */
  private error(op: string, errno: number, devId: number): ErrnoError {
    const device = devId === -1 || devId === 0xffffffff ? "" : ` device ${devId}`;
    const prefix = `${op}${device}`;
    switch (errno) {
      case EPERM:
      case EACCES:
        if (this.unprivileged.get(devId)) {
          return new ErrnoError(op, errno, `${prefix}: permission denied on /dev/ublkc${devId} (an unprivileged device's nodes must belong to you)`);
        }
        return new ErrnoError(op, errno, `${prefix}: permission denied (ublk control commands need root / CAP_SYS_ADMIN, or --unprivileged)`);
      case ENODEV:
        return new ErrnoError(op, errno, `${prefix}: no such ublk device`);
      case EEXIST:
        return new ErrnoError(op, errno, `${prefix}: device id already in use`);
      case EOPNOTSUPP:
        return new ErrnoError(op, errno, `${prefix}: not supported by this kernel's ublk_drv`);
      default:
        return new ErrnoError(op, errno, `${prefix}: ${errnoText(errno)} (${errnoName(errno)})`);
    }
  }

  /**
   * For an unprivileged device the kernel checks the caller's rights on the char device named at the start of
   * the buffer (padded here to 8 bytes so the payload after it stays aligned). Returns the payload's offset.
   */
  private pathPrefix(devId: number): number {
    let unprivileged = this.unprivileged.get(devId);
    if (unprivileged === undefined) {
      try {
        unprivileged = (this.getDevInfo(devId).flags & UBLK_F_UNPRIVILEGED_DEV) !== 0;
      } catch {
        unprivileged = false; // the command itself will report why
      }
    }
    if (!unprivileged) return 0;
    return this.writePath(devId);
  }

  private writePath(devId: number): number {
    const path = Buffer.from(`/dev/ublkc${devId}`);
    const pathBytes = Math.ceil((path.byteLength + 1) / 8) * 8;
    this.u8.fill(0, 0, pathBytes);
    this.u8.set(path, 0);
    return pathBytes;
  }

  // ---- commands -----------------------------------------------------------------------------------------

  /** UBLK_U_CMD_GET_FEATURES: the UBLK_F_* mask this kernel supports. */
  getFeatures(): number {
    this.u32.fill(0, 0, 2);
    this.command("GET_FEATURES", UBLK_U_CMD_GET_FEATURES, 0xffffffff, { len: 8, addr: this.bufferAddress });
    return this.u32[0]! + this.u32[1]! * TWO_POW_32;
  }

  /** UBLK_U_CMD_ADD_DEV: creates /dev/ublkcN; returns the device as the kernel set it up (id, flags). */
  addDev(request: AddDevRequest): DevInfo {
    const L = ublksrv_ctrl_dev_info;
    this.u8.fill(0, 0, L.SIZE);
    this.u16[L.nr_hw_queues / 2] = request.nrHwQueues;
    this.u16[L.queue_depth / 2] = request.queueDepth;
    this.u32[L.max_io_buf_bytes / 4] = request.maxIoBufBytes;
    this.u32[L.dev_id / 4] = request.devId >>> 0;
    const flags = request.flags | UBLK_F_CMD_IOCTL_ENCODE;
    setU64(this.u32, L.flags, flags);
    setU64(this.u32, L.ublksrv_flags, request.ublksrvFlags ?? 0);
    this.command("ADD_DEV", UBLK_U_CMD_ADD_DEV, request.devId, { len: L.SIZE, addr: this.bufferAddress });
    const info = this.readDevInfo(0);
    this.unprivileged.set(info.devId, (info.flags & UBLK_F_UNPRIVILEGED_DEV) !== 0);
    return info;
  }

  /** UBLK_U_CMD_DEL_DEV: removes the device; the kernel waits until /dev/ublkcN is released. */
  delDev(devId: number, options: CommandOptions = {}): void {
    this.command("DEL_DEV", UBLK_U_CMD_DEL_DEV, devId, { devPathLen: this.pathPrefix(devId) }, options);
    this.unprivileged.delete(devId);
  }

  /** UBLK_U_CMD_START_DEV: needs every queue FETCHed; adds the disk and scans partitions before returning. */
  startDev(devId: number, daemonPid: number, options: CommandOptions = { timeoutMs: 120_000 }): void {
    this.command("START_DEV", UBLK_U_CMD_START_DEV, devId, { data: daemonPid, devPathLen: this.pathPrefix(devId) }, options);
  }

  /** UBLK_U_CMD_STOP_DEV: removes the disk; outstanding FETCHes complete with -ENODEV. */
  stopDev(devId: number, options: CommandOptions = {}): void {
    this.command("STOP_DEV", UBLK_U_CMD_STOP_DEV, devId, { devPathLen: this.pathPrefix(devId) }, options);
  }

  /**
   * UBLK_U_CMD_TRY_STOP_DEV (SAFE_STOP_DEV, ≥ 7.0): STOP_DEV only if nobody has /dev/ublkbN open; -EBUSY
   * otherwise, and the device keeps serving. On success new opens are refused until the disk is gone.
   */
  tryStopDev(devId: number, options: CommandOptions = {}): void {
    this.command("TRY_STOP_DEV", UBLK_U_CMD_TRY_STOP_DEV, devId, { devPathLen: this.pathPrefix(devId) }, options);
  }

  /**
   * UBLK_U_CMD_UPDATE_SIZE (≥ 6.16): sets the capacity to `devSectors` (512-byte sectors, in data[0]) and
   * stores it in the params GET_PARAMS returns. The kernel does not freeze the queue: the target must hold
   * the new size before a grow and may only release the tail after a shrink.
   */
  updateSize(devId: number, devSectors: number): void {
    this.command("UPDATE_SIZE", UBLK_U_CMD_UPDATE_SIZE, devId, { data: devSectors, devPathLen: this.pathPrefix(devId) });
  }

  /**
   * UBLK_U_CMD_QUIESCE_DEV (QUIESCE, ≥ 6.16; the device needs USER_RECOVERY | QUIESCE): new requests are
   * held, and once every queue has an idle tag the server's pending FETCHes complete with UBLK_IO_RES_ABORT.
   * -EBUSY when that does not happen within `waitMs` (data[0]; the device stays canceling: the server must
   * then exit and leave the rest to recovery).
   */
  quiesceDev(devId: number, waitMs: number): void {
    this.command("QUIESCE_DEV", UBLK_U_CMD_QUIESCE_DEV, devId, { data: waitMs, devPathLen: this.pathPrefix(devId) }, { timeoutMs: waitMs + 30_000 });
  }

  /** getDevInfo for the user's command `op` (recover, resize …): a missing device is one line, "op: no ublk device N". */
  getDevInfoFor(op: string, devId: number): DevInfo {
    try {
      return this.getDevInfo(devId);
    } catch (error) {
      if (error instanceof ErrnoError && error.errno === ENODEV) throw new ErrnoError(op, ENODEV, `${op}: no ublk device ${devId}`);
      throw error;
    }
  }

  /** UBLK_U_CMD_GET_DEV_INFO, falling back to GET_DEV_INFO2 (which names /dev/ublkcN) where the first is refused. */
  getDevInfo(devId: number): DevInfo {
    let info: DevInfo;
    this.u8.fill(0, 0, ublksrv_ctrl_dev_info.SIZE);
    try {
      this.command("GET_DEV_INFO", UBLK_U_CMD_GET_DEV_INFO, devId, { len: ublksrv_ctrl_dev_info.SIZE, addr: this.bufferAddress });
      info = this.readDevInfo(0);
    } catch (error) {
      // EPERM: not root; EINVAL: an unprivileged device, which wants its path even from root.
      if (!(error instanceof ErrnoError) || ![EPERM, EACCES, EINVAL].includes(error.errno)) throw error;
      info = this.getDevInfo2(devId);
    }
    this.unprivileged.set(devId, (info.flags & UBLK_F_UNPRIVILEGED_DEV) !== 0);
    return info;
  }

  /** UBLK_U_CMD_GET_DEV_INFO2: the buffer starts with the char device's path; the answer follows it. */
  getDevInfo2(devId: number): DevInfo {
    const pathBytes = this.writePath(devId);
    this.u8.fill(0, pathBytes, pathBytes + ublksrv_ctrl_dev_info.SIZE);
    this.command("GET_DEV_INFO2", UBLK_U_CMD_GET_DEV_INFO2, devId, { len: ublksrv_ctrl_dev_info.SIZE, devPathLen: pathBytes });
    return this.readDevInfo(pathBytes);
  }

  private readDevInfo(byteOffset: number): DevInfo {
    const L = ublksrv_ctrl_dev_info;
    const view = new DataView(this.buffer, byteOffset, L.SIZE); // control plane only; never per I/O
    const u64 = (offset: number) => view.getUint32(offset, true) + view.getUint32(offset + 4, true) * TWO_POW_32;
    return {
      devId: view.getUint32(L.dev_id, true),
      nrHwQueues: view.getUint16(L.nr_hw_queues, true),
      queueDepth: view.getUint16(L.queue_depth, true),
      state: view.getUint16(L.state, true),
      maxIoBufBytes: view.getUint32(L.max_io_buf_bytes, true),
      ublksrvPid: view.getInt32(L.ublksrv_pid, true),
      flags: u64(L.flags),
      ublksrvFlags: u64(L.ublksrv_flags),
      ownerUid: view.getUint32(L.owner_uid, true),
      ownerGid: view.getUint32(L.owner_gid, true),
    };
  }

  /** UBLK_U_CMD_SET_PARAMS (only before START_DEV). The DEVT part is read-only and never sent. */
  setParams(devId: number, params: DeviceParams): void {
    const P = ublk_params, B = ublk_param_basic, D = ublk_param_discard;
    const at = this.pathPrefix(devId);
    this.u8.fill(0, at, at + P.SIZE);
    const view = new DataView(this.buffer, at, P.SIZE);
    let types = UBLK_PARAM_TYPE_BASIC;
    const b = params.basic;
    view.setUint32(P.basic + B.attrs, b.attrs, true);
    view.setUint8(P.basic + B.logical_bs_shift, b.logicalBsShift);
    view.setUint8(P.basic + B.physical_bs_shift, b.physicalBsShift);
    view.setUint8(P.basic + B.io_opt_shift, b.ioOptShift);
    view.setUint8(P.basic + B.io_min_shift, b.ioMinShift);
    view.setUint32(P.basic + B.max_sectors, b.maxSectors, true);
    view.setUint32(P.basic + B.chunk_sectors, b.chunkSectors, true);
    view.setUint32(P.basic + B.dev_sectors, b.devSectors >>> 0, true);
    view.setUint32(P.basic + B.dev_sectors + 4, Math.floor(b.devSectors / TWO_POW_32), true);
    view.setUint32(P.basic + B.virt_boundary_mask, b.virtBoundaryMask >>> 0, true);
    view.setUint32(P.basic + B.virt_boundary_mask + 4, Math.floor(b.virtBoundaryMask / TWO_POW_32), true);
    if (params.discard) {
      types |= UBLK_PARAM_TYPE_DISCARD;
      const d = params.discard;
      view.setUint32(P.discard + D.discard_alignment, d.discardAlignment, true);
      view.setUint32(P.discard + D.discard_granularity, d.discardGranularity, true);
      view.setUint32(P.discard + D.max_discard_sectors, d.maxDiscardSectors, true);
      view.setUint32(P.discard + D.max_write_zeroes_sectors, d.maxWriteZeroesSectors, true);
      view.setUint16(P.discard + D.max_discard_segments, d.maxDiscardSegments, true);
    }
    if (params.dmaAlignMask !== undefined) {
      types |= UBLK_PARAM_TYPE_DMA_ALIGN;
      view.setUint32(P.dma_alignment, params.dmaAlignMask, true);
    }
    view.setUint32(P.len, P.SIZE, true);
    view.setUint32(P.types, types, true);
    this.command("SET_PARAMS", UBLK_U_CMD_SET_PARAMS, devId, { len: P.SIZE, addr: this.bufferAddress, devPathLen: at });
  }

  /** UBLK_U_CMD_GET_PARAMS: what SET_PARAMS stored, plus the DEVT numbers once the disk exists. */
  getParams(devId: number): DeviceParams {
    const P = ublk_params, B = ublk_param_basic, D = ublk_param_discard, T = ublk_param_devt;
    const at = this.pathPrefix(devId);
    this.u8.fill(0, at, at + P.SIZE);
    const view = new DataView(this.buffer, at, P.SIZE);
    view.setUint32(P.len, P.SIZE, true);
    this.command("GET_PARAMS", UBLK_U_CMD_GET_PARAMS, devId, { len: P.SIZE, addr: this.bufferAddress, devPathLen: at });
    const types = view.getUint32(P.types, true);
    const u64 = (offset: number) => view.getUint32(offset, true) + view.getUint32(offset + 4, true) * TWO_POW_32;
    const params: DeviceParams = {
      basic: {
        attrs: view.getUint32(P.basic + B.attrs, true),
        logicalBsShift: view.getUint8(P.basic + B.logical_bs_shift),
        physicalBsShift: view.getUint8(P.basic + B.physical_bs_shift),
        ioOptShift: view.getUint8(P.basic + B.io_opt_shift),
        ioMinShift: view.getUint8(P.basic + B.io_min_shift),
        maxSectors: view.getUint32(P.basic + B.max_sectors, true),
        chunkSectors: view.getUint32(P.basic + B.chunk_sectors, true),
        devSectors: u64(P.basic + B.dev_sectors),
        virtBoundaryMask: u64(P.basic + B.virt_boundary_mask),
      },
    };
    if (types & UBLK_PARAM_TYPE_DISCARD) {
      params.discard = {
        discardAlignment: view.getUint32(P.discard + D.discard_alignment, true),
        discardGranularity: view.getUint32(P.discard + D.discard_granularity, true),
        maxDiscardSectors: view.getUint32(P.discard + D.max_discard_sectors, true),
        maxWriteZeroesSectors: view.getUint32(P.discard + D.max_write_zeroes_sectors, true),
        maxDiscardSegments: view.getUint16(P.discard + D.max_discard_segments, true),
      };
    }
    if (types & UBLK_PARAM_TYPE_DMA_ALIGN) params.dmaAlignMask = view.getUint32(P.dma_alignment, true);
    if (types & UBLK_PARAM_TYPE_DEVT) {
      params.devt = {
        charMajor: view.getUint32(P.devt + T.char_major, true),
        charMinor: view.getUint32(P.devt + T.char_minor, true),
        diskMajor: view.getUint32(P.devt + T.disk_major, true),
        diskMinor: view.getUint32(P.devt + T.disk_minor, true),
      };
    }
    return params;
  }

  /** UBLK_U_CMD_GET_QUEUE_AFFINITY: the CPUs queue `qId` should run on, as a cpu_set_t byte mask. */
  getQueueAffinity(devId: number, qId: number): Uint8Array {
    const maskBytes = 512; // 4096 CPUs; the kernel wants at least nr_cpu_ids bits, a multiple of 8 bytes
    const at = this.pathPrefix(devId);
    this.u8.fill(0, at, at + maskBytes);
    this.command("GET_QUEUE_AFFINITY", UBLK_U_CMD_GET_QUEUE_AFFINITY, devId, { len: maskBytes, addr: this.bufferAddress, data: qId, devPathLen: at });
    let lastByte = maskBytes;
    while (lastByte > 8 && this.u8[at + lastByte - 1] === 0) lastByte--;
    return this.u8.slice(at, at + Math.ceil(lastByte / 8) * 8);
  }

  /** UBLK_U_CMD_START_USER_RECOVERY: -EBUSY until the device is quiesced and /dev/ublkcN released. */
  startUserRecovery(devId: number): void {
    this.command("START_USER_RECOVERY", UBLK_U_CMD_START_USER_RECOVERY, devId, { devPathLen: this.pathPrefix(devId) });
  }

  /** UBLK_U_CMD_END_USER_RECOVERY: waits until every queue of the new daemon has FETCHed. */
  endUserRecovery(devId: number, daemonPid: number, options: CommandOptions = { timeoutMs: 120_000 }): void {
    this.command("END_USER_RECOVERY", UBLK_U_CMD_END_USER_RECOVERY, devId, { data: daemonPid, devPathLen: this.pathPrefix(devId) }, options);
  }
}

/** CPU numbers set in a cpu_set_t byte mask. */
export function cpusOf(mask: Uint8Array): number[] {
  const cpus: number[] = [];
  for (let byte = 0; byte < mask.length; byte++) {
    for (let bit = 0; bit < 8; bit++) if (mask[byte]! & (1 << bit)) cpus.push(byte * 8 + bit);
  }
  return cpus;
}
