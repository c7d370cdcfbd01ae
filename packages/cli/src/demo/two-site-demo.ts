/**
 * `ferry demo`: Ferry's main job, end to end on this machine. Two sites on loopback, each with its
 * own nats-server (JetStream, its own domain, users with passwords; B's leafnode dials A) and its
 * own `ferry volume serve`; a consistency group of two volumes at A, written over NBD, replicated
 * continuously to B; beside it a third volume replicated synchronously, each acknowledged write
 * read back at B at once, B's service stopped and started again under it (the pair suspends and
 * resyncs), and the two copies' digests compared; then the group is synced, its pair
 * stopped, B promoted, and B's bytes checked against A's. Every step is a real command (the `ferry`
 * bin, qemu-io, nbdcopy) whose exit status is checked, narrated as a user at that site would type it.
 *
 * It owns everything it starts or creates — one temp directory, two nats-servers, the volume
 * services (B's twice) — and stops and removes all of it again, on success, on failure and on Ctrl-C.
 */
import type { SitePair } from "@ferry/nats-sites";
import { formatBytes } from "../bytes.js";
import type { PairStatus, PromotedVolume } from "../commands/replicate.js";
import { DemoCheckFailed, ToolFailed } from "../errors.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { COMMAND_TIMEOUT_MS, DemoHost, type DemoSite, runDemo } from "./demo-host.js";
import { exportSha256 } from "./export-digest.js";
import { runTool } from "./external-tool.js";

const MiB = 2 ** 20;
const GROUP = [
  { name: "web-root", size: 64 * MiB },
  { name: "web-db", size: 32 * MiB },
] as const;
const VOLUME_NAMES = GROUP.map((v) => v.name);
/** Replicated synchronously, beside the async group: every write waits until site B applied it. */
const SYNC_VOLUME = { name: "orders", size: 16 * MiB } as const;
/** The records written to it, one qemu-io write each: a byte pattern qemu-io's `read -P` verifies. */
const ORDERS = [
  { number: 1, pattern: "0x01", offset: "0" },
  { number: 2, pattern: "0x02", offset: "5M" },
  { number: 3, pattern: "0x03", offset: "10M" },
] as const;
const ORDER_LENGTH = "64K";
/** Written while site B's service is down: acknowledged at A alone, resent when B is back. */
const ORDER_WHILE_B_IS_DOWN = { number: 4, pattern: "0x04", offset: "12M" } as const;
const INTERVAL = "1s";
const FIRST_GENERATION_TIMEOUT_MS = 120_000;
/** The sync pair copies the volume whole first, then goes synchronous at its next cut (a second or two). */
const SYNC_ACTIVE_TIMEOUT_MS = 60_000;
const POLL_MS = 250;
/** The digests shown are cut to this many hex digits; the comparison uses all of them. */
const DIGEST_SHOWN = 16;

export function runTwoSiteDemo(io: ProgramIo): Promise<void> {
  return runDemo(new TwoSiteDemo(io));
}

