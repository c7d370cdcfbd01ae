/**
 * One site's `ferry volume serve`, joined to that site's nats-server, as the replication tests
 * start it: its data directory (a sandbox temp dir unless given) and its NBD socket inside it.
 */
import { join } from "node:path";
import type { FerryCli, FerryServe, Sandbox, Site } from "@ferry/testkit";

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
  const data = options.data ?? (await sandbox.dir(`ferry-${site.name}-`));
  const serve = await ferry.serve([
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
  ]);
  return { data, serve };
}
