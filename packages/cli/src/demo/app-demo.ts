/**
 * `ferry demo`: Ferry's main job on its embedded default. Three sites on loopback — A (eu-es),
 * B (eu-de) and C (us-east), each with its own nats-server (B and C dial A's leafnode port) and its
 * own ferryd (`ferry daemon`: volume service + orchestrator). At A, two applications: `shop`
 * (two volumes, async continuous) and `ledger` (one volume, sync). A copy of shop in us-east is
 * refused by its policy; both are protected to B; a write workload runs while the lag is sampled;
 * then a DR drill beside running replication, an unplanned failover, a failback and a planned
 * migration, each verified by sha256 of the NBD exports at both sites. Then the hybrid application
 * `web` (hybrid-demo.ts): a VM — a real guest at A, on a private libvirtd per site, adopted into
 * Ferry volumes — and Kubernetes objects — a StatefulSet, its PVC on a Ferry volume, a ConfigMap, a
 * Secret and a Service in site A's cluster (a kube-apiserver per site) — protected to B as one
 * application, failed over: the guest boots at B and the objects are recreated in B's cluster, the
 * checksums compared. A summary table ends it: RPO achieved, RTO per operation, bytes resynced vs
 * changed.
 *
 * Every step is a real command (the `ferry` bin, qemu-io, nbdcopy, virsh) whose exit status is
 * checked, narrated as a user at that site would type it. The demo owns everything it starts — one
 * temp directory, three nats-servers, three ferryd, two libvirtd with their guests, etcd and two
 * kube-apiservers — and stops and
 * removes it all again, on success, on failure and on Ctrl-C.
 */

import type { Site } from "@ferry/nats-sites";
import type { Operation, ProtectionStatus } from "@ferry/orchestrator";
import { formatBytes } from "../bytes.js";
import { DemoCheckFailed, SiteStartFailed, ToolFailed } from "../errors.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { COMMAND_TIMEOUT_MS, DemoHost, type DemoSite, FERRY_BIN, runDemo } from "./demo-host.js";
import { exportSha256, shortDigest } from "./export-digest.js";
import { runTool } from "./external-tool.js";
import { HybridApplication, type HybridHost } from "./hybrid-demo.js";
import { K8sMember } from "./k8s-member.js";
import { shellWord } from "./narrator.js";
import { VmMember } from "./vm-member.js";

const MiB = 2 ** 20;
const SHOP = { name: "shop", volumes: ["shop-db", "shop-files"], size: 64 * MiB } as const;
const LEDGER = { name: "ledger", volumes: ["ledger"], size: 16 * MiB } as const;
const RPO_SECONDS = 5;
const WORKLOAD_ROUNDS = 6;
const FIRST_POINT_TIMEOUT_MS = 120_000;
/** The sites' names, known before they start: the hybrid application's members prepare them. */
const SITE_A = "site-a";
const SITE_B = "site-b";

interface SummaryRow {
  operation: string;
  rtoSeconds: number;
  check: string;
  detail: string;
}

export function runAppDemo(io: ProgramIo): Promise<void> {
  return runDemo(new AppDemo(io));
}

class AppDemo extends DemoHost {
  private readonly summary: SummaryRow[] = [];
  private readonly lagSamples: number[] = [];
  private readonly hybrid = this.hybridApplication();

