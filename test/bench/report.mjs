/**
 * Turns the samples of a bench run into medians, the workload × server table and the ratio lines.
 * Ratios are information for people, not verdicts: nothing here fails a run.
 */

export const GOALS = { ferryVsBestPeer: 1.0, trackedVsUntracked: 0.95 };

/** Server CPU per unit of work: per request for IOPS workloads, per GB moved for the others. */
function cpuKey(w) {
  return w.metric === "iops" ? "serverCpuUsPerOp" : "serverCpuMsPerGB";
}

export function median(values) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return Number.NaN;
  const mid = Math.floor(v.length / 2);
  return v.length % 2 === 1 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

/**
 * The nearest-rank percentile `p` (0 < p ≤ 100) of `values`: the smallest value with at least p% of
 * the values at or below it — always one of the samples, never an interpolation.
 */
export function percentile(values, p) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return Number.NaN;
  if (!(p > 0 && p <= 100)) throw new Error(`percentile must be in (0, 100], got ${p}`);
  return v[Math.max(0, Math.ceil((p / 100) * v.length) - 1)];
}

/** Run `fn` and say how long it took: `{ seconds, result }`. */
export async function timed(fn) {
  const started = process.hrtime.bigint();
  const result = await fn();
  return { seconds: Number(process.hrtime.bigint() - started) / 1e9, result };
}

/** Per workload and server: the median of every metric, and how far the repetitions spread. */
export function summarise(workloads, servers, samples) {
  const out = {};
  for (const w of workloads) {
    out[w.id] = {};
    for (const s of servers) {
      const runs = samples[w.id]?.[s] ?? [];
      if (runs.length === 0) continue;
      const pick = (k) => runs.map((r) => r[k]);
      const main = pick(w.metric);
      const m = median(main);
      out[w.id][s] = {
        [w.metric]: m,
        ...(w.latency ? { clatP50Us: median(pick("clatP50Us")), clatP99Us: median(pick("clatP99Us")) } : {}),
        serverCpu: median(pick(cpuKey(w))),
        // Half the min–max range as a share of the median: a quick read on the noise.
        spread: runs.length > 1 ? (Math.max(...main) - Math.min(...main)) / 2 / m : 0,
        runs,
      };
    }
  }
  return out;
}

/** `ferry / best peer` and `tracked / untracked` for every workload where both sides ran. */
export function ratios(workloads, summary, peers) {
  const vsPeer = [];
  const cbt = [];
  for (const w of workloads) {
    const row = summary[w.id];
    const ferry = row.ferry?.[w.metric];
    const best = peers
      .filter((p) => row[p])
      .map((p) => ({ peer: p, value: row[p][w.metric] }))
      .sort((a, b) => b.value - a.value)[0];
    if (ferry !== undefined && best) {
      vsPeer.push({
        workload: w.id,
        ratio: ferry / best.value,
        bestPeer: best.peer,
        goal: GOALS.ferryVsBestPeer,
        cpuRatio: row.ferry.serverCpu / row[best.peer].serverCpu,
      });
    }
    const untracked = row["ferry-untracked"]?.[w.metric];
    if (ferry !== undefined && untracked !== undefined) {
      cbt.push({
        workload: w.id,
        ratio: ferry / untracked,
        goal: GOALS.trackedVsUntracked,
        cpuRatio: row.ferry.serverCpu / row["ferry-untracked"].serverCpu,
      });
    }
  }
  return { ferryVsBestPeer: vsPeer, trackedVsUntracked: cbt };
}

export function formatTable(workloads, servers, summary) {
  const header = ["workload", "unit", ...servers];
  const rows = [];
  for (const w of workloads) {
    const row = summary[w.id];
    const unit = w.metric === "iops" ? "IOPS" : "MB/s";
    rows.push([
      w.label,
      unit,
      ...servers.map((s) => (row[s] ? `${fmtMetric(w.metric, row[s][w.metric])} ±${pct(row[s].spread)}` : "-")),
    ]);
    if (w.latency) {
      rows.push(["  clat p50", "µs", ...servers.map((s) => (row[s] ? fmtUs(row[s].clatP50Us) : "-"))]);
      rows.push(["  clat p99", "µs", ...servers.map((s) => (row[s] ? fmtUs(row[s].clatP99Us) : "-"))]);
    }
    const cpuUnit = w.metric === "iops" ? "µs/op" : "ms/GB";
    rows.push(["  server CPU", cpuUnit, ...servers.map((s) => (row[s] ? fmtUs(row[s].serverCpu) : "-"))]);
  }
  return align([header, ...rows]);
}

export function formatRatios(workloads, r) {
  const label = (id) => workloads.find((w) => w.id === id).label;
  const lines = [];
  const verdict = (x) => (x.ratio >= x.goal ? "meets goal" : "BELOW goal");
  lines.push(`ferry / best peer (goal >= ${GOALS.ferryVsBestPeer.toFixed(2)}x):`);
  if (r.ferryVsBestPeer.length === 0) lines.push("  (not measured: needs ferry and a peer)");
  for (const x of r.ferryVsBestPeer) {
    lines.push(
      `  ${label(x.workload).padEnd(22)} ${x.ratio.toFixed(2)}x  ${verdict(x)}  (best peer: ${x.bestPeer}; ferry uses ${x.cpuRatio.toFixed(2)}x its CPU per unit)`,
    );
  }
  lines.push(`tracked / untracked (goal >= ${GOALS.trackedVsUntracked.toFixed(2)}x):`);
  if (r.trackedVsUntracked.length === 0) lines.push("  (not measured: needs ferry and ferry-untracked)");
  for (const x of r.trackedVsUntracked) {
    lines.push(
      `  ${label(x.workload).padEnd(22)} ${x.ratio.toFixed(2)}x  ${verdict(x)}  (tracked uses ${x.cpuRatio.toFixed(2)}x the CPU per unit)`,
    );
  }
  return lines.join("\n");
}

export function fmtMetric(metric, value) {
  if (!Number.isFinite(value)) return "?";
  if (metric === "iops") return value >= 10_000 ? `${(value / 1000).toFixed(1)}k` : value.toFixed(0);
  return value.toFixed(0);
}

function fmtUs(value) {
  return Number.isFinite(value) ? value.toFixed(0) : "?";
}

function pct(share) {
  return `${(share * 100).toFixed(0)}%`;
}

/** Pad every column of `rows` (the first is the header) to its widest cell. */
export function align(rows) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)));
  return rows
    .map((r) =>
      r
        .map((c, i) => String(c).padEnd(widths[i]))
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}