class TwoSiteDemo extends DemoHost {
  async run(): Promise<void> {
    const { narrator } = this;
    const root = await this.makeRoot();

    narrator.step(`Two sites on this machine, each with its own nats-server (everything lives in ${root})`);
    const pair = await this.startSites({ parentDir: root });
    for (const line of describeSites(pair)) narrator.show(line);

    narrator.step("Each site runs its own volume service, joined to its site's NATS");
    // Each also connects straight to the other's server (the direct route, `--peer-nats`).
    const a = await this.startService(pair.a, {
      allowRegions: [pair.a.region, pair.b.region],
      peerNats: [`${pair.b.name}=${pair.b.peerUrl}`],
    });
    const b = await this.startService(pair.b, { allowRegions: [], peerNats: [`${pair.a.name}=${pair.a.peerUrl}`] });
    narrator.show(`(commands at each site run with FERRY_DATA=${a.dataDir}, resp. ${b.dataDir})`);

    narrator.step("Create two volumes at site A; replicated together, they form one consistency group");
    for (const volume of GROUP) {
      await this.ferry(a, ["volume", "create", volume.name, "--size", formatBytes(volume.size)]);
    }

    narrator.step("Write recognisable data into them over NBD with qemu-io");
    await this.qemuIo(a, "web-root", [
      `write -s ${await this.textFile("web-root-1", "ferry demo | web-root | written at site-a | round 1", MiB)} 0 1M`,
      "write -P 0xab 16M 8M",
    ]);
    await this.qemuIo(a, "web-db", [
      `write -s ${await this.textFile("web-db-1", "ferry demo | web-db | written at site-a | round 1", MiB)} 0 1M`,
      "write -P 0xcd 8M 4M",
    ]);

    narrator.step(`Replicate the group to site B: asynchronous, continuous, a generation every ${INTERVAL}`);
    await this.ferry(a, [
      "replicate",
      "start",
      ...VOLUME_NAMES,
      "--to",
      b.nats.name,
      "--mode",
      "async",
      "--interval",
      INTERVAL,
    ]);
    const first = await this.firstGeneration(a);
    narrator.show(
      `site B holds its first complete generation (${first.lastCompleteGeneration}), a full copy of both volumes`,
    );

    narrator.step("Replication status at site A: the generation site B holds, its lag, bytes raw and on the wire");
    await this.ferry(a, ["replicate", "status"]);
    narrator.show(compression(await this.pairStatus(a)));

    // Before the group's sync, not after, so that `replicate stop` follows the sync at once: a stop
    // that lands while a cycle is in flight reports the generation before the one site B then
    // completes, and the promote shows that later one.
    await this.synchronousPair(a, b);

    narrator.step("Write more into the group at site A while replication runs");
    await this.qemuIo(a, "web-root", [
      `write -s ${await this.textFile("web-root-2", "ferry demo | web-root | written at site-a | round 2", 256 * 1024)} 40M 256K`,
    ]);
    await this.qemuIo(a, "web-db", ["write -P 0xef 20M 1M"]);

    narrator.step("Sync: cut a generation now and wait until site B holds it completely");
    await this.ferry(a, ["replicate", "sync", ...VOLUME_NAMES]);
    narrator.show(compression(await this.pairStatus(a)));

    narrator.step("Stop the pair at site A; site B keeps the last generation it completed");
    await this.ferry(a, ["replicate", "stop", ...VOLUME_NAMES]);
    narrator.show("sha256 of site A's volumes, unchanged since the sync (nothing writes to them from here on):");
    const atA = new Map<string, string>();
    for (const name of VOLUME_NAMES) {
      atA.set(name, await this.step(exportSha256(a.service.uri(name), this.interruption.signal, COMMAND_TIMEOUT_MS)));
      narrator.show(`  ${name.padEnd(8)}  ${atA.get(name)}`);
    }

    narrator.step("Site B, still a replica, serves that generation read-only");
    await this.ferry(b, ["volume", "list"]);
    await this.qemuIo(b, "web-root", ["read -v 0 96"], { readOnly: true });
    await this.refusedWrite(b, "web-root");

    narrator.step("Fail over: promote the replicas at site B");
    const promoted = JSON.parse(
      await this.ferry(b, ["replicate", "promote", ...VOLUME_NAMES, "--json"]),
    ) as PromotedVolume[];

    narrator.step("Verify: site B holds exactly site A's bytes at the generation it was promoted at");
    await this.verify(a, b, promoted, atA);

    narrator.step("Site B's volumes are writable now, and track their own changes");
    await this.qemuIo(b, "web-db", ["write -P 0x42 30M 64K", "read -P 0x42 30M 64K"]);
    await this.ferry(b, ["volume", "list"]);
  }

  protected doneMessage(): string {
    return (
      `Done: site B held every acknowledged write to ${SYNC_VOLUME.name} and took over ${VOLUME_NAMES.join(" and ")}, ` +
      "byte for byte, with everything stopped again"
    );
  }

  /** The status of the pair holding `volumes` (default: the async group), from `--json`. */
  private async pairStatus(site: DemoSite, volumes: readonly string[] = VOLUME_NAMES): Promise<PairStatus> {
    const pairs = JSON.parse(await this.ferryQuiet(site, ["replicate", "status", "--json"])) as PairStatus[];
    const pair = pairs.find((p) => volumes.every((name) => p.volumes.includes(name)));
    if (!pair) {
      throw new DemoCheckFailed(`site ${site.nats.name} reports no replication pair of ${volumes.join(", ")}`);
    }
    return pair;
  }

