/**
 * The two-site NATS topology Ferry replicates over (ARCHITECTURE §2, infra/nats/README.md), started
 * for a test: site A accepts the leafnode link, site B dials it through a `TestLinkProxy` so that a
 * test can partition and heal the link. Everything lives in one temp directory and is removed by
 * `stop()`; the servers are ended by their PIDs, and, should the test process exit without calling
 * `stop()`, killed by an exit guard.
 *
 * In vitest:
 *
 *     let sites: TwoSites;
 *     beforeAll(async () => { sites = await startTwoSites(); });
 *     afterAll(() => sites?.stop());
 *
 * `startTwoSites()` cleans up whatever it had started before it rejects, so a failing `beforeAll`
 * leaves nothing behind either.
 */
import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { onExit } from "./exit-guard.js";
import { freePort } from "./free-port.js";
import { type NatsCredentials, NatsSite, type Site } from "./nats-site.js";
import { type PartitionMode, TestLinkProxy } from "./test-link-proxy.js";
import { waitFor } from "./wait-for.js";

export interface SiteOptions {
  /** Site name and JetStream domain; default `site-a` / `site-b`. */
  name?: string;
  /** Default `eu-es` / `eu-de`. */
  region?: string;
}

export interface TwoSitesOptions {
  a?: SiteOptions;
  b?: SiteOptions;
  /** Where the `*.conf.tmpl` files are; default the repository's `infra/nats/`. */
  templateDir?: string;
  /** The server binary; default `nats-server` on PATH. */
  natsServer?: string;
  /**
   * Server ping interval (a Go duration); a dead leafnode link is noticed after three unanswered
   * pings. Default `10s`; a blackhole test wants `1s`.
   */
  pingInterval?: string;
  /** Bound on each wait (a server becoming healthy, the link forming, a graceful stop); default 20 s. */
  timeoutMs?: number;
}

export interface TwoSites {
  /** Accepts the leafnode link. */
  readonly a: Site;
  /** Dials the leafnode link (through `linkProxy`). */
  readonly b: Site;
  /** The temp directory holding both sites. */
  readonly dir: string;
  /** Test proxy between B's leafnode remote and A's leaf port. */
  readonly linkProxy: TestLinkProxy;
  /** Resolve once both servers report the leafnode connection; reject after the deadline. */
  waitForLink(timeoutMs?: number): Promise<void>;
  /** Resolve once neither server reports a leafnode connection; reject after the deadline. */
  waitForNoLink(timeoutMs?: number): Promise<void>;
  /**
   * Cut the link. `reset` (default) resolves once both servers have seen it go; `blackhole`
   * resolves at once — the servers notice only through their pings (see `pingInterval`).
   */
  partition(mode?: PartitionMode): Promise<void>;
  /** Restore the link and resolve once it is up again. */
  heal(): Promise<void>;
  /** Stop both servers and the proxy, remove the temp directory. Idempotent. */
  stop(): Promise<void>;
}

const DEFAULT_TEMPLATE_DIR = fileURLToPath(new URL("../../../infra/nats/", import.meta.url));

interface LeafzReport {
  leafnodes?: number;
}

export async function startTwoSites(options: TwoSitesOptions = {}): Promise<TwoSites> {
  const timeoutMs = options.timeoutMs ?? 20_000;
  const dir = await mkdtemp(join(tmpdir(), "ferry-nats-"));
  const releaseDirGuard = onExit(() => rmSync(dir, { recursive: true, force: true }));
  const started: NatsSite[] = [];
  let proxy: TestLinkProxy | undefined;
  let stopped = false;

  const stopAll = async (): Promise<void> => {
    const errors: unknown[] = [];
    // B first, so that A does not log a dropped link for a site that is going away anyway.
    for (const site of [...started].reverse()) await site.stop().catch((error) => errors.push(error));
    await proxy?.close();
    await rm(dir, { recursive: true, force: true });
    releaseDirGuard();
    if (errors.length > 0) throw errors[0];
  };

  try {
    const common = {
      templateDir: options.templateDir ?? DEFAULT_TEMPLATE_DIR,
      natsServer: options.natsServer ?? "nats-server",
      timeoutMs,
    };
    const leafPassword = secret();
    const pingInterval = options.pingInterval ?? "10s";
    const aLeafPort = await freePort();
    proxy = await TestLinkProxy.start({ port: aLeafPort });

    const aName = options.a?.name ?? "site-a";
    const bName = options.b?.name ?? "site-b";
    await Promise.all([mkdir(join(dir, aName)), mkdir(join(dir, bName))]);
    const a = new NatsSite({
      ...common,
      name: aName,
      region: options.a?.region ?? "eu-es",
      template: "site-a.conf.tmpl",
      dir: join(dir, aName),
      clientPort: await freePort(),
      monitorPort: await freePort(),
      leafPort: aLeafPort,
      users: siteUsers(),
      // A advertises the proxy: B would otherwise learn A's real leaf port and, on its next
      // reconnect, go around the proxy (and around any partition).
      values: { LEAF_PASSWORD: leafPassword, LEAF_ADVERTISE: `127.0.0.1:${proxy.port}`, PING_INTERVAL: pingInterval },
    });
    const b = new NatsSite({
      ...common,
      name: bName,
      region: options.b?.region ?? "eu-de",
      template: "site-b.conf.tmpl",
      dir: join(dir, bName),
      clientPort: await freePort(),
      monitorPort: await freePort(),
      users: siteUsers(),
      values: {
        LEAF_PASSWORD: leafPassword,
        LEAF_REMOTE: `127.0.0.1:${proxy.port}`,
        PING_INTERVAL: pingInterval,
      },
    });
    started.push(a, b);
    // Settle both before judging: cleaning up while the other start is still under way could race it.
    const starts = await Promise.allSettled([a.start(), b.start()]);
    for (const start of starts) if (start.status === "rejected") throw start.reason;

    const leafnodes = async (site: Site): Promise<number> => (await site.monitor<LeafzReport>("leafz")).leafnodes ?? 0;
    const linkProxy = proxy;
    const sites: TwoSites = {
      a,
      b,
      dir,
      linkProxy,
      async waitForLink(ms = timeoutMs) {
        await waitFor(
          `the leafnode link ${b.name} → ${a.name} (both /leafz report 1 leafnode)`,
          async () => (await leafnodes(a)) === 1 && (await leafnodes(b)) === 1,
          { timeoutMs: ms, intervalMs: 25 },
        );
      },
      async waitForNoLink(ms = timeoutMs) {
        await waitFor(
          `the leafnode link ${b.name} → ${a.name} to be gone (both /leafz report 0 leafnodes)`,
          async () => (await leafnodes(a)) === 0 && (await leafnodes(b)) === 0,
          { timeoutMs: ms, intervalMs: 25 },
        );
      },
      async partition(mode: PartitionMode = "reset") {
        linkProxy.partition(mode);
        if (mode === "reset") await sites.waitForNoLink();
      },
      async heal() {
        linkProxy.heal();
        await sites.waitForLink();
      },
      async stop() {
        if (stopped) return;
        stopped = true;
        await stopAll();
      },
    };
    await sites.waitForLink();
    return sites;
  } catch (error) {
    await stopAll().catch(() => {});
    throw error;
  }
}

function secret(): string {
  return randomBytes(12).toString("hex");
}

function siteUsers(): { ferryd: NatsCredentials; cli: NatsCredentials } {
  return { ferryd: { user: "ferryd", password: secret() }, cli: { user: "cli", password: secret() } };
}
