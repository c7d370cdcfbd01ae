#!/usr/bin/env node
/**
 * The catalog and scheduler at scale (issue: 1,000 applications × 3 volumes on one site): two sites
 * (two nats-servers linked by a leafnode), one ferryd each (`ferry daemon --metrics …`), N
 * applications of 3 small volumes created at site A through the API and protected to site B under
 * one async policy. Once every protection has its first recovery point it measures, against the
 * goals:
 *
 *   tick    the scheduler's tick (status of every pair, RPO of every protection, metrics, events),
 *           from ferryd's own `ferry_scheduler_tick_seconds` histogram over a quiet window
 *   status  `status` of all applications: the API request alone (NATS request/reply, JSON of N
 *           rows) and `ferry status --json` as a user runs it (CLI start-up included)
 *   rss     ferryd's resident memory at site A (VmRSS; VmHWM is the peak)
 *
 * It measures and reports; it never fails because a number is high. It owns its temp dir and every
 * process it starts, and removes/stops them on every way out (Ctrl-C included).
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { startSitePair } from "@ferry/nats-sites";
import { call, connectNats } from "@ferry/orchestrator";
import { replicate } from "../../packages/dataplane-native/binding.js";
import { benchArgs, positiveEnv } from "./bench-options.mjs";
import { environment } from "./environment.mjs";
import { ferryArgs, startFerryd } from "./ferry-site.mjs";
import { runDir, runLogged, stop, waitUntil } from "./processes.mjs";
import { align, median, percentile, timed } from "./report.mjs";

const GOALS = { tickMs: 50, statusMs: 500, rssMB: 300 };

const USAGE = `usage: node test/bench/catalog-bench.mjs [--json FILE]

environment (defaults in brackets):
  BENCH_APPS            applications (3 volumes each)                     [1000]
  BENCH_WINDOW_SECONDS  quiet window the scheduler ticks are taken from   [20]
  BENCH_STATUS_REPS     status requests timed (API); the CLI runs 3       [10]
  BENCH_DIR             where the temp dir goes                           [${tmpdir()}]
`;

const VOLUMES_PER_APP = 3;
const VOLUME_SIZE = 1024 * 1024;
/** Requests in flight while the applications are created and protected. */
const CONCURRENCY = 8;

