/**
 * One site's `ferry volume serve` or `ferry daemon` (ferryd), joined to that site's nats-server, as
 * the tests start them: its data directory (a sandbox temp dir unless given) and its NBD socket
 * inside it.
 */
import { join } from "node:path";
import type { ProtectionStatus } from "@ferry/orchestrator";
import { type FerryCli, type FerryServe, type Sandbox, type Site, waitFor } from "@ferry/testkit";

/** A data directory and the `ferry volume serve` of one site. */
export interface SiteService {
  data: string;
  serve: FerryServe;
}

export interface ServeSiteOptions {
  /** Serve this data directory (a restart); default a new temp dir of the sandbox. */
  data?: string;
  /** More `ferry volume serve` arguments (`--allow-regions …`). */
  extra?: readonly string[];
}

export async function serveSite(
  ferry: FerryCli,
  sandbox: Sandbox,
  site: Site,
  options: ServeSiteOptions = {},
): Promise<SiteService> {
  return startSiteService(ferry, sandbox, site, "serve", options);
}

/** ferryd (`ferry daemon`) of one site; `extra` e.g. `--metrics 127.0.0.1:0`. */
export async function daemonSite(
  ferry: FerryCli,
  sandbox: Sandbox,
  site: Site,
  options: ServeSiteOptions = {},
): Promise<SiteService> {
  return startSiteService(ferry, sandbox, site, "daemon", options);
}

async function startSiteService(
  ferry: FerryCli,
  sandbox: Sandbox,
  site: Site,
  command: "serve" | "daemon",
  options: ServeSiteOptions,
): Promise<SiteService> {
  const data = options.data ?? (await sandbox.dir(`ferry-${site.name}-`));
  const args = [
    "--data",
    data,
    "--socket",
    join(data, "nbd.sock"),
    "--site",
    site.name,
    "--region",
    site.region,
    "--nats",
    site.url,
    ...(options.extra ?? []),
  ];
  const serve = await (command === "serve" ? ferry.serve(args) : ferry.daemon(args));
  return { data, serve };
}

/** `ferry` arguments against one site's ferryd, as that site's `cli` user (global options after the command). */
export function atSite(site: Site, args: readonly string[]): string[] {
  return [...args, "--nats", site.cliUrl, "--site", site.name];
}

/**
 * Wait until `site` (the source) sees a recovery point of `app` cut after `sinceMs` (the writes
 * before it are in) — at `target` when given, else at its first target.
 */
export async function pointAfter(
  ferry: FerryCli,
  site: Site,
  app: string,
  sinceMs: number,
  target?: string,
): Promise<void> {
  await waitFor(
    `a recovery point of ${app}${target === undefined ? "" : ` at ${target}`} newer than the last write`,
    async () => {
      const rows = await ferry.json<ProtectionStatus[]>(atSite(site, ["status", app]));
      const p = rows.find(
        (r) => r.source === site.name && (target === undefined || r.target === target),
      )?.lastRecoveryPoint;
      return p !== null && p !== undefined && p.atMs > sinceMs;
    },
    { timeoutMs: 30_000 },
  );
}

/** Wait until `site`'s ferryd knows `count` sites (itself included), as `ferry site list` shows. */
export async function waitForSites(ferry: FerryCli, site: Site, count: number): Promise<void> {
  await waitFor(
    `site ${site.name} to know ${count} sites`,
    async () => (await ferry.json<{ name: string }[]>(atSite(site, ["site", "list"]))).length === count,
    { timeoutMs: 20_000 },
  );
}
