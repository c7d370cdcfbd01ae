#!/usr/bin/env node
/**
 * The synchronous-write and continuous-lag benchmark of replication between two sites (two
 * nats-servers linked by a leafnode, one `ferry volume serve` per site, all on this machine), each
 * part against a baseline measured in the same invocation:
 *
 *   sync  fio (nbd engine) 4 KiB random writes at QD 1 into a volume with a synchronous pair
 *         (`--mode sync`, `syncState: active`) and into an unreplicated volume of the same service;
 *         completion latency p50/p99 of each and what the pair adds.
 *   lag   an async pair with continuous generations while fio writes at a fixed rate; the pair's
 *         `lagSeconds` sampled through the control socket (`replicate` of the napi binding, one
 *         request per sample, no CLI start-up) against the same pair idle.
 *
 * Both parts end by checking that the replica at site B holds exactly site A's bytes (sha256 of
 * both exports read with nbdcopy): a benchmark of a broken pair would be worthless, so a mismatch
 * fails the run. It measures and reports; it never fails because a number is low. It owns its temp
 * dir and every process it starts, and removes/stops them on every way out (Ctrl-C included).
 * See README.md next to it for the knobs and what each number means.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { startSitePair, waitFor } from "@ferry/nats-sites";
import { createVolume } from "../../packages/dataplane-native/binding.js";
import { benchArgs, benchRoute, benchSize, positiveEnv } from "./bench-options.mjs";
import { expectSame, sha256Export } from "./checksum.mjs";
import { environment } from "./environment.mjs";
import { ferry, pairStatus, serveSite } from "./ferry-site.mjs";
import { clatUs, fioJobSide } from "./fio-result.mjs";
import { lagSummary } from "./lag-summary.mjs";
import { natsRoundTrips } from "./nats-round-trip.mjs";
import { cpuSeconds, runDir, spawnLogged, stop } from "./processes.mjs";
import { align, median, percentile, timed } from "./report.mjs";

const GOALS = { addedP50Us: 200, addedP99Us: 1000, lagP99Seconds: 5 };
const PARTS = ["sync", "lag"];

const USAGE = `usage: node test/bench/sync-lag-bench.mjs [--json FILE]

environment (defaults in brackets):
  BENCH_PARTS          comma list of ${PARTS.join(",")}                          [${PARTS.join(",")}]
  BENCH_SIZE           size of every volume                                [1G]
  BENCH_SYNC_SECONDS   measured seconds of each fio run (sync part)        [15]
  BENCH_SYNC_WARMUP    fio ramp-up seconds, not measured                   [2]
  BENCH_SYNC_REPS      fio runs per volume, alternating; medians shown     [3]
  BENCH_LAG_SECONDS    seconds fio writes during the lag part              [60]
  BENCH_LAG_IDLE_SECONDS  seconds the same pair is sampled idle first      [20]
  BENCH_LAG_RATE       fio --rate of the lag part's writer                 [20m]
  BENCH_LAG_BS         fio --bs of the lag part's random writes            [64k]
  BENCH_LAG_INTERVAL   the async pair's --interval                         [5s]
  BENCH_LAG_SAMPLE_MS  how often lagSeconds is sampled                     [250]
  BENCH_ROUTE          direct: each service also connects to the other
                       site's server (--peer-nats); leafnode: only through
                       its own server and the link                         [direct]
  BENCH_DIR            where the temp dir goes (one filesystem for all)    [${tmpdir()}]
`;

function config() {
  const { json } = benchArgs(USAGE);
  const env = process.env;
  const parts = (env.BENCH_PARTS ?? PARTS.join(","))
    .split(",")
    .map((p) => p.trim())
    .filter(Boolean);
  const unknown = parts.filter((p) => !PARTS.includes(p));
  if (unknown.length > 0 || parts.length === 0) {
    throw new Error(`BENCH_PARTS: choose from ${PARTS.join(", ")}, got '${env.BENCH_PARTS}'`);
  }
  const size = benchSize();
  const interval = (env.BENCH_LAG_INTERVAL ?? "5s").trim();
  const intervalMatch = /^(\d+(?:\.\d+)?)(ms|s|m)$/.exec(interval);
  if (!intervalMatch) throw new Error(`BENCH_LAG_INTERVAL must be a duration such as 5s or 500ms, got '${interval}'`);
  const intervalSeconds = Number(intervalMatch[1]) * { ms: 0.001, s: 1, m: 60 }[intervalMatch[2]];
  return {
    parts,
    size,
    sync: {
      seconds: positiveEnv("BENCH_SYNC_SECONDS", 15),
      warmup: Number(env.BENCH_SYNC_WARMUP ?? 2),
      reps: Math.round(positiveEnv("BENCH_SYNC_REPS", 3)),
    },
    lag: {
      seconds: positiveEnv("BENCH_LAG_SECONDS", 60),
      idleSeconds: Number(env.BENCH_LAG_IDLE_SECONDS ?? 20),
      rate: (env.BENCH_LAG_RATE ?? "20m").trim(),
      bs: (env.BENCH_LAG_BS ?? "64k").trim(),
      interval,
      intervalSeconds,
      sampleMs: positiveEnv("BENCH_LAG_SAMPLE_MS", 250),
    },
    route: benchRoute(),
    dir: env.BENCH_DIR ?? tmpdir(),
    json,
  };
}

/**
 * Two NATS sites, a `ferry volume serve` at each (connected straight to the other site's server
 * when `route` is `direct`), and `volumes` created at A; `fn({ sites, a, b, aData, dir })` runs with them, and everything is stopped (by PID) and left for `runDir` to remove
 * afterwards, also when `fn` fails.
 */
