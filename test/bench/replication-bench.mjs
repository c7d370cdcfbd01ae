#!/usr/bin/env node
/**
 * The replication benchmark: Ferry's asynchronous replication between two sites (two nats-servers
 * linked by a leafnode, one `ferry volume serve` per site) against copying the same disk image
 * with nbdcopy (NBD export to NBD export) and with rsync, all in one invocation. Two phases per
 * repetition: the full initial sync of a volume, then the sync after a small share of its blocks
 * (64 KiB by default) changed. Prints a table of medians and the speed ratios, Ferry's both as the
 * wall time of `ferry replicate sync` and as the data plane's ship+apply time of the generation
 * (`lastCycle.ms`: cut to the target's commit); `--json FILE` also writes every
 * sample. It measures and reports; it never fails because a number is low. It does fail when a
 * copy is wrong: every destination is compared with its source (sha256) after every phase.
 *
 * It owns its temp dir and the processes it starts, and removes/stops them on every way out.
 * See README.md next to it for the knobs and what each number means.
 */
import {
  closeSync,
  copyFileSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { startSitePair, waitFor } from "@ferry/nats-sites";
import { parseSize } from "../../packages/dataplane-native/binding.js";
import { benchArgs, benchRoute, benchSize } from "./bench-options.mjs";
import { dirtyBytes, pickBlocks, qemuIoBatches, writeChanges } from "./change-set.mjs";
import { expectSame, sha256Export, sha256File } from "./checksum.mjs";
import { IMAGE_MIXES, writeDiskImage } from "./disk-image.mjs";
import { environment } from "./environment.mjs";
import { COMMAND_TIMEOUT_MS, ferry, pairStatus, serveSite } from "./ferry-site.mjs";
import { runDir, runLogged, spawnLogged, stop, waitForExport } from "./processes.mjs";
import { align, median, timed } from "./report.mjs";
import { parseRsyncStats } from "./rsync-stats.mjs";

const GOAL_DELTA_VS_RSYNC = 20;

const USAGE = `usage: node test/bench/replication-bench.mjs [--json FILE]

environment (defaults in brackets):
  BENCH_SIZE         volume / image size                                  [1G]
  BENCH_REPS         repetitions; the table shows the median              [3]
  BENCH_CHANGE       share of the blocks changed before the delta sync    [0.01]
  BENCH_CHANGE_BLOCK size of a changed block: 64K (the issue's), 4K, …     [64K]
  BENCH_GRANULARITY  comma list of Ferry CBT granularities, one Ferry
                     volume and pair each; the first is the headline      [64K,4K]
  BENCH_SEED         seed of the image and of the changed blocks          [1]
  BENCH_IMAGE        what the image holds: mixed (½ random, ¼ text,
                     ¼ holes), random or text (all of it)                 [mixed]
  BENCH_ROUTE        direct: each service also connects to the other
                     site's server (--peer-nats); leafnode: only through
                     its own server and the link                          [direct]
  BENCH_DIR          where the temp dir goes (one filesystem for all)     [${tmpdir()}]
  BENCH_KEEP_LOGS    a dir: each repetition's service logs are copied
                     there (rep<N>-serve-<site>.log) before its temp dir
                     goes; run with FERRY_LOG=debug for phase timings     [unset]
`;

function config() {
  const { json } = benchArgs(USAGE);
  const env = process.env;
  const size = benchSize();
  const reps = Number(env.BENCH_REPS ?? 3);
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`BENCH_REPS must be a whole number ≥ 1, got '${reps}'`);
  const change = Number(env.BENCH_CHANGE ?? 0.01);
  if (!(change > 0 && change <= 1)) throw new Error(`BENCH_CHANGE must be in (0, 1], got '${env.BENCH_CHANGE}'`);
  const changeBlockText = (env.BENCH_CHANGE_BLOCK ?? "64K").trim().toUpperCase();
  const changeBlock = parseSize(changeBlockText);
  if (!(changeBlock >= 4096 && changeBlock % 4096 === 0 && size % changeBlock === 0)) {
    throw new Error(`BENCH_CHANGE_BLOCK must be a multiple of 4K that divides BENCH_SIZE, got '${changeBlockText}'`);
  }
  const granularities = (env.BENCH_GRANULARITY ?? "64K,4K")
    .split(",")
    .map((g) => g.trim())
    .filter(Boolean)
    .map((g) => ({ text: g.toUpperCase(), bytes: parseSize(g) }));
  if (granularities.length === 0) throw new Error("BENCH_GRANULARITY names no granularity");
  return {
    size,
    reps,
    change,
    changeBlock,
    changeBlockText,
    seed: env.BENCH_SEED ?? "1",
    mix: imageMix(env.BENCH_IMAGE),
    route: benchRoute(),
    dir: env.BENCH_DIR ?? tmpdir(),
    keepLogs: env.BENCH_KEEP_LOGS || null,
    json,
    // One Ferry volume (and pair) per granularity; the first is what the ratios compare.
    ferry: granularities.map((g) => ({
      id: `ferry-${g.text.toLowerCase()}`,
      label: `ferry (${g.text} CBT)`,
      volume: `bench-${g.text.toLowerCase()}`,
      granularity: g.bytes,
      granularityText: g.text,
    })),
  };
}

