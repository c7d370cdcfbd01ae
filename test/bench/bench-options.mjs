/**
 * A bench's command line and environment knobs: `--json FILE` and `--help` (the usage text, then
 * exit 0), and the checks every bench applies to its `BENCH_*` variables, each failing with the
 * variable's name and what it got.
 */
import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { parseSize } from "../../packages/dataplane-native/binding.js";

/** The command line: prints `usage` and exits on --help; `{ json }` is the absolute --json path, if given. */
export function benchArgs(usage) {
  const { values } = parseArgs({ options: { json: { type: "string" }, help: { type: "boolean", short: "h" } } });
  if (values.help) {
    process.stdout.write(usage);
    process.exit(0);
  }
  return { json: values.json ? resolve(values.json) : undefined };
}

/** `process.env[name]` (else `fallback`) as a number > 0. */
export function positiveEnv(name, fallback) {
  const text = process.env[name];
  const v = Number(text ?? fallback);
  if (!Number.isFinite(v) || v <= 0) throw new Error(`${name} must be a positive number, got '${text}'`);
  return v;
}

/** `$BENCH_SIZE` (else `fallback`, e.g. "1G") in bytes, a whole number of MiB. */
export function benchSize(fallback = "1G") {
  const size = parseSize(process.env.BENCH_SIZE ?? fallback);
  if (size % (1 << 20) !== 0) throw new Error(`BENCH_SIZE must be a whole number of MiB, got ${size} bytes`);
  return size;
}

/**
 * `$BENCH_ROUTE`: how each site's Ferry reaches the other — `direct` (also connected to the other
 * site's nats-server as user peer, `--peer-nats`: one server relays each message) or `leafnode`
 * (through its own server and the link: two servers relay each message). Default `direct`.
 */
export function benchRoute() {
  const route = process.env.BENCH_ROUTE ?? "direct";
  if (route !== "direct" && route !== "leafnode")
    throw new Error(`BENCH_ROUTE must be direct or leafnode, got '${route}'`);
  return route;
}
