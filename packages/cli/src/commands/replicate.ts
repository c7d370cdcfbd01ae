/**
 * `ferry replicate …`: start, watch, force and stop asynchronous replication of volumes to another
 * site, and promote the replicas at the target. The volume service of the data directory does the
 * work (to replicate, it must have joined a site: `ferry volume serve --site … --region … --nats …`);
 * this file owns only arguments and presentation, and never talks to NATS itself.
 */
import { type Command, InvalidArgumentError, Option } from "commander";
import { formatBytes } from "../bytes.js";
import { resolveDataDir } from "../data-dir.js";
import { dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { type DataOption, dataOption, type JsonOption, jsonOption } from "./volume.js";

/** One replication pair as the data plane reports it: a consistency group shipped to one site. */
export interface PairStatus {
  group: string;
  volumes: string[];
  target: string;
  mode: string;
  /** `starting`, `syncing` (first full copy), `shipping`, `idle`, `error` or `stopped`. */
  state: string;
  /** The newest generation the target holds completely (generation numbers are per volume: the highest). */
  lastCompleteGeneration: number | null;
  lastCompleteAtMs: number | null;
  lagSeconds: number;
  /** Bytes of volume data shipped, before and after compression (since the service started). */
  bytesRaw: number;
  bytesWire: number;
  generationsShipped: number;
  lastError: string | null;
}

/** A replica made writable by `promote`: the generation (of its former source) it now holds. */
export interface PromotedVolume {
  volume: string;
  generation: number;
}

const MODES = ["async", "sync"] as const;
const DEFAULT_INTERVAL = "5s";
/** The data plane cycles no more often than this; a shorter interval would silently mean this one. */
const MIN_INTERVAL_MS = 100;

const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 };

/** `500ms`, `5s`, `1.5m`, `1h` → milliseconds; anything else is a usage error naming the input. */
function parseDuration(text: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(text.trim());
  const factor = match?.[2] === undefined ? undefined : DURATION_UNITS_MS[match[2]];
  if (match?.[1] === undefined || factor === undefined) {
    throw new InvalidArgumentError(`'${text}' is not a duration: use a number with ms, s, m or h, e.g. 500ms, 5s, 2m`);
  }
  const ms = Math.round(Number(match[1]) * factor);
  if (ms < MIN_INTERVAL_MS) {
    throw new InvalidArgumentError(`'${text}' is too short: the shortest interval is ${MIN_INTERVAL_MS}ms`);
  }
  return ms;
}

/** zstd level, as the data plane accepts it. */
function parseLevel(text: string): number {
  const level = Number(text);
  if (!/^\d+$/.test(text) || level < 1 || level > 19) {
    throw new InvalidArgumentError(`'${text}' is not a compression level: use a whole number from 1 to 19`);
  }
  return level;
}

interface StartOptions extends DataOption {
  to: string;
  mode: (typeof MODES)[number];
  interval: number;
  rate?: string;
  level?: number;
}

