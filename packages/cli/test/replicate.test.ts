/**
 * `ferry replicate` between two real sites: two nats-servers linked by a leafnode (testkit's
 * `startTwoSites`) and one `ferry volume serve` per site, joined to its site's NATS. Data goes in
 * at A with qemu-io and is checked at B's read-only export, byte for byte; sync mode, failover with
 * `replicate reverse`, recovery points, residency and the usage errors are checked as a user sees
 * them: exit status and one `ferry:` line.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FerryCli, qemuIo, Sandbox, exportSha256 as sha256Of, startTwoSites, type TwoSites } from "@ferry/testkit";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import type { PairStatus } from "../src/commands/replicate.js";
import { type SiteService, serveSite as serveSiteWith } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const KiB = 1024;
const MiB = 2 ** 20;
const VOLUME_SIZE = 4 * MiB;

interface VolumeJson {
  name: string;
  readOnly: boolean;
}

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;

beforeAll(async () => {
  sites = await startTwoSites();
});

afterAll(async () => {
  await sites?.stop();
});

beforeEach(() => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
});

// Kills every `ferry volume serve` (by PID) and removes the data directories, also after a failure.
afterEach(async () => {
  await sandbox.cleanup();
});

function serveSite(site: "a" | "b", extra: readonly string[] = []): Promise<SiteService> {
  return serveSiteWith(ferry, sandbox, sites[site], { extra });
}

/** qemu-io on a read-only export (B's replicas refuse a read-write open). */
async function qemuIoReadOnly(uri: string, commands: readonly string[]): Promise<void> {
  const result = await sandbox.run("qemu-io", ["-r", "-f", "raw", uri, ...commands.flatMap((c) => ["-c", c])]);
  if (result.code !== 0) {
    throw new Error(`qemu-io -r ${commands.join("; ")} on ${uri}: ${result.stdout.trim()} ${result.stderr.trim()}`);
  }
}

function exportSha256(uri: string): Promise<string> {
  return sha256Of(sandbox, uri);
}

