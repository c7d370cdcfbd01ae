/**
 * The hybrid application of `ferry demo`: one application, `web`, whose members are of different
 * kinds, protected from site A to site B as one entity and failed over as one. Each kind of member
 * is a `HybridMember` (the VM, `vm-member.ts`; the Kubernetes objects, `k8s-member.ts`): it prepares what its sites need before
 * ferryd starts, brings its member up at site A, runs its workload once protected, and after the
 * failover checks at site B that what it finds there is what it wrote at A. The application's own
 * steps — create, protect, a recovery point after the workloads, failover, the checks and the
 * summary row — do not change with the members, so another kind joins as one more member.
 *
 * This file never starts a process itself; members start theirs through the host, which owns and
 * stops them (`HybridHost.own`).
 */
import type { Operation, ProtectionStatus } from "@ferry/orchestrator";
import { DemoCheckFailed } from "../errors.js";
import { formatTable } from "../table.js";
import type { DemoSite } from "./demo-host.js";
import { shortDigest } from "./export-digest.js";
import type { Narrator } from "./narrator.js";
import type { SiteServiceSpec } from "./site-service.js";

/** What the demo offers a member: its narration, its sites' commands, and ownership of processes. */
export interface HybridHost {
  readonly narrator: Narrator;
  /** The demo's temp directory. */
  readonly root: string;
  readonly signal: AbortSignal;
  /** `work`, or the demo's interruption if that comes first. */
  step<T>(work: Promise<T>): Promise<T>;
  /** `ferry ARGS` at a site, shown; its stdout. */
  ferry(site: DemoSite, args: readonly string[]): Promise<string>;
  ferryQuiet(site: DemoSite, args: readonly string[]): Promise<string>;
  /** Another program at a site (virsh, truncate, grep …), shown unless `quiet`; its stdout. */
  tool(site: DemoSite, command: string, args: readonly string[], options?: { quiet?: boolean }): Promise<string>;
  /** Run a recovery operation, shown; the finished operation (it must have succeeded). */
  operation(site: DemoSite, args: readonly string[]): Promise<Operation>;
  waitFor(what: string, done: () => Promise<boolean>, timeoutMs?: number): Promise<void>;
  /** Stop this in the demo's cleanup (before the ferryds); `stop` answers the line to show. */
  own(what: string, stop: () => Promise<string>): void;
}

/** What members add to a site's ferryd (and to the environment of the commands run at that site). */
export type FerrydOptions = Pick<SiteServiceSpec, "libvirt" | "kubernetes">;

/** A row of the table that compares what a member wrote at A with what it found at B. */
export interface MemberCheck {
  source: string;
  sourceSha256: string;
  copy: string;
  copySha256: string;
}

/** One member of the hybrid application, of one kind. */
export interface HybridMember {
  /** What it is, for the narration, e.g. "VM web (the test guest)". */
  readonly title: string;
  /** Fail at once, saying what to install, when what it needs is missing. Starts nothing. */
  checkInstalled(): void;
  /** Before ferryd starts: whatever its sites need (started through `host.own`). */
  prepare(sites: { a: string; b: string }): Promise<void>;
  /** Show what `prepare` started. */
  describe(): Promise<void>;
  /** The ferryd options it needs at a site (e.g. `libvirt`). */
  ferrydOptions(site: string): FerrydOptions;
  /** Bring the member up at site A; answers the arguments it adds to `ferry app create`. */
  create(a: DemoSite): Promise<string[]>;
  /** Its workload at site A while protected; resolves once all of it is written and known. */
  write(a: DemoSite): Promise<void>;
  /** Site A is lost: set aside what the member leaves there that would be taken for site B's. */
  leave(a: DemoSite): Promise<void>;
  /**
   * Watch, from before `ferry failover` at B (started at `failoverStartedMs`) on, until the member is
   * up at B; quietly (the operation's output is being shown). Give up, failing, once `abandoned()`.
   */
  up(b: DemoSite, failoverStartedMs: number, abandoned: () => boolean): Promise<{ upAtMs: number; what: string }>;
  /** Show it at site B and check what it finds there against what it wrote at A. */
  verify(b: DemoSite): Promise<MemberCheck[]>;
}

export interface HybridSummary {
  operation: string;
  rtoSeconds: number;
  check: string;
  detail: string;
}

const RECOVERY_POINT_TIMEOUT_MS = 120_000;

export class HybridApplication {
  constructor(
    private readonly host: HybridHost,
    readonly name: string,
    private readonly members: readonly HybridMember[],
  ) {}

