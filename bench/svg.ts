/** A dependency-free SVG bar chart: IOPS per case, ours beside the kernel's, with p99 latency labels. */
export interface BarPair {
  label: string;
  ours: number;
  kernel: number | null;
  oursP99us: number;
  kernelP99us: number | null;
}

const escape = (text: string) => text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

export function renderSvg(pairs: BarPair[]): string {
  const rowHeight = 44, labelWidth = 300, barWidth = 520, top = 40;
  const height = top + pairs.length * rowHeight + 30;
  const max = Math.max(1, ...pairs.flatMap((p) => [p.ours, p.kernel ?? 0]));
  const scale = (value: number) => Math.max(1, (value / max) * barWidth);
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${labelWidth + barWidth + 200}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="10" y="20" font-size="14" font-weight="bold">IOPS per case (bar) and p99 latency (label): ublk-bun vs the kernel's driver</text>`,
    `<rect x="${labelWidth}" y="26" width="10" height="10" fill="#2b7bb9"/><text x="${labelWidth + 14}" y="35">ublk-bun</text>`,
    `<rect x="${labelWidth + 90}" y="26" width="10" height="10" fill="#aaaaaa"/><text x="${labelWidth + 104}" y="35">kernel (null_blk / loop)</text>`,
  ];
  pairs.forEach((pair, index) => {
    const y = top + index * rowHeight;
    parts.push(`<text x="10" y="${y + 22}">${escape(pair.label)}</text>`);
    parts.push(`<rect x="${labelWidth}" y="${y + 4}" width="${scale(pair.ours)}" height="16" fill="#2b7bb9"/>`);
    parts.push(`<text x="${labelWidth + scale(pair.ours) + 6}" y="${y + 16}">${pair.ours.toFixed(0)} IOPS, p99 ${pair.oursP99us.toFixed(0)} µs</text>`);
    if (pair.kernel !== null) {
      parts.push(`<rect x="${labelWidth}" y="${y + 22}" width="${scale(pair.kernel)}" height="16" fill="#aaaaaa"/>`);
      parts.push(`<text x="${labelWidth + scale(pair.kernel) + 6}" y="${y + 34}">${pair.kernel.toFixed(0)} IOPS, p99 ${(pair.kernelP99us ?? 0).toFixed(0)} µs</text>`);
    }
  });
  parts.push("</svg>");
  return parts.join("\n");
}
