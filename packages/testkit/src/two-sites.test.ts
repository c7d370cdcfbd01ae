import { createHash, randomBytes } from "node:crypto";
import { access, cp, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { NatsCredentials, Site } from "@ferry/nats-sites";
import { isAlive, waitFor } from "@ferry/nats-sites";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startTwoSites, type TwoSites } from "./two-sites.js";

const MIB = 1024 * 1024;
const TEMPLATES = fileURLToPath(new URL("../../../infra/nats/", import.meta.url));

/** PIDs of running processes whose command line mentions `text`. */
async function processesMentioning(text: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (cmdline.includes(text)) pids.push(Number(entry));
  }
  return pids;
}

const connections: NatsConnection[] = [];

async function client(site: Site, user: "ferryd" | "cli" = "ferryd"): Promise<NatsConnection> {
  const credentials: NatsCredentials = site.users[user];
  const nc = await connect({
    servers: site.server,
    user: credentials.user,
    pass: credentials.password,
    name: `testkit-${site.name}-${user}`,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 100,
  });
  connections.push(nc);
  return nc;
}

afterEach(async () => {
  await Promise.all(connections.splice(0).map((nc) => nc.close()));
});

/** A responder that answers every request on `subject` with `<site>:<payload>`. */
function echo(nc: NatsConnection, subject: string, site: string): Subscription {
  return nc.subscribe(subject, {
    callback: (error, msg) => {
      if (!error) msg.respond(Buffer.concat([Buffer.from(`${site}:`), msg.data]));
    },
  });
}

/**
 * A request that is retried until it is answered: interest crosses the leafnode asynchronously, so
 * right after a (re)connect the other site may not know about a responder yet.
 */
async function requestUntilAnswered(nc: NatsConnection, subject: string, data: Uint8Array, timeoutMs = 10_000) {
  return waitFor(`an answer on ${subject}`, () => nc.request(subject, data, { timeout: 1_000 }), {
    timeoutMs,
    intervalMs: 50,
  });
}

