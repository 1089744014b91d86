// The control plane against the real ublk_drv (run by tests/run.ts on a ublk host or inside the VM).
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { Ctrl } from "../../lib/ctrl.ts";
import { ENODEV, ErrnoError } from "../../ffi/errno.ts";
import { UBLK_F_CMD_IOCTL_ENCODE, UBLK_F_USER_RECOVERY, UBLK_S_DEV_DEAD } from "../../ffi/uapi/ublk_cmd.ts";

const ctrl = Ctrl.open();
afterAll(() => ctrl.close());

describe("control commands through the ring", () => {
  test("GET_FEATURES returns a mask with CMD_IOCTL_ENCODE", () => {
    const features = ctrl.getFeatures();
    expect(features).toBeGreaterThan(0);
    expect(features & UBLK_F_CMD_IOCTL_ENCODE).toBe(UBLK_F_CMD_IOCTL_ENCODE);
  });

  test("ADD_DEV creates /dev/ublkcN, GET_DEV_INFO and GET_PARAMS read it back, DEL_DEV removes it", () => {
    const info = ctrl.addDev({ devId: -1, nrHwQueues: 2, queueDepth: 64, maxIoBufBytes: 512 * 1024, flags: UBLK_F_USER_RECOVERY });
    try {
      expect(info.devId).toBeGreaterThanOrEqual(0);
      expect(existsSync(`/dev/ublkc${info.devId}`)).toBe(true);
      const back = ctrl.getDevInfo(info.devId);
      expect(back).toMatchObject({ devId: info.devId, nrHwQueues: 2, queueDepth: 64, maxIoBufBytes: 512 * 1024, state: UBLK_S_DEV_DEAD });
      expect(back.flags & (UBLK_F_USER_RECOVERY | UBLK_F_CMD_IOCTL_ENCODE)).toBe(UBLK_F_USER_RECOVERY | UBLK_F_CMD_IOCTL_ENCODE);
      expect(ctrl.getDevInfo2(info.devId)).toEqual(back);
      ctrl.setParams(info.devId, { basic: { attrs: 0, logicalBsShift: 9, physicalBsShift: 12, ioOptShift: 12, ioMinShift: 9,
        maxSectors: 1024, chunkSectors: 0, devSectors: 2 ** 33, virtBoundaryMask: 0 },
        discard: { discardAlignment: 0, discardGranularity: 4096, maxDiscardSectors: 2048, maxWriteZeroesSectors: 2048, maxDiscardSegments: 1 } });
      const params = ctrl.getParams(info.devId);
      expect(params.basic).toMatchObject({ logicalBsShift: 9, physicalBsShift: 12, maxSectors: 1024, devSectors: 2 ** 33 });
      expect(params.discard?.discardGranularity).toBe(4096);
      expect(ctrl.getQueueAffinity(info.devId, 1).some((byte) => byte !== 0)).toBe(true);
    } finally {
      ctrl.delDev(info.devId);
    }
    expect(existsSync(`/dev/ublkc${info.devId}`)).toBe(false);
    const gone = (() => { try { ctrl.getDevInfo(info.devId); return 0; } catch (error) { return (error as ErrnoError).errno; } })();
    expect(gone).toBe(ENODEV);
  });

  test("a chosen id is honoured and a taken id is refused with EEXIST", () => {
    const first = ctrl.addDev({ devId: 7, nrHwQueues: 1, queueDepth: 8, maxIoBufBytes: 65536, flags: 0 });
    try {
      expect(first.devId).toBe(7);
      expect(() => ctrl.addDev({ devId: 7, nrHwQueues: 1, queueDepth: 8, maxIoBufBytes: 65536, flags: 0 })).toThrow(/already in use/);
    } finally {
      ctrl.delDev(7);
    }
  });
});
