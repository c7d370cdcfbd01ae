/**
 * `ferry replicate …`: start, watch, force and stop replication of volumes to another site
 * (asynchronous generations or synchronous writes), promote replicas at the target (failover),
 * replicate back after a failover, and list a target's recovery points. The running volume service
 * of the data directory does the work (to replicate, it must have joined a site: `ferry volume serve
 * --site … --region … --nats …`); this file owns only arguments and presentation, and never talks to
 * NATS itself.
 */

// The data plane's answers, as the orchestrator types them.
import type { PairStatus, PromotedVolume, ReplicaPoints } from "@ferry/orchestrator";
import { type Command, InvalidArgumentError, Option } from "commander";
import { formatBytes } from "../bytes.js";
import { resolveDataDir } from "../data-dir.js";
import { dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { type DataOption, dataOption, type JsonOption, jsonOption } from "./volume.js";

export type { PairStatus, PromotedVolume, ReplicaPoints };

const MODES = ["async", "sync"] as const;
const ON_LOSS = ["suspend", "block"] as const;
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
  toNode?: string;
  mode: (typeof MODES)[number];
  interval: number;
  rate?: string;
  level?: number;
  onPeerLoss?: (typeof ON_LOSS)[number];
  /** `--on-loss`, the hidden older spelling of `--on-peer-loss`. */
  onLoss?: (typeof ON_LOSS)[number];
  blockTimeout?: number;
  recoveryPoints?: number;
  maxMessage?: string;
}

/** A whole number in `[min, max]`, for options. */
function parseCount(min: number, max: number, what: string): (text: string) => number {
  return (text) => {
    const n = Number(text);
    if (!/^\d+$/.test(text) || n < min || n > max) {
      throw new InvalidArgumentError(`'${text}' is not ${what}: use a whole number from ${min} to ${max}`);
    }
    return n;
  };
}

