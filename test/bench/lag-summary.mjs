/**
 * What the lag bench reports of its samples of a pair's status (`{ lag, lastCycle }` every few
 * hundred ms): lag percentiles, and the generations the samples saw complete — each once, by its
 * number — with their cut-to-commit time and size, and the rate at which they shipped.
 */
import { percentile } from "./report.mjs";

export function lagSummary(samples) {
  if (samples.length === 0) throw new Error("no lag samples");
  const lags = samples.map((s) => s.lag);
  const cycles = new Map();
  for (const s of samples) if (s.lastCycle) cycles.set(s.lastCycle.generation, s.lastCycle);
  // The first cycle seen may have completed just before sampling began; it still ran during the part.
  const seen = [...cycles.values()];
  return {
    samples: lags.length,
    p50: percentile(lags, 50),
    p99: percentile(lags, 99),
    max: Math.max(...lags),
    cycles: seen.length,
    cycleMsP50: percentile(
      seen.map((c) => c.ms),
      50,
    ),
    cycleMsMax: seen.length === 0 ? Number.NaN : Math.max(...seen.map((c) => c.ms)),
    cycleRawP50: percentile(
      seen.map((c) => c.bytesRaw),
      50,
    ),
    // How fast the generations that carried data went from cut to commit, in bytes per second:
    // below the writer's rate, each cycle has more to ship than the last and the lag has no bound.
    shipBytesPerSecond: shipRate(seen.filter((c) => c.bytesRaw > 0)),
  };
}

function shipRate(cycles) {
  const ms = cycles.reduce((sum, c) => sum + c.ms, 0);
  return ms > 0 ? (cycles.reduce((sum, c) => sum + c.bytesRaw, 0) * 1000) / ms : Number.NaN;
}