describe("startTwoSites", () => {
  let sites: TwoSites;
  beforeAll(async () => {
    sites = await startTwoSites();
  });
  afterAll(() => sites?.stop());

  it("starts both sites, each its own JetStream domain, with the leafnode link up", async () => {
    const { a, b } = sites;
    expect([a.name, a.region, b.name, b.region]).toEqual(["site-a", "eu-es", "site-b", "eu-de"]);
    expect(a.url).toBe(`nats://ferryd:${a.users.ferryd.password}@127.0.0.1:${a.clientPort}`);
    expect(a.leafPort).toBeTypeOf("number");
    expect(b.leafPort).toBeUndefined();
    for (const site of [a, b]) {
      expect(isAlive(site.pid)).toBe(true);
      expect(Number((await readFile(join(site.dir, "nats-server.pid"), "utf8")).trim())).toBe(site.pid);
      const varz = await site.monitor<{ server_name: string; max_payload: number; jetstream: { config: unknown } }>(
        "varz",
      );
      expect(varz.server_name).toBe(`ferry-${site.name}`);
      expect(varz.max_payload).toBe(8 * MIB);
      expect(varz.jetstream.config).toMatchObject({ domain: site.name, store_dir: join(site.storeDir, "jetstream") });
    }
    const leafz = await a.monitor<{ leafnodes: number; leafs: { account: string }[] }>("leafz");
    expect(leafz.leafnodes).toBe(1);
    expect(leafz.leafs[0]?.account).toBe("FERRY");
    expect(sites.linkProxy.connections).toBe(1);
  });

  it("carries request/reply from B to a responder on A and from A to a responder on B", async () => {
    const [ncA, ncB] = await Promise.all([client(sites.a), client(sites.b)]);
    echo(ncA, "ferry.test.echo.a", "site-a");
    echo(ncB, "ferry.test.echo.b", "site-b");
    await Promise.all([ncA.flush(), ncB.flush()]);

    const fromB = await requestUntilAnswered(ncB, "ferry.test.echo.a", Buffer.from("hello from b"));
    expect(fromB.string()).toBe("site-a:hello from b");
    const fromA = await requestUntilAnswered(ncA, "ferry.test.echo.b", Buffer.from("hello from a"));
    expect(fromA.string()).toBe("site-b:hello from a");
  });

  it("passes 1 MiB messages across the link, byte for byte", async () => {
    const [ncA, ncB] = await Promise.all([client(sites.a), client(sites.b)]);
    ncA.subscribe("ferry.test.digest", {
      callback: (error, msg) => {
        if (!error) msg.respond(createHash("sha256").update(msg.data).digest());
      },
    });
    await ncA.flush();
    const payload = randomBytes(MIB);
    const digest = await requestUntilAnswered(ncB, "ferry.test.digest", payload);
    expect(Buffer.from(digest.data).toString("hex")).toBe(createHash("sha256").update(payload).digest("hex"));

    // And the other way, as plain publishes to a subscriber on B: 8 in a row, all equal.
    const received: Buffer[] = [];
    const sub = ncB.subscribe("ferry.test.big", {
      max: 8,
      callback: (_, msg) => {
        received.push(Buffer.from(msg.data));
      },
    });
    await ncB.flush();
    await waitFor("A to see B's subscription", async () => {
      const leafz = await sites.a.monitor<{ leafs: { subscriptions_list?: string[] }[] }>("leafz?subs=1");
      return leafz.leafs[0]?.subscriptions_list?.includes("ferry.test.big");
    });
    for (let i = 0; i < 8; i++) ncA.publish("ferry.test.big", payload);
    await ncA.flush();
    await sub.closed;
    expect(received).toHaveLength(8);
    for (const message of received) expect(message.equals(payload)).toBe(true);
  });

  it("lets B use a KV bucket in site A's domain through the domain prefix", async () => {
    const [ncA, ncB] = await Promise.all([client(sites.a), client(sites.b)]);
    const catalogA = await new Kvm(jetstream(ncA)).create("catalog");
    await catalogA.put("sites.site-a", "eu-es");

    const catalogFromB = await new Kvm(jetstream(ncB, { domain: sites.a.name })).open("catalog");
    expect((await catalogFromB.get("sites.site-a"))?.string()).toBe("eu-es");
    await catalogFromB.put("sites.site-b", "eu-de");
    expect((await catalogA.get("sites.site-b"))?.string()).toBe("eu-de");

    // B's own domain is a different JetStream: it has no such bucket.
    const jsmB = await jetstreamManager(ncB);
    await expect(jsmB.streams.info("KV_catalog")).rejects.toThrow(/stream not found/);
    const jsmBtoA = await jetstreamManager(ncB, { domain: sites.a.name });
    expect((await jsmBtoA.streams.info("KV_catalog")).config.name).toBe("KV_catalog");
  });

  it("lets the CLI user send requests but not serve them", async () => {
    const ncA = await client(sites.a);
    echo(ncA, "ferry.api.site-a.ping", "site-a");
    await ncA.flush();
    const cli = await client(sites.b, "cli");
    expect((await requestUntilAnswered(cli, "ferry.api.site-a.ping", Buffer.from("status"))).string()).toBe(
      "site-a:status",
    );

    const sub = cli.subscribe("ferry.api.site-a.ping");
    const closed = await sub.closed;
    expect(closed).toBeInstanceOf(Error);
    expect(String(closed)).toMatch(/permissions violation for subscription to "ferry.api.site-a.ping"/i);
  });

  it("restores the link, with subscriptions both ways, after B's server restarts", async () => {
    const { a, b } = sites;
    const [ncA, ncB] = await Promise.all([client(a), client(b)]);
    echo(ncA, "ferry.test.restart.a", "site-a");
    echo(ncB, "ferry.test.restart.b", "site-b");
    await requestUntilAnswered(ncB, "ferry.test.restart.a", Buffer.from("before"));
    const pidBefore = b.pid;
    const portsBefore = [b.clientPort, b.monitorPort];

    await b.restart();
    expect(b.pid).not.toBe(pidBefore);
    expect(isAlive(pidBefore)).toBe(false);
    expect([b.clientPort, b.monitorPort]).toEqual(portsBefore);
    await sites.waitForLink();

    // ncB reconnects by itself and resubscribes; A must learn of that subscription over the new link.
    expect((await requestUntilAnswered(ncB, "ferry.test.restart.a", Buffer.from("after"))).string()).toBe(
      "site-a:after",
    );
    expect((await requestUntilAnswered(ncA, "ferry.test.restart.b", Buffer.from("after"))).string()).toBe(
      "site-b:after",
    );
  });

  it("keeps B's JetStream data across a restart (same store)", async () => {
    const ncB = await client(sites.b);
    const kv = await new Kvm(jetstream(ncB)).create("durable");
    await kv.put("k", "v1");
    await connections.splice(connections.indexOf(ncB), 1)[0]?.close();

    await sites.b.restart();
    const again = await client(sites.b);
    expect((await (await new Kvm(jetstream(again)).open("durable")).get("k"))?.string()).toBe("v1");
  });

  it("partitions the link (reset) and heals it", async () => {
    const [ncA, ncB] = await Promise.all([client(sites.a), client(sites.b)]);
    echo(ncA, "ferry.test.partition", "site-a");
    await requestUntilAnswered(ncB, "ferry.test.partition", Buffer.from("before"));

    await sites.partition();
    expect(sites.linkProxy.partitioned).toBe("reset");
    // No link, no interest: B's server knows nobody on its side answers.
    await expect(ncB.request("ferry.test.partition", Buffer.from("during"), { timeout: 2_000 })).rejects.toThrow(
      /no responders/i,
    );

    await sites.heal();
    expect(sites.linkProxy.partitioned).toBeUndefined();
    expect((await requestUntilAnswered(ncB, "ferry.test.partition", Buffer.from("after"))).string()).toBe(
      "site-a:after",
    );
    // The relinked B came back through the proxy, not around it: a second partition still cuts.
    expect(sites.linkProxy.connections).toBe(1);
    await sites.partition();
    await sites.heal();
    expect(sites.linkProxy.connections).toBe(1);
  });
});