describe("ferry replicate between two sites", () => {
  it("ships a consistency group to site B, then only the changed blocks", async () => {
    // Site A takes its site and NATS URL from the environment, as documented.
    const aData = await sandbox.dir("ferry-a-");
    const aServe = await ferry.serve(
      ["--data", aData, "--socket", join(aData, "nbd.sock"), "--region", sites.a.region],
      { env: { ...process.env, FERRY_SITE: sites.a.name, FERRY_NATS: sites.a.url } },
    );
    expect(aServe.servingLine).toContain(`as site ${sites.a.name} (region eu-es)`);
    expect(aServe.servingLine).not.toContain(sites.a.users.ferryd.password);
    const a: SiteService = { data: aData, serve: aServe };
    const b = await serveSite("b");
    expect(b.serve.servingLine).toContain(`as site ${sites.b.name} (region eu-de)`);

    // Created while A serves: over the control socket.
    for (const name of ["a", "b"]) {
      await ferry.ok(["volume", "create", name, "--size", "4M", "--data", a.data]);
    }
    await qemuIo(sandbox, a.serve.uri("a"), ["write -P 0xab 0 1M"]);
    await qemuIo(sandbox, a.serve.uri("b"), ["write -P 0xcd 2M 64K"]);

    const started = await ferry.ok([
      "replicate",
      "start",
      "a",
      "b",
      "--to",
      "site-b",
      "--mode",
      "async",
      "--interval",
      "1h",
      "--data",
      a.data,
    ]);
    expect(started).toMatch(/^replicating a, b to site-b \(async, every 1h\): \w+\n$/);

    const first = await ferry.json<PairStatus>(["replicate", "sync", "a", "b", "--data", a.data]);
    expect(first).toMatchObject({ volumes: ["a", "b"], target: "site-b", mode: "async", state: "idle" });
    expect(first.lastCompleteGeneration).toBeGreaterThanOrEqual(1);
    expect(first.lastError).toBeNull();
    // The first full copy reads both volumes whole; the mostly-zero data compresses to little.
    expect(first.bytesRaw).toBe(2 * VOLUME_SIZE);
    expect(first.bytesWire).toBeGreaterThan(0);
    expect(first.bytesWire).toBeLessThan(first.bytesRaw);

    const replicas = await ferry.json<VolumeJson[]>(["volume", "list", "--data", b.data]);
    expect(replicas.map((v) => [v.name, v.readOnly])).toEqual([
      ["a", true],
      ["b", true],
    ]);
    await qemuIoReadOnly(b.serve.uri("a"), ["read -P 0xab 0 1M", "read -P 0 1M 3M"]);
    await qemuIoReadOnly(b.serve.uri("b"), ["read -P 0 0 2M", "read -P 0xcd 2M 64K", "read -P 0 2112K 1984K"]);
    for (const name of ["a", "b"]) {
      expect(await exportSha256(b.serve.uri(name)), name).toBe(await exportSha256(a.serve.uri(name)));
    }

    // One 64 KiB block of a, two of b (70 KiB from 1 MiB spans two).
    await qemuIo(sandbox, a.serve.uri("a"), ["write -P 0x11 3M 4K"]);
    await qemuIo(sandbox, a.serve.uri("b"), ["write -P 0x22 1M 70K"]);
    // Until the next generation is complete, B keeps showing the last one.
    await qemuIoReadOnly(b.serve.uri("a"), ["read -P 0 3M 4K"]);

    const second = await ferry.json<PairStatus>(["replicate", "sync", "a", "b", "--data", a.data]);
    expect(second.lastCompleteGeneration).toBeGreaterThan(first.lastCompleteGeneration ?? Number.POSITIVE_INFINITY);
    expect(second.bytesRaw - first.bytesRaw).toBe(3 * 64 * KiB);
    await qemuIoReadOnly(b.serve.uri("a"), ["read -P 0xab 0 1M", "read -P 0x11 3M 4K", "read -P 0 3076K 1020K"]);
    await qemuIoReadOnly(b.serve.uri("b"), ["read -P 0x22 1M 70K", "read -P 0xcd 2M 64K"]);
    for (const name of ["a", "b"]) {
      expect(await exportSha256(b.serve.uri(name)), name).toBe(await exportSha256(a.serve.uri(name)));
    }

    const [pair, ...others] = await ferry.json<PairStatus[]>(["replicate", "status", "--data", a.data]);
    expect(others).toEqual([]);
    expect(pair).toEqual({
      group: expect.any(String),
      volumes: ["a", "b"],
      target: "site-b",
      mode: "async",
      state: "idle",
      lastCompleteGeneration: second.lastCompleteGeneration,
      lastCompleteAtMs: expect.any(Number),
      lagSeconds: expect.any(Number),
      bytesRaw: second.bytesRaw,
      bytesWire: second.bytesWire,
      generationsShipped: expect.any(Number),
      compressionRatio: second.bytesRaw / second.bytesWire,
      lastError: null,
      syncWrites: 0,
      suspensions: 0,
      lastCycle: second.lastCycle,
      // No --peer-nats: through site A's server and the leafnode link.
      route: "leafnode",
    });
    // The second generation's own trip: the three blocks above, cut to commit.
    expect(second.lastCycle).toMatchObject({
      generation: second.lastCompleteGeneration,
      bytesRaw: 3 * 64 * KiB,
      bytesWire: expect.any(Number),
      ms: expect.any(Number),
    });
    // Its phases, in order, make up its time.
    const cycle = second.lastCycle;
    if (cycle === null) throw new Error("replicate sync reported no lastCycle");
    for (const phase of [cycle.cutMs, cycle.beginMs, cycle.shipMs, cycle.commitMs]) expect(phase).toBeGreaterThan(0);
    expect(cycle.cutMs + cycle.beginMs + cycle.shipMs + cycle.commitMs).toBeCloseTo(cycle.ms, 3);
    const table = await ferry.ok(["replicate", "status", "--data", a.data]);
    expect(table).toMatch(/^VOLUMES\s+TARGET\s+MODE\s+STATE\s+LAST GEN\s+LAG\s+RAW\s+WIRE\s+RATIO\s+ROUTE\n/);
    expect(table).toMatch(new RegExp(`a,b\\s+site-b\\s+async\\s+idle\\s+${second.lastCompleteGeneration}\\s`));

    // --on-peer-loss (or its older spelling --on-loss) belongs to sync pairs.
    for (const flag of ["--on-peer-loss", "--on-loss"]) {
      const onLoss = await ferry.run([
        "replicate",
        "start",
        "c",
        "--to",
        "site-b",
        "--mode",
        "async",
        flag,
        "block",
        "--data",
        a.data,
      ]);
      expect(onLoss.code, flag).toBe(2);
      expect(onLoss.stderr).toMatch(
        /^ferry: option '--on-peer-loss <policy>' only applies to --mode sync \(see 'ferry replicate start --help'\)\n$/,
      );
    }

    const stopped = await ferry.ok(["replicate", "stop", "a", "b", "--data", a.data]);
    expect(stopped).toContain(
      `stopped replicating a, b to site-b; it keeps generation ${second.lastCompleteGeneration}`,
    );
    expect(await ferry.json<PairStatus[]>(["replicate", "status", "--data", a.data])).toEqual([]);
    expect(await ferry.ok(["replicate", "status", "--data", a.data])).toContain("no replication pairs");
    await qemuIoReadOnly(b.serve.uri("a"), ["read -P 0x11 3M 4K"]);

    expect(await a.serve.stop()).toEqual({ code: 0, signal: null });
    expect(await b.serve.stop()).toEqual({ code: 0, signal: null });
  });

  it("promotes the replicas at site B: writable, holding exactly what A held at the synced generation", async () => {
    const a = await serveSite("a");
    const b = await serveSite("b");
    for (const name of ["a", "b"]) {
      await ferry.ok(["volume", "create", name, "--size", "4M", "--data", a.data]);
    }
    await qemuIo(sandbox, a.serve.uri("a"), ["write -P 0x5a 0 512K", "write -P 0x6b 3M 1M"]);
    await qemuIo(sandbox, a.serve.uri("b"), ["write -P 0x7c 1M 64K"]);
    const group = ["a", "b"];
    await ferry.ok([
      "replicate",
      "start",
      ...group,
      "--to",
      "site-b",
      "--mode",
      "async",
      "--interval",
      "1h",
      "--data",
      a.data,
    ]);
    const synced = await ferry.json<PairStatus>(["replicate", "sync", ...group, "--data", a.data]);
    expect(synced).toMatchObject({ state: "idle", lastError: null });
    const atSync = new Map<string, string>();
    for (const name of group) atSync.set(name, await exportSha256(a.serve.uri(name)));

    // Written after the synced generation and never shipped: the pair stops before another cycle.
    await qemuIo(sandbox, a.serve.uri("a"), ["write -P 0x99 0 4K"]);
    await ferry.ok(["replicate", "stop", ...group, "--data", a.data]);

    // Still a replica: B's export refuses writes.
    const refused = await sandbox.run("qemu-io", ["-f", "raw", b.serve.uri("a"), "-c", "write -P 1 0 4K"]);
    expect(refused.code).not.toBe(0);

    const promoted = await ferry.json<Array<{ volume: string; generation: number }>>([
      "replicate",
      "promote",
      ...group,
      "--data",
      b.data,
    ]);
    expect(promoted).toEqual([
      { volume: "a", generation: synced.lastCompleteGeneration },
      { volume: "b", generation: synced.lastCompleteGeneration },
    ]);
    const replicas = await ferry.json<VolumeJson[]>(["volume", "list", "--data", b.data]);
    expect(replicas.map((v) => [v.name, v.readOnly])).toEqual([
      ["a", false],
      ["b", false],
    ]);
    for (const name of group) {
      expect(await exportSha256(b.serve.uri(name)), name).toBe(atSync.get(name));
    }
    expect(await exportSha256(a.serve.uri("a"))).not.toBe(atSync.get("a"));

    // Writable over NBD now, and tracking its own writes.
    await qemuIo(sandbox, b.serve.uri("a"), ["write -P 0x42 2M 64K"]);
    await qemuIo(sandbox, b.serve.uri("a"), ["read -P 0x42 2M 64K", "read -P 0x5a 0 512K", "read -P 0x6b 3M 1M"]);
    expect(await ferry.json(["volume", "dirty", "a", "--data", b.data])).toEqual([
      { offset: 2 * MiB, length: 64 * KiB },
    ]);

    // A second promote finds no replica left; a source volume never was one. Nothing changes.
    for (const [data, name] of [
      [b.data, "b"],
      [a.data, "a"],
    ] as const) {
      const again = await ferry.run(["replicate", "promote", name, "--data", data]);
      expect(again.code, `${data} ${name}`).toBe(1);
      expect(again.stdout).toBe("");
      expect(again.stderr).toBe(
        `ferry: invalid argument: volume '${name}' is not a replica: promote runs at the target site, on replicated volumes\n`,
      );
    }
    const unknown = await ferry.run(["replicate", "promote", "nope", "--data", b.data]);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/^ferry: .*'nope'.*\n$/);

    expect(await a.serve.stop()).toEqual({ code: 0, signal: null });
    expect(await b.serve.stop()).toEqual({ code: 0, signal: null });
  });

  it("prints the promoted volumes and their generation as a table", async () => {
    const a = await serveSite("a");
    const b = await serveSite("b");
    await ferry.ok(["volume", "create", "solo", "--size", "1M", "--data", a.data]);
    await ferry.ok(["replicate", "start", "solo", "--to", "site-b", "--mode", "async", "--data", a.data]);
    const synced = await ferry.json<PairStatus>(["replicate", "sync", "solo", "--data", a.data]);
    await ferry.ok(["replicate", "stop", "solo", "--data", a.data]);
    // Offline, on the files: the same answer as through a running service.
    expect(await b.serve.stop()).toEqual({ code: 0, signal: null });
    const table = await ferry.ok(["replicate", "promote", "solo", "--data", b.data]);
    expect(table).toBe(
      `VOLUME  GENERATION\nsolo    ${synced.lastCompleteGeneration}\n` +
        "promoted solo: writable here at the generation shown, no longer replicas\n",
    );
    expect(await ferry.json<VolumeJson[]>(["volume", "list", "--data", b.data])).toMatchObject([
      { name: "solo", readOnly: false },
    ]);
  });

  it("runs a sync pair, fails over to site B, and replicates back with reverse", async () => {
    // Each site's service also connects straight to the other's server (user peer): the pair's
    // traffic goes there, one server hop instead of two.
    const a = await serveSite("a", ["--peer-nats", `site-b=${sites.b.peerUrl}`]);
    const b = await serveSite("b", ["--peer-nats", `site-a=${sites.a.peerUrl}`]);
    expect(a.serve.servingLine).toContain(`, direct to site-b at ${sites.b.server}`);
    expect(a.serve.servingLine).not.toContain(sites.b.users.peer.password);
    await ferry.ok(["volume", "create", "s", "--size", "4M", "--data", a.data]);
    await qemuIo(sandbox, a.serve.uri("s"), ["write -P 0x21 0 4M"]);
    const started = await ferry.ok([
      "replicate",
      "start",
      "s",
      "--to",
      "site-b",
      "--mode",
      "sync",
      "--interval",
      "1h",
      "--data",
      a.data,
    ]);
    expect(started).toMatch(/^replicating s to site-b \(sync, every 1h, on peer loss suspend\): \w+\n$/);
    let status: PairStatus[] = [];
    for (let i = 0; i < 100; i++) {
      status = await ferry.json<PairStatus[]>(["replicate", "status", "--data", a.data]);
      if (status[0]?.syncState === "active") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(status[0]).toMatchObject({ mode: "sync", syncState: "active", route: "direct" });
    // Acknowledged means applied at B: read there right after each write, no sync in between.
    for (const [pattern, offset] of [
      ["0x31", "0"],
      ["0x32", "1M"],
      ["0x33", "3M"],
    ]) {
      await qemuIo(sandbox, a.serve.uri("s"), [`write -P ${pattern} ${offset} 64K`, "flush"]);
      await qemuIoReadOnly(b.serve.uri("s"), [`read -P ${pattern} ${offset} 64K`]);
    }
    expect(await ferry.ok(["replicate", "status", "--data", a.data])).toMatch(
      /s\s+site-b\s+sync \(active\)\s.*\sdirect$/m,
    );

    // Failover: A goes away; B takes over and writes; A comes back and gets only what changed.
    await ferry.ok(["replicate", "stop", "s", "--data", a.data]);
    await qemuIo(sandbox, a.serve.uri("s"), ["write -P 0x41 2M 64K"]);
    const points = await ferry.json<{ volume: string; points: { back: number }[] }[]>([
      "replicate",
      "points",
      "s",
      "--data",
      b.data,
    ]);
    expect(points[0]?.volume).toBe("s");
    expect(await ferry.ok(["replicate", "points", "s", "--data", b.data])).toMatch(
      /^VOLUME\s+FROM\s+BACK\s+GENERATION\s+COMPLETED\n/,
    );
    await ferry.ok(["replicate", "promote", "s", "--data", b.data]);
    await qemuIo(sandbox, b.serve.uri("s"), ["write -P 0x51 3M 64K"]);
    const reversed = await ferry.ok([
      "replicate",
      "reverse",
      "s",
      "--to",
      "site-a",
      "--interval",
      "1h",
      "--data",
      b.data,
    ]);
    expect(reversed).toMatch(/^replicating s back to site-a \(async, every 1h\): \w+\n$/);
    const back = await ferry.json<PairStatus>(["replicate", "sync", "s", "--data", b.data]);
    // The union, nothing else: what B changed since the promotion (3M) and what A changed after
    // the last generation B held completely (2M). Stopping the sync pair recorded the synchronous
    // writes as B's last complete generation, so they are not sent back.
    expect(back.bytesRaw).toBe(2 * 64 * 1024);
    expect(await exportSha256(a.serve.uri("s"))).toBe(await exportSha256(b.serve.uri("s")));
    // A now holds B's data: B's write, the synchronous ones, and B's bytes where A diverged.
    await qemuIoReadOnly(a.serve.uri("s"), ["read -P 0x51 3M 64K", "read -P 0x32 1M 64K", "read -P 0x21 2M 64K"]);

    // Reverse is for promoted volumes only.
    await ferry.ok(["volume", "create", "t", "--size", "1M", "--data", b.data]);
    const notPromoted = await ferry.run(["replicate", "reverse", "t", "--to", "site-a", "--data", b.data]);
    expect(notPromoted.code).toBe(1);
    expect(notPromoted.stderr).toMatch(
      /^ferry: invalid argument: volume 't' was not promoted from site site-a: reverse replicates back to the site a volume failed over from.*\n$/,
    );
  });

  it("refuses to copy a volume to a region the source site does not allow, and creates nothing there", async () => {
    const a = await serveSite("a", ["--allow-regions", "us-east"]);
    const b = await serveSite("b");
    expect(a.serve.servingLine).toContain("copies only to us-east");
    await ferry.ok(["volume", "create", "resident", "--size", "1M", "--data", a.data]);
    await ferry.ok(["replicate", "start", "resident", "--to", "site-b", "--mode", "async", "--data", a.data]);

    const sync = await ferry.run(["replicate", "sync", "resident", "--data", a.data]);
    expect(sync.code).toBe(1);
    expect(sync.stdout).toBe("");
    expect(sync.stderr).toMatch(/^ferry: residency: .*\n$/);
    for (const word of ["resident", "site-b", "eu-de", "us-east"]) expect(sync.stderr).toContain(word);

    expect(await ferry.json<VolumeJson[]>(["volume", "list", "--data", b.data])).toEqual([]);
    const [pair] = await ferry.json<PairStatus[]>(["replicate", "status", "--data", a.data]);
    expect(pair).toMatchObject({ state: "error", lastCompleteGeneration: null, bytesRaw: 0 });
    expect(pair?.lastError).toContain("us-east");
  });

  it("tells to start a joined volume service when none runs", async () => {
    const data = await sandbox.dir();
    const result = await ferry.run(["replicate", "sync", "a", "--data", data]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^ferry: .*`ferry volume serve --data .* --site .*`\n$/);
  });

  it("exits 2 on bad usage, naming the option and a valid form", async () => {
    const data = await sandbox.dir();
    const start = ["replicate", "start", "v", "--to", "site-b", "--data", data];
    const cases: Array<[string[], RegExp]> = [
      [
        [...start, "--mode", "async", "--interval", "5x"],
        /^ferry: option '--interval <duration>' argument '5x' is invalid\. .*5s/,
      ],
      [
        [...start, "--mode", "async", "--interval", "0s"],
        /^ferry: option '--interval <duration>' argument '0s' is invalid/,
      ],
      [[...start, "--mode", "async", "--rate", "fast"], /^ferry: option '--rate <size>': invalid size 'fast'/],
      [[...start, "--mode", "async", "--rate", "0"], /^ferry: option '--rate <size>' argument '0' is invalid/],
      [[...start, "--mode", "async", "--level", "20"], /^ferry: option '--level <n>' argument '20' is invalid/],
      [[...start, "--mode", "semi"], /^ferry: option '--mode <mode>' argument 'semi' is invalid/],
      [start, /^ferry: required option '--mode <mode>' not specified/],
      [["replicate", "sync"], /^ferry: missing required argument 'volumes'/],
      [["replicate", "promote"], /^ferry: missing required argument 'volumes'/],
      [["replicate", "promote", "s", "--back", "last"], /^ferry: option '--back <n>' argument 'last' is invalid/],
      [["replicate", "status", "extra"], /^ferry: too many arguments/],
    ];
    for (const [args, message] of cases) {
      const result = await ferry.run(args);
      expect(result.code, args.join(" ")).toBe(2);
      expect(result.stderr, args.join(" ")).toMatch(message);
      expect(result.stderr.split("\n"), args.join(" ")).toHaveLength(2);
    }
  });
});

