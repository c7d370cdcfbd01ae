/** Byte counts for people: `1G`, `64K`, `1.50G`, as `ferry` prints them in tables. */
const UNITS: ReadonlyArray<readonly [string, number]> = [
  ["T", 2 ** 40],
  ["G", 2 ** 30],
  ["M", 2 ** 20],
  ["K", 2 ** 10],
];

export function formatBytes(bytes: number): string {
  for (const [unit, factor] of UNITS) {
    if (bytes >= factor) {
      return bytes % factor === 0 ? `${bytes / factor}${unit}` : `${(bytes / factor).toFixed(2)}${unit}`;
    }
  }
  return `${bytes}`;
}