  async run(): Promise<void> {
    const { narrator } = this;
    this.hybrid.checkInstalled();
    const root = await this.makeRoot();

    narrator.step(`Three sites on this machine, each with its own nats-server (everything lives in ${root})`);
    // Both settle before a failure is passed on: a cleanup that ran while the other start was still
    // under way would miss what that start makes afterwards (seen: a cluster's temp dir left behind).
    const [started, prepared] = await Promise.allSettled([
      this.startSites({ parentDir: root, a: { name: SITE_A }, b: { name: SITE_B }, c: {} }),
      this.hybrid.prepare({ a: SITE_A, b: SITE_B }),
    ]);
    if (started.status === "rejected") throw started.reason;
    if (prepared.status === "rejected") throw prepared.reason;
    const sites = started.value;
    const c = sites.c;
    if (c === undefined) throw new SiteStartFailed("the third site did not start");
    narrator.show(describeSites(sites.a, sites.b, c));
    await this.hybrid.describe();

    narrator.step("Each site runs ferryd: its volume service and its orchestrator in one process");
    // A and B replicate with each other: each also connects straight to the other's server.
    const a = await this.startFerryd(sites.a, [sites.b]);
    const b = await this.startFerryd(sites.b, [sites.a]);
    await this.startFerryd(c);
    narrator.show(
      "(the commands below reach a site's ferryd over NATS: FERRY_NATS is that site's cli user, FERRY_SITE its name)",
    );
    await this.waitFor("all three sites to know each other", async () => {
      const list = JSON.parse(await this.ferryQuiet(a, ["site", "list", "--json"])) as unknown[];
      return list.length === 3;
    });
    await this.ferry(a, ["site", "list"]);

    narrator.step("Two applications at site A: shop (a database and its files) and ledger");
    await this.ferry(a, ["app", "create", SHOP.name, ...volumeArgs(SHOP.volumes), "--size", formatBytes(SHOP.size)]);
    await this.ferry(a, [
      "app",
      "create",
      LEDGER.name,
      ...volumeArgs(LEDGER.volumes),
      "--size",
      formatBytes(LEDGER.size),
    ]);
    await this.qemuIo(a, "shop-db", [
      `write -s ${await this.textFile("shop-db", "ferry demo | shop-db | written at site-a", MiB)} 0 1M`,
      "write -P 0xab 8M 4M",
    ]);
    await this.qemuIo(a, "shop-files", [
      `write -s ${await this.textFile("shop-files", "ferry demo | shop-files | written at site-a", MiB)} 0 1M`,
    ]);

    narrator.step("Policies, set per application: shop async and continuous, ledger synchronous; both EU only");
    await this.ferry(a, [
      "policy",
      "create",
      "continuous-eu",
      "--mode",
      "async",
      "--continuous",
      "--rpo",
      `${RPO_SECONDS}s`,
      "--allowed-regions",
      "eu-es,eu-de",
    ]);
    await this.ferry(a, ["policy", "create", "zero-loss-eu", "--mode", "sync", "--allowed-regions", "eu-es,eu-de"]);

    narrator.step("Residency: a copy of shop in us-east is refused before anything moves");
    await this.refused(a, ["protect", SHOP.name, "--policy", "continuous-eu", "--to", c.name], "residency");

    narrator.step("Protect both applications to site B");
    await this.ferry(a, ["protect", SHOP.name, "--policy", "continuous-eu", "--to", b.nats.name]);
    await this.ferry(a, ["protect", LEDGER.name, "--policy", "zero-loss-eu", "--to", b.nats.name]);
    await this.waitFor(
      "the first complete recovery point of both applications at site B",
      async () => (await this.statuses(a)).every((s) => s.lastRecoveryPoint !== null),
      FIRST_POINT_TIMEOUT_MS,
    );
    await this.ferry(a, ["status"]);

    narrator.step(`A write workload at site A, ${WORKLOAD_ROUNDS} rounds, while the lag to site B is sampled`);
    for (let round = 1; round <= WORKLOAD_ROUNDS; round++) {
      const offset = `${16 + round * 4}M`;
      await this.qemuIo(
        a,
        SHOP.volumes[round % 2] ?? "shop-db",
        [`write -P 0x${(0x10 + round).toString(16)} ${offset} 2M`],
        {
          quiet: round > 2,
        },
      );
      await this.sampleLag(a);
      await this.pause(500);
      await this.sampleLag(a);
    }
    if (WORKLOAD_ROUNDS > 2) narrator.show(`(rounds 3-${WORKLOAD_ROUNDS} wrote alike, not shown)`);
    await this.ferry(a, ["status"]);
    narrator.show(
      `lag sampled ${this.lagSamples.length} times: at most ${Math.max(...this.lagSamples).toFixed(1)} s ` +
        `(RPO ${RPO_SECONDS} s)`,
    );

    narrator.step("ledger is synchronous: every write site A acknowledges is at site B the moment it returns");
    for (const [i, offset] of ["0", "4M", "8M"].entries()) {
      const pattern = `0x0${i + 1}`;
      await this.qemuIo(a, "ledger", [`write -P ${pattern} ${offset} 64K`, "flush"]);
      await this.qemuIo(b, "ledger", [`read -P ${pattern} ${offset} 64K`], { readOnly: true });
    }
    narrator.show("each record was read back at site B right after site A's acknowledgement, no sync in between");

    narrator.step("DR drill at site B: an isolated copy of shop, while replication goes on");
    const atDrill = await this.settledDigests(a, SHOP.volumes);
    const drill = await this.operation(b, ["failover", SHOP.name, "--to", b.nats.name, "--test"]);
    await this.verify(
      "drill copy at site B",
      a,
      b,
      SHOP.volumes.map((v) => [v, `${v}-drill`]),
      atDrill,
    );
    this.record(
      "DR drill (test failover)",
      drill,
      "copy = source",
      `point ${drill.result.point}, replication kept running`,
    );
    const before = (await this.shopStatus(a)).lastRecoveryPoint?.generation ?? 0;
    await this.qemuIo(a, "shop-db", ["write -P 0x5a 40M 1M"]);
    await this.waitFor("a new recovery point at site B during the drill", async () => {
      const now = (await this.shopStatus(a)).lastRecoveryPoint?.generation ?? 0;
      return now > before;
    });
    narrator.show(
      `replication went on during the drill: site B completed generation ${before} → ${(await this.shopStatus(a)).lastRecoveryPoint?.generation}`,
    );
    const cleanup = await this.operation(b, ["drill", "cleanup", SHOP.name]);
    this.record("drill cleanup", cleanup, "-", "drill copies deleted");

    narrator.step(
      "Unplanned failover of shop to site B (site B recovers from its own latest point; A is not asked for data)",
    );
    const atFailover = await this.settledDigests(a, SHOP.volumes);
    const failover = await this.operation(b, ["failover", SHOP.name, "--to", b.nats.name]);
    await this.verify(
      "site B after failover",
      a,
      b,
      SHOP.volumes.map((v) => [v, v]),
      atFailover,
    );
    this.record("unplanned failover", failover, "B = last point", `promoted generation ${failover.result.point}`);

    narrator.step("shop runs at site B now; it changes there");
    await this.qemuIo(b, "shop-db", ["write -P 0xb1 2M 512K", "write -P 0xb2 30M 256K"]);
    const changedAtB = 768 * 1024;

    narrator.step("Failback: only what changed goes back to site A, then shop moves home without data loss");
    const atB = await this.digests(b, SHOP.volumes);
    const failback = await this.operation(a, ["failback", SHOP.name]);
    await this.verify(
      "site A after failback",
      b,
      a,
      SHOP.volumes.map((v) => [v, v]),
      atB,
    );
    const resynced = Number(failback.result.bytesResynced ?? 0);
    this.record(
      "failback",
      failback,
      "A = B",
      `resynced ${formatBytes(resynced)} for ${formatBytes(changedAtB)} changed of ${formatBytes(SHOP.volumes.length * SHOP.size)}`,
    );

    narrator.step("Planned migration of shop to site B: the last write at site A is there too");
    await this.qemuIo(a, "shop-files", ["write -P 0xc1 50M 1M"]);
    const atA = await this.digests(a, SHOP.volumes);
    const migration = await this.operation(b, ["failover", SHOP.name, "--to", b.nats.name, "--planned"]);
    await this.verify(
      "site B after migration",
      a,
      b,
      SHOP.volumes.map((v) => [v, v]),
      atA,
    );
    this.record(
      "planned migration",
      migration,
      "B = A, 0 lost",
      `final generation ${migration.result.finalGeneration}`,
    );
    await this.ferry(b, ["status"]);

    await this.hybrid.protect(a, b, "continuous-eu");
    await this.hybrid.write(a);
    this.summary.push(await this.hybrid.failover(a, b));

    narrator.step("What happened, as events at site B (any NATS subscriber can follow them live)");
    await this.ferry(b, ["events", "--app", SHOP.name, "--limit", "8"]);

    narrator.step("Summary");
    const maxLag = Math.max(...this.lagSamples);
    narrator.show(
      formatTable(
        ["OPERATION", "RTO", "DATA CHECK", "DETAIL"],
        this.summary.map((r) => [r.operation, `${r.rtoSeconds.toFixed(1)}s`, r.check, r.detail]),
      ),
    );
    narrator.show(
      `RPO achieved: shop (async, continuous) lagged at most ${maxLag.toFixed(1)} s under writes (policy ${RPO_SECONDS} s: ` +
        `${maxLag <= RPO_SECONDS ? "met" : "NOT met"}); ledger (sync) 0: every acknowledged write was at site B`,
    );
  }