/** `BENCH_IMAGE`, checked: one of `IMAGE_MIXES` (default `mixed`). */
function imageMix(value) {
  const mix = (value ?? "mixed").trim().toLowerCase();
  if (!IMAGE_MIXES.includes(mix))
    throw new Error(`BENCH_IMAGE must be one of ${IMAGE_MIXES.join(", ")}, got '${value}'`);
  return mix;
}

/** How the table's title describes the image. */
const MIX_LABEL = { mixed: "½ random, ¼ text, ¼ holes", random: "all random bytes", text: "all log text" };

/**
 * The data plane's time for the generation `ferry replicate sync` just completed: `lastCycle.ms`,
 * from the start of its cut to the target's commit acknowledgement — ship + apply, without the
 * CLI's start-up and control-socket round trip that the wall time of the command includes.
 */
function shipApplySeconds(f, status) {
  const cycle = status.lastCycle;
  if (!cycle || cycle.generation !== status.lastCompleteGeneration) {
    throw new Error(
      `${f.label}: \`ferry replicate sync --json\` reported no lastCycle for generation ${status.lastCompleteGeneration} ` +
        `(got ${JSON.stringify(cycle)}); is the build older than lastCycle? run \`npm run build\``,
    );
  }
  return cycle.ms / 1000;
}

/** Copy the `serve-<site>.log` files of a repetition's `dir` into `into` (made if missing). */
function keepServiceLogs(dir, into, rep) {
  mkdirSync(into, { recursive: true });
  for (const name of readdirSync(dir).filter((n) => /^serve-.*\.log$/.test(n))) {
    copyFileSync(join(dir, name), join(into, `rep${rep}-${name}`));
  }
}

