/**
 * The changes of the delta phase: a share of a volume's blocks of one size (64 KiB by default, as
 * the benchmark has it; 4 KiB as an option) at random offsets (distinct, from a seed), each
 * rewritten with incompressible bytes; and what a changed-block tracker at a given granularity must
 * ship for them, to check that a delta sync ships no more than that.
 *
 * Through NBD the blocks go one `qemu-io write` each: `nbdcopy` of a sparse file holding just the
 * changes would not do, because it copies in units of the destination's preferred block size
 * (64 KiB for a Ferry export) and so writes the zeroes around each change as well.
 */
import { closeSync, fdatasyncSync, openSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { SeededRandom } from "./seeded-random.mjs";

/** The smallest changed block, and the unit every other changed-block size is a multiple of. */
export const BLOCK = 4096;

/** Distinct block numbers (in units of `block` bytes), `share` of the volume's blocks (rounded), ascending. */
export function pickBlocks(size, share, seed, block = BLOCK) {
  if (!(block >= BLOCK && block % BLOCK === 0)) throw new Error(`changed block ${block} is not a multiple of ${BLOCK}`);
  const total = Math.floor(size / block);
  const count = Math.round(total * share);
  if (!(count >= 1 && count <= total)) throw new Error(`cannot change ${share} of ${total} blocks`);
  const rng = new SeededRandom(`blocks:${seed}`);
  const picked = new Set();
  while (picked.size < count) picked.add(rng.below(total));
  return [...picked].sort((x, y) => x - y);
}

/** Bytes in the tracking blocks of `granularity` (a multiple of 4 KiB) that hold part of a changed block of `block` bytes. */
export function dirtyBytes(blocks, granularity, size, block = BLOCK) {
  if (granularity % BLOCK !== 0) throw new Error(`granularity ${granularity} is not a multiple of ${BLOCK}`);
  const touched = new Set();
  for (const b of blocks) {
    const last = Math.floor((Math.min((b + 1) * block, size) - 1) / granularity);
    for (let t = Math.floor((b * block) / granularity); t <= last; t++) touched.add(t);
  }
  let bytes = 0;
  for (const t of touched) bytes += Math.min(granularity, size - t * granularity);
  return bytes;
}

/**
 * Write new contents (the same in every file) to `blocks` (of `block` bytes) of each of `files`,
 * durably, and each block's new contents also to a file of its own in `patternDir` (for
 * `qemu-io write -s`, which writes exactly one block through NBD). Returns `[{ offset, length, pattern }]`.
 */
export function writeChanges(blocks, seed, files, patternDir, block = BLOCK) {
  const rng = new SeededRandom(`changes:${seed}`);
  const fds = files.map((f) => openSync(f, "r+"));
  const writes = [];
  try {
    for (const b of blocks) {
      const data = rng.bytes(block);
      for (const fd of fds) writeSync(fd, data, 0, block, b * block);
      const pattern = join(patternDir, `${b}.blk`);
      writeFileSync(pattern, data);
      writes.push({ offset: b * block, length: block, pattern });
    }
    for (const fd of fds) fdatasyncSync(fd);
  } finally {
    for (const fd of fds) closeSync(fd);
  }
  return writes;
}

/**
 * qemu-io argument lists that perform `writes` (from `writeChanges`), at most `batch` writes per
 * invocation so that no command line gets long, each ending with a flush.
 */
export function qemuIoBatches(uri, writes, batch = 1000) {
  const out = [];
  for (let i = 0; i < writes.length; i += batch) {
    const commands = writes.slice(i, i + batch).map((w) => `write -q -s ${w.pattern} ${w.offset} ${w.length}`);
    out.push(["-f", "raw", uri, ...[...commands, "flush"].flatMap((c) => ["-c", c])]);
  }
  return out;
}