  /**
   * The synchronous part: `orders` replicated with `--mode sync` while the async group goes on.
   * Each write is read back at B's read-only export right after qemu-io got its acknowledgement at
   * A, with no `replicate sync` in between, so what the demo shows is the acknowledgement itself
   * waiting for B; then the digests of both copies, taken with the pair still running, must agree.
   */
  private async synchronousPair(a: DemoSite, b: DemoSite): Promise<void> {
    const { narrator } = this;
    const { name } = SYNC_VOLUME;
    narrator.step(`A third volume, ${name}, must not lose an acknowledged write: replicate it synchronously`);
    await this.ferry(a, ["volume", "create", name, "--size", formatBytes(SYNC_VOLUME.size)]);
    const started = Date.now();
    await this.ferry(a, ["replicate", "start", name, "--to", b.nats.name, "--mode", "sync", "--interval", INTERVAL]);
    await this.syncActive(a, name);
    narrator.show(
      `the pair copied ${name} whole, then went synchronous (syncState "active") after ` +
        `${((Date.now() - started) / 1000).toFixed(1)} s: from now on a write at ${a.nats.name} is acknowledged ` +
        `only once ${b.nats.name} has applied it`,
    );

    narrator.step(
      "Write orders at site A; read each at site B as soon as it is acknowledged (no `ferry replicate sync`)",
    );
    for (const order of ORDERS) {
      const range = `${order.offset} ${ORDER_LENGTH}`;
      await this.qemuIo(a, name, [`write -P ${order.pattern} ${range}`, "flush"]);
      await this.readAtReplica(order, a, b);
    }
    narrator.show(
      `all ${ORDERS.length} orders were at ${b.nats.name} the moment ${a.nats.name} acknowledged them ` +
        "(read -P checks every byte): while the pair is active, losing site A loses no acknowledged write",
    );

    narrator.step(`Replication status at site A: ${name} synchronous and active, beside the async group`);
    await this.ferry(a, ["replicate", "status"]);
    const status = await this.pairStatus(a, [name]);
    if (status.syncState !== "active" || status.syncWrites < ORDERS.length) {
      throw new DemoCheckFailed(
        `the sync pair of ${name} reports syncState ${status.syncState ?? "none"} and ${status.syncWrites} ` +
          `synchronous writes after ${ORDERS.length} orders; expected active and at least ${ORDERS.length}`,
      );
    }
    narrator.show(
      `syncWrites ${status.syncWrites}: writes to ${name} that ${b.nats.name} applied before ${a.nats.name} ` +
        `acknowledged them (ferry replicate status --json)`,
    );

    await this.targetLost(a, b);

    narrator.step(`Data check: ${name} at both sites, read over NBD with nbdcopy while the pair runs; then stop it`);
    const digests = [];
    for (const site of [a, b]) {
      const digest = await this.step(
        exportSha256(site.service.uri(name), this.interruption.signal, COMMAND_TIMEOUT_MS),
      );
      digests.push(digest);
    }
    const [atA, atB] = digests;
    this.narrator.show(
      formatTable(
        ["SITE", "VOLUME", "SHA256"],
        [
          [a.nats.name, name, atA ?? ""],
          [b.nats.name, name, atB ?? ""],
        ],
      ),
    );
    if (atA !== atB) {
      throw new DemoCheckFailed(`${name} differs between the sites: ${a.nats.name} ${atA}, ${b.nats.name} ${atB}`);
    }
    narrator.show(
      `equal: ${name} at ${b.nats.name} is byte for byte what ${a.nats.name} holds, all ${ORDERS.length + 1} orders, ` +
        `with the pair running (sha256 over all ${formatBytes(SYNC_VOLUME.size)})`,
    );
    await this.ferry(a, ["replicate", "stop", name]);
  }

