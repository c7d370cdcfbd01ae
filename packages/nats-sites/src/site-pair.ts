/**
 * The two-site NATS topology Ferry replicates over (ARCHITECTURE §2, infra/nats/README.md), started
 * on this machine's loopback: site A accepts the leafnode link, site B dials it, each site is its
 * own JetStream domain with users `ferryd`, `cli` and `peer` (random passwords). Everything lives in one
 * temp directory that `stop()` removes; the servers are ended by their PIDs, and, should the
 * process exit without calling `stop()`, killed by an exit guard.
 *
 * `startSitePair()` cleans up whatever it had started before it rejects, so a failed start leaves
 * nothing behind either. It never reaches beyond loopback.
 */
import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { NatsServerFailed } from "./errors.js";
import { onExit } from "./exit-guard.js";
import { freePort } from "./free-port.js";
import { NatsSite, type Site, type SiteUsers } from "./nats-site.js";
import { waitFor } from "./wait-for.js";

export interface SiteOptions {
  /** Site name and JetStream domain; default `site-a` / `site-b`. */
  name?: string;
  /** Default `eu-es` / `eu-de`. */
  region?: string;
}

/** Something B dials instead of A's leaf port, forwarding to it (a test's partition proxy). */
export interface LinkFront {
  readonly port: number;
  close(): Promise<void>;
}

export interface SitePairOptions {
  a?: SiteOptions;
  b?: SiteOptions;
  /**
   * A third site, started only when given: it dials A's leaf port directly (like B, but never
   * through the link front), so all three share the account. The demo uses it to show a residency
   * refusal. Default name `site-c`, region `us-east`.
   */
  c?: SiteOptions;
  /** Where the `*.conf.tmpl` files are; default the repository's `infra/nats/`. */
  templateDir?: string;
  /** The server binary; default `nats-server` on PATH. */
  natsServer?: string;
  /**
   * Server ping interval (a Go duration); a dead leafnode link is noticed after three unanswered
   * pings. Default `10s`.
   */
  pingInterval?: string;
  /** Bound on each wait (a server becoming healthy, the link forming, a graceful stop); default 20 s. */
  timeoutMs?: number;
  /** Where the pair's temp directory is created; default the OS temp directory. */
  parentDir?: string;
  /**
   * Started with A's leaf port before the servers: B dials the front's port and A advertises it.
   * `stop()` closes it. Default: none, B dials A's leaf port directly.
   */
  linkFront?: (aLeafPort: number) => Promise<LinkFront>;
}

export interface SitePair {
  /** Accepts the leafnode link. */
  readonly a: Site;
  /** Dials the leafnode link. */
  readonly b: Site;
  /** The optional third site (`SitePairOptions.c`); dials A's leaf port. */
  readonly c?: Site;
  /** The temp directory holding both sites. */
  readonly dir: string;
  /** Resolve once both servers report the leafnode connection; reject after the deadline. */
  waitForLink(timeoutMs?: number): Promise<void>;
  /** Resolve once neither server reports a leafnode connection; reject after the deadline. */
  waitForNoLink(timeoutMs?: number): Promise<void>;
  /** Stop both servers (B first) and the link front, remove the temp directory. Idempotent. */
  stop(): Promise<void>;
}

const DEFAULT_TEMPLATE_DIR = fileURLToPath(new URL("../../../infra/nats/", import.meta.url));

interface LeafzReport {
  leafnodes?: number;
}

/** Starts of a pair before a port taken by another process (between picking it and binding) is fatal. */
const PORT_ATTEMPTS = 3;

/** Start both sites and resolve once the leafnode link between them is up. */
export async function startSitePair(options: SitePairOptions = {}): Promise<SitePair> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startSitePairOnce(options);
    } catch (error) {
      // The ports were free a moment ago; another process may have taken one since.
      const portTaken = error instanceof NatsServerFailed && error.logTail.includes("address already in use");
      if (!portTaken || attempt >= PORT_ATTEMPTS) throw error;
    }
  }
}

