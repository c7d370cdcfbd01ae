#!/usr/bin/env node
/**
 * The volume-service benchmark: fio (nbd engine) and nbdcopy against a Ferry export, qemu-nbd and
 * nbdkit, all run by this script in the same invocation, one server at a time, each on a fresh
 * file. Prints a workload × server table of medians and the ratios `ferry / best peer` and
 * `tracked / untracked`; with `--json FILE` also writes every sample. It measures and reports;
 * it never fails because a number is low (timing assertions do not belong in tests or here).
 *
 * It owns its temp dir and the processes it starts, and removes/stops them on every way out.
 * See README.md next to it for the knobs and what each number means.
 */
import {
  closeSync,
  fdatasyncSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { benchArgs, benchSize, positiveEnv } from "./bench-options.mjs";
import { environment } from "./environment.mjs";
import { clatUs, fioJobSide } from "./fio-result.mjs";
import { cpuSeconds, runDir, runLogged, spawnLogged, stop, waitForExport } from "./processes.mjs";
import { formatRatios, formatTable, ratios, summarise } from "./report.mjs";
import { copySourceCommand, listenOn, PEERS, SERVERS, uriOf } from "./servers.mjs";

const USAGE = `usage: node test/bench/volume-bench.mjs [--json FILE]

environment (defaults in brackets):
  BENCH_SIZE       volume / file size                         [1G]
  BENCH_SECONDS    measured seconds per fio job               [10]
  BENCH_WARMUP     fio ramp-up seconds, not measured          [2]
  BENCH_REPS       repetitions; the table shows the median    [3]
  BENCH_TRANSPORT  unix | tcp (loopback), same for all        [unix]
  BENCH_SERVERS    comma list of ${Object.keys(SERVERS).join(",")}  [all]
  BENCH_WORKLOADS  comma list of seq-write,seq-read,rand-write,copy  [all]
  BENCH_DIR        where the temp dir goes (one filesystem for all)  [${tmpdir()}]
`;

const WORKLOADS = [
  { id: "seq-write", label: "seq write 1M QD8", metric: "mbps", fio: { rw: "write", bs: "1M", iodepth: 8 } },
  { id: "seq-read", label: "seq read 1M QD8", metric: "mbps", fio: { rw: "read", bs: "1M", iodepth: 8 } },
  {
    id: "rand-write",
    label: "rand write 4K QD32",
    metric: "iops",
    latency: true,
    fio: { rw: "randwrite", bs: "4k", iodepth: 32, extra: ["--norandommap", "--randrepeat=1"] },
  },
  { id: "copy", label: "nbdcopy", metric: "mbps", copy: true },
];

function config() {
  const { json } = benchArgs(USAGE);
  const env = process.env;
  const list = (name, known) => {
    if (!env[name]) return known;
    const picked = env[name]
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean);
    const unknown = picked.filter((p) => !known.includes(p));
    if (unknown.length > 0) throw new Error(`${name}: unknown ${unknown.join(", ")}; choose from ${known.join(", ")}`);
    return known.filter((k) => picked.includes(k));
  };
  const transport = env.BENCH_TRANSPORT ?? "unix";
  if (!["unix", "tcp"].includes(transport)) throw new Error(`BENCH_TRANSPORT must be unix or tcp, got '${transport}'`);
  const size = benchSize();
  const workloadIds = list(
    "BENCH_WORKLOADS",
    WORKLOADS.map((w) => w.id),
  );
  return {
    size,
    seconds: positiveEnv("BENCH_SECONDS", 10),
    warmup: Number(env.BENCH_WARMUP ?? 2),
    reps: Math.round(positiveEnv("BENCH_REPS", 3)),
    transport,
    servers: list("BENCH_SERVERS", Object.keys(SERVERS)),
    workloads: WORKLOADS.filter((w) => workloadIds.includes(w.id)),
    dir: env.BENCH_DIR ?? tmpdir(),
    json,
  };
}