/** A new sparse file of `size` bytes (all holes). */
function sparseFile(file, size) {
  const fd = openSync(file, "wx");
  try {
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
}

/** An `nbdkit file` server on `file` (read-only with `readOnly`), on a unix socket in `dir`. */
async function nbdkitFile(dir, name, file, readOnly) {
  const socket = join(dir, `${name}.sock`);
  const child = spawnLogged(
    `nbdkit file (${name})`,
    "nbdkit",
    ["--foreground", "--exit-with-parent", ...(readOnly ? ["--readonly"] : []), "--unix", socket, "file", file],
    join(dir, `${name}.log`),
  );
  const uri = `nbd+unix:///?socket=${socket}`;
  await waitForExport(child, uri);
  return { child, uri };
}

/** nbdcopy from an nbdkit export of `source` to an nbdkit export of `dest`: servers up first, then the timed copy. */
async function nbdcopyRun(dir, tag, source, dest) {
  const src = await nbdkitFile(dir, `${tag}-src`, source, true);
  try {
    const dst = await nbdkitFile(dir, `${tag}-dst`, dest, false);
    try {
      // --flush: the copy is durable when nbdcopy returns, as a Ferry generation is at commit.
      const { seconds } = await timed(() =>
        runLogged(
          "nbdcopy",
          "nbdcopy",
          ["--flush", src.uri, dst.uri],
          join(dir, `${tag}-nbdcopy.log`),
          COMMAND_TIMEOUT_MS,
        ),
      );
      return { seconds };
    } finally {
      await stop(dst.child);
    }
  } finally {
    await stop(src.child);
  }
}

async function rsyncRun(dir, tag, args) {
  const out = join(dir, `${tag}-rsync.out`);
  const { seconds } = await timed(() =>
    runLogged("rsync", "rsync", ["--stats", "--fsync", ...args], join(dir, `${tag}-rsync.log`), COMMAND_TIMEOUT_MS, {
      stdout: out,
      env: { ...process.env, LC_ALL: "C" },
    }),
  );
  const stats = parseRsyncStats(readFileSync(out, "utf8"));
  return { seconds, wire: stats.sent + stats.received, stats };
}

/** Bytes a file holds on disk, not its holes: what nbdcopy reads and writes of it (it skips holes). */
function allocatedBytes(file) {
  return statSync(file).blocks * 512;
}

/**
 * One repetition: fresh sites, services, volumes and destinations; the initial phase, the changes,
 * the delta phase. Returns `{ initial: {tool: sample}, delta: {tool: sample}, … }`.
 */
async function repetition(cfg, root, rep, image) {
  const dir = mkdtempSync(join(root, `rep${rep}-`));
  const started = [];
  const sample = { initial: {}, delta: {} };
  try {
    const sites = await startSitePair({ parentDir: dir });
    started.push(() => sites.stop());
    const aData = join(dir, "ferry-a");
    const bData = join(dir, "ferry-b");
    mkdirSync(bData);
    for (const f of cfg.ferry) {
      await ferry(dir, `create-${f.id}`, [
        "volume",
        "create",
        f.volume,
        "--size",
        String(cfg.size),
        "--granularity",
        f.granularityText,
        "--data",
        aData,
      ]);
    }
    const serve = async (site, data, peer) => {
      const service = await serveSite(dir, site, data, cfg.route === "direct" ? [peer] : []);
      started.push(() => stop(service.child));
      return service;
    };
    const a = await serve(sites.a, aData, sites.b);
    const b = await serve(sites.b, bData, sites.a);

    // The source every tool starts from: the same image, the same bytes, copied fresh.
    const source = join(dir, "source.raw");
    await runLogged("cp", "cp", ["--sparse=always", image.file, source], join(dir, "cp.log"), COMMAND_TIMEOUT_MS);
    for (const f of cfg.ferry) {
      // Into the fresh (all-zero) volume through NBD; not measured.
      await runLogged(
        "nbdcopy (load)",
        "nbdcopy",
        ["--destination-is-zero", "--flush", source, a.uri(f.volume)],
        join(dir, "load.log"),
        COMMAND_TIMEOUT_MS,
      );
    }

    // Phase 1: the full initial sync.
    const cli = (name, args) => ferry(dir, name, [...args, "--data", aData]);
    for (const f of cfg.ferry) {
      const { seconds, result } = await timed(async () => {
        await cli(`start-${f.id}`, [
          "replicate",
          "start",
          f.volume,
          "--to",
          sites.b.name,
          "--mode",
          "async",
          "--interval",
          "1h",
        ]);
        // Until B holds the first (full) generation. Not `ferry replicate sync`: that would cut a
        // second, empty generation, whose lastCycle would then hide the full one's.
        return waitFor(
          `${f.label}: the first generation at site B`,
          async () => {
            const status = await pairStatus(aData, f.volume);
            if (status.lastError !== null) throw new Error(`${f.label}: initial sync reported ${status.lastError}`);
            return status.lastCompleteGeneration !== null && status;
          },
          { timeoutMs: COMMAND_TIMEOUT_MS, intervalMs: 20 },
        );
      });
      if (result.lastError !== null) throw new Error(`${f.label}: initial sync reported ${result.lastError}`);
      sample.initial[f.id] = {
        seconds,
        shipApply: shipApplySeconds(f, result),
        wire: result.bytesWire,
        raw: result.bytesRaw,
        status: result,
      };
      expectSame(
        `${f.label} replica at site B`,
        await sha256Export(b.uri(f.volume), join(dir, "sum.log")),
        image.sha256,
      );
    }
    const nbdcopyDest = join(dir, "nbdcopy-dest.raw");
    sparseFile(nbdcopyDest, cfg.size);
    sample.initial.nbdcopy = {
      ...(await nbdcopyRun(dir, "initial", source, nbdcopyDest)),
      wire: allocatedBytes(source),
    };
    expectSame("nbdcopy's destination", await sha256File(nbdcopyDest), image.sha256);
    const rsyncDest = join(dir, "rsync-dest");
    mkdirSync(rsyncDest);
    sample.initial.rsync = await rsyncRun(dir, "initial", [
      "--whole-file",
      "--sparse",
      source,
      join(rsyncDest, "disk.raw"),
    ]);
    expectSame("rsync's destination", await sha256File(join(rsyncDest, "disk.raw")), image.sha256);

    // The changes: the same new blocks into the source file (for rsync and nbdcopy) and, through
    // NBD, into every Ferry volume; not measured.
    const blocks = pickBlocks(cfg.size, cfg.change, cfg.seed, cfg.changeBlock);
    const patterns = join(dir, "changes");
    mkdirSync(patterns);
    const writes = writeChanges(blocks, cfg.seed, [source], patterns, cfg.changeBlock);
    const changedSha256 = await sha256File(source);
    for (const f of cfg.ferry) {
      for (const args of qemuIoBatches(a.uri(f.volume), writes)) {
        await runLogged("qemu-io (changes)", "qemu-io", args, join(dir, "changes.log"), COMMAND_TIMEOUT_MS);
      }
    }
    for (const f of cfg.ferry) {
      // The changes reached the volume: a wrong replica below is then replication's doing.
      expectSame(
        `${f.label} volume at site A`,
        await sha256Export(a.uri(f.volume), join(dir, "sum.log")),
        changedSha256,
      );
    }
    sample.changedBlocks = blocks.length;

    // Phase 2: the delta sync.
    sample.cliFloor = (await timed(() => cli("status", ["replicate", "status", "--json"]))).seconds;
    for (const f of cfg.ferry) {
      const before = sample.initial[f.id].status;
      const { seconds, result } = await timed(async () =>
        JSON.parse(await cli(`sync2-${f.id}`, ["replicate", "sync", f.volume, "--json"])),
      );
      if (result.lastError !== null) throw new Error(`${f.label}: delta sync reported ${result.lastError}`);
      sample.delta[f.id] = {
        seconds,
        shipApply: shipApplySeconds(f, result),
        wire: result.bytesWire - before.bytesWire,
        raw: result.bytesRaw - before.bytesRaw,
        cycle: result.lastCycle,
        expectedRaw: dirtyBytes(blocks, f.granularity, cfg.size, cfg.changeBlock),
      };
      expectSame(
        `${f.label} replica at site B`,
        await sha256Export(b.uri(f.volume), join(dir, "sum.log")),
        changedSha256,
      );
    }
    sample.delta.rsync = await rsyncRun(dir, "delta", [
      "--inplace",
      "--no-whole-file",
      // The destination's size is the same and its mtime may be too: never let the quick check skip it.
      "--ignore-times",
      source,
      join(rsyncDest, "disk.raw"),
    ]);
    expectSame("rsync's destination", await sha256File(join(rsyncDest, "disk.raw")), changedSha256);
    sample.delta.nbdcopy = { ...(await nbdcopyRun(dir, "delta", source, nbdcopyDest)), wire: allocatedBytes(source) };
    expectSame("nbdcopy's destination", await sha256File(nbdcopyDest), changedSha256);
    return sample;
  } finally {
    for (const undo of started.reverse()) {
      // Report and go on: the next undo must still run, and an error already on its way wins.
      await undo().catch((error) => process.stderr.write(`bench: cleaning up: ${error.message}\n`));
    }
    if (cfg.keepLogs) keepServiceLogs(dir, cfg.keepLogs, rep);
    rmSync(dir, { recursive: true, force: true });
  }
}

const MiB = 2 ** 20;

/** Per phase and tool: the medians over the repetitions, and how far the times spread. */
function summarise(cfg, samples) {
  const tools = {
    initial: [...cfg.ferry.map((f) => f.id), "nbdcopy", "rsync"],
    delta: [...cfg.ferry.map((f) => f.id), "rsync", "nbdcopy"],
  };
  const out = {};
  for (const [phase, ids] of Object.entries(tools)) {
    out[phase] = {};
    for (const id of ids) {
      const runs = samples.map((s) => s[phase][id]);
      const pick = (f) => median(runs.map(f));
      const seconds = pick((r) => r.seconds);
      out[phase][id] = {
        seconds,
        // Half the min–max range as a share of the median: a quick read on the noise.
        spread:
          runs.length > 1
            ? (Math.max(...runs.map((r) => r.seconds)) - Math.min(...runs.map((r) => r.seconds))) / 2 / seconds
            : 0,
        // Ferry only: the data plane's cut-to-commit time of the generation (lastCycle.ms).
        shipApply: pick((r) => r.shipApply ?? Number.NaN),
        wire: pick((r) => r.wire),
        data: pick((r) => r.raw ?? r.stats?.literal ?? r.wire),
        expectedRaw: pick((r) => r.expectedRaw ?? Number.NaN),
      };
    }
  }
  return { ...out, cliFloor: median(samples.map((s) => s.cliFloor)), changedBlocks: samples[0].changedBlocks };
}

/**
 * Speed-ups of Ferry over each peer (the peer's time ÷ Ferry's), two ways: against the data
 * plane's ship+apply time (`lastCycle.ms`, the issue's measure: what the goal is judged on) and
 * against the wall time of `ferry replicate sync`, CLI start-up included (`…Wall`).
 */
function ratios(cfg, summary) {
  const speedUp = (phase, peer, id) => ({
    [peer]: summary[phase][peer].seconds / summary[phase][id].shipApply,
    [`${peer}Wall`]: summary[phase][peer].seconds / summary[phase][id].seconds,
  });
  return {
    initial: Object.fromEntries(
      cfg.ferry.map((f) => [f.id, { ...speedUp("initial", "nbdcopy", f.id), ...speedUp("initial", "rsync", f.id) }]),
    ),
    delta: Object.fromEntries(
      cfg.ferry.map((f) => [
        f.id,
        {
          ...speedUp("delta", "rsync", f.id),
          ...speedUp("delta", "nbdcopy", f.id),
          goalVsRsync: GOAL_DELTA_VS_RSYNC,
          shippedVsTracked: summary.delta[f.id].data / summary.delta[f.id].expectedRaw,
        },
      ]),
    ),
  };
}

const mib = (bytes) => (Number.isFinite(bytes) ? (bytes / MiB).toFixed(1) : "-");

function formatTable(cfg, summary) {
  const label = (id) => cfg.ferry.find((f) => f.id === id)?.label ?? (id === "nbdcopy" ? "nbdcopy" : "rsync");
  const rows = [["phase", "tool", "time s", "ship+apply s", "MB/s", "data MiB", "wire MiB"]];
  for (const phase of ["initial", "delta"]) {
    for (const [id, r] of Object.entries(summary[phase])) {
      const tool = phase === "delta" && id === "nbdcopy" ? "nbdcopy (full copy)" : label(id);
      rows.push([
        phase === "initial" ? "initial (full)" : "delta",
        tool,
        `${r.seconds.toFixed(2)} ±${(r.spread * 100).toFixed(0)}%`,
        Number.isFinite(r.shipApply) ? r.shipApply.toFixed(2) : "-",
        (cfg.size / r.seconds / 1e6).toFixed(0),
        mib(r.data),
        id === "nbdcopy" ? `~${mib(r.wire)}` : mib(r.wire),
      ]);
    }
  }
  return align(rows);
}

function formatRatios(cfg, summary, r) {
  const lines = [
    "speed-up = the other tool's time ÷ ferry's ship+apply time (lastCycle.ms: cut to the target's commit);",
    "           [wall: ÷ the wall time of the ferry commands, CLI start-up included: initial `replicate start` until B",
    "           holds the generation, delta `replicate sync`]; above 1.00x ferry is faster",
  ];
  const pair = (x, peer) => `${x[peer].toFixed(2)}x [wall ${x[`${peer}Wall`].toFixed(2)}x]`;
  for (const f of cfg.ferry) {
    const x = r.initial[f.id];
    lines.push(`  initial  ${f.label.padEnd(17)} vs nbdcopy ${pair(x, "nbdcopy")}, vs rsync ${pair(x, "rsync")}`);
  }
  for (const f of cfg.ferry) {
    const x = r.delta[f.id];
    const verdict = x.rsync >= x.goalVsRsync ? "meets goal" : "BELOW goal";
    lines.push(
      `  delta    ${f.label.padEnd(17)} vs rsync ${pair(x, "rsync")}  ${verdict} (>= ${x.goalVsRsync}x on ship+apply), vs a full nbdcopy ${pair(x, "nbdcopy")}`,
    );
  }
  const changed = summary.changedBlocks * cfg.changeBlock;
  lines.push(
    `delta: ${summary.changedBlocks} blocks of ${cfg.changeBlockText} changed (${mib(changed)} MiB); volume data shipped:`,
  );
  for (const f of cfg.ferry) {
    const d = summary.delta[f.id];
    const check =
      r.delta[f.id].shippedVsTracked > 1.0001
        ? `MORE than the ${mib(d.expectedRaw)} MiB its ${f.granularityText} tracking blocks hold`
        : `= the ${f.granularityText} tracking blocks holding a change`;
    lines.push(
      `  ${f.label.padEnd(17)} ${mib(d.data)} MiB (${(d.data / changed).toFixed(1)}x the change) ${check}; ${mib(d.wire)} MiB on the wire`,
    );
  }
  const rs = summary.delta.rsync;
  lines.push(
    `  ${"rsync".padEnd(17)} ${mib(rs.data)} MiB literal data (${(rs.data / changed).toFixed(1)}x the change); ${mib(rs.wire)} MiB on the wire`,
  );
  lines.push(
    `every ferry time includes the CLI's start-up: \`ferry replicate status\` alone takes ${summary.cliFloor.toFixed(2)} s`,
  );
  return lines.join("\n");
}

async function main() {
  const cfg = config();
  const env = await environment({ rsync: "rsync", nbdcopy: "nbdcopy", nbdkit: "nbdkit", natsServer: "nats-server" });
  env.rsync = env.rsync.replace(/\s+protocol.*/, "");
  const { root, cleanup } = runDir(cfg.dir, "ferry-replication-bench-");

  const sizeLabel = cfg.size >= 2 ** 30 ? `${cfg.size / 2 ** 30} GiB` : `${cfg.size / MiB} MiB`;
  process.stderr.write(
    `bench: ${cfg.reps} reps of: ${cfg.ferry.map((f) => f.label).join(", ")}, nbdcopy, rsync; ${sizeLabel}, ` +
      `${(cfg.change * 100).toFixed(2)}% of ${cfg.changeBlockText} blocks changed; in ${root}\n`,
  );
  const loadBefore = loadavg();
  const samples = [];
  try {
    const file = join(root, "image.raw");
    const { seconds, result: kinds } = await timed(async () => writeDiskImage(file, cfg.size, cfg.seed, cfg.mix));
    const image = { file, kinds, sha256: await sha256File(file) };
    process.stderr.write(
      `bench: image: ${mib(kinds.random)} MiB random, ${mib(kinds.text)} MiB text, ${mib(kinds.zero)} MiB holes (made in ${seconds.toFixed(1)} s)\n`,
    );
    for (let rep = 1; rep <= cfg.reps; rep++) {
      const s = await repetition(cfg, root, rep, image);
      samples.push(s);
      const show = (phase) =>
        Object.entries(s[phase])
          .map(([id, r]) => `${id} ${r.seconds.toFixed(2)} s`)
          .join(", ");
      process.stderr.write(`bench: rep ${rep}/${cfg.reps}: initial: ${show("initial")}\n`);
      process.stderr.write(`bench: rep ${rep}/${cfg.reps}: delta:   ${show("delta")}\n`);
    }
  } finally {
    cleanup();
  }
  const loadAfter = loadavg();
  const summary = summarise(cfg, samples);
  const r = ratios(cfg, summary);
  const fmtLoad = (l) => l.map((x) => x.toFixed(2)).join(" ");
  process.stdout.write(
    `\nFerry replication bench — ${sizeLabel} volume (${MIX_LABEL[cfg.mix]}), then ${(cfg.change * 100).toFixed(2)}% of its ${cfg.changeBlockText} blocks changed; ` +
      `median of ${cfg.reps}, ±: half the min–max range; every copy verified (sha256) and durable (fsync) at its destination; ` +
      `Ferry's route to site B: ${cfg.route === "direct" ? "direct (--peer-nats, one nats-server)" : "leafnode (two nats-servers)"}\n` +
      `${env.rsync}, ${env.nbdcopy}, ${env.nbdkit}, ${env.natsServer}; ${env.cpus} CPUs, load ${fmtLoad(loadBefore)} → ${fmtLoad(loadAfter)}; ferry ${env.commit}\n\n` +
      `${formatTable(cfg, summary)}\n\n${formatRatios(cfg, summary, r)}\n`,
  );
  if (cfg.json) {
    const doc = {
      config: { ...cfg, json: undefined },
      environment: { ...env, loadBefore, loadAfter },
      results: summary,
      ratios: r,
      samples,
    };
    writeFileSync(cfg.json, `${JSON.stringify(doc, null, 2)}\n`);
    process.stderr.write(`bench: wrote ${cfg.json}\n`);
  }
}

main().catch((error) => {
  process.stderr.write(`bench: ${error.stack ?? error}\n`);
  process.exitCode = 1;
});
