/**
 * A tiny struct-layout helper. Each kernel struct is declared once, as a list of fields with their byte
 * offset and width; `struct()` checks the declaration (every field inside the struct, scalars naturally
 * aligned, no two fields overlapping) and returns a frozen table of numeric offsets plus `SIZE`.
 * The offsets are plain numbers so the hot path indexes typed arrays with them at no cost.
 */

/** Width of a field in bytes: 1, 2, 4 or 8 for scalars, anything else for byte arrays / nested structs. */
export type FieldSpec = readonly [offsetBytes: number, widthBytes: number];

export type StructLayout<F extends Record<string, FieldSpec>> = Readonly<{ SIZE: number } & { [K in keyof F]: number }>;

export function struct<F extends Record<string, FieldSpec>>(name: string, sizeBytes: number, fields: F): StructLayout<F> {
  const out: Record<string, number> = { SIZE: sizeBytes };
  const spans: Array<[number, number, string]> = [];
  for (const [field, [offsetBytes, widthBytes]] of Object.entries(fields)) {
    if (offsetBytes < 0 || offsetBytes + widthBytes > sizeBytes) {
      throw new Error(`layout ${name}.${field}: [${offsetBytes}, +${widthBytes}) is outside the ${sizeBytes}-byte struct`);
    }
    const scalar = widthBytes === 1 || widthBytes === 2 || widthBytes === 4 || widthBytes === 8;
    if (scalar && offsetBytes % widthBytes !== 0) {
      throw new Error(`layout ${name}.${field}: offset ${offsetBytes} is not aligned to ${widthBytes}`);
    }
    for (const [start, end, other] of spans) {
      if (offsetBytes < end && start < offsetBytes + widthBytes) {
        throw new Error(`layout ${name}.${field} overlaps ${name}.${other}`);
      }
    }
    spans.push([offsetBytes, offsetBytes + widthBytes, field]);
    out[field] = offsetBytes;
  }
  return Object.freeze(out) as StructLayout<F>;
}

/** Linux `_IOC(dir, type, nr, size)` as used by ioctl-encoded uring_cmd opcodes (asm-generic layout). */
export const IOC_NONE = 0;
export const IOC_WRITE = 1;
export const IOC_READ = 2;
export function ioc(dir: number, type: string, nr: number, sizeBytes: number): number {
  return ((dir << 30) | (sizeBytes << 16) | (type.charCodeAt(0) << 8) | nr) >>> 0;
}
export const ior = (type: string, nr: number, sizeBytes: number) => ioc(IOC_READ, type, nr, sizeBytes);
export const iowr = (type: string, nr: number, sizeBytes: number) => ioc(IOC_READ | IOC_WRITE, type, nr, sizeBytes);

const TWO_POW_32 = 4294967296;

/** Stores a u64 (an address: below 2^53) at byte `byteOffset` of a u32 view, as two halves. */
export function setU64(words: Uint32Array, byteOffset: number, value: number): void {
  words[byteOffset / 4] = value % TWO_POW_32;
  words[byteOffset / 4 + 1] = Math.floor(value / TWO_POW_32);
}
