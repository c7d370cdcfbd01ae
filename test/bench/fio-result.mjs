/**
 * What a bench reads from fio's `--output-format=json` result: one job's throughput and its
 * completion-latency percentiles. fio prints the percentiles it was asked for under keys such as
 * "99.000000" (`jobs[i].write.clat_ns.percentile`), in nanoseconds.
 */

/**
 * The `side` ("read" or "write") of the first job of a fio JSON document (text), or an error when
 * fio reported one or moved no data that way.
 */
export function fioJobSide(text, side, what = "fio") {
  const job = JSON.parse(text).jobs?.[0];
  if (!job) throw new Error(`${what}: fio's JSON has no job`);
  if (job.error !== 0) throw new Error(`${what}: fio reported error ${job.error}`);
  const out = job[side];
  if (!(out?.io_bytes > 0)) throw new Error(`${what}: fio moved no data (${side})`);
  return out;
}

/** The completion latency at percentile `p` (e.g. 99 or 99.9) of a fio job side, in µs; NaN if fio did not report it. */
export function clatUs(side, p) {
  const percentiles = side.clat_ns?.percentile ?? {};
  const hit = Object.entries(percentiles).find(([key]) => Math.abs(Number(key) - p) < 1e-9);
  return hit === undefined ? Number.NaN : hit[1] / 1000;
}