async function withTwoSites(root, name, size, volumes, route, fn) {
  const dir = join(root, name);
  mkdirSync(dir);
  const undo = [];
  try {
    const sites = await startSitePair({ parentDir: dir });
    undo.push(() => sites.stop());
    const aData = join(dir, "ferry-a");
    const bData = join(dir, "ferry-b");
    mkdirSync(bData);
    for (const v of volumes) await createVolume(aData, v, size);
    const direct = route === "direct";
    const a = await serveSite(dir, sites.a, aData, direct ? [sites.b] : []);
    undo.push(() => stop(a.child));
    const b = await serveSite(dir, sites.b, bData, direct ? [sites.a] : []);
    undo.push(() => stop(b.child));
    return await fn({ sites, a, b, aData, dir });
  } finally {
    for (const step of undo.reverse()) {
      // Report and go on: the next step must still run, and an error already on its way wins.
      await step().catch((error) => process.stderr.write(`bench: cleaning up: ${error.message}\n`));
    }
  }
}

/** The bench's long-lived processes of a part, by role, whose CPU time it accounts. */
function serverPids(sites, a, b) {
  return { "ferry A": a.child.pid, "ferry B": b.child.pid, "nats A": sites.a.pid, "nats B": sites.b.pid };
}

/** CPU seconds each of `pids` has used so far. */
function cpuSnapshot(pids) {
  return Object.fromEntries(Object.entries(pids).map(([role, pid]) => [role, cpuSeconds(pid)]));
}

/** CPU seconds used since `before`, per role. */
function cpuSince(pids, before) {
  const now = cpuSnapshot(pids);
  return Object.fromEntries(Object.keys(pids).map((role) => [role, now[role] - before[role]]));
}

/** Fail unless the replica of `volume` at B holds exactly A's bytes. */
async function verifyReplica(a, b, volume, dir) {
  const [atA, atB] = await Promise.all([
    sha256Export(a.uri(volume), join(dir, "sum-a.log")),
    sha256Export(b.uri(volume), join(dir, "sum-b.log")),
  ]);
  expectSame(`the replica of ${volume} at site B`, atB, atA);
  return atA;
}

/** fio with the nbd engine into `uri`; `extra` are further fio options. Resolves to the job's write side. */
function fio(dir, name, uri, extra, boundSeconds) {
  const out = join(dir, `${name}.json`);
  const child = spawnLogged(
    `fio (${name})`,
    "fio",
    [
      `--name=${name}`,
      "--ioengine=nbd",
      `--uri=${uri}`,
      "--rw=randwrite",
      "--numjobs=1",
      "--direct=0",
      "--time_based",
      ...extra,
      "--output-format=json",
      `--output=${out}`,
    ],
    join(dir, `${name}.log`),
  );
  const timer = setTimeout(() => process.kill(child.pid, "SIGKILL"), boundSeconds * 1000);
  const done = child.exited.then(({ code, signal, error }) => {
    clearTimeout(timer);
    if (error) throw new Error(`fio failed to run: ${error.message}`);
    if (code !== 0) throw new Error(`fio ${name} exited with ${code ?? signal}; see ${child.log}`);
    return fioJobSide(readFileSync(out, "utf8"), "write", `fio ${name}`);
  });
  return { child, done };
}