async function main() {
  const { json } = benchArgs(USAGE);
  const apps = positiveEnv("BENCH_APPS", 1000);
  const windowSeconds = positiveEnv("BENCH_WINDOW_SECONDS", 20);
  const statusReps = positiveEnv("BENCH_STATUS_REPS", 10);
  const env = await environment({ natsServer: "nats-server" });
  const { root } = runDir(process.env.BENCH_DIR ?? tmpdir(), "ferry-catalog-bench-");
  console.log(`catalog bench: ${apps} applications × ${VOLUMES_PER_APP} volumes, in ${root}`);

  const sites = await startSitePair({ parentDir: root });
  const ferryd = {};
  for (const site of [sites.a, sites.b]) ferryd[site.name] = await startFerrydWithMetrics(root, site);
  const nc = await connectNats(sites.a.cliUrl, "catalog bench");
  const at = sites.a.name;
  try {
    await waitUntil("both sites to know each other", async () => (await call(nc, at, "siteList")).length === 2);
    await call(nc, at, "policyCreate", { name: "bench", mode: "async", interval: "1h", rpo: "2h" });

    const names = Array.from({ length: apps }, (_, i) => `app-${String(i).padStart(4, "0")}`);
    const create = await timed(() =>
      inParallel(names, (name) =>
        call(
          nc,
          at,
          "appCreate",
          {
            name,
            volumes: Array.from({ length: VOLUMES_PER_APP }, (_, v) => `${name}-v${v}`),
            sizeBytes: VOLUME_SIZE,
          },
          60_000,
        ),
      ),
    );
    console.log(`created ${apps} applications (${apps * VOLUMES_PER_APP} volumes) in ${create.seconds.toFixed(1)} s`);
    const protect = await timed(() =>
      inParallel(names, (name) => call(nc, at, "protect", { app: name, policy: "bench", to: sites.b.name }, 60_000)),
    );
    console.log(`protected them to ${sites.b.name} in ${protect.seconds.toFixed(1)} s`);
    const firstPoints = await timed(() =>
      waitUntil(
        "every protection's first recovery point",
        async () => {
          const rows = await call(nc, at, "status", {}, 60_000);
          return rows.length === apps && rows.every((r) => r.lastRecoveryPoint !== null);
        },
        1_800_000,
      ),
    );
    console.log(
      `every application has its first recovery point at ${sites.b.name} after ${firstPoints.seconds.toFixed(1)} s`,
    );

    // The scheduler ticks every second: the histogram's growth over a quiet window.
    const metricsUrl = `${ferryd[at].metrics}/metrics`;
    const before = tickHistogram(await (await fetch(metricsUrl)).text());
    await sleep(windowSeconds * 1000);
    const after = tickHistogram(await (await fetch(metricsUrl)).text());
    const ticks = after.count - before.count;
    const tickMeanMs = ticks > 0 ? ((after.sum - before.sum) / ticks) * 1000 : Number.NaN;
    const tickP99Ms = bucketPercentile(before, after, 0.99) * 1000;

    const apiMs = [];
    for (let i = 0; i < statusReps; i++) {
      const t = await timed(() => call(nc, at, "status", {}, 60_000));
      apiMs.push(t.seconds * 1000);
    }
    // What the status of every pair costs through the control socket (the CLI's way in; ferryd asks its
    // in-process service instead).
    const dataPlaneMs = [];
    for (let i = 0; i < statusReps; i++) {
      const t = await timed(async () =>
        JSON.parse(await replicate(ferryd[at].data, JSON.stringify({ op: "replicateStatus" }))),
      );
      dataPlaneMs.push(t.seconds * 1000);
    }
    const cliMs = [];
    for (let i = 0; i < 3; i++) {
      const t = await timed(() =>
        runLogged("ferry status", process.execPath, ferryArgs("status", "--json"), join(root, "status.log"), 60_000, {
          env: { ...process.env, FERRY_NATS: sites.a.cliUrl, FERRY_SITE: at },
          stdout: join(root, "status.json"),
        }),
      );
      cliMs.push(t.seconds * 1000);
    }
    const rows = JSON.parse(readFileSync(join(root, "status.json"), "utf8"));
    if (rows.length !== apps) throw new Error(`ferry status --json listed ${rows.length} rows, not ${apps}`);
    const mem = memory(ferryd[at].child.pid);

    const results = {
      environment: {
        ...env,
        load: loadavg()
          .map((l) => l.toFixed(1))
          .join(" "),
      },
      apps,
      volumes: apps * VOLUMES_PER_APP,
      createSeconds: create.seconds,
      protectSeconds: protect.seconds,
      firstPointsSeconds: firstPoints.seconds,
      tick: { count: ticks, meanMs: tickMeanMs, p99BucketMs: tickP99Ms },
      statusApiMs: { median: median(apiMs), p90: percentile(apiMs, 90) },
      statusCliMs: { median: median(cliMs) },
      dataPlaneStatusMs: { median: median(dataPlaneMs) },
      rssMB: mem.rssMB,
      peakRssMB: mem.hwmMB,
      goals: GOALS,
    };
    console.log(
      `\n${align([
        ["measure", "ferry", "goal", "met"],
        ["scheduler tick, mean ms", tickMeanMs.toFixed(1), `≤ ${GOALS.tickMs}`, yes(tickMeanMs <= GOALS.tickMs)],
        [
          "scheduler tick, p99 (bucket bound) ms",
          tickP99Ms.toFixed(0),
          `≤ ${GOALS.tickMs}`,
          yes(tickP99Ms <= GOALS.tickMs),
        ],
        [
          "status of all pairs via the control socket (ferryd asks in-process), ms",
          median(dataPlaneMs).toFixed(1),
          "-",
          "-",
        ],
        [
          "status, API request, median ms",
          median(apiMs).toFixed(0),
          `≤ ${GOALS.statusMs}`,
          yes(median(apiMs) <= GOALS.statusMs),
        ],
        [
          "ferry status --json (CLI), median ms",
          median(cliMs).toFixed(0),
          `≤ ${GOALS.statusMs}`,
          yes(median(cliMs) <= GOALS.statusMs),
        ],
        ["ferryd RSS at site A, MB", mem.rssMB.toFixed(0), `≤ ${GOALS.rssMB}`, yes(mem.rssMB <= GOALS.rssMB)],
        ["ferryd peak RSS (VmHWM), MB", mem.hwmMB.toFixed(0), `≤ ${GOALS.rssMB}`, yes(mem.hwmMB <= GOALS.rssMB)],
      ])}`,
    );
    console.log(`(${ticks} ticks over ${windowSeconds} s; load ${results.environment.load}; Ferry ${env.commit})`);
    if (json) {
      mkdirSync(join(json, ".."), { recursive: true });
      writeFileSync(json, `${JSON.stringify(results, null, 2)}\n`);
    }
  } finally {
    await nc.close();
    for (const f of Object.values(ferryd)) await stop(f.child, 60_000);
    await sites.stop();
  }
}