/** The sync pair's policy for a lost target, from either spelling of the option. */
function onPeerLoss(options: StartOptions): (typeof ON_LOSS)[number] | undefined {
  return options.onPeerLoss ?? options.onLoss;
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
        "then one generation every --interval. Idempotent for the same volumes and site. A volume may replicate to " +
        "several sites, each pair from its own cuts and on its own schedule; synchronously to one of them at most.",
    )
    .argument("<volumes...>", "volume names at this site")
    .requiredOption("--to <site>", "the site to replicate to")
    .option(
      "--to-node <node>",
      "the node of that site to replicate to, when it runs several volume services (`ferry volume serve --node`)",
    )
    .addOption(
      new Option(
        "--mode <mode>",
        "async: ship a generation every --interval; sync: once caught up, every write waits until the target " +
          "applied it (zero data loss), and a generation is marked complete every --interval",
      )
        .choices(MODES)
        .makeOptionMandatory(),
    )
    .addOption(
      new Option(
        "--interval <duration>",
        "time between generations, and the lag the pair keeps under (a cut starts early by twice the last one's time): 500ms, 5s, 2m, 1h",
      )
        .default(parseDuration(DEFAULT_INTERVAL), DEFAULT_INTERVAL)
        .argParser(parseDuration),
    )
    .option("--rate <size>", "bandwidth limit in bytes per second on the wire, with a K/M/G suffix (default: none)")
    .addOption(
      new Option("--level <n>", "zstd compression level of the data sent, 1-19 (default: 1)").argParser(parseLevel),
    )
    .addOption(
      new Option(
        "--on-peer-loss <policy>",
        "sync: when the target is unreachable, suspend (writes go on here, tracked, and only what changed is " +
          "resynced when it is back; the default) or block (writes wait --block-timeout, then fail with EIO)",
      ).choices(ON_LOSS),
    )
    .addOption(new Option("--on-loss <policy>", "the same as --on-peer-loss").choices(ON_LOSS).hideHelp())
    .addOption(
      new Option("--block-timeout <duration>", "sync with --on-peer-loss block: how long a write waits for the target")
        .default(parseDuration("30s"), "30s")
        .argParser(parseDuration),
    )
    .addOption(
      new Option(
        "--recovery-points <n>",
        "complete generations the target keeps, the last one included (default: 3)",
      ).argParser(parseCount(1, 1000, "a number of recovery points")),
    )
    .option(
      "--max-message <size>",
      "largest message on the wire, never above the NATS server's max_payload (default: 1M)",
    )
    .addOption(dataOption())
    .action(async (volumes: string[], options: StartOptions, command: Command) => {
      const { status, rate } = await startPair(volumes, options, command, false);
      const limits = [
        status.mode,
        `every ${formatDuration(options.interval)}`,
        ...(rate === null ? [] : [`at most ${formatBytes(rate)}/s`]),
        ...(options.level === undefined ? [] : [`level ${options.level}`]),
        ...(options.mode === "sync" ? [`on peer loss ${onPeerLoss(options) ?? "suspend"}`] : []),
      ];
      io.writeOut(
        `replicating ${status.volumes.join(", ")} to ${targetOf(status)} (${limits.join(", ")}): ${status.state}\n`,
      );
    });

  const startPair = async (
    volumes: string[],
    options: StartOptions,
    command: Command,
    reverse: boolean,
  ): Promise<{ status: PairStatus; rate: number | null }> => {
    const rate = options.rate === undefined ? null : await parseRate(options.rate, command);
    const maxMessage =
      options.maxMessage === undefined ? null : await parseSizeOption("--max-message", options.maxMessage, command);
    if (onPeerLoss(options) !== undefined && options.mode !== "sync") {
      command.error("option '--on-peer-loss <policy>' only applies to --mode sync", {
        code: "commander.invalidArgument",
      });
    }
    const status = (await request(resolveDataDir(options.data), {
      op: "replicateStart",
      volumes,
      to: options.to,
      toNode: options.toNode ?? null,
      mode: options.mode,
      intervalMs: options.interval,
      rate,
      level: options.level ?? null,
      onLoss: onPeerLoss(options) ?? null,
      blockTimeoutMs: options.blockTimeout ?? null,
      recoveryPoints: options.recoveryPoints ?? null,
      maxMessage,
      reverse,
    })) as PairStatus;
    return { status, rate };
  };

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
    .addOption(toOption())
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (volumes: string[], options: DataOption & JsonOption & { to?: string }) => {
      const status = (await request(resolveDataDir(options.data), {
        op: "replicateSync",
        volumes,
        to: options.to ?? null,
      })) as PairStatus;
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
    .addOption(toOption())
    .addOption(dataOption())
    .action(async (volumes: string[], options: DataOption & { to?: string }) => {
      const status = (await request(resolveDataDir(options.data), {
        op: "replicateStop",
        volumes,
        to: options.to ?? null,
      })) as PairStatus;
      const held =
        status.lastCompleteGeneration === null
          ? "it holds no complete generation"
          : `it keeps generation ${status.lastCompleteGeneration}`;
      io.writeOut(`stopped replicating ${status.volumes.join(", ")} to ${targetOf(status)}; ${held}\n`);
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
    .addOption(
      new Option(
        "--back <n>",
        "promote at an older recovery point: n complete generations before the last (see `replicate points`)",
      )
        .default(0)
        .argParser(parseCount(0, 1000, "a number of recovery points to go back")),
    )
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (volumes: string[], options: DataOption & JsonOption & { back: number }) => {
      const promoted = (await request(resolveDataDir(options.data), {
        op: "replicatePromote",
        volumes,
        back: options.back,
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

  replicate
    .command("reverse")
    .summary("after a failover, replicate promoted volumes back to the site they came from")
    .description(
      "run at the site whose replicas were promoted: start replicating the volumes back to their former source. " +
        "There they become replicas again (stop that site's own pair for them first), and only the union of what " +
        "changed there after the last generation it shipped and what changed here since the promotion is sent; " +
        "where that history cannot be proven, block hashes decide. Takes the options of `replicate start`.",
    )
    .argument("<volumes...>", "promoted volumes at this site, as one consistency group")
    .requiredOption("--to <site>", "the site the volumes were promoted from")
    .option("--to-node <node>", "the node of that site holding the volumes, when it runs several volume services")
    .addOption(new Option("--mode <mode>", "async or sync, as for `replicate start`").choices(MODES).default("async"))
    .addOption(
      new Option(
        "--interval <duration>",
        "time between generations, and the lag the pair keeps under (a cut starts early by twice the last one's time): 500ms, 5s, 2m, 1h",
      )
        .default(parseDuration(DEFAULT_INTERVAL), DEFAULT_INTERVAL)
        .argParser(parseDuration),
    )
    .option("--rate <size>", "bandwidth limit in bytes per second on the wire (default: none)")
    .addOption(dataOption())
    .action(async (volumes: string[], options: StartOptions, command: Command) => {
      const { status } = await startPair(volumes, options, command, true);
      io.writeOut(
        `replicating ${status.volumes.join(", ")} back to ${targetOf(status)} (${status.mode}, every ${formatDuration(options.interval)}): ${status.state}\n`,
      );
    });

  replicate
    .command("points")
    .summary("list the recovery points of replicas at this (target) site")
    .description(
      "list, for each replica, the complete generations it can be promoted at: BACK 0 is the last complete one, " +
        "BACK n the n-th before it (`replicate promote --back n`). Volumes of one group share their points.",
    )
    .argument("<volumes...>", "replicas at this site")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (volumes: string[], options: DataOption & JsonOption) => {
      const replicas = (await request(resolveDataDir(options.data), {
        op: "replicaPoints",
        volumes,
      })) as ReplicaPoints[];
      if (options.json) return printJson(replicas);
      const rows = replicas.flatMap((r) =>
        r.points.map((p) => [r.volume, r.sourceSite, p.back, p.generation, new Date(p.atMs).toISOString()]),
      );
      io.writeOut(`${formatTable(["VOLUME", "FROM", "BACK", "GENERATION", "COMPLETED"], rows)}\n`);
    });
}

/** A size option (`1M`, `64K`) through the data plane's size parser; a bad value is bad usage. */
async function parseSizeOption(flag: string, text: string, command: Command): Promise<number> {
  const native = await dataplane();
  try {
    return native.parseSize(text);
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    if (code !== "ERR_BAD_SIZE" || !(error instanceof Error)) throw error;
    command.error(`option '${flag} <size>': ${error.message}`, {
      code: "commander.invalidArgument",
    });
  }
}

/**
 * `--rate` in bytes per second, through the data plane's size parser (the one `--size` uses); a bad
 * value is bad usage, like every other option value of this command.
 */
async function parseRate(text: string, command: Command): Promise<number> {
  const rate = await parseSizeOption("--rate", text, command);
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
    targetOf(p),
    p.syncState === undefined ? p.mode : `${p.mode} (${p.syncState})`,
    p.state,
    p.lastCompleteGeneration ?? "-",
    p.lastCompleteGeneration === null ? "-" : formatSeconds(p.lagSeconds),
    formatBytes(p.bytesRaw),
    formatBytes(p.bytesWire),
    p.bytesWire === 0 ? "-" : `${p.compressionRatio.toFixed(1)}x`,
    // direct: to the target's own server (--peer-nats); leafnode: through this site's and the link.
    p.route || "-",
  ]);
  const table = formatTable(
    ["VOLUMES", "TARGET", "MODE", "STATE", "LAST GEN", "LAG", "RAW", "WIRE", "RATIO", "ROUTE"],
    rows,
  );
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

/** `--to` of the commands that act on one pair: needed when the volumes replicate to several sites. */
function toOption(): Option {
  return new Option("--to <site>", "the pair's target site, when the volumes replicate to several");
}

/** A pair's target: its site, and the node there when the site has several. */
function targetOf(p: PairStatus): string {
  return p.targetNode === undefined ? p.target : `${p.target} (node ${p.targetNode})`;
}