// ---- Part 1: synchronous write latency ------------------------------------------------------

/** `ferry replicate start VOLUME --to TARGET` with `options`, on site A's data directory. */
function startPair(dir, aData, volume, target, options) {
  return ferry(dir, "start", ["replicate", "start", volume, "--to", target.name, ...options, "--data", aData]);
}

const SYNC_VOLUMES = { replicated: "sync-pair", plain: "unreplicated" };

async function syncPart(cfg, root) {
  const { seconds, warmup, reps } = cfg.sync;
  return withTwoSites(
    root,
    "sync",
    cfg.size,
    Object.values(SYNC_VOLUMES),
    cfg.route,
    async ({ sites, a, b, aData, dir }) => {
      const volume = SYNC_VOLUMES.replicated;
      await startPair(dir, aData, volume, sites.b, ["--mode", "sync"]);
      const { seconds: toActive } = await timed(() =>
        waitFor(
          `the sync pair of ${volume} to reach syncState active`,
          async () => {
            const p = await pairStatus(aData, volume);
            if (p.lastError) process.stderr.write(`bench: sync pair: ${p.lastError}\n`);
            return p.syncState === "active" && p;
          },
          { timeoutMs: 300_000, intervalMs: 200 },
        ),
      );
      process.stderr.write(
        `bench: sync: pair active after ${toActive.toFixed(1)} s; NATS round trips, then ${reps} × 2 fio runs\n`,
      );
      const natsUs = await natsRoundTrips(sites, Math.min(5, seconds), 4096, cfg.route);
      const pids = serverPids(sites, a, b);
      const runs = { replicated: [], plain: [] };
      for (let rep = 0; rep < reps; rep++) {
        // Alternate which volume goes first, so slow drift on the machine lands on both.
        const order = rep % 2 === 0 ? ["plain", "replicated"] : ["replicated", "plain"];
        for (const kind of order) {
          const before = await pairStatus(aData, volume);
          const cpu0 = cpuSnapshot(pids);
          const job = await fio(
            dir,
            `${kind}-${rep + 1}`,
            a.uri(SYNC_VOLUMES[kind]),
            ["--bs=4k", "--iodepth=1", "--norandommap", `--runtime=${seconds}`, `--ramp_time=${warmup}`],
            seconds + warmup + 120,
          ).done;
          const after = await pairStatus(aData, volume);
          // CPU over the whole run, ramp included; summariseSync divides it by the writes of the whole
          // run as IOPS × length estimates them: rough, but enough to see which process works hardest.
          const cpu = cpuSince(pids, cpu0);
          if (kind === "replicated") {
            // Every write of the run must have waited for B: still active, never suspended, and B
            // acknowledged at least as many writes as fio counted after its ramp.
            if (after.syncState !== "active" || after.suspensions !== before.suspensions) {
              throw new Error(
                `the sync pair left the active state during fio (now ${after.syncState}, suspensions ` +
                  `${before.suspensions} → ${after.suspensions}, last error ${after.lastError}): the latency is not that of a sync pair`,
              );
            }
            if (after.syncWrites - before.syncWrites < job.total_ios) {
              throw new Error(
                `site B acknowledged ${after.syncWrites - before.syncWrites} writes, fio counted ${job.total_ios}: writes bypassed the sync link`,
              );
            }
          } else if (after.syncWrites !== before.syncWrites) {
            throw new Error("writes to the unreplicated volume went through the sync link");
          }
          const run = { iops: job.iops, p50Us: clatUs(job, 50), p99Us: clatUs(job, 99), ios: job.total_ios, cpu };
          runs[kind].push(run);
          process.stderr.write(
            `bench: sync: rep ${rep + 1}/${reps} ${kind.padEnd(10)} ${run.iops.toFixed(0)} IOPS, clat p50 ${run.p50Us.toFixed(0)} µs, p99 ${run.p99Us.toFixed(0)} µs\n`,
          );
        }
      }
      const { seconds: verifySeconds } = await timed(() => verifyReplica(a, b, volume, dir));
      process.stderr.write(`bench: sync: replica at B equals A (sha256, ${verifySeconds.toFixed(1)} s)\n`);
      const final = await pairStatus(aData, volume);
      return { toActiveSeconds: toActive, runs, natsUs, verified: true, syncWrites: final.syncWrites };
    },
  );
}