  /**
   * `--on-peer-loss suspend` at work: site B's volume service stops, a write at A still completes (the
   * pair suspends and tracks what changed), and once B's service is back the pair resends what
   * changed and is synchronous again, with that write at B. B's new service replaces the old one in
   * `b` and in the list the cleanup stops; the old one leaves that list only once it has stopped.
   */
  private async targetLost(a: DemoSite, b: DemoSite): Promise<void> {
    const { narrator } = this;
    const { name } = SYNC_VOLUME;
    const order = ORDER_WHILE_B_IS_DOWN;
    const range = `${order.offset} ${ORDER_LENGTH}`;
    narrator.step("Site B's volume service stops: with --on-peer-loss suspend, writes at site A go on without it");
    const gone = b.service;
    narrator.command(b.nats.name, `kill -TERM ${gone.pid}   # its ferry volume serve`);
    await this.stopService(gone);
    narrator.show(`ferry volume serve of ${b.nats.name} (pid ${gone.pid}) stopped`);
    await this.qemuIo(a, name, [`write -P ${order.pattern} ${range}`, "flush"]);
    await this.ferry(a, ["replicate", "status"]);
    const suspended = await this.pairStatus(a, [name]);
    if (suspended.syncState === "active" || suspended.suspensions < 1) {
      throw new DemoCheckFailed(
        `the sync pair of ${name} reports syncState ${suspended.syncState ?? "none"} and ` +
          `${suspended.suspensions} suspensions with ${b.nats.name}'s service stopped; expected it suspended`,
      );
    }
    narrator.show(
      `order ${order.number} was acknowledged at ${a.nats.name} alone: the pair suspended itself ` +
        `(suspensions ${suspended.suspensions}) and tracks what changes until ${b.nats.name} is back`,
    );

    narrator.step("Site B's volume service is back: the pair resends what changed and is synchronous again");
    const back = await this.startService(b.nats, { allowRegions: [], peerNats: [`${a.nats.name}=${a.nats.peerUrl}`] });
    b.service = back.service;
    const resumed = await this.syncActive(a, name);
    await this.readAtReplica(order, a, b);
    narrator.show(
      `synchronous again: ${formatBytes(resumed.bytesRaw - suspended.bytesRaw)} resent, not the whole ` +
        `${formatBytes(SYNC_VOLUME.size)}; order ${order.number} is at ${b.nats.name}`,
    );
  }

  /** Read an order at B's read-only export; a failed read or other bytes fail the demo. */
  private async readAtReplica(
    order: { number: number; pattern: string; offset: string },
    a: DemoSite,
    b: DemoSite,
  ): Promise<void> {
    const command = `read -P ${order.pattern} ${order.offset} ${ORDER_LENGTH}`;
    await this.qemuIo(b, SYNC_VOLUME.name, [command], { readOnly: true }).catch((error: unknown) => {
      if (!(error instanceof ToolFailed)) throw error;
      throw new DemoCheckFailed(
        `order ${order.number} (${ORDER_LENGTH} of ${order.pattern} at ${order.offset}), acknowledged at ` +
          `${a.nats.name}, is not at ${b.nats.name}: ${error.message}`,
        { cause: error },
      );
    });
  }

  /** Poll the sync pair of `volume` until every write waits for the target; bounded. */
  private async syncActive(site: DemoSite, volume: string): Promise<PairStatus> {
    const deadline = Date.now() + SYNC_ACTIVE_TIMEOUT_MS;
    for (;;) {
      const status = await this.pairStatus(site, [volume]);
      if (status.syncState === "active") return status;
      if (Date.now() > deadline) {
        const why = status.lastError === null ? `state ${status.state}` : status.lastError;
        throw new DemoCheckFailed(
          `the sync pair of ${volume} is not active after ${SYNC_ACTIVE_TIMEOUT_MS / 1000} s ` +
            `(syncState ${status.syncState ?? "none"}): ${why}`,
        );
      }
      await this.pause(POLL_MS);
    }
  }

  /** Poll the pair until the target holds a complete generation; bounded. */
  private async firstGeneration(site: DemoSite): Promise<PairStatus> {
    const deadline = Date.now() + FIRST_GENERATION_TIMEOUT_MS;
    for (;;) {
      const status = await this.pairStatus(site);
      if (status.lastCompleteGeneration !== null) return status;
      if (Date.now() > deadline) {
        const why = status.lastError === null ? `state ${status.state}` : status.lastError;
        throw new DemoCheckFailed(
          `site B holds no complete generation after ${FIRST_GENERATION_TIMEOUT_MS / 1000} s: ${why}`,
        );
      }
      await this.pause(POLL_MS);
    }
  }