function yes(ok) {
  return ok ? "yes" : "NO";
}

/** ferryd with its Prometheus endpoint on a free port: `{ child, data, metrics }`. */
async function startFerrydWithMetrics(root, site) {
  const { child, data, line } = await startFerryd(root, site, {
    args: ["--metrics", "127.0.0.1:0"],
    ready: /metrics on http:\/\/\S+\/metrics/,
  });
  const metrics = /metrics on (http:\/\/\S+)\/metrics/.exec(line)?.[1];
  return { child, metrics, data };
}

/** Run `fn` over `items`, CONCURRENCY at a time. */
async function inParallel(items, fn) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next++];
      await fn(item);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
}

/** The tick histogram from Prometheus text: count, sum (seconds) and the cumulative buckets. */
function tickHistogram(text) {
  const buckets = [];
  let count = 0;
  let sum = 0;
  for (const line of text.split("\n")) {
    const bucket = /^ferry_scheduler_tick_seconds_bucket\{le="([^"]+)"\} (\S+)$/.exec(line);
    if (bucket)
      buckets.push({ le: bucket[1] === "+Inf" ? Number.POSITIVE_INFINITY : Number(bucket[1]), n: Number(bucket[2]) });
    const c = /^ferry_scheduler_tick_seconds_count (\S+)$/.exec(line);
    if (c) count = Number(c[1]);
    const s = /^ferry_scheduler_tick_seconds_sum (\S+)$/.exec(line);
    if (s) sum = Number(s[1]);
  }
  return { buckets, count, sum };
}

/** The upper bound of the bucket holding the p-quantile of the ticks between two scrapes. */
function bucketPercentile(before, after, p) {
  const total = after.count - before.count;
  if (total <= 0) return Number.NaN;
  for (const [i, b] of after.buckets.entries()) {
    const n = b.n - (before.buckets[i]?.n ?? 0);
    if (n >= p * total) return b.le;
  }
  return Number.POSITIVE_INFINITY;
}

/** VmRSS and VmHWM of a process, in MB. */
function memory(pid) {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (field) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? Number.NaN);
  return { rssMB: kb("VmRSS") / 1024, hwmMB: kb("VmHWM") / 1024 };
}

main().catch((error) => {
  console.error(`catalog bench failed: ${error.message}`);
  process.exitCode = 1;
});