/** `{ role: CPU µs per write }` over a run: CPU of the whole run (ramp included) ÷ (IOPS × its length). */
function cpuPerWriteUs(run, runSeconds) {
  const writes = run.iops * runSeconds;
  return Object.fromEntries(Object.entries(run.cpu).map(([role, sec]) => [role, (sec * 1e6) / writes]));
}

function summariseSync(cfg, sync) {
  const med = (kind, key) => median(sync.runs[kind].map((r) => r[key]));
  const runSeconds = cfg.sync.seconds + cfg.sync.warmup;
  const cpuUs = {};
  for (const kind of ["plain", "replicated"]) {
    const perRun = sync.runs[kind].map((r) => cpuPerWriteUs(r, runSeconds));
    cpuUs[kind] = Object.fromEntries(Object.keys(perRun[0]).map((role) => [role, median(perRun.map((x) => x[role]))]));
  }
  const out = {};
  for (const kind of ["plain", "replicated"]) {
    out[kind] = { iops: med(kind, "iops"), p50Us: med(kind, "p50Us"), p99Us: med(kind, "p99Us") };
  }
  const addedP50Us = out.replicated.p50Us - out.plain.p50Us;
  const addedP99Us = out.replicated.p99Us - out.plain.p99Us;
  const nats = {
    requests: sync.natsUs.length,
    p50Us: percentile(sync.natsUs, 50),
    p99Us: percentile(sync.natsUs, 99),
  };
  return {
    ...out,
    nats,
    cpuUs,
    addedP50Us,
    addedP99Us,
    ratioP50: out.replicated.p50Us / out.plain.p50Us,
    ratioP99: out.replicated.p99Us / out.plain.p99Us,
    ratioIops: out.replicated.iops / out.plain.iops,
    goalP50Met: addedP50Us <= GOALS.addedP50Us,
    goalP99Met: addedP99Us <= GOALS.addedP99Us,
  };
}

const signed = (x) => `${x >= 0 ? "+" : "−"}${Math.abs(x).toFixed(0)}`;

function formatSync(cfg, s) {
  const rows = [["4 KiB rand write QD1", "IOPS", "clat p50 µs", "clat p99 µs"]];
  rows.push(["unreplicated", s.plain.iops.toFixed(0), s.plain.p50Us.toFixed(0), s.plain.p99Us.toFixed(0)]);
  rows.push([
    "sync pair (active)",
    s.replicated.iops.toFixed(0),
    s.replicated.p50Us.toFixed(0),
    s.replicated.p99Us.toFixed(0),
  ]);
  const verdict = (met) => (met ? "meets goal" : "MISSES goal");
  return [
    `sync write latency — fio --ioengine=nbd 4 KiB random writes, QD 1, ${cfg.sync.seconds} s (+${cfg.sync.warmup} s ramp), median of ${cfg.sync.reps} runs each, interleaved`,
    align(rows),
    `added by the sync pair: p50 ${signed(s.addedP50Us)} µs ${verdict(s.goalP50Met)} (<= ${GOALS.addedP50Us} µs), ` +
      `p99 ${signed(s.addedP99Us)} µs ${verdict(s.goalP99Met)} (<= ${GOALS.addedP99Us} µs)`,
    `sync pair ÷ unreplicated: p50 ${s.ratioP50.toFixed(2)}x, p99 ${s.ratioP99.toFixed(2)}x, IOPS ${s.ratioIops.toFixed(2)}x`,
    `the NATS path alone (nats.js request A → B → A ${cfg.route === "direct" ? "through B's nats-server, as the direct route" : "through both nats-servers and the leafnode"}, 4 KiB, QD 1, ` +
      `${s.nats.requests} requests): p50 ${s.nats.p50Us.toFixed(0)} µs, p99 ${s.nats.p99Us.toFixed(0)} µs; ` +
      `added beyond it: p50 ${signed(s.addedP50Us - s.nats.p50Us)} µs, p99 ${signed(s.addedP99Us - s.nats.p99Us)} µs`,
    `CPU per write, µs (median over runs; whole run ÷ writes): ${Object.entries(s.cpuUs.replicated)
      .map(([role, us]) => `${role} ${us.toFixed(0)}`)
      .join(", ")} with the sync pair; ferry A ${s.cpuUs.plain["ferry A"].toFixed(0)} unreplicated`,
    "replica at site B after the runs: byte-identical to site A (sha256)",
  ].join("\n");
}

// ---- Part 2: continuous async lag -------------------------------------------------------------