  /** A write to a replica must be refused: show that it is. */
  private async refusedWrite(site: DemoSite, volume: string): Promise<void> {
    const command = "write -P 0x42 0 4K";
    const uri = site.service.uri(volume);
    this.narrator.command(site.nats.name, `qemu-io -f raw -c '${command}' '${uri}'`);
    const outcome = await this.step(
      runTool("qemu-io", ["-f", "raw", "-c", command, uri], {
        signal: this.interruption.signal,
        timeoutMs: COMMAND_TIMEOUT_MS,
      }).then(
        () => undefined,
        (error: unknown) => error,
      ),
    );
    if (!(outcome instanceof ToolFailed)) {
      if (outcome !== undefined) throw outcome;
      throw new DemoCheckFailed(`site ${site.nats.name}'s replica ${volume} accepted a write before promote`);
    }
    this.narrator.show(`refused, as it must be: ${outcome.message.replace(/^.* failed: /, "")}`);
  }

  /**
   * Site B's digests against site A's. A is unchanged since the sync, and B holds the sync's
   * generation or a later one (continuous replication may cut one more, empty, before the stop),
   * so A's digests are A's bytes at the generation B was promoted at.
   */
  private async verify(
    a: DemoSite,
    b: DemoSite,
    promoted: readonly PromotedVolume[],
    atA: ReadonlyMap<string, string>,
  ): Promise<void> {
    const rows: (string | number)[][] = [];
    const mismatches: string[] = [];
    const generations = new Set<number>();
    for (const name of VOLUME_NAMES) {
      const generation = promoted.find((p) => p.volume === name)?.generation;
      if (generation === undefined) throw new DemoCheckFailed(`\`ferry replicate promote\` did not report ${name}`);
      generations.add(generation);
      const atB = await this.step(exportSha256(b.service.uri(name), this.interruption.signal, COMMAND_TIMEOUT_MS));
      const fromA = atA.get(name) ?? "";
      const equal = atB === fromA;
      if (!equal) mismatches.push(`${name}: site A ${fromA}, site B ${atB}`);
      rows.push([name, generation, short(fromA), short(atB), equal ? "equal" : "DIFFERENT"]);
    }
    this.narrator.show(formatTable(["VOLUME", "GENERATION", "SITE A SHA256", "SITE B SHA256", "RESULT"], rows));
    if (mismatches.length > 0) {
      throw new DemoCheckFailed(`site B does not hold site A's bytes: ${mismatches.join("; ")}`);
    }
    const total = GROUP.reduce((sum, v) => sum + v.size, 0);
    this.narrator.show(
      `verified: ${VOLUME_NAMES.join(" and ")} at ${b.nats.name} are byte for byte what ${a.nats.name} held at ` +
        `generation ${[...generations].join(", ")} (sha256 over all ${formatBytes(total)})`,
    );
  }
}

function describeSites(pair: SitePair): string[] {
  const { a, b } = pair;
  return [
    formatTable(
      ["SITE", "REGION", "NATS-SERVER", "CLIENTS", "JETSTREAM DOMAIN", "LEAFNODE"],
      [
        [a.name, a.region, `pid ${a.pid}`, a.server, a.name, `accepts on 127.0.0.1:${a.leafPort}`],
        [b.name, b.region, `pid ${b.pid}`, b.server, b.name, `dials ${a.name}`],
      ],
    ),
    `leafnode link ${b.name} → ${a.name} is up; each site has users ferryd and cli with random passwords (configs rendered from infra/nats/)`,
  ];
}

function compression(status: PairStatus): string {
  const factor = status.bytesWire > 0 ? status.bytesRaw / status.bytesWire : 0;
  const ratio = factor > 0 ? ` (${factor.toFixed(factor < 10 ? 1 : 0)}× smaller)` : "";
  return (
    `shipped ${formatBytes(status.bytesRaw)} of volume data as ${formatBytes(status.bytesWire)} on the wire${ratio}: ` +
    "zstd, and zero blocks as zero frames"
  );
}

function short(digest: string): string {
  return `${digest.slice(0, DIGEST_SHOWN)}…`;
}
