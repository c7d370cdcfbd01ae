// Unit tests of the replication bench's pure helpers: `node --test test/bench/`. Not part of
// `npm test`, like the benchmarks themselves.
import assert from "node:assert/strict";
import { test } from "node:test";
import { BLOCK, dirtyBytes, pickBlocks, qemuIoBatches } from "./change-set.mjs";
import { SEGMENT, segmentKinds } from "./disk-image.mjs";
import { parseRsyncStats } from "./rsync-stats.mjs";

test("pickBlocks picks the share of distinct blocks, sorted, the same for the same seed", () => {
  const blocks = pickBlocks(1 << 30, 0.01, "s");
  assert.equal(blocks.length, 2621);
  assert.equal(new Set(blocks).size, blocks.length);
  assert.deepEqual(
    blocks,
    [...blocks].sort((x, y) => x - y),
  );
  assert.ok(blocks.every((b) => b >= 0 && b < (1 << 30) / BLOCK));
  assert.deepEqual(pickBlocks(1 << 30, 0.01, "s"), blocks);
  assert.notDeepEqual(pickBlocks(1 << 30, 0.01, "t"), blocks);
  assert.throws(() => pickBlocks(BLOCK, 0.01, "s"), /cannot change/);
});

test("dirtyBytes counts each tracking block holding a change once, clipped at the end", () => {
  assert.equal(dirtyBytes([0, 1, 15], 65536, 1 << 20), 65536);
  assert.equal(dirtyBytes([0, 16], 65536, 1 << 20), 2 * 65536);
  assert.equal(dirtyBytes([0, 1, 15], 4096, 1 << 20), 3 * 4096);
  assert.equal(dirtyBytes([17], 65536, 72 * 1024), 8192);
  assert.throws(() => dirtyBytes([0], 6000, 1 << 20), /multiple of 4096/);
});

test("qemuIoBatches writes every block once, in bounded batches that each end with a flush", () => {
  const writes = [0, 1, 2, 3, 4].map((b) => ({ offset: b * BLOCK, pattern: `/p/${b}.blk` }));
  const batches = qemuIoBatches("nbd+unix:///v?socket=/s", writes, 2);
  assert.equal(batches.length, 3);
  assert.deepEqual(batches[2], [
    "-f",
    "raw",
    "nbd+unix:///v?socket=/s",
    "-c",
    "write -q -s /p/4.blk 16384 4096",
    "-c",
    "flush",
  ]);
  const commands = batches.flatMap((args) => args.filter((_, i) => args[i - 1] === "-c"));
  assert.equal(commands.filter((c) => c.startsWith("write")).length, writes.length);
  assert.equal(commands.filter((c) => c === "flush").length, 3);
});

test("segmentKinds is exactly half random, a quarter text, the rest holes, shuffled by seed", () => {
  const kinds = segmentKinds(64 * SEGMENT, 1);
  const count = (k) => kinds.filter((x) => x === k).length;
  assert.deepEqual([count("random"), count("text"), count("zero")], [32, 16, 16]);
  assert.notDeepEqual(kinds.slice(0, 32), Array(32).fill("random"));
  assert.deepEqual(segmentKinds(64 * SEGMENT, 1), kinds);
  assert.throws(() => segmentKinds(SEGMENT + 1, 1), /whole number of MiB/);
});

test("parseRsyncStats reads the byte counts rsync --stats prints", () => {
  const text = [
    "Number of files: 1 (reg: 1)",
    "Total file size: 1,073,741,824 bytes",
    "Literal data: 85,262,336 bytes",
    "Matched data: 988,479,488 bytes",
    "Total bytes sent: 85,541,263",
    "Total bytes received: 196,686",
  ].join("\n");
  assert.deepEqual(parseRsyncStats(text), {
    sent: 85_541_263,
    received: 196_686,
    literal: 85_262_336,
    matched: 988_479_488,
    fileSize: 1_073_741_824,
  });
  assert.throws(() => parseRsyncStats("Total bytes sent: 1"), /Total bytes received/);
});
