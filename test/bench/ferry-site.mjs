/**
 * Ferry as a bench run uses it between two sites: the `ferry` CLI run to completion against a data
 * dir, and `ferry volume serve` or ferryd joined to one NATS site of `startSitePair`
 * (@ferry/nats-sites). Every process goes through processes.mjs, so it is stopped by PID; the caller
 * owns stopping the service it gets back. `pairStatus` asks the running service directly, through
 * its control socket (the napi binding's `replicate`, what the CLI does inside), so that polling
 * costs no CLI start-up.
 */
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { replicate } from "../../packages/dataplane-native/binding.js";
import { runLogged, spawnLogged, waitForLine } from "./processes.mjs";

const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const FERRY_CLI = join(REPO, "packages/cli/bin/ferry.js");
/** Bound on every single command (a copy, a sync, a checksum), so that a hung tool cannot hang the run. */
export const COMMAND_TIMEOUT_MS = 600_000;

export const ferryArgs = (...args) => [FERRY_CLI, ...args];

/** Run the ferry CLI; returns its stdout (stderr goes to `dir/name.log`). */
export async function ferry(dir, name, args) {
  const out = join(dir, `${name}.out`);
  const label = `ferry ${args.slice(0, 2).join(" ")}`;
  await runLogged(label, process.execPath, ferryArgs(...args), join(dir, `${name}.log`), COMMAND_TIMEOUT_MS, {
    stdout: out,
  });
  return readFileSync(out, "utf8");
}

/**
 * `ferry volume serve` on `data` (a unix socket inside it) joined to `site` (a `startSitePair`
 * site: its name, region and NATS URL, passed as $FERRY_NATS), connected straight to the servers
 * of the `peers` sites (`--peer-nats`, the direct route). Resolves once it serves:
 * `{ child, uri(volume) }`.
 */
export async function serveSite(dir, site, data, peers = []) {
  const socket = join(data, "nbd.sock");
  const peerArgs = peers.flatMap((p) => ["--peer-nats", `${p.name}=${p.peerUrl}`]);
  const child = spawnLogged(
    `ferry volume serve (${site.name})`,
    process.execPath,
    ferryArgs(
      "volume",
      "serve",
      "--data",
      data,
      "--socket",
      socket,
      "--site",
      site.name,
      "--region",
      site.region,
      ...peerArgs,
    ),
    join(dir, `serve-${site.name}.log`),
    { env: { ...process.env, FERRY_NATS: site.url } },
  );
  try {
    await waitForLine(child, /serving \d+ volume/);
  } catch (error) {
    process.kill(child.pid, "SIGKILL");
    throw error;
  }
  return { child, uri: (volume) => `nbd+unix:///${volume}?socket=${socket}` };
}

/** The replication pair holding `volume`, as the service of `dataDir` reports it now. */
export async function pairStatus(dataDir, volume) {
  const pairs = JSON.parse(await replicate(dataDir, JSON.stringify({ op: "replicateStatus" })));
  const pair = pairs.find((p) => p.volumes.includes(volume));
  if (!pair) throw new Error(`no replication pair holds ${volume} at ${dataDir}`);
  return pair;
}

/**
 * ferryd (`ferry daemon`) of `site` (a `startSitePair` site) on `root`/ferryd-<site>, its socket in
 * there, with `args` added; resolves once its log has a line matching `ready`:
 * `{ child, data, socket, line }`.
 */
export async function startFerryd(root, site, { args = [], ready = /^ferryd: serving/ } = {}) {
  const data = join(root, `ferryd-${site.name}`);
  const socket = join(data, "nbd.sock");
  mkdirSync(data, { recursive: true });
  const child = spawnLogged(
    `ferryd (${site.name})`,
    process.execPath,
    ferryArgs("daemon", "--data", data, "--socket", socket, "--site", site.name, "--region", site.region, ...args),
    join(root, `ferryd-${site.name}.log`),
    { env: { ...process.env, FERRY_NATS: site.url } },
  );
  const line = await waitForLine(child, ready, 60_000);
  return { child, data, socket, line };
}
