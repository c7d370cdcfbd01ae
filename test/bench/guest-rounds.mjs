/**
 * The test guest's write rate, read from its own console: each round writes the same MiB on the disk
 * (O_DIRECT) and then reads them back for its checksum, and the guest prints its uptime when a
 * round's checksum is out. A round's rate is its MiB over the time since the previous round's line —
 * the rate of write + read-back, as the guest sees it; round 1 has no start line, so no rate.
 */
import { median } from "./report.mjs";

/** `wroteAt`: guest uptime (s) at the end of each round (index 0 = round 1). */
export function roundRates(wroteAt, mib) {
  const rates = [];
  for (let i = 1; i < wroteAt.length; i++) {
    const seconds = wroteAt[i] - wroteAt[i - 1];
    if (!(seconds > 0)) throw new Error(`round ${i + 1} ended ${seconds} s after round ${i}: not a guest uptime`);
    rates.push({ round: i + 1, mibPerSecond: mib / seconds });
  }
  return rates;
}

/**
 * Rounds split around a window of time (the live adoption's block copy and pivot, `fromMs`–`toMs`,
 * host clock). `endsAtMs[i]`: when round i + 1's line appeared on the console (host clock), so round
 * r ran from `endsAtMs[r - 2]` to `endsAtMs[r - 1]`. Before: rounds that ended by `fromMs`. After:
 * rounds that began at `toMs` or later. During: every other round, i.e. each one that ran at some
 * moment of the window. Each phase: its rounds and their median MiB/s (NaN without any).
 */
export function adoptionPhases(rates, endsAtMs, fromMs, toMs) {
  if (toMs < fromMs) throw new Error(`the window ends (${toMs}) before it begins (${fromMs})`);
  const span = (round) => {
    const from = endsAtMs[round - 2];
    const to = endsAtMs[round - 1];
    if (from === undefined || to === undefined) throw new Error(`no console time for round ${round}`);
    return { from, to };
  };
  const phase = (keep) => {
    const rounds = rates.filter((r) => keep(span(r.round)));
    return { rounds: rounds.map((r) => r.round), mibPerSecond: median(rounds.map((r) => r.mibPerSecond)) };
  };
  return {
    before: phase((r) => r.to <= fromMs),
    during: phase((r) => r.to > fromMs && r.from < toMs),
    after: phase((r) => r.from >= toMs),
  };
}