async function startSitePairOnce(options: SitePairOptions): Promise<SitePair> {
  const timeoutMs = options.timeoutMs ?? 20_000;
  const dir = await mkdtemp(join(options.parentDir ?? tmpdir(), "ferry-nats-"));
  const releaseDirGuard = onExit(() => rmSync(dir, { recursive: true, force: true }));
  const started: NatsSite[] = [];
  let front: LinkFront | undefined;
  let stopped = false;

  const stopAll = async (): Promise<void> => {
    const errors: unknown[] = [];
    // B first, so that A does not log a dropped link for a site that is going away anyway.
    for (const site of [...started].reverse()) await site.stop().catch((error) => errors.push(error));
    await front?.close();
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
    front = await options.linkFront?.(aLeafPort);
    // A advertises what B dials: B would otherwise learn A's real leaf port and, on its next
    // reconnect, go around the front (and around any partition a test made there).
    const leafAddress = `127.0.0.1:${front?.port ?? aLeafPort}`;

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
      values: { LEAF_PASSWORD: leafPassword, LEAF_ADVERTISE: leafAddress, PING_INTERVAL: pingInterval },
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
      values: { LEAF_PASSWORD: leafPassword, LEAF_REMOTE: leafAddress, PING_INTERVAL: pingInterval },
    });
    let c: NatsSite | undefined;
    if (options.c !== undefined) {
      const cName = options.c.name ?? "site-c";
      await mkdir(join(dir, cName));
      c = new NatsSite({
        ...common,
        name: cName,
        region: options.c.region ?? "us-east",
        template: "site-b.conf.tmpl",
        dir: join(dir, cName),
        clientPort: await freePort(),
        monitorPort: await freePort(),
        users: siteUsers(),
        values: { LEAF_PASSWORD: leafPassword, LEAF_REMOTE: `127.0.0.1:${aLeafPort}`, PING_INTERVAL: pingInterval },
      });
    }
    started.push(a, b, ...(c === undefined ? [] : [c]));
    // Settle all before judging: cleaning up while another start is still under way could race it.
    const starts = await Promise.allSettled(started.map((site) => site.start()));
    for (const start of starts) if (start.status === "rejected") throw start.reason;

    const leafnodes = async (site: Site): Promise<number> => (await site.monitor<LeafzReport>("leafz")).leafnodes ?? 0;
    const pair: SitePair = {
      a,
      b,
      ...(c === undefined ? {} : { c }),
      dir,
      async waitForLink(ms = timeoutMs) {
        await waitFor(
          `the leafnode link ${b.name} → ${a.name} (both /leafz report 1 leafnode)`,
          async () => (await leafnodes(a)) === 1 + (c ? 1 : 0) && (await leafnodes(b)) === 1,
          { timeoutMs: ms, intervalMs: 25 },
        );
        if (c) {
          await waitFor(`the leafnode link ${c.name} → ${a.name}`, async () => (await leafnodes(c)) === 1, {
            timeoutMs: ms,
            intervalMs: 25,
          });
        }
      },
      async waitForNoLink(ms = timeoutMs) {
        await waitFor(
          `the leafnode link ${b.name} → ${a.name} to be gone (both /leafz report 0 leafnodes)`,
          async () => (await leafnodes(a)) === (c ? 1 : 0) && (await leafnodes(b)) === 0,
          { timeoutMs: ms, intervalMs: 25 },
        );
      },
      async stop() {
        if (stopped) return;
        stopped = true;
        await stopAll();
      },
    };
    await pair.waitForLink();
    return pair;
  } catch (error) {
    await stopAll().catch(() => {});
    throw error;
  }
}

function secret(): string {
  return randomBytes(12).toString("hex");
}

function siteUsers(): SiteUsers {
  return {
    ferryd: { user: "ferryd", password: secret() },
    cli: { user: "cli", password: secret() },
    peer: { user: "peer", password: secret() },
  };
}