/** Sample the pair's status every `everyMs` until `until` settles; returns `[{ atMs, lag, state, lastCycle }]`. */
async function sampleLag(aData, volume, everyMs, until) {
  let done = false;
  const finish = () => {
    done = true;
  };
  until.then(finish, finish);
  const samples = [];
  const t0 = Date.now();
  let next = t0;
  while (!done) {
    const p = await pairStatus(aData, volume);
    if (p.lastError) throw new Error(`the async pair reported ${p.lastError}`);
    samples.push({ atMs: Date.now() - t0, lag: p.lagSeconds, state: p.state, lastCycle: p.lastCycle });
    next += everyMs;
    await sleep(Math.max(0, next - Date.now()));
  }
  return samples;
}

async function lagPart(cfg, root) {
  const { seconds, idleSeconds, rate, bs, interval, sampleMs } = cfg.lag;
  const volume = "lag";
  return withTwoSites(root, "lag", cfg.size, [volume], cfg.route, async ({ sites, a, b, aData, dir }) => {
    await startPair(dir, aData, volume, sites.b, ["--mode", "async", "--interval", interval]);
    // The first (full) generation is not what the part measures: wait for it.
    await ferry(dir, "sync-initial", ["replicate", "sync", volume, "--json", "--data", aData]);
    let idle = [];
    if (idleSeconds > 0) {
      process.stderr.write(`bench: lag: sampling the idle pair for ${idleSeconds} s\n`);
      idle = await sampleLag(aData, volume, sampleMs, sleep(idleSeconds * 1000));
    }
    process.stderr.write(
      `bench: lag: fio randwrite bs ${bs} at ${rate}/s for ${seconds} s, sampling every ${sampleMs} ms\n`,
    );
    const run = fio(
      dir,
      "lag-writer",
      a.uri(volume),
      [`--bs=${bs}`, "--iodepth=1", "--norandommap", "--refill_buffers", `--rate=${rate}`, `--runtime=${seconds}`],
      seconds + 120,
    );
    const pids = serverPids(sites, a, b);
    const cpu0 = cpuSnapshot(pids);
    const [loaded, job] = await Promise.all([sampleLag(aData, volume, sampleMs, run.done), run.done]);
    const cpu = cpuSince(pids, cpu0);
    const { seconds: syncSeconds, result: synced } = await timed(async () =>
      JSON.parse(await ferry(dir, "sync-final", ["replicate", "sync", volume, "--json", "--data", aData])),
    );
    if (synced.lastError !== null) throw new Error(`the final sync reported ${synced.lastError}`);
    await verifyReplica(a, b, volume, dir);
    process.stderr.write("bench: lag: replica at B equals A after the final sync (sha256)\n");
    return {
      idle,
      loaded,
      writeMBps: job.bw_bytes / 1e6,
      cpu,
      writtenBytes: job.io_bytes,
      finalSync: { seconds: syncSeconds, lastCycle: synced.lastCycle },
      verified: true,
    };
  });
}

