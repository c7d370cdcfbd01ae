// Unit tests of the benches' pure helpers: `node --test test/bench/`. Not part of `npm test`,
// like the benchmarks themselves.
import assert from "node:assert/strict";
import { test } from "node:test";
import { BLOCK, dirtyBytes, pickBlocks, qemuIoBatches } from "./change-set.mjs";
import { SEGMENT, segmentKinds } from "./disk-image.mjs";
import { clatUs, fioJobSide } from "./fio-result.mjs";
import { adoptionPhases, roundRates } from "./guest-rounds.mjs";
import { lagSummary } from "./lag-summary.mjs";
import { percentile } from "./report.mjs";
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
  const writes = [0, 1, 2, 3, 4].map((b) => ({ offset: b * BLOCK, length: BLOCK, pattern: `/p/${b}.blk` }));
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
  assert.deepEqual(segmentKinds(4 * SEGMENT, 1, "random"), ["random", "random", "random", "random"]);
  assert.deepEqual(segmentKinds(2 * SEGMENT, 1, "text"), ["text", "text"]);
  assert.throws(() => segmentKinds(SEGMENT, 1, "zeros"), /unknown image mix 'zeros'/);
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

test("pickBlocks and dirtyBytes take the changed block's size (64 KiB, as the issue's delta has it)", () => {
  const blocks = pickBlocks(1 << 30, 0.01, "s", 65536);
  assert.equal(blocks.length, 164);
  assert.ok(blocks.every((b) => b >= 0 && b < (1 << 30) / 65536));
  // The 4 KiB default draws exactly what it drew before the size became a parameter.
  assert.deepEqual(pickBlocks(1 << 30, 0.01, "s", BLOCK), pickBlocks(1 << 30, 0.01, "s"));
  // A 64 KiB change is one 64 KiB tracking block, or sixteen 4 KiB ones.
  assert.equal(dirtyBytes([0, 3], 65536, 1 << 20, 65536), 2 * 65536);
  assert.equal(dirtyBytes([0, 3], 4096, 1 << 20, 65536), 2 * 65536);
  // Coarser tracking: changes in the same 1 MiB block count once.
  assert.equal(dirtyBytes([0, 1, 16], 1 << 20, 2 << 20, 65536), 2 << 20);
  assert.throws(() => pickBlocks(1 << 20, 0.01, "s", 6000), /multiple of 4096/);
});

test("qemuIoBatches writes each change with its own length", () => {
  const [args] = qemuIoBatches("nbd+unix:///v?socket=/s", [{ offset: 65536, length: 65536, pattern: "/p/1.blk" }]);
  assert.ok(args.includes("write -q -s /p/1.blk 65536 65536"));
});

test("percentile is nearest-rank: always a sample, p100 the maximum, NaN without samples", () => {
  const v = [5, 1, 4, 2, 3, 6, 7, 8, 9, 10];
  assert.equal(percentile(v, 50), 5);
  assert.equal(percentile(v, 99), 10);
  assert.equal(percentile(v, 100), 10);
  assert.equal(percentile(v, 10), 1);
  assert.equal(percentile([3], 99), 3);
  assert.equal(percentile([1, Number.NaN, 2], 50), 1);
  assert.ok(Number.isNaN(percentile([], 50)));
  assert.throws(() => percentile(v, 0), /percentile/);
});

test("fioJobSide and clatUs read fio's JSON: percentiles in µs, errors named", () => {
  const doc = {
    jobs: [
      {
        error: 0,
        write: {
          io_bytes: 4096 * 10,
          iops: 1234.5,
          clat_ns: { percentile: { "1.000000": 30000, "50.000000": 61440, "99.000000": 250880, "99.900000": 1003520 } },
        },
        read: { io_bytes: 0 },
      },
    ],
  };
  const side = fioJobSide(JSON.stringify(doc), "write");
  assert.equal(side.iops, 1234.5);
  assert.equal(clatUs(side, 50), 61.44);
  assert.equal(clatUs(side, 99), 250.88);
  assert.equal(clatUs(side, 99.9), 1003.52);
  assert.ok(Number.isNaN(clatUs(side, 95)));
  assert.ok(Number.isNaN(clatUs({}, 50)));
  assert.throws(() => fioJobSide(JSON.stringify(doc), "read", "fio x"), /fio x: fio moved no data \(read\)/);
  assert.throws(() => fioJobSide(JSON.stringify({ jobs: [{ ...doc.jobs[0], error: 5 }] }), "write"), /error 5/);
  assert.throws(() => fioJobSide(JSON.stringify({ jobs: [] }), "write"), /no job/);
});