  protected doneMessage(): string {
    return "Done: every operation verified byte for byte, and everything stopped again";
  }

  /** ferryd of a site, sending straight to the servers of `peers` (the direct route, `--peer-nats`). */
  private startFerryd(nats: Site, peers: readonly Site[] = []): Promise<DemoSite> {
    return this.startService(nats, {
      command: "daemon",
      allowRegions: [],
      peerNats: peers.map((p) => `${p.name}=${p.peerUrl}`),
      ...this.hybrid.ferrydOptions(nats.name),
    });
  }

  /** `web`: today the VM; Kubernetes objects and their PVCs join it as further members. */
  private hybridApplication(): HybridApplication {
    const host = this.hybridHost();
    return new HybridApplication(host, "web", [new VmMember(host), new K8sMember(host)]);
  }

  /** What the hybrid application's members may use of this demo. */
  private hybridHost(): HybridHost {
    const demo = this;
    return {
      narrator: this.narrator,
      get root() {
        if (demo.root === undefined) throw new Error("the demo's directory is not made yet");
        return demo.root;
      },
      signal: this.interruption.signal,
      step: (work) => this.step(work),
      ferry: (site, args) => this.ferry(site, args),
      ferryQuiet: (site, args) => this.ferryQuiet(site, args),
      tool: (site, command, args, options) => this.tool(site, command, args, options),
      operation: (site, args) => this.operation(site, args),
      waitFor: (what, done, timeoutMs) => this.waitFor(what, done, timeoutMs),
      own: (what, stop) => this.own(what, stop),
    };
  }