function formatLag(cfg, lag) {
  const idle = lag.idle.length > 0 ? lagSummary(lag.idle) : undefined;
  const loaded = lagSummary(lag.loaded);
  const row = (name, s) => [
    name,
    String(s.samples),
    s.p50.toFixed(2),
    s.p99.toFixed(2),
    s.max.toFixed(2),
    String(s.cycles),
    `${s.cycleMsP50.toFixed(0)} / ${s.cycleMsMax.toFixed(0)}`,
    (s.cycleRawP50 / 2 ** 20).toFixed(1),
  ];
  const rows = [
    ["async pair", "samples", "lag p50 s", "lag p99 s", "lag max s", "cycles", "cycle ms p50 / max", "MiB/cycle p50"],
  ];
  if (idle) rows.push(row("idle", idle));
  rows.push(row(`fio ${cfg.lag.bs} at ${cfg.lag.rate}/s`, loaded));
  const met = loaded.p99 <= GOALS.lagP99Seconds;
  const lines = [
    `continuous async lag — --interval ${cfg.lag.interval}, lagSeconds sampled every ${cfg.lag.sampleMs} ms through the control socket; ` +
      `fio --ioengine=nbd randwrite bs ${cfg.lag.bs} QD 1 --rate=${cfg.lag.rate} for ${cfg.lag.seconds} s ` +
      `(wrote ${(lag.writeMBps / 1.048576).toFixed(1)} MiB/s, ${(lag.writtenBytes / 2 ** 20).toFixed(0)} MiB)`,
    align(rows),
    `lag p99 under load ${loaded.p99.toFixed(2)} s ${met ? "meets goal" : "MISSES goal"} (<= ${GOALS.lagP99Seconds} s); ` +
      `÷ interval ${(loaded.p99 / cfg.lag.intervalSeconds).toFixed(2)}x` +
      (idle ? `, ÷ idle p99 ${(loaded.p99 / idle.p99).toFixed(2)}x` : ""),
    `by construction the lag (age of the last completed cut) peaks just before a generation completes, at about interval − ` +
      `2 × the previous cycle + this cycle (a cut starts early by twice the last cycle's time): here ${cfg.lag.intervalSeconds} s − ` +
      `${(loaded.cycleMsP50 / 1000).toFixed(2)} s (a p50 cycle) = ${(cfg.lag.intervalSeconds - loaded.cycleMsP50 / 1000).toFixed(2)} s`,
    `keeping up: the generations that carried data shipped and applied ${(loaded.shipBytesPerSecond / 1e6).toFixed(1)} MB/s ` +
      `(raw volume data, cut to commit), the writer wrote ${lag.writeMBps.toFixed(1)} MB/s` +
      (loaded.shipBytesPerSecond < lag.writeMBps * 1e6
        ? " — less than it writes: every cycle has more to ship than the one before, and the lag has no bound"
        : ""),
    `CPU while fio wrote, cores (CPU-s ÷ ${cfg.lag.seconds} s): ${Object.entries(lag.cpu)
      .map(([role, sec]) => `${role} ${(sec / cfg.lag.seconds).toFixed(2)}`)
      .join(", ")} (of ${cpus().length})`,
    `final \`ferry replicate sync\`: ${lag.finalSync.seconds.toFixed(2)} s wall, ship+apply ${(lag.finalSync.lastCycle?.ms ?? Number.NaN).toFixed(0)} ms; ` +
      "replica at site B then byte-identical to site A (sha256)",
  ];
  return { text: lines.join("\n"), idle, loaded, goalMet: met };
}

// ---- Run ----------------------------------------------------------------------------------------

async function main() {
  const cfg = config();
  const env = await environment({ fio: "fio", nbdcopy: "nbdcopy", natsServer: "nats-server" });
  const { root, cleanup } = runDir(cfg.dir, "ferry-sync-lag-bench-");
  const sizeLabel = cfg.size >= 2 ** 30 ? `${cfg.size / 2 ** 30} GiB` : `${cfg.size / 2 ** 20} MiB`;
  process.stderr.write(`bench: ${cfg.parts.join(" + ")} on ${sizeLabel} volumes, in ${root}\n`);
  const loadBefore = loadavg();
  const results = {};
  try {
    if (cfg.parts.includes("sync")) results.sync = await syncPart(cfg, root);
    if (cfg.parts.includes("lag")) results.lag = await lagPart(cfg, root);
  } finally {
    cleanup();
  }
  const loadAfter = loadavg();
  const fmtLoad = (l) => l.map((x) => x.toFixed(2)).join(" ");
  const sections = [];
  const summary = {};
  if (results.sync) {
    summary.sync = summariseSync(cfg, results.sync);
    sections.push(formatSync(cfg, summary.sync));
  }
  if (results.lag) {
    const lag = formatLag(cfg, results.lag);
    summary.lag = { idle: lag.idle, loaded: lag.loaded, goalMet: lag.goalMet };
    sections.push(lag.text);
  }
  process.stdout.write(
    `\nFerry sync/lag bench — ${sizeLabel} volumes, two sites on this machine (nats-server leafnode, NATS over loopback TCP, NBD over unix sockets); ` +
      `Ferry's route to site B: ${cfg.route === "direct" ? "direct (--peer-nats, one nats-server)" : "leafnode (two nats-servers)"}\n` +
      `${env.fio}, ${env.nbdcopy}, ${env.natsServer}; ${env.cpus} CPUs, load ${fmtLoad(loadBefore)} → ${fmtLoad(loadAfter)}; ferry ${env.commit}\n\n` +
      `${sections.join("\n\n")}\n`,
  );
  if (cfg.json) {
    const doc = {
      config: { ...cfg, json: undefined },
      environment: { ...env, loadBefore, loadAfter },
      summary,
      results,
    };
    writeFileSync(cfg.json, `${JSON.stringify(doc, null, 2)}\n`);
    process.stderr.write(`bench: wrote ${cfg.json}\n`);
  }
}

main().catch((error) => {
  process.stderr.write(`bench: ${error.stack ?? error}\n`);
  process.exitCode = 1;
});