describe("ferry volume serve joining a site", () => {
  it("exits 2 unless --site, --region and --nats come all together", async () => {
    const data = await sandbox.dir();
    const { FERRY_SITE: _site, FERRY_NATS: _nats, ...env } = process.env;
    const cases: Array<[string[], NodeJS.ProcessEnv, RegExp]> = [
      [["--site", "site-a"], env, /--region and --nats are missing/],
      [
        ["--region", "eu-es"],
        { ...env, FERRY_NATS: sites.a.url },
        /--site is missing \(--nats came from \$FERRY_NATS\)/,
      ],
      [["--allow-regions", "eu-de"], env, /--allow-regions applies to a service that joins a site/],
      [
        ["--peer-nats", "site-b=nats://peer:pw@h:1"],
        env,
        /--peer-nats \(or \$FERRY_PEER_NATS\) applies to a service that joins a site/,
      ],
      [[], { ...env, FERRY_PEER_NATS: "site-b=nats://peer:pw@h:1" }, /--peer-nats \(or \$FERRY_PEER_NATS\) applies/],
      // From the environment too, each of several space-separated values checked.
      [
        ["--site", "site-a", "--region", "eu-es", "--nats", sites.a.url],
        { ...env, FERRY_PEER_NATS: `site-c=nats://h:1 site-b=http://peer:secret@h:1` },
        /--peer-nats site-b: 'http:\/\/peer:\*\*\*@h:1' is not a NATS URL/,
      ],
      ...[
        ["site-b", /--peer-nats 'site-b' is not SITE=URL/],
        ["site-b=http://peer:secret@h:1", /--peer-nats site-b: 'http:\/\/peer:\*\*\*@h:1' is not a NATS URL/],
        ["site-a=nats://h:1", /--peer-nats names this site \(site-a\)/],
      ].map(([peer, message]): [string[], NodeJS.ProcessEnv, RegExp] => [
        ["--site", "site-a", "--region", "eu-es", "--nats", sites.a.url, "--peer-nats", peer as string],
        env,
        message as RegExp,
      ]),
      [
        ["--site", "site-a", "--region", "eu-es", "--nats", sites.a.url, "--allow-regions", ","],
        env,
        /--allow-regions ',' names no region/,
      ],
    ];
    for (const [args, caseEnv, message] of cases) {
      const result = await ferry.run(["volume", "serve", "--data", data, "--socket", join(data, "s"), ...args], {
        env: caseEnv,
      });
      expect(result.code, args.join(" ")).toBe(2);
      expect(result.stderr, args.join(" ")).toMatch(message);
      expect(result.stderr).toContain("(see 'ferry volume serve --help')");
    }
  });

  it("fails with exit 1 when the site's NATS refuses the credentials, without printing the password", async () => {
    const data = await sandbox.dir();
    const url = `nats://ferryd:not-the-password@${sites.a.server}`;
    const args = ["--data", data, "--socket", join(data, "s"), "--site", "site-a", "--region", "eu-es", "--nats", url];
    const result = await ferry.run(["volume", "serve", ...args]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^ferry: .*authorization violation.*--nats/);
    expect(result.stderr).not.toContain("not-the-password");
  });

  it("serves untracked (benchmarks only) with --untracked, which help does not show", async () => {
    const data = await sandbox.dir();
    expect(await ferry.ok(["volume", "serve", "--help"])).not.toContain("untracked");
    await ferry.ok(["volume", "create", "bench", "--size", "1M", "--data", data]);
    const serve = await ferry.serve(["--data", data, "--socket", join(data, "s"), "--untracked"]);
    expect(serve.servingLine).toContain("without changed-block tracking");
    // Untracked means wholly dirty: the next generation copies everything.
    expect(await ferry.json(["volume", "dirty", "bench", "--data", data])).toEqual([{ offset: 0, length: MiB }]);
    expect(await serve.stop()).toEqual({ code: 0, signal: null });
  });
});