  /** Another program at a site, with the site's environment; shown unless `quiet`. */
  private async tool(
    site: DemoSite,
    command: string,
    args: readonly string[],
    { quiet = false } = {},
  ): Promise<string> {
    if (!quiet) this.narrator.command(site.nats.name, [command, ...args].map(shellWord).join(" "));
    const { stdout } = await this.step(
      runTool(command, args, { signal: this.interruption.signal, timeoutMs: COMMAND_TIMEOUT_MS, env: this.env(site) }),
    );
    if (!quiet) this.narrator.show(stdout.replace(/\r/g, ""));
    return stdout;
  }

  protected override env(site: DemoSite): NodeJS.ProcessEnv {
    return { ...super.env(site), FERRY_NATS: site.nats.cliUrl, FERRY_SITE: site.nats.name };
  }

  /** A command that must be refused: show the refusal, fail the demo if it went through. */
  private async refused(site: DemoSite, args: readonly string[], expect: string): Promise<void> {
    this.narrator.command(site.nats.name, ["ferry", ...args].join(" "));
    const outcome = await this.step(
      runTool(process.execPath, [FERRY_BIN, ...args], {
        signal: this.interruption.signal,
        timeoutMs: COMMAND_TIMEOUT_MS,
        env: this.env(site),
        label: "ferry",
      }).then(
        () => undefined,
        (error: unknown) => error,
      ),
    );
    if (!(outcome instanceof ToolFailed) || !outcome.message.includes(expect)) {
      if (outcome !== undefined && !(outcome instanceof ToolFailed)) throw outcome;
      throw new DemoCheckFailed(`\`ferry ${args.join(" ")}\` was not refused for ${expect}`);
    }
    this.narrator.show(`refused (exit 1): ${outcome.message.replace(/^ferry failed: /, "")}`);
  }

