/**
 * The disk image the replication bench copies: a sparse raw file made of 1 MiB segments, half
 * incompressible (random bytes), a quarter text-like (log lines, which zstd level 1 shrinks about
 * threefold), a quarter holes — roughly what a used VM disk holds. The segment order is shuffled
 * from the seed, so every kind of segment is spread over the whole image, the same in every run.
 */
import { closeSync, fdatasyncSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { SeededRandom } from "./seeded-random.mjs";

export const SEGMENT = 1 << 20;

/** What an image may be made of: `mixed` (the default), or all `random` or all `text` segments. */
export const IMAGE_MIXES = ["mixed", "random", "text"];

/**
 * The kind of every segment of an image of `size` bytes: for `mixed`, exactly ½ random, ¼ text,
 * the rest zero; for `random` or `text`, every segment of that kind.
 */
export function segmentKinds(size, seed, mix = "mixed") {
  if (size % SEGMENT !== 0) throw new Error(`the image size must be a whole number of MiB, got ${size} bytes`);
  if (!IMAGE_MIXES.includes(mix)) throw new Error(`unknown image mix '${mix}': use one of ${IMAGE_MIXES.join(", ")}`);
  const n = size / SEGMENT;
  if (mix !== "mixed") return Array(n).fill(mix);
  const random = Math.floor(n / 2);
  const text = Math.floor(n / 4);
  const kinds = [
    ...Array(random).fill("random"),
    ...Array(text).fill("text"),
    ...Array(n - random - text).fill("zero"),
  ];
  const rng = new SeededRandom(`segments:${seed}`);
  for (let i = kinds.length - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    [kinds[i], kinds[j]] = [kinds[j], kinds[i]];
  }
  return kinds;
}

/**
 * Write the image (of `mix`, see `segmentKinds`) to `file` (created; it must not exist) and make it durable, so no writeback of
 * it runs into a measurement. Zero segments stay holes. Returns the bytes of each kind.
 */
export function writeDiskImage(file, size, seed, mix = "mixed") {
  const kinds = segmentKinds(size, seed, mix);
  const rng = new SeededRandom(`content:${seed}`);
  const fd = openSync(file, "wx");
  const bytes = { random: 0, text: 0, zero: 0 };
  try {
    ftruncateSync(fd, size);
    for (const [i, kind] of kinds.entries()) {
      bytes[kind] += SEGMENT;
      if (kind === "zero") continue;
      const data = kind === "random" ? rng.bytes(SEGMENT) : logText(rng, SEGMENT);
      writeSync(fd, data, 0, SEGMENT, i * SEGMENT);
    }
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return bytes;
}

const LEVELS = ["INFO", "INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"];
const REQUESTS = [
  "GET /api/v1/orders/",
  "GET /api/v1/customers/",
  "POST /api/v1/cart/",
  "GET /static/app.",
  "PUT /api/v1/orders/",
];
const STATUS = ["200", "200", "200", "201", "204", "304", "404", "500"];

/** `length` bytes of web-server-like log lines: structured, repetitive, with random ids in them. */
function logText(rng, length) {
  const lines = [];
  let size = 0;
  let ms = rng.below(80_000_000);
  while (size < length) {
    ms += rng.below(40);
    const line =
      `2025-03-14T${clock(ms)}Z ${LEVELS[rng.below(LEVELS.length)]} web-${rng.below(8)} ` +
      `${REQUESTS[rng.below(REQUESTS.length)]}${rng.below(100_000)} ${STATUS[rng.below(STATUS.length)]} ` +
      `${rng.below(900) + 1}ms user=u${rng.below(50_000)} trace=${rng.next().toString(16).padStart(8, "0")}\n`;
    lines.push(line);
    size += line.length;
  }
  return Buffer.from(lines.join(""), "latin1").subarray(0, length);
}

/** `hh:mm:ss.mmm` of a millisecond count (cheaper than a Date per line). */
function clock(ms) {
  const two = (n) => String(n).padStart(2, "0");
  const h = Math.floor(ms / 3_600_000) % 24;
  return `${two(h)}:${two(Math.floor(ms / 60_000) % 60)}:${two(Math.floor(ms / 1000) % 60)}.${String(ms % 1000).padStart(3, "0")}`;
}