test("lagSummary takes lag percentiles and counts each completed generation once", () => {
  const cycle = (generation, ms, bytesRaw) => ({ generation, ms, bytesRaw, bytesWire: bytesRaw / 2 });
  const samples = [
    { lag: 0.5, lastCycle: cycle(3, 400, 100) },
    { lag: 2.5, lastCycle: cycle(3, 400, 100) },
    { lag: 5.5, lastCycle: cycle(3, 400, 100) },
    { lag: 0.6, lastCycle: cycle(4, 600, 300) },
    { lag: 3.0, lastCycle: cycle(4, 600, 300) },
    { lag: 6.1, lastCycle: cycle(4, 600, 300) },
    { lag: 0.9, lastCycle: cycle(5, 900, 200) },
  ];
  const s = lagSummary(samples);
  assert.equal(s.samples, 7);
  assert.equal(s.p50, 2.5);
  assert.equal(s.p99, 6.1);
  assert.equal(s.max, 6.1);
  assert.equal(s.cycles, 3);
  assert.equal(s.cycleMsP50, 600);
  assert.equal(s.cycleMsMax, 900);
  assert.equal(s.cycleRawP50, 200);
  assert.equal(s.shipBytesPerSecond, (600 * 1000) / 1900);
  assert.ok(Number.isNaN(lagSummary([{ lag: 1, lastCycle: cycle(1, 5, 0) }]).shipBytesPerSecond));
  assert.equal(lagSummary([{ lag: 1, lastCycle: null }]).cycles, 0);
  assert.throws(() => lagSummary([]), /no lag samples/);
});

test("roundRates: MiB over the time since the previous round's line; round 1 has none", () => {
  assert.deepEqual(roundRates([2.0, 3.0, 5.0], 4), [
    { round: 2, mibPerSecond: 4 },
    { round: 3, mibPerSecond: 2 },
  ]);
  assert.deepEqual(roundRates([2.0], 4), []);
  assert.throws(() => roundRates([3.0, 3.0], 4), /round 2 ended 0 s after round 1/);
});

test("adoptionPhases: before, the rounds that ran during the window, after", () => {
  const rates = [2, 3, 4, 5, 6, 7, 8].map((round) => ({ round, mibPerSecond: round }));
  // Round r ended at r seconds (host clock, ms); round r ran from r - 1 to r.
  const endsAtMs = [1, 2, 3, 4, 5, 6, 7, 8].map((s) => s * 1000);
  const p = adoptionPhases(rates, endsAtMs, 3500, 4200);
  assert.deepEqual(p.before, { rounds: [2, 3], mibPerSecond: 2.5 });
  assert.deepEqual(p.during, { rounds: [4, 5], mibPerSecond: 4.5 });
  assert.deepEqual(p.after, { rounds: [6, 7, 8], mibPerSecond: 7 });
  // Within one round: that round is "during"; a round ending at the window's start is "before".
  assert.deepEqual(adoptionPhases(rates, endsAtMs, 5000, 5800).during.rounds, [6]);
  assert.ok(Number.isNaN(adoptionPhases(rates, endsAtMs, 8000, 9000).after.mibPerSecond));
  assert.throws(() => adoptionPhases(rates, endsAtMs, 4000, 3000), /ends \(3000\) before it begins/);
  assert.throws(() => adoptionPhases(rates, endsAtMs.slice(0, 3), 0, 1), /no console time for round 4/);
});