export function registerReplicateCommands(program: Command, io: ProgramIo): void {
  const replicate = program
    .command("replicate")
    .description(
      "replicate volumes to another site, asynchronously, through the running volume services of both sites " +
        "(each started with `ferry volume serve --site NAME --region REGION --nats URL`); promote the replicas " +
        "at the target site to fail over",
    );
  const printJson = (value: unknown) => io.writeOut(`${JSON.stringify(value, null, 2)}\n`);
  const request = async (dataDir: string, body: Record<string, unknown>): Promise<unknown> => {
    const native = await dataplane();
    return JSON.parse(await native.replicate(dataDir, JSON.stringify(body))) as unknown;
  };

  replicate
    .command("start")
    .summary("start replicating volumes to a site (one consistency group)")
    .description(
      "start replicating volumes to another site. The volumes named together form one consistency group: every " +
        "generation the target completes holds all of them as of the same instant. A first full copy starts at once, " +
        "then one generation every --interval. Idempotent for the same volumes and site.",
    )
    .argument("<volumes...>", "volume names at this site")
    .requiredOption("--to <site>", "the site to replicate to")
    .addOption(
      new Option("--mode <mode>", "async: ship a generation every --interval (sync is not available yet)")
        .choices(MODES)
        .makeOptionMandatory(),
    )
    .addOption(
      new Option("--interval <duration>", "time between generations: 500ms, 5s, 2m, 1h")
        .default(parseDuration(DEFAULT_INTERVAL), DEFAULT_INTERVAL)
        .argParser(parseDuration),
    )
    .option("--rate <size>", "bandwidth limit in bytes per second on the wire, with a K/M/G suffix (default: none)")
    .addOption(
      new Option("--level <n>", "zstd compression level of the data sent, 1-19 (default: 1)").argParser(parseLevel),
    )
    .addOption(dataOption())
    .action(async (volumes: string[], options: StartOptions, command: Command) => {
      const rate = options.rate === undefined ? null : await parseRate(options.rate, command);
      const status = (await request(resolveDataDir(options.data), {
        op: "replicateStart",
        volumes,
        to: options.to,
        mode: options.mode,
        intervalMs: options.interval,
        rate,
        level: options.level ?? null,
      })) as PairStatus;
      const limits = [
        status.mode,
        `every ${formatDuration(options.interval)}`,
        ...(rate === null ? [] : [`at most ${formatBytes(rate)}/s`]),
        ...(options.level === undefined ? [] : [`level ${options.level}`]),
      ];
      io.writeOut(
        `replicating ${status.volumes.join(", ")} to ${status.target} (${limits.join(", ")}): ${status.state}\n`,
      );
    });

  replicate
    .command("status")
    .description(
      "show every replication pair of this site's volume service: state, last complete generation, lag, bytes",
    )
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (options: DataOption & JsonOption) => {
      const dataDir = resolveDataDir(options.data);
      const pairs = (await request(dataDir, { op: "replicateStatus" })) as PairStatus[];
      if (options.json) return printJson(pairs);
      if (pairs.length === 0) {
        io.writeOut(`no replication pairs in ${dataDir}\n`);
        return;
      }
      io.writeOut(`${pairTable(pairs)}\n`);
    });

  replicate
    .command("sync")
    .summary("ship a generation now and wait until the target holds it")
    .description(
      "cut the volumes' consistency group now and return once the target site holds that generation completely",
    )
    .argument("<volumes...>", "volumes of one replication pair")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (volumes: string[], options: DataOption & JsonOption) => {
      const status = (await request(resolveDataDir(options.data), { op: "replicateSync", volumes })) as PairStatus;
      if (options.json) return printJson(status);
      io.writeOut(`${pairTable([status])}\n`);
    });

  replicate
    .command("stop")
    .summary("stop replicating volumes")
    .description(
      "stop the replication pair holding these volumes and forget it; what the target holds stays there (read-only)",
    )
    .argument("<volumes...>", "volumes of one replication pair")
    .addOption(dataOption())
    .action(async (volumes: string[], options: DataOption) => {
      const status = (await request(resolveDataDir(options.data), { op: "replicateStop", volumes })) as PairStatus;
      const held =
        status.lastCompleteGeneration === null
          ? "it holds no complete generation"
          : `it keeps generation ${status.lastCompleteGeneration}`;
      io.writeOut(`stopped replicating ${status.volumes.join(", ")} to ${status.target}; ${held}\n`);
    });

  replicate
    .command("promote")
    .summary("make replicas at this site writable (failover)")
    .description(
      "at the target site: make replicated volumes writable at the last generation they hold completely. A " +
        "generation still being applied is rolled back first, so each volume holds exactly what its source held " +
        "at that generation's cut; from then on the volume tracks its own writes and is no longer a replica. " +
        "Stop the pair at the source first (`ferry replicate stop`) when the source is still reachable. Works " +
        "through the running volume service of the data directory, or on the files when none runs.",
    )
    .argument("<volumes...>", "replica volume names at this site")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (volumes: string[], options: DataOption & JsonOption) => {
      const promoted = (await request(resolveDataDir(options.data), {
        op: "replicatePromote",
        volumes,
      })) as PromotedVolume[];
      if (options.json) return printJson(promoted);
      io.writeOut(
        `${formatTable(
          ["VOLUME", "GENERATION"],
          promoted.map((p) => [p.volume, p.generation]),
        )}\n`,
      );
      io.writeOut(
        `promoted ${promoted.map((p) => p.volume).join(", ")}: writable here at the generation shown, no longer replicas\n`,
      );
    });
}

/**
 * `--rate` in bytes per second, through the data plane's size parser (the one `--size` uses); a bad
 * value is bad usage, like every other option value of this command.
 */
async function parseRate(text: string, command: Command): Promise<number> {
  const native = await dataplane();
  let rate: number;
  try {
    rate = native.parseSize(text);
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    if (code !== "ERR_BAD_SIZE" || !(error instanceof Error)) throw error;
    command.error(`option '--rate <size>': ${error.message}`, {
      code: "commander.invalidArgument",
    });
  }
  // Zero would mean "never send": no limit is spelled by leaving the option out.
  if (rate === 0) {
    command.error(
      `option '--rate <size>' argument '${text}' is invalid. Give a rate above 0, e.g. 100M, or leave --rate out for no limit`,
      {
        code: "commander.invalidArgument",
      },
    );
  }
  return rate;
}

function pairTable(pairs: readonly PairStatus[]): string {
  const rows = pairs.map((p) => [
    p.volumes.join(","),
    p.target,
    p.mode,
    p.state,
    p.lastCompleteGeneration ?? "-",
    p.lastCompleteGeneration === null ? "-" : formatSeconds(p.lagSeconds),
    formatBytes(p.bytesRaw),
    formatBytes(p.bytesWire),
  ]);
  const table = formatTable(["VOLUMES", "TARGET", "MODE", "STATE", "LAST GEN", "LAG", "RAW", "WIRE"], rows);
  const errors = pairs.filter((p) => p.lastError !== null).map((p) => `${p.group}: ${p.lastError}`);
  return [table, ...errors].join("\n");
}

function formatSeconds(seconds: number): string {
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${Math.floor(seconds % 60)}s`;
  return `${Math.floor(seconds / 3600)}h${Math.floor((seconds % 3600) / 60)}m`;
}

function formatDuration(ms: number): string {
  for (const unit of ["h", "m", "s"] as const) {
    const factor = DURATION_UNITS_MS[unit] ?? 1;
    if (ms % factor === 0) return `${ms / factor}${unit}`;
  }
  return `${ms}ms`;
}