/**
 * Fill a file with non-zero data and make it durable, so reads read data (not holes), writes
 * measure the steady state (overwriting cached blocks), and no writeback from the fill runs into
 * the measurement. The same bytes for every server.
 */
function fill(file, size) {
  const chunk = Buffer.alloc(1 << 20);
  let x = 0x9e3779b9;
  for (let i = 0; i < chunk.length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    chunk.writeUInt32LE(x >>> 0, i);
  }
  const fd = openSync(file, "r+");
  try {
    for (let at = 0; at < size; at += chunk.length) writeSync(fd, chunk, 0, chunk.length, at);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

async function runFio(w, uri, cfg, dir, serverPid) {
  const out = join(dir, "fio.json");
  const args = [
    `--name=${w.id}`,
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${w.fio.rw}`,
    `--bs=${w.fio.bs}`,
    `--iodepth=${w.fio.iodepth}`,
    "--numjobs=1",
    "--direct=0",
    "--time_based",
    `--runtime=${cfg.seconds}`,
    `--ramp_time=${cfg.warmup}`,
    ...(w.fio.extra ?? []),
    "--output-format=json",
    `--output=${out}`,
  ];
  // fio counts only what follows the ramp; so does the server CPU time.
  const cpuAfterRamp = sleep(cfg.warmup * 1000).then(() => cpuSeconds(serverPid));
  await runLogged("fio", "fio", args, join(dir, "fio.log"), (cfg.seconds + cfg.warmup + 60) * 1000);
  const cpu = cpuSeconds(serverPid) - (await cpuAfterRamp);
  const text = readFileSync(out, "utf8");
  const side = fioJobSide(text, w.fio.rw.includes("read") ? "read" : "write", `fio ${w.id} against ${uri}`);
  return {
    mbps: side.bw_bytes / 1e6,
    iops: side.iops,
    clatP50Us: clatUs(side, 50),
    clatP99Us: clatUs(side, 99),
    seconds: JSON.parse(text).jobs[0].job_runtime / 1000,
    ...serverCpu(cpu, side.io_bytes, side.total_ios),
  };
}

async function runCopy(uri, cfg, dir, serverPid) {
  const listen = await listenOn(cfg.transport, dir, "source");
  const [command, args] = copySourceCommand(cfg.size, listen);
  const source = spawnLogged("copy source (nbdkit sparse-random)", command, args, join(dir, "source.log"));
  try {
    await waitForExport(source, uriOf(listen));
    const started = process.hrtime.bigint();
    const cpu0 = cpuSeconds(serverPid);
    await runLogged("nbdcopy", "nbdcopy", [uriOf(listen), uri], join(dir, "nbdcopy.log"), 600_000);
    const cpu = cpuSeconds(serverPid) - cpu0;
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    return { mbps: cfg.size / seconds / 1e6, seconds, ...serverCpu(cpu, cfg.size, Number.NaN) };
  } finally {
    await stop(source);
  }
}

/**
 * What the server spent per unit of work, in CPU time of all its threads. Throughput on a busy
 * 2-core machine depends on what else runs; the CPU a server burns per byte or per request
 * depends much less on that, so it is the steadier number for comparing servers.
 */
function serverCpu(cpuSeconds, bytes, ops) {
  return {
    serverCpuSeconds: cpuSeconds,
    serverCpuMsPerGB: (cpuSeconds * 1e3) / (bytes / 1e9),
    serverCpuUsPerOp: (cpuSeconds * 1e6) / ops,
  };
}

/** One measurement: fresh dir, fresh file, fresh server; everything gone afterwards. */
async function measure(w, serverName, cfg, root, n) {
  const dir = mkdtempSync(join(root, `${String(n).padStart(3, "0")}-${w.id}-${serverName}-`));
  try {
    const server = SERVERS[serverName];
    const prepared = await server.prepare(dir, cfg.size);
    if (!w.copy) fill(prepared.file, cfg.size);
    const listen = await listenOn(cfg.transport, dir, "nbd");
    const [command, args] = server.command(prepared, listen);
    const child = spawnLogged(serverName, command, args, join(dir, "server.log"));
    try {
      await waitForExport(child, uriOf(listen));
      return w.copy
        ? await runCopy(uriOf(listen), cfg, dir, child.pid)
        : await runFio(w, uriOf(listen), cfg, dir, child.pid);
    } finally {
      await stop(child);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function transportLabel(transport) {
  return transport === "unix" ? "unix sockets" : "loopback TCP";
}

async function main() {
  const cfg = config();
  const env = await environment({
    fio: "fio",
    qemuNbd: "qemu-nbd",
    nbdkit: "nbdkit",
    nbdcopy: "nbdcopy",
    nbdinfo: "nbdinfo",
  });
  const { root, cleanup } = runDir(cfg.dir, "ferry-bench-");

  const sizeLabel = `${cfg.size / 2 ** 30 >= 1 ? `${cfg.size / 2 ** 30} GiB` : `${cfg.size / 2 ** 20} MiB`}`;
  for (const w of cfg.workloads) if (w.copy) w.label = `nbdcopy ${sizeLabel}`;
  const total = cfg.reps * cfg.workloads.length * cfg.servers.length;
  process.stderr.write(
    `bench: ${total} runs: ${cfg.servers.join(", ")} × ${cfg.workloads.map((w) => w.id).join(", ")} × ${cfg.reps} reps; ` +
      `size ${sizeLabel}, fio ${cfg.warmup}+${cfg.seconds} s, ${transportLabel(cfg.transport)}, in ${root}\n`,
  );
  const loadBefore = loadavg();
  const samples = {};
  let n = 0;
  try {
    for (let rep = 0; rep < cfg.reps; rep++) {
      for (const [wi, w] of cfg.workloads.entries()) {
        // Rotate the server order so none always runs first (or last) under the same conditions.
        const k = (rep + wi) % cfg.servers.length;
        const order = [...cfg.servers.slice(k), ...cfg.servers.slice(0, k)];
        for (const s of order) {
          n += 1;
          const result = await measure(w, s, cfg, root, n);
          samples[w.id] ??= {};
          samples[w.id][s] ??= [];
          samples[w.id][s].push(result);
          const shown = w.metric === "iops" ? `${result.iops.toFixed(0)} IOPS` : `${result.mbps.toFixed(0)} MB/s`;
          process.stderr.write(`bench: [${n}/${total}] rep ${rep + 1} ${w.id.padEnd(10)} ${s.padEnd(15)} ${shown}\n`);
        }
      }
    }
  } finally {
    cleanup();
  }
  const loadAfter = loadavg();

  const summary = summarise(cfg.workloads, cfg.servers, samples);
  const r = ratios(
    cfg.workloads,
    summary,
    PEERS.filter((p) => cfg.servers.includes(p)),
  );
  const fmtLoad = (l) => l.map((x) => x.toFixed(2)).join(" ");
  process.stdout.write(
    `\nFerry volume bench — ${sizeLabel} file per server, ${transportLabel(cfg.transport)}, fio ${cfg.seconds} s (+${cfg.warmup} s warm-up), ` +
      `median of ${cfg.reps}, ±: half the min–max range\n` +
      `${env.fio}, ${env.qemuNbd}, ${env.nbdkit}, ${env.nbdcopy}; ${env.cpus} CPUs, load ${fmtLoad(loadBefore)} → ${fmtLoad(loadAfter)}; ferry ${env.commit}\n\n` +
      `${formatTable(cfg.workloads, cfg.servers, summary)}\n\n${formatRatios(cfg.workloads, r)}\n`,
  );
  if (cfg.json) {
    const doc = {
      config: { ...cfg, json: undefined, workloads: cfg.workloads },
      environment: { ...env, loadBefore, loadAfter },
      results: summary,
      ratios: r,
    };
    writeFileSync(cfg.json, `${JSON.stringify(doc, null, 2)}\n`);
    process.stderr.write(`bench: wrote ${cfg.json}\n`);
  }
}

main().catch((error) => {
  process.stderr.write(`bench: ${error.stack ?? error}\n`);
  process.exitCode = 1;
});