  /** Run a recovery operation, shown with its steps; answers the finished operation. */
  private async operation(site: DemoSite, args: readonly string[]): Promise<Operation> {
    await this.ferry(site, args);
    const ops = JSON.parse(await this.ferryQuiet(site, ["operation", "--json"])) as Operation[];
    const op = ops.at(-1);
    if (op === undefined || op.state !== "succeeded") {
      throw new DemoCheckFailed(`\`ferry ${args.join(" ")}\` did not succeed: ${op?.error?.message ?? "no operation"}`);
    }
    return op;
  }

  private record(operation: string, op: Operation, check: string, detail: string): void {
    this.summary.push({ operation, rtoSeconds: ((op.endedAtMs ?? 0) - op.startedAtMs) / 1000, check, detail });
  }

  private async statuses(site: DemoSite): Promise<ProtectionStatus[]> {
    return JSON.parse(await this.ferryQuiet(site, ["status", "--json"])) as ProtectionStatus[];
  }

  private async shopStatus(site: DemoSite): Promise<ProtectionStatus> {
    const s = (await this.statuses(site)).find((x) => x.app === SHOP.name && x.source === site.nats.name);
    if (s === undefined) throw new DemoCheckFailed(`site ${site.nats.name} reports no protection of ${SHOP.name}`);
    return s;
  }

  private async sampleLag(site: DemoSite): Promise<void> {
    const lag = (await this.shopStatus(site)).lagSeconds;
    if (lag !== null) this.lagSamples.push(lag);
  }

  /** Digests of the source once site B holds a point cut after now (the writes so far are in it). */
  private async settledDigests(a: DemoSite, volumes: readonly string[]): Promise<Map<string, string>> {
    const since = Date.now();
    await this.waitFor("a recovery point at site B after the last write", async () => {
      const point = (await this.shopStatus(a)).lastRecoveryPoint;
      return point !== null && point.atMs > since;
    });
    return this.digests(a, volumes);
  }

  private async digests(site: DemoSite, volumes: readonly string[]): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const v of volumes) {
      out.set(v, await this.step(exportSha256(site.service.uri(v), this.interruption.signal, COMMAND_TIMEOUT_MS)));
    }
    return out;
  }

  /** `pairs` are [volume at `from`, volume at `to`]; their sha256 must equal `expected` (taken at `from`). */
  private async verify(
    what: string,
    from: DemoSite,
    to: DemoSite,
    pairs: readonly (readonly [string, string])[],
    expected: ReadonlyMap<string, string>,
  ): Promise<void> {
    const rows: string[][] = [];
    const mismatches: string[] = [];
    for (const [source, copy] of pairs) {
      const digest = await this.step(exportSha256(to.service.uri(copy), this.interruption.signal, COMMAND_TIMEOUT_MS));
      const want = expected.get(source) ?? "";
      if (digest !== want) mismatches.push(`${copy}: ${digest} ≠ ${want}`);
      rows.push([
        `${from.nats.name}:${source}`,
        shortDigest(want),
        `${to.nats.name}:${copy}`,
        shortDigest(digest),
        digest === want ? "equal" : "DIFFERENT",
      ]);
    }
    this.narrator.show(formatTable(["SOURCE", "SHA256", "COPY", "SHA256", "RESULT"], rows));
    if (mismatches.length > 0)
      throw new DemoCheckFailed(`${what} does not hold the expected bytes: ${mismatches.join("; ")}`);
  }

  private waitFor(what: string, done: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
    return this.until(
      done,
      timeoutMs,
      () => new DemoCheckFailed(`gave up waiting for ${what} after ${timeoutMs / 1000} s`),
    );
  }
}

function volumeArgs(volumes: readonly string[]): string[] {
  return volumes.flatMap((v) => ["--volume", v]);
}

function describeSites(a: Site, b: Site, c: Site): string {
  return [
    formatTable(
      ["SITE", "REGION", "NATS-SERVER", "CLIENTS", "LEAFNODE"],
      [
        [a.name, a.region, `pid ${a.pid}`, a.server, `accepts on 127.0.0.1:${a.leafPort}`],
        [b.name, b.region, `pid ${b.pid}`, b.server, `dials ${a.name}`],
        [c.name, c.region, `pid ${c.pid}`, c.server, `dials ${a.name}`],
      ],
    ),
    "each site is its own JetStream domain (catalog, events) with users ferryd and cli (random passwords)",
  ].join("\n");
}