describe("startTwoSites with a blackholed link", () => {
  let sites: TwoSites;
  beforeAll(async () => {
    sites = await startTwoSites({ pingInterval: "500ms" });
  });
  afterAll(() => sites?.stop());

  it("lets both servers notice the dead link through their pings, and relinks after heal", async () => {
    const [ncA, ncB] = await Promise.all([client(sites.a), client(sites.b)]);
    echo(ncA, "ferry.test.blackhole", "site-a");
    await requestUntilAnswered(ncB, "ferry.test.blackhole", Buffer.from("before"));

    await sites.partition("blackhole");
    // While the servers still believe in the link, a request goes into the void and times out.
    await expect(ncB.request("ferry.test.blackhole", Buffer.from("during"), { timeout: 300 })).rejects.toThrow(
      /timeout/i,
    );
    await sites.waitForNoLink(10_000);

    await sites.heal();
    expect((await requestUntilAnswered(ncB, "ferry.test.blackhole", Buffer.from("after"))).string()).toBe(
      "site-a:after",
    );
  });
});

describe("TwoSites.stop", () => {
  it("ends both servers by PID and removes every file, and may be called twice", async () => {
    const sites = await startTwoSites();
    const pids = [sites.a.pid, sites.b.pid];
    await sites.stop();
    for (const pid of pids) expect(isAlive(pid)).toBe(false);
    await expect(access(sites.dir)).rejects.toThrow(/ENOENT/);
    expect(await processesMentioning(sites.dir)).toEqual([]);
    await sites.stop();
  });

  it("cleans up site A when site B fails to start, and says why", async () => {
    const templates = await mkdtemp(join(tmpdir(), "ferry-nats-templates-"));
    try {
      await cp(TEMPLATES, templates, { recursive: true });
      await writeFile(
        join(templates, "site-b.conf.tmpl"),
        `${await readFile(join(TEMPLATES, "site-b.conf.tmpl"), "utf8")}\nno_such_option: true\n`,
      );
      const failure = await startTwoSites({ templateDir: templates }).then(
        () => new Error("expected startTwoSites to fail"),
        (error: Error) => error,
      );
      expect(failure.message).toMatch(/site-b exited during startup/);
      expect(failure.message).toMatch(/no_such_option/);
      const dir = /(\/\S*ferry-nats-[^/\s]+)\//.exec(failure.message)?.[1];
      expect(dir).toBeDefined();
      await expect(access(dir ?? "")).rejects.toThrow(/ENOENT/);
      expect(await processesMentioning(dir ?? "")).toEqual([]);
    } finally {
      await rm(templates, { recursive: true, force: true });
    }
  });
});
