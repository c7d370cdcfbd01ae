/**
 * `ferry volume serve`: run the volume service in the foreground until SIGTERM or SIGINT, then stop
 * it cleanly (in-flight requests finish, bitmaps are persisted) and return. The service runs on the
 * data plane's own threads; this function only starts it, reports where it listens and waits.
 * With a site to join, the service also sends and receives replication over that site's NATS.
 */
import { natsHost } from "@ferry/orchestrator";
import { type Command, Option } from "commander";
import { dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";

export const DEFAULT_LISTEN = "127.0.0.1:10809";
export const SITE_ENV = "FERRY_SITE";
export const NATS_ENV = "FERRY_NATS";

/** The site a service joins for replication: all of it, or none (`SiteOptions` → `joinedSite`). */
export interface SiteJoin {
  site: string;
  region: string;
  /** `nats://user:password@host:port` of the site's NATS server (user ferryd). */
  nats: string;
  /** Regions allowed to hold copies of this site's volumes; empty means any. */
  allowRegions: string[];
  /** Other sites' servers as `SITE=URL` (user peer): replication to SITE goes straight there. */
  peerNats: string[];
  /** This service's node in the site, when the site has several services (ferryds). */
  node?: string | undefined;
}

export interface ServeRequest {
  dataDir: string;
  listen?: string | undefined;
  socket?: string | undefined;
  join?: SiteJoin | undefined;
  /** Benchmarks only: no changed-block tracking (every volume is wholly dirty). */
  untracked?: boolean | undefined;
}

/** The serve command's site options as commander leaves them, and where each value came from. */
export interface SiteOptions {
  site?: string | undefined;
  region?: string | undefined;
  nats?: string | undefined;
  allowRegions?: string | undefined;
  peerNats?: string[] | undefined;
  node?: string | undefined;
  /** `env` when the value came from $FERRY_SITE / $FERRY_NATS rather than the command line. */
  sourceOf(option: "site" | "region" | "nats"): string | undefined;
}

/**
 * The site options of a serving command: --site and --nats are global (the program's, maybe from
 * the environment), --region and --allow-regions the command's own.
 */
export function siteOptions(
  command: Command,
  own: {
    region?: string | undefined;
    allowRegions?: string | undefined;
    peerNats?: string[] | undefined;
    node?: string | undefined;
  },
): SiteOptions {
  let root = command;
  while (root.parent) root = root.parent;
  const globals = command.optsWithGlobals<{ site?: string; nats?: string }>();
  return {
    site: globals.site,
    nats: globals.nats,
    region: own.region,
    allowRegions: own.allowRegions,
    peerNats: own.peerNats,
    node: own.node,
    sourceOf: (o) => (o === "region" ? command.getOptionValueSource(o) : root.getOptionValueSource(o)),
  };
}

/** Where the serving commands also read `--peer-nats` values (space-separated), keeping passwords off the command line. */
export const PEER_NATS_ENV = "FERRY_PEER_NATS";

/** The repeatable `--peer-nats SITE=URL` option of the serving commands (or $FERRY_PEER_NATS). */
export function peerNatsOption(): Option {
  return new Option(
    "--peer-nats <site=url>",
    "also connect straight to another site's NATS server (its user peer, nats://peer:password@host:port) and send " +
      "replication to that site there: one server relays each message instead of two, which shortens every " +
      "synchronous write; the leafnode route is used whenever that connection is down (repeat per site; in " +
      `$${PEER_NATS_ENV}, separate them by spaces)`,
  )
    .env(PEER_NATS_ENV)
    .argParser((value: string, all: string[]) => [...all, ...value.split(/\s+/).filter((v) => v !== "")])
    .default([] as string[]);
}

/**
 * `--peer-nats` values checked by the data plane, which parses them again when the service starts:
 * SITE=URL, a NATS URL, never this site, each site once.
 */
async function peerNats(site: string, peers: readonly string[]): Promise<string[]> {
  const native = await dataplane();
  try {
    native.checkPeerNats(site, [...peers]);
  } catch (error) {
    if ((error as { code?: unknown }).code === "ERR_INVALID_ARGUMENT" && error instanceof Error) {
      throw new SiteOptionsError(error.message.replace(/^invalid argument: /, ""));
    }
    throw error;
  }
  return [...peers];
}

/** A node name is one NATS subject token, as a site name is. */
const NODE_NAME = /^[A-Za-z0-9_-]{1,64}$/;

/** The `--node` option of the serving commands. */
export function nodeOption(): Option {
  return new Option(
    "--node <name>",
    "this service's node in its site, when the site runs several (one ferryd per host): replication for the " +
      "volumes it holds is addressed to it; every service of a site needs its own node name",
  );
}

/** Thrown for a combination of site options that cannot work; the command reports it as bad usage. */
export class SiteOptionsError extends Error {}

/**
 * The site to join, or undefined for a service that does not replicate. --site, --region and --nats
 * go together: a service with only some of them could neither ship nor receive, so it is refused
 * before anything starts.
 */
export async function joinedSite(options: SiteOptions): Promise<SiteJoin | undefined> {
  const given = (["site", "region", "nats"] as const).filter((o) => options[o] !== undefined);
  if (given.length === 0) {
    if (options.allowRegions !== undefined) {
      throw new SiteOptionsError(
        "--allow-regions applies to a service that joins a site: add --site, --region and --nats",
      );
    }
    if ((options.peerNats ?? []).length > 0) {
      throw new SiteOptionsError(
        `--peer-nats (or $${PEER_NATS_ENV}) applies to a service that joins a site: add --site, --region and --nats`,
      );
    }
    if (options.node !== undefined) {
      throw new SiteOptionsError("--node applies to a service that joins a site: add --site, --region and --nats");
    }
    return undefined;
  }
  const { site, region, nats } = options;
  if (site === undefined || region === undefined || nats === undefined) {
    const missing = (["site", "region", "nats"] as const).filter((o) => options[o] === undefined);
    const fromEnv = given
      .filter((o) => options.sourceOf(o) === "env")
      .map((o) => `--${o} came from $${o === "site" ? SITE_ENV : NATS_ENV}`);
    throw new SiteOptionsError(
      `--site, --region and --nats go together: ${missing.map((o) => `--${o}`).join(" and ")} ${missing.length === 1 ? "is" : "are"} missing` +
        `${fromEnv.length > 0 ? ` (${fromEnv.join(", ")})` : ""}; give all three to join a site for replication, or none`,
    );
  }
  for (const [option, value] of [
    ["--site", site],
    ["--region", region],
  ] as const) {
    if (value.trim() === "") throw new SiteOptionsError(`${option} is empty: give a name, e.g. ${option} eu-es`);
  }
  let allowRegions: string[] = [];
  if (options.allowRegions !== undefined) {
    allowRegions = options.allowRegions
      .split(",")
      .map((r) => r.trim())
      .filter((r) => r !== "");
    if (allowRegions.length === 0) {
      throw new SiteOptionsError(
        `--allow-regions '${options.allowRegions}' names no region: give a comma-separated list, e.g. eu-es,eu-de, or leave it out to allow any`,
      );
    }
  }
  const node = options.node;
  if (node !== undefined && !NODE_NAME.test(node)) {
    throw new SiteOptionsError(
      `--node '${node}' is not a valid node name: use letters, digits, '-' and '_' (at most 64), e.g. --node n2`,
    );
  }
  return { site, region, nats, allowRegions, peerNats: await peerNats(site, options.peerNats ?? []), node };
}

const STOP_SIGNALS = ["SIGTERM", "SIGINT"] as const;
type StopSignal = (typeof STOP_SIGNALS)[number];

/** A started volume service and the line that says where it serves. */
export async function startService(request: ServeRequest) {
  const { startVolumeService } = await dataplane();
  const listen = request.listen ?? (request.socket === undefined ? DEFAULT_LISTEN : undefined);
  const service = await startVolumeService({
    dataDir: request.dataDir,
    listen,
    socket: request.socket,
    untracked: request.untracked,
    site: request.join?.site,
    region: request.join?.region,
    nats: request.join?.nats,
    node: request.join?.node,
    allowRegions: request.join?.allowRegions,
    peers: request.join?.peerNats,
  });
  const names = service.volumeNames;
  const where: string[] = [];
  if (service.tcpAddress) where.push(`nbd://${service.tcpAddress}/`);
  if (service.socketPath)
    where.push(where.length > 0 ? `(unix socket ${service.socketPath})` : `nbd+unix:///?socket=${service.socketPath}`);
  const list = names.length > 0 ? ` (${names.join(", ")})` : "";
  const serving = `serving ${names.length} volume${names.length === 1 ? "" : "s"}${list} on ${where.join(" ")}${siteNote(request)}`;
  return { service, serving };
}

export async function serveVolumes(request: ServeRequest, io: ProgramIo): Promise<void> {
  const { service, serving } = await startService(request);
  io.writeOut(`ferry: ${serving}\n`);
  const signal = await nextStopSignal();
  io.writeErr(`ferry: ${signal} received, stopping the volume service\n`);
  await stopOnce(io, () => service.stop());
}

/** Run a clean stop; a second signal meanwhile means "now": leave with failure rather than hang. */
export async function stopOnce(io: ProgramIo, stop: () => Promise<void>): Promise<void> {
  const force = (again: StopSignal) => {
    io.writeErr(`ferry: ${again} received again, exiting without a clean stop\n`);
    process.exit(1);
  };
  for (const s of STOP_SIGNALS) process.once(s, force);
  try {
    await stop();
  } finally {
    for (const s of STOP_SIGNALS) process.off(s, force);
  }
}

/** Where the service replicates from; the NATS password never reaches the output. */
function siteNote({ join, untracked }: ServeRequest): string {
  let note = "";
  if (join) {
    const allowed = join.allowRegions.length > 0 ? `, copies only to ${join.allowRegions.join(", ")}` : "";
    note += ` as site ${join.site}${join.node === undefined ? "" : ` node ${join.node}`} (region ${join.region}${allowed}) via NATS ${natsHost(join.nats)}`;
    const direct = join.peerNats.map((p) => {
      const [site, url] = [p.slice(0, p.indexOf("=")), p.slice(p.indexOf("=") + 1)];
      return `${site} at ${natsHost(url)}`;
    });
    if (direct.length > 0) note += `, direct to ${direct.join(", ")}`;
  }
  if (untracked) note += " without changed-block tracking (benchmarks only)";
  return note;
}

export function nextStopSignal(): Promise<StopSignal> {
  return new Promise((resolve) => {
    // Signal listeners do not keep Node's event loop alive by themselves, and the service runs on
    // native threads; this timer is what keeps the process waiting.
    const keepAlive = setInterval(() => {}, 2 ** 30);
    const handlers = STOP_SIGNALS.map((signal) => {
      const handler = () => {
        clearInterval(keepAlive);
        for (const [s, h] of handlers) process.off(s, h);
        resolve(signal);
      };
      return [signal, handler] as const;
    });
    for (const [s, h] of handlers) process.once(s, h);
  });
}