  checkInstalled(): void {
    for (const m of this.members) m.checkInstalled();
  }

  async prepare(sites: { a: string; b: string }): Promise<void> {
    await Promise.all(this.members.map((m) => m.prepare(sites)));
  }

  async describe(): Promise<void> {
    for (const m of this.members) await m.describe();
  }

  ferrydOptions(site: string): FerrydOptions {
    return Object.assign({}, ...this.members.map((m) => m.ferrydOptions(site)));
  }

  /** Bring the members up at A, make them one application and protect it to B under `policy`. */
  async protect(a: DemoSite, b: DemoSite, policy: string): Promise<void> {
    const { narrator } = this.host;
    const args: string[] = [];
    for (const m of this.members) {
      narrator.step(`${m.title}: a member of the hybrid application ${this.name} at site A`);
      args.push(...(await m.create(a)));
    }
    narrator.step(
      `The hybrid application ${this.name} (${this.members.map((m) => m.title).join(" + ")}), protected to site B like shop`,
    );
    await this.host.ferry(a, ["app", "create", this.name, ...args]);
    await this.host.ferry(a, ["protect", this.name, "--policy", policy, "--to", b.nats.name, "--wait"]);
  }

  /** The members' workloads at A, then a recovery point at B cut after all of them. */
  async write(a: DemoSite): Promise<void> {
    for (const m of this.members) {
      this.host.narrator.step(`${m.title} writes at site A while ${this.name} is protected`);
      await m.write(a);
    }
    const since = Date.now();
    await this.host.waitFor(
      `a recovery point of ${this.name} at site B after its workload`,
      async () => {
        const point = (await this.status(a)).lastRecoveryPoint;
        return point !== null && point.atMs > since;
      },
      RECOVERY_POINT_TIMEOUT_MS,
    );
    await this.host.ferry(a, ["status", this.name]);
  }

  /** Unplanned failover to B; every member up there with what it wrote at A; the summary row. */
  async failover(a: DemoSite, b: DemoSite): Promise<HybridSummary> {
    const { narrator } = this.host;
    narrator.step(
      `Unplanned failover of ${this.name} to site B: its members start there from B's latest recovery point`,
    );
    for (const m of this.members) await m.leave(a);
    // Watched from before the command: a member may be up before the command has returned.
    const started = Date.now();
    let failed = false;
    const watching = Promise.all(this.members.map((m) => m.up(b, started, () => failed)));
    let op: Operation;
    try {
      op = await this.host.operation(b, ["failover", this.name, "--to", b.nats.name]);
    } catch (error) {
      failed = true;
      await watching.catch(() => undefined);
      throw error;
    }
    const ups = await watching;
    const checks: MemberCheck[] = [];
    for (const m of this.members) checks.push(...(await m.verify(b)));
    const rows = checks.map((c) => [
      c.source,
      shortDigest(c.sourceSha256),
      c.copy,
      shortDigest(c.copySha256),
      c.copySha256 === c.sourceSha256 ? "equal" : "DIFFERENT",
    ]);
    narrator.show(formatTable(["WRITTEN AT A", "SHA256", "FOUND AT B", "SHA256", "RESULT"], rows));
    const different = checks.filter((c) => c.copySha256 !== c.sourceSha256);
    if (different.length > 0) {
      throw new DemoCheckFailed(
        `${this.name} at site B does not hold what it wrote at site A: ${different.map((c) => `${c.copy}: ${c.copySha256} ≠ ${c.sourceSha256}`).join("; ")}`,
      );
    }
    const upAtMs = Math.max(...ups.map((u) => u.upAtMs));
    const opSeconds = ((op.endedAtMs ?? 0) - op.startedAtMs) / 1000;
    return {
      operation: `failover of ${this.name} (hybrid)`,
      rtoSeconds: (upAtMs - started) / 1000,
      check: "B = what A wrote",
      detail: `operation ${opSeconds.toFixed(1)}s; ${ups.map((u) => u.what).join("; ")}`,
    };
  }

  private async status(a: DemoSite): Promise<ProtectionStatus> {
    const all = JSON.parse(await this.host.ferryQuiet(a, ["status", "--json"])) as ProtectionStatus[];
    const s = all.find((x) => x.app === this.name && x.source === a.nats.name);
    if (s === undefined) throw new DemoCheckFailed(`site ${a.nats.name} reports no protection of ${this.name}`);
    return s;
  }
}
