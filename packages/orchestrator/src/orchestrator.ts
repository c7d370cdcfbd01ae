/**
 * One site's orchestrator, inside ferryd next to the volume service: it leads the site (a KV
 * lease), serves the API on `ferry.api.<site>.<op>`, announces the site to the others, keeps the
 * data plane's replication pairs in line with the catalog's protections, tracks every protection's
 * RPO, and runs recovery operations (operations.ts) to completion — also after a restart.
 *
 * Cross-site work goes through the other site's ferryd, over the same API (internal ops below),
 * never into its catalog directly: each site's catalog has one writer, its leader.
 */
import { randomUUID } from "node:crypto";
import type { Msg, NatsConnection, Subscription } from "@nats-io/transport-node";
import type { K8sAdapter, VmAdapter } from "./adapters.js";
import { type Adapters, captureCut, type MemberSet, memberSets, orchestratedCuts } from "./capture.js";
import { Catalog, protectionKey } from "./catalog.js";
import { answer, call } from "./client.js";
import type { DataPlane, PairStatus, ReplicaPoints } from "./dataplane.js";
import { conflict, ErrorCode, errorBody, FerryError, invalid, notFound } from "./errors.js";
import { EventLog, type FerryEvent } from "./events.js";
import { Lease } from "./lease.js";
import { Metrics } from "./metrics.js";
import type {
  Application,
  Operation,
  OperationKind,
  Protection,
  ProtectionPolicy,
  ProtectionStatus,
  RecoveryPoint,
  RestoreSettings,
  Site,
} from "./model.js";
import { NodeDirectory, SITE_NODE, SiteDataPlane, serveNode } from "./nodes.js";
import { newOperation, runSteps, type StepFn } from "./operations.js";
import { type PointMetadata, PointStore, type PointSummary, pointsKey } from "./points.js";
import {
  type ApplicationSpec,
  checkName,
  DEFAULT_RESTORE,
  type PolicySpec,
  samePolicy,
  validateApplication,
  validatePolicy,
} from "./validate.js";

/** How long recover-members waits for a capture still being written (tries × ms). */
const CAPTURE_WAIT_TRIES = 10;
const CAPTURE_WAIT_MS = 500;

export interface OrchestratorOptions {
  site: string;
  region: string;
  /** Connected as the site's ferryd user. */
  nc: NatsConnection;
  dataPlane: DataPlane;
  version: string;
  /**
   * This ferryd's identity in the leader lease; stable across restarts of the same ferryd (host and
   * data directory), so a restarted leader takes its lease back at once. Default: a random id.
   */
  holder?: string;
  /** Scheduler period (RPO tracking, pair reconciliation); default 1 s. */
  tickMs?: number;
  /** Site announcement period; default 5 s. A site unheard for 3 periods shows as unreachable. */
  heartbeatMs?: number;
  /** Leader lease term; default 10 s. */
  leaseTermMs?: number;
  /**
   * This ferryd's node in the site, when the site runs several (one per host): it serves its data
   * plane to the site's leader on `ferry.node.<site>.<node>`, and as leader it reaches every node's
   * (nodes.ts). None: the site's only ferryd.
   */
  node?: string;
  /** Where the application's VMs and Kubernetes objects are handled (none: volumes only). */
  adapters?: Adapters;
  log?: (line: string) => void;
}

/** How long one site's ferryd waits for another's on steps that do not move data. */
const PEER_TIMEOUT_MS = 10_000;
/** A final sync or a resync may move a lot of data. */
const SYNC_TIMEOUT_MS = 30 * 60_000;
/** How often a target drops the metadata of recovery points it no longer keeps. */
const PRUNE_EVERY_MS = 30_000;
const HELLO_SUBJECT = "ferry.sites.hello";

type Handler = (body: Record<string, unknown>) => Promise<unknown>;

export class Orchestrator {
  readonly metrics = new Metrics();
  readonly site: string;
  readonly region: string;
  private readonly nc: NatsConnection;
  private dataPlane: DataPlane;
  /** This ferryd's own volume service (`dataPlane` is the whole site's when it has nodes). */
  private readonly localDataPlane: DataPlane;
  /** Several nodes in the site: the site-wide data plane (the leader's view) and this node's own. */
  private readonly node: string | undefined;
  private siteDp: SiteDataPlane | undefined;
  private nodes!: NodeDirectory;
  private nodeSub: Subscription | undefined;
  private readonly version: string;
  private readonly tickMs: number;
  private readonly heartbeatMs: number;
  private readonly log: (line: string) => void;
  private catalog!: Catalog;
  private events!: EventLog;
  private lease!: Lease;
  private leading = false;
  private stopped = false;
  private apiSub: Subscription | undefined;
  private helloSub: Subscription | undefined;
  private timers: NodeJS.Timeout[] = [];
  private ticking = false;
  private campaigning = false;
  /** When each site was last heard (kept in memory: the catalog is written only when a site changes). */
  private readonly lastSeen = new Map<string, number>();
  private readonly running = new Map<string, Promise<Operation>>();
  /** Last RPO verdict per protection key, to publish only changes. */
  private readonly rpoMet = new Map<string, boolean>();
  private readonly handlers: Record<string, Handler>;
  private readonly volumeSizes = new Map<string, number>();
  private readonly adapters: Adapters;
  private points!: PointStore;
  /** Orchestrated cuts: per protection key, when the last one started and whether one runs. */
  private readonly lastCut = new Map<string, number>();
  /** The orchestrated cut running now, per protection. */
  private readonly cutting = new Map<string, Promise<void>>();
  private readonly cutReason = new Map<string, string | null>();
  private lastPrune = 0;

  private constructor(options: OrchestratorOptions) {
    this.site = options.site;
    this.region = options.region;
    this.nc = options.nc;
    this.localDataPlane = this.recordingChanges(options.dataPlane);
    this.dataPlane = this.localDataPlane;
    this.node = options.node;
    this.version = options.version;
    this.tickMs = options.tickMs ?? 1_000;
    this.heartbeatMs = options.heartbeatMs ?? 5_000;
    this.log = options.log ?? ((line) => process.stderr.write(`ferryd: ${line}\n`));
    this.adapters = options.adapters ?? {};
    this.handlers = this.buildHandlers();
  }

  static async start(options: OrchestratorOptions): Promise<Orchestrator> {
    checkName("site", options.site);
    const o = new Orchestrator(options);
    o.catalog = await Catalog.open(o.nc);
    o.events = await EventLog.open(o.nc, o.site);
    o.points = new PointStore(o.nc, o.site);
    await o.points.ensureOwn();
    if (o.node !== undefined) checkName("node", o.node);
    // Every ferryd records itself, so that one started with --node and one without cannot run in
    // the same site unnoticed (the one without would address, and as leader reach, only itself).
    o.nodes = await NodeDirectory.open(o.nc, 3 * o.heartbeatMs);
    const others = (await o.nodes.list()).filter((n) => n.live && n.node !== (o.node ?? SITE_NODE));
    if (o.node === undefined && others.length > 0) {
      throw invalid(
        `site ${o.site} runs ferryd on nodes ${others.map((n) => n.node).join(", ")}: start this one with --node NAME too`,
      );
    }
    if (o.node !== undefined && others.some((n) => n.node === SITE_NODE)) {
      throw invalid(
        `site ${o.site} runs a ferryd without --node: with several ferryd in a site, give each its own --node NAME ` +
          "(restart that one with --node too)",
      );
    }
    await o.recordNode();
    if (o.node !== undefined) {
      o.nodeSub = serveNode(o.nc, o.site, o.node, o.dataPlane);
      o.siteDp = new SiteDataPlane(o.nc, o.site, o.node, o.dataPlane, o.nodes);
      o.dataPlane = o.siteDp;
    }
    o.lease = await Lease.open(o.nc, options.holder ?? randomUUID(), options.leaseTermMs ?? 10_000);
    await o.campaign();
    o.helloSub = o.nc.subscribe(HELLO_SUBJECT, { callback: (_e, m) => void o.onHello(m) });
    await o.hello();
    o.timers.push(setInterval(() => void o.hello(), o.heartbeatMs));
    o.timers.push(setInterval(() => void o.campaign(), Math.max(500, (options.leaseTermMs ?? 10_000) / 3)));
    o.timers.push(setInterval(() => void o.tick(), o.tickMs));
    return o;
  }

  get isLeader(): boolean {
    return this.leading;
  }

  /** Stop serving: the API and timers end, running operations stay persisted (resumed on restart). */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const t of this.timers) clearInterval(t);
    this.helloSub?.unsubscribe();
    this.apiSub?.unsubscribe();
    this.nodeSub?.unsubscribe();
    await this.recordNode().catch(() => {});
    await this.nodes?.stopped(this.node ?? SITE_NODE);
    await this.events?.flush();
    await this.lease?.release();
    this.leading = false;
    this.metrics.leader.set(0);
  }

  // ---- leadership -------------------------------------------------------------------------------

  /**
   * One round of the lease. Rounds never overlap: becoming leader loads the catalog, which can take
   * longer than the round period, and a second round meanwhile would subscribe the API twice.
   */
  private async campaign(): Promise<void> {
    if (this.stopped || this.campaigning) return;
    this.campaigning = true;
    try {
      const lead = await this.lease.tryAcquire();
      if (lead && !this.leading) await this.becomeLeader();
      else if (!lead && this.leading) this.stepDown();
    } finally {
      this.campaigning = false;
    }
  }

  private async becomeLeader(): Promise<void> {
    await this.catalog.load();
    this.leading = true;
    this.metrics.leader.set(1);
    this.metrics.applications.set(this.catalog.apps.list().length);
    this.apiSub = this.nc.subscribe(`ferry.api.${this.site}.*`, {
      queue: "ferryd",
      callback: (_e, m) => void this.serve(m),
    });
    this.log(`leading site ${this.site} (region ${this.region})`);
    for (const op of this.catalog.operations.list()) {
      if (op.state === "running") this.launch(op);
    }
  }

  private stepDown(): void {
    this.leading = false;
    this.metrics.leader.set(0);
    this.apiSub?.unsubscribe();
    this.apiSub = undefined;
    this.log(`no longer leading site ${this.site}`);
  }

  // ---- API ----------------------------------------------------------------------------------------

  private async serve(m: Msg): Promise<void> {
    const op = m.subject.slice(`ferry.api.${this.site}.`.length);
    await answer(m, async () => {
      const handler = this.handlers[op];
      if (handler === undefined) throw invalid(`ferryd of site ${this.site} has no operation '${op}'`);
      let body: unknown;
      try {
        body = m.data.length === 0 ? {} : m.json();
      } catch {
        throw invalid(`the request to ${op} is not JSON`);
      }
      if (typeof body !== "object" || body === null || Array.isArray(body)) {
        throw invalid(`the request to ${op} must be a JSON object`);
      }
      return handler(body as Record<string, unknown>);
    });
  }

  private buildHandlers(): Record<string, Handler> {
    return {
      siteList: async () => {
        const nodes =
          this.node === undefined
            ? undefined
            : (await this.nodes.list())
                .filter((n) => n.node !== SITE_NODE)
                .map((n) => ({ name: n.node, live: n.live }));
        return this.sites().map((x) => (x.self && nodes !== undefined ? { ...x, nodes } : x));
      },
      appCreate: async (b) => this.createApp(b as unknown as ApplicationSpec),
      appList: async () => this.catalog.apps.list().sort((a, b) => a.name.localeCompare(b.name)),
      appShow: async (b) => this.showApp(str(b, "name")),
      policyCreate: async (b) => this.createPolicy(b as unknown as PolicySpec),
      policyList: async () => this.catalog.policies.list().sort((a, b) => a.name.localeCompare(b.name)),
      protect: async (b) => this.protect(str(b, "app"), str(b, "policy"), str(b, "to")),
      unprotect: async (b) => this.unprotect(str(b, "app")),
      replicaForget: async (b) => this.replicaForget(str(b, "app")),
      status: async (b) => this.status(optStr(b, "app")),
      recoveryPoints: async (b) => this.recoveryPoints(str(b, "app")),
      recoveryPointShow: async (b) => this.recoveryPointShow(str(b, "app"), str(b, "point")),
      failover: async (b) => this.startFailover(b),
      failback: async (b) => this.startFailback(str(b, "app")),
      drillCleanup: async (b) => this.startDrillCleanup(str(b, "app")),
      operationGet: async (b) => this.operation(str(b, "id")),
      operationList: async (b) => this.operationList(optStr(b, "app")),
      events: async (b) => this.events.recent(num(b, "limit", 100), optStr(b, "app")),
      // Internal: one site's ferryd asking another's.
      replicaPlace: async (b) => ({ node: (await this.replicaNode(strs(b, "volumes"))) ?? null }),
      replicaRegister: async (b) => this.registerReplica(b.app as Application, b.protection as Protection),
      pairSync: async (b) => this.pairSync(str(b, "app"), optStr(b, "target")),
      pairStop: async (b) =>
        b.all === true
          ? this.pairStopAll(str(b, "app"), str(b, "target"))
          : this.pairStop(str(b, "app"), str(b, "target")),
      fence: async (b) => this.fenceApp(str(b, "app"), b.fenced === true),
      reverseStart: async (b) => this.reverseStart(str(b, "app"), str(b, "to")),
      protectionStatus: async (b) => this.status(str(b, "app")),
      appActivated: async (b) => this.appActivated(b.app as Application, b.protection as Protection | null),
      membersStop: async (b) => this.membersStop(str(b, "app")),
      lockAcquire: async (b) => this.lockAcquire(str(b, "app"), str(b, "operation"), str(b, "site")),
      lockRelease: async (b) => this.lockRelease(str(b, "app"), str(b, "operation")),
    };
  }

  // ---- sites --------------------------------------------------------------------------------------

  private async hello(): Promise<void> {
    if (this.stopped || this.nc.isClosed()) return;
    const me: Site = { name: this.site, region: this.region, version: this.version, lastSeenMs: Date.now() };
    this.nc.publish(HELLO_SUBJECT, JSON.stringify(me));
    await this.recordNode().catch((error) => this.log(`node ${this.node ?? "(site)"} not recorded: ${error}`));
  }

  /** `dp`, recording this node again as soon as its volumes change (not only every heartbeat). */
  private recordingChanges(dp: DataPlane): DataPlane {
    const then = async <T>(result: Promise<T>): Promise<T> => {
      const r = await result;
      if (this.nodes !== undefined) await this.recordNode().catch(() => {});
      return r;
    };
    return {
      ...dp,
      createVolume: (name, size, beside) => then(dp.createVolume(name, size, beside)),
      clone: (volumes, back, names) => then(dp.clone(volumes, back, names)),
      deleteVolume: (name) => then(dp.deleteVolume(name)),
    };
  }

  /** This ferryd in `ferry-nodes`: a node with the volumes it holds. */
  private async recordNode(): Promise<void> {
    if (this.node === undefined) return this.nodes.record(SITE_NODE);
    const volumes = (await this.localDataPlane.listVolumes()).map((v) => v.name);
    await this.nodes.record(this.node, volumes);
  }

  private async onHello(m: Msg): Promise<void> {
    if (!this.leading) return;
    let site: Site;
    try {
      site = m.json<Site>();
      checkName("site", site.name);
    } catch {
      return;
    }
    const known = this.catalog.sites.get(site.name);
    site.lastSeenMs = Date.now();
    this.lastSeen.set(site.name, site.lastSeenMs);
    if (known?.region === site.region && known.version === site.version) return;
    await this.catalog.sites.put(site.name, site).catch(() => {});
    if (known === undefined && site.name !== this.site) {
      await this.events.emit("site.joined", null, { site: site.name, region: site.region });
      await this.hello(); // let the newcomer learn of this site at once
    }
  }

  private sites(): (Site & { reachable: boolean; self: boolean })[] {
    const now = Date.now();
    return this.catalog.sites
      .list()
      .map((s) => ({ ...s, lastSeenMs: this.lastSeen.get(s.name) ?? s.lastSeenMs }))
      .map((s) => ({ ...s, self: s.name === this.site, reachable: now - s.lastSeenMs < 3 * this.heartbeatMs }))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  private requireSite(name: string): Site {
    checkName("site", name);
    const site = this.catalog.sites.get(name);
    if (site === undefined) {
      const known = this.catalog.sites.list().map((s) => s.name);
      throw notFound(
        `site ${name} is unknown to site ${this.site} (known: ${known.join(", ") || "none"}); ` +
          "a site becomes known once its ferryd runs and the sites are linked",
      );
    }
    return site;
  }

  /** Refuse before anything moves when the policy does not allow the site's region. */
  private checkResidency(app: string, policy: ProtectionPolicy, site: Site, action: string): void {
    if (policy.allowedRegions.length > 0 && !policy.allowedRegions.includes(site.region)) {
      throw new FerryError(
        ErrorCode.residency,
        `residency: application ${app} may not ${action} site ${site.name}: its region ${site.region} is not among ` +
          `the regions policy ${policy.name} allows (${policy.allowedRegions.join(", ")}); nothing was changed`,
      );
    }
  }

  // ---- applications and policies ---------------------------------------------------------------

  private requireApp(name: string): Application {
    checkName("application", name);
    const app = this.catalog.apps.get(name);
    if (app === undefined) {
      throw notFound(`application ${name} does not exist at site ${this.site}: see \`ferry app list\``);
    }
    return app;
  }

  private async createApp(spec: ApplicationSpec): Promise<Application> {
    const valid = validateApplication(spec);
    const { name, vms, kubernetes, sizeBytes } = valid;
    const existing = this.catalog.apps.get(name);
    // Running at another site now (failed over, migrated): it is defined there, not redefined from here.
    if (existing !== undefined && existing.active !== this.site) return existing;
    // A VM's disks are Ferry volumes (adopted), and so are the PVs under the selected PVCs: they
    // join the application's consistency group.
    let volumes = valid.volumes;
    const draft = { vms, kubernetes } as Application;
    for (const { adapter, members, what, kind } of memberSets(draft, this.adapters)) {
      if (adapter === undefined) {
        throw new FerryError(
          ErrorCode.failed,
          `application ${name} has ${what} members (${members.join(", ")}) but ferryd at site ${this.site} has no ` +
            `${what} adapter: start it with ${kind === "vm" ? "--libvirt URI" : "--kubeconfig FILE"}`,
        );
      }
      volumes = [...new Set([...volumes, ...(await adapter.volumesOf(members))])];
    }
    if (volumes.length === 0) {
      throw invalid(
        `application ${name} has no Ferry volumes: its PVCs are not bound to PVs of Ferry's CSI driver (csi.ferry.io), ` +
          "add --volume NAME or bind the claims to Ferry volumes",
      );
    }
    if (existing !== undefined) {
      const same = (a: Pick<Application, "volumes" | "vms" | "kubernetes">) =>
        JSON.stringify([a.volumes, a.vms, a.kubernetes]);
      if (same(existing) === same({ volumes, vms, kubernetes })) {
        return existing;
      }
      throw conflict(
        `application ${name} exists already with volumes ${existing.volumes.join(", ")}; choose another name`,
      );
    }
    for (const other of this.catalog.apps.list()) {
      const shared = other.volumes.find((v) => volumes.includes(v));
      if (shared !== undefined) {
        throw conflict(`volume ${shared} belongs to application ${other.name} already; a volume is in one application`);
      }
    }
    const present = new Map((await this.dataPlane.listVolumes()).map((v) => [v.name, v]));
    const missing = volumes.filter((v) => !present.has(v));
    const replica = volumes.find((v) => present.get(v)?.replicaOf);
    if (replica !== undefined) {
      throw conflict(
        `volume ${replica} is a replica of another site's volume; an application is created where it runs`,
      );
    }
    if (missing.length > 0 && sizeBytes === null) {
      throw invalid(
        `application ${name}: volume${missing.length > 1 ? "s" : ""} ${missing.join(", ")} do${missing.length > 1 ? "" : "es"} ` +
          "not exist at this site: add --size (e.g. --size 1G) to create them, or create them first",
      );
    }
    // With several nodes, an application's volumes share one (one consistency group): the new ones
    // go beside those that exist, and existing ones spread over nodes are refused.
    if (this.siteDp !== undefined) await this.siteDp.nodeOf(volumes, true);
    for (const v of missing) await this.dataPlane.createVolume(v, sizeBytes as number, volumes);
    const app: Application = {
      name,
      volumes,
      vms,
      kubernetes,
      origin: this.site,
      active: this.site,
      createdAtMs: Date.now(),
    };
    await this.catalog.apps.create(name, app);
    this.metrics.applications.set(this.catalog.apps.list().length);
    await this.events.emit("app.created", name, { volumes, created: missing });
    return app;
  }

  private async showApp(name: string) {
    const app = this.requireApp(name);
    return {
      app,
      protections: this.catalog.protectionsOf(name),
      operations: this.operationList(name).slice(-5),
      // With several nodes in the site: the one holding the application's volumes here.
      ...(this.siteDp === undefined
        ? {}
        : { node: await this.siteDp.nodeOf(app.volumes).catch((error) => `unknown: ${errorBody(error).message}`) }),
    };
  }

  private async createPolicy(spec: PolicySpec): Promise<ProtectionPolicy> {
    const policy = validatePolicy(spec, Date.now());
    const existing = this.catalog.policies.get(policy.name);
    if (existing !== undefined) {
      if (samePolicy(existing, policy)) return existing;
      throw conflict(`policy ${policy.name} exists already with other settings; choose another name`);
    }
    await this.catalog.policies.create(policy.name, policy);
    await this.events.emit("policy.created", null, { policy: policy.name, mode: policy.mode });
    return policy;
  }

  // ---- protection ---------------------------------------------------------------------------------

  private async protect(appName: string, policyName: string, to: string): Promise<Protection> {
    const app = this.requireApp(appName);
    checkName("policy", policyName);
    const policy = this.catalog.policies.get(policyName);
    if (policy === undefined) throw notFound(`policy ${policyName} does not exist: see \`ferry policy list\``);
    if (app.active !== this.site) {
      throw conflict(
        `application ${appName} runs at site ${app.active}, not here: protect it there (--site ${app.active})`,
      );
    }
    if (to === this.site) throw invalid(`application ${appName} runs at site ${to}; protect it to another site`);
    const target = this.requireSite(to);
    this.checkResidency(appName, policy, target, "be protected to");
    await this.ensureIdle(appName);
    const key = protectionKey(appName, to);
    const existing = this.catalog.protections.get(key);
    if (existing !== undefined && existing.state === "protecting") {
      if (existing.policy === policyName) return existing;
      throw conflict(
        `application ${appName} is protected to ${to} under policy ${existing.policy} already; one policy per target`,
      );
    }
    // Several targets, each under its own policy; synchronously to one of them at most (a write
    // waits for one site).
    const sync = this.catalog
      .protectionsOf(appName)
      .find((p) => p.source === this.site && p.target !== to && p.state === "protecting" && p.settings.mode === "sync");
    if (sync !== undefined && policy.mode === "sync") {
      throw conflict(
        `application ${appName} replicates synchronously to ${sync.target} already (policy ${sync.policy}); an ` +
          `application has one synchronous target: protect it to ${to} under an async policy`,
      );
    }
    const now = Date.now();
    const protection: Protection = {
      app: appName,
      policy: policyName,
      source: this.site,
      target: to,
      state: "protecting",
      settings: policy,
      createdAtMs: now,
      updatedAtMs: now,
    };
    // The target learns of the application first: it checks residency on its side too, and names
    // its node that keeps the replicas when it runs several.
    const registered = await call<Protection>(this.nc, to, "replicaRegister", { app, protection }, PEER_TIMEOUT_MS);
    if (registered?.targetNode !== undefined) protection.targetNode = registered.targetNode;
    await this.startPair(app, protection, false);
    await this.catalog.protections.put(key, protection);
    await this.events.emit("protection.started", appName, {
      target: to,
      policy: policyName,
      mode: policy.mode,
      rpoSeconds: policy.rpoMs / 1000,
    });
    return protection;
  }

  /**
   * Stop protecting an application: its pairs stop, the protection records go at both ends (the
   * target's when it answers). The replicas stay at the target, read-only, as the data plane keeps
   * them after a stop.
   */
  private async unprotect(appName: string): Promise<Protection[]> {
    const app = this.requireApp(appName);
    if (app.active !== this.site) {
      throw conflict(`application ${appName} runs at site ${app.active}: unprotect it there (--site ${app.active})`);
    }
    await this.ensureIdle(appName);
    const mine = this.catalog.protectionsOf(appName).filter((p) => p.source === this.site);
    if (mine.length === 0) throw notFound(`application ${appName} is not protected from site ${this.site}`);
    for (const p of mine) {
      await this.pairStop(appName, p.target);
      await this.catalog.protections.delete(protectionKey(appName, p.target));
      this.rpoMet.delete(protectionKey(appName, p.target));
      this.forgetCuts(protectionKey(appName, p.target));
      this.metrics.dropProtection(appName, p.target);
      await call(this.nc, p.target, "replicaForget", { app: appName }, PEER_TIMEOUT_MS).catch((error) =>
        this.log(`site ${p.target} not told that ${appName} is unprotected: ${errorBody(error).message}`),
      );
      await this.events.emit("protection.stopped", appName, { target: p.target });
    }
    return mine;
  }

  /** At a target: forget a protection its source stopped (the replicas stay). */
  private async replicaForget(appName: string): Promise<null> {
    const app = this.catalog.apps.get(appName);
    if (app === undefined || app.active === this.site) return null;
    await this.catalog.protections.delete(protectionKey(appName, this.site)).catch(() => {});
    return null;
  }

  private startPair(app: Application, p: Protection, reverse: boolean): Promise<PairStatus> {
    return this.dataPlane.replicateStart({
      volumes: app.volumes,
      to: p.target,
      toNode: p.targetNode,
      mode: p.settings.mode,
      intervalMs: p.settings.intervalMs,
      rate: p.settings.rateBytes,
      recoveryPoints: p.settings.retain,
      pointsMaxAgeMs: p.settings.retainAgeMs ?? null,
      scheduled: !orchestratedCuts(app, p),
      reverse,
    });
  }

  /** At the target: remember the application and its protection (the source's ferryd calls this). */
  private async registerReplica(app: Application, protection: Protection): Promise<Protection> {
    checkName("application", app?.name);
    if (protection?.target !== this.site) throw invalid(`protection of ${app.name} is not for site ${this.site}`);
    const source = this.requireSite(protection.source);
    if (protection.settings.allowedRegions.length > 0 && !protection.settings.allowedRegions.includes(this.region)) {
      throw new FerryError(
        ErrorCode.residency,
        `residency: site ${this.site} (region ${this.region}) refuses a copy of application ${app.name} from ` +
          `${source.name}: policy ${protection.policy} allows only ${protection.settings.allowedRegions.join(", ")}`,
      );
    }
    const present = this.catalog.apps.get(app.name);
    if (present !== undefined && present.active === this.site) {
      throw conflict(`application ${app.name} runs at site ${this.site}; it cannot also be a replica here`);
    }
    const owned = new Map((await this.dataPlane.listVolumes()).map((v) => [v.name, v]));
    const clash = app.volumes.find((v) => {
      const info = owned.get(v);
      return info !== undefined && !info.replicaOf && !info.readOnly;
    });
    if (clash !== undefined && present === undefined) {
      throw conflict(
        `site ${this.site} has its own volume ${clash}; a replica of ${app.name}'s volume of that name cannot be kept here`,
      );
    }
    const node = await this.replicaNode(app.volumes);
    const registered: Protection = { ...protection };
    if (node === undefined) delete registered.targetNode;
    else registered.targetNode = node;
    await this.catalog.apps.put(app.name, app);
    await this.catalog.protections.put(protectionKey(app.name, this.site), registered);
    this.metrics.applications.set(this.catalog.apps.list().length);
    return registered;
  }

  /**
   * Where this site keeps (or holds) `volumes` when it runs several nodes: the node that has them,
   * else the one with the fewest volumes. None: the site's only ferryd.
   */
  private async replicaNode(volumes: readonly string[]): Promise<string | undefined> {
    return this.siteDp?.nodeOf(volumes, true);
  }

  private findPair(app: Application, target: string, pairs: PairIndex): PairStatus | undefined {
    return pairs.get(pairKey(target, app.volumes));
  }

  /** Ship a generation of the application's pair to `target` now (the only pair when not given). */
  private async pairSync(appName: string, target: string | null): Promise<PairStatus> {
    const app = this.requireApp(appName);
    // Members' metadata travels with orchestrated cuts only: the generation a migration ends on must
    // carry one taken now (after its members were stopped here), so one is cut before the sync.
    const p = this.catalog
      .protectionsOf(appName)
      .find(
        (x) =>
          x.source === this.site &&
          x.state === "protecting" &&
          (target === null || x.target === target) &&
          orchestratedCuts(app, x),
      );
    if (p !== undefined) {
      const key = protectionKey(p.app, p.target);
      while (this.cutting.has(key)) await this.cutting.get(key);
      this.lastCut.set(key, Date.now());
      await this.startCut(app, p);
    }
    return this.dataPlane.replicateSync(app.volumes, target ?? undefined);
  }

  /** Stop this site's pair of the application to `target`, if there is one. */
  private async pairStop(appName: string, target: string): Promise<PairStatus | null> {
    const app = this.requireApp(appName);
    const pair = this.findPair(app, target, indexPairs(await this.dataPlane.replicateStatus()));
    if (pair === undefined) return null;
    const stopped = await this.dataPlane.replicateStop(app.volumes, target);
    const p = this.catalog.protections.get(protectionKey(appName, target));
    if (p !== undefined && p.source === this.site) {
      await this.catalog.protections.put(protectionKey(appName, target), {
        ...p,
        state: "paused",
        updatedAtMs: Date.now(),
      });
    }
    return stopped;
  }

  /**
   * Stop every pair of the application at this site: the one to `target` (where an operation moves
   * it) and those to its other targets, which pause — the volumes are about to become replicas of
   * `target`'s, and a replica ships nowhere. `ferry protect` resumes a paused target later.
   */
  private async pairStopAll(appName: string, target: string): Promise<PairStatus | null> {
    const stopped = await this.pairStop(appName, target);
    for (const p of this.catalog.protectionsOf(appName)) {
      if (p.source !== this.site || p.target === target) continue;
      if ((await this.pairStop(appName, p.target)) !== null) {
        await this.events.emit("protection.paused", appName, {
          target: p.target,
          reason: `${appName} moves to ${target}; protect it to ${p.target} again once it runs here`,
        });
      }
    }
    return stopped;
  }

  private async fenceApp(appName: string, fenced: boolean) {
    const app = this.requireApp(appName);
    const result = await this.dataPlane.fence(app.volumes, fenced);
    await this.events.emit(fenced ? "app.fenced" : "app.unfenced", appName, { volumes: app.volumes });
    return result;
  }

  /** At a site whose replicas were promoted: replicate the application back to `to`. */
  private async reverseStart(appName: string, to: string): Promise<Protection> {
    const app = this.requireApp(appName);
    // The settings come from the protection the application had (either direction).
    const previous = this.catalog
      .protectionsOf(appName)
      .sort((a, b) => b.updatedAtMs - a.updatedAtMs)
      .at(0);
    if (previous === undefined)
      throw notFound(`application ${appName} has no protection at site ${this.site} to reverse`);
    const now = Date.now();
    const protection: Protection = {
      ...previous,
      source: this.site,
      target: to,
      state: "protecting",
      createdAtMs: now,
      updatedAtMs: now,
    };
    delete protection.targetNode;
    const { node } = await call<{ node: string | null }>(
      this.nc,
      to,
      "replicaPlace",
      { volumes: app.volumes },
      PEER_TIMEOUT_MS,
    );
    if (node !== null) protection.targetNode = node;
    await this.startPair(app, protection, true);
    // The record of the old direction (this site as target) goes; this site's protections to other
    // targets stay (paused by the move, resumed when the application is back here).
    for (const p of this.catalog.protectionsOf(appName)) {
      if (p.target !== to && p.target === this.site) {
        await this.catalog.protections.delete(protectionKey(appName, p.target)).catch(() => {});
      }
    }
    await this.catalog.protections.put(protectionKey(appName, to), protection);
    await this.events.emit("protection.started", appName, { target: to, policy: protection.policy, reverse: true });
    return protection;
  }

  /** The other site's view after an operation moved the application. */
  private async appActivated(app: Application, protection: Protection | null): Promise<null> {
    checkName("application", app?.name);
    await this.catalog.apps.put(app.name, app);
    for (const p of this.catalog.protectionsOf(app.name)) {
      if (protection === null || p.target !== protection.target) {
        await this.catalog.protections.put(protectionKey(p.app, p.target), {
          ...p,
          state: "failed-over",
          updatedAtMs: Date.now(),
        });
      }
    }
    if (protection !== null) await this.catalog.protections.put(protectionKey(app.name, protection.target), protection);
    return null;
  }

  // ---- status and RPO -----------------------------------------------------------------------------

  private async status(appName: string | null): Promise<ProtectionStatus[]> {
    if (appName !== null) this.requireApp(appName);
    const protections = this.catalog.protections
      .list()
      .filter((p) => appName === null || p.app === appName)
      .sort((a, b) => a.app.localeCompare(b.app) || a.target.localeCompare(b.target));
    const pairs = indexPairs(
      protections.some((p) => p.source === this.site) ? await this.dataPlane.replicateStatus() : [],
    );
    const out: ProtectionStatus[] = [];
    for (const p of protections) {
      const app = this.catalog.apps.get(p.app);
      if (app === undefined) continue;
      out.push(await this.statusOf(app, p, pairs));
    }
    return out;
  }

  private async statusOf(app: Application, p: Protection, pairs: PairIndex): Promise<ProtectionStatus> {
    if (p.source === this.site && p.state === "protecting") {
      const pair = this.findPair(app, p.target, pairs);
      const status = sourceStatus(p, pair);
      if (pair === undefined) status.lastError = this.siteDp?.whyMissing(app.volumes) ?? status.lastError;
      if (pair !== undefined && pair.lastCompleteGeneration === null) {
        status.initialCopy =
          pair.transfer != null
            ? { doneBytes: pair.transfer.doneBytes, totalBytes: pair.transfer.totalBytes }
            : { doneBytes: pair.bytesRaw, totalBytes: await this.sizeOf(app) };
      }
      return status;
    }
    const base = statusBase(p);
    // At the target (or a protection no longer shipping): what the replicas hold.
    let last: { generation: number; atMs: number } | null = null;
    if (p.target === this.site && app.active !== this.site) {
      const points = await this.dataPlane.points(app.volumes).catch(() => []);
      const newest = completePoints(points)[0];
      if (newest !== undefined) last = { generation: newest.generation, atMs: newest.atMs };
    }
    const lag = last === null ? null : Math.max(0, (Date.now() - last.atMs) / 1000);
    return {
      ...base,
      state: p.target === this.site && p.state === "protecting" ? "replica" : p.state,
      syncState: null,
      lagSeconds: lag,
      rpoMet: lag !== null && lag * 1000 <= Math.max(p.settings.rpoMs, p.settings.intervalMs * 2),
      lastRecoveryPoint: last,
      bytesRaw: 0,
      bytesWire: 0,
      lastError: null,
    };
  }

  /** The application's volumes' total size (sizes cached: a volume's size does not change). */
  private async sizeOf(app: Application): Promise<number> {
    if (app.volumes.some((v) => !this.volumeSizes.has(v))) {
      for (const v of await this.dataPlane.listVolumes()) this.volumeSizes.set(v.name, v.size);
    }
    return app.volumes.reduce((sum, v) => sum + (this.volumeSizes.get(v) ?? 0), 0);
  }

  /** One scheduler pass: reconcile pairs with protections, track RPO, publish changes. */
  private async tick(): Promise<void> {
    if (!this.leading || this.stopped || this.ticking) return;
    this.ticking = true;
    const end = this.metrics.tickSeconds.startTimer();
    try {
      if (Date.now() - this.lastPrune >= PRUNE_EVERY_MS) {
        this.lastPrune = Date.now();
        void this.prunePoints();
      }
      const mine = this.catalog.protections.list().filter((p) => p.source === this.site && p.state === "protecting");
      if (mine.length === 0) return;
      const pairs = indexPairs(await this.dataPlane.replicateStatus());
      for (const p of mine) {
        const app = this.catalog.apps.get(p.app);
        if (app === undefined || app.active !== this.site || this.holdsLock(p.app)) continue;
        const pair = this.findPair(app, p.target, pairs);
        if (pair === undefined) {
          // Level-triggered: a protection without its pair gets it back (e.g. after a data dir restore).
          await this.startPair(app, p, false).catch((error) =>
            this.log(`cannot restart replication of ${p.app} to ${p.target}: ${errorBody(error).message}`),
          );
          continue;
        }
        // Only between cycles: a cut asked for while one ships (or the first full copy runs) waits
        // for it, and the application would stay quiesced all that time.
        if (orchestratedCuts(app, p) && pair.state === "idle" && pair.lastCompleteGeneration !== null) {
          this.maybeCut(app, p);
        }
        // Synchronous: a tick handles every protection of the site without a turn of the event loop each.
        const s = sourceStatus(p, pair);
        const series = this.metrics.protection(p.app, p.target);
        series.rpoSeconds.set(s.rpoSeconds);
        if (s.lagSeconds !== null) series.lag.set(s.lagSeconds);
        series.rpoMet.set(s.rpoMet ? 1 : 0);
        series.bytesRaw.set(s.bytesRaw);
        series.bytesWire.set(s.bytesWire);
        const key = protectionKey(p.app, p.target);
        const before = this.rpoMet.get(key);
        // Before the first complete generation there is no RPO to miss or meet yet.
        if (s.lastRecoveryPoint === null) continue;
        this.rpoMet.set(key, s.rpoMet);
        // A change, or a first verdict that is a breach (a first "met" is no news).
        if (before !== s.rpoMet && (before !== undefined || !s.rpoMet)) {
          await this.events.emit(s.rpoMet ? "rpo.recovered" : "rpo.breached", p.app, {
            target: p.target,
            lagSeconds: s.lagSeconds,
            rpoSeconds: s.rpoSeconds,
          });
        }
      }
    } catch (error) {
      this.log(`scheduler: ${errorBody(error).message}`);
    } finally {
      end();
      this.ticking = false;
    }
  }

  // ---- recovery points ----------------------------------------------------------------------------

  private async recoveryPoints(appName: string): Promise<RecoveryPoint[]> {
    const app = this.requireApp(appName);
    const here = this.catalog.protectionsOf(appName).find((p) => p.target === this.site);
    if (here !== undefined && app.active !== this.site) {
      const replicas = await this.dataPlane.points(app.volumes);
      const points = completePoints(replicas);
      const captured = await this.points.list(appName, here.source).catch(() => new Map());
      return points.map((pt) => {
        const c = captured.get(pt.generation);
        return {
          id: String(pt.generation),
          app: appName,
          site: this.site,
          source: here.source,
          generation: pt.generation,
          back: pt.back,
          atMs: pt.atMs,
          // Without a capture the point holds what the disks held at the cut: crash-consistent.
          consistency: c?.consistency ?? "crash",
          reason: c?.reason ?? null,
          members: c?.members ?? 0,
          metadataBytes: c?.bytes ?? null,
        };
      });
    }
    const out: RecoveryPoint[] = [];
    for (const p of this.catalog.protectionsOf(appName)) {
      if (p.source !== this.site || p.state !== "protecting") continue;
      out.push(
        ...(await call<RecoveryPoint[]>(this.nc, p.target, "recoveryPoints", { app: appName }, PEER_TIMEOUT_MS)),
      );
    }
    return out;
  }

  /** The metadata stored with one recovery point (asked at the target, or passed on to it). */
  private async recoveryPointShow(appName: string, point: string): Promise<PointMetadata | null> {
    const app = this.requireApp(appName);
    const generation = Number(point);
    if (!/^\d+$/.test(point) || !Number.isSafeInteger(generation)) {
      throw invalid(`${point} is not a recovery point id: see \`ferry recovery-points ${appName}\``);
    }
    const here = this.catalog.protectionsOf(appName).find((p) => p.target === this.site);
    if (here === undefined || app.active === this.site) {
      // A generation is cut by one pair, so it is a point of one target only: ask each in turn.
      const targets = this.catalog
        .protectionsOf(appName)
        .filter((p) => p.source === this.site)
        .map((p) => p.target);
      if (targets.length === 0) throw notFound(`application ${appName} has no recovery points: it is not protected`);
      let missing: unknown;
      for (const target of targets) {
        try {
          return await call(this.nc, target, "recoveryPointShow", { app: appName, point }, PEER_TIMEOUT_MS);
        } catch (error) {
          if (!(error instanceof FerryError && error.code === ErrorCode.notFound) || targets.length === 1) throw error;
          missing = error;
        }
      }
      throw targets.length > 1
        ? notFound(
            `application ${appName} has no recovery point ${point} at ${targets.join(" or ")} (see \`ferry recovery-points ${appName}\`)`,
          )
        : missing;
    }
    const meta = await this.points.get(appName, here.source, generation);
    if (meta === null) {
      const kept = completePoints(await this.dataPlane.points(app.volumes)).some((p) => p.generation === generation);
      if (!kept) {
        throw notFound(
          `application ${appName} has no recovery point ${point} at site ${this.site} (see \`ferry recovery-points ${appName}\`)`,
        );
      }
    }
    return meta;
  }

  /**
   * Start an orchestrated cut of `p` when its interval has passed and none is running; in the
   * background (the tick goes on), one at a time per protection.
   */
  private maybeCut(app: Application, p: Protection): void {
    const key = protectionKey(p.app, p.target);
    const now = Date.now();
    if (this.cutting.has(key) || now - (this.lastCut.get(key) ?? 0) < p.settings.intervalMs) return;
    this.lastCut.set(key, now);
    this.startCut(app, p);
  }

  /** One orchestrated cut of `p`, noted in `cutting` until it is over; never rejects. */
  private startCut(app: Application, p: Protection): Promise<void> {
    const key = protectionKey(p.app, p.target);
    const end = this.metrics.captureSeconds.startTimer();
    const running = captureCut(app, p, this.dataPlane, this.points, this.adapters)
      .then(async ({ meta }) => {
        end();
        const before = this.cutReason.get(key);
        this.cutReason.set(key, meta.reason);
        // Said once when it starts (or its reason changes), and once when it is over.
        if (meta.reason !== null && meta.reason !== before) {
          await this.events.emit("point.degraded", p.app, {
            target: p.target,
            generation: meta.generation,
            consistency: meta.consistency,
            wanted: p.settings.consistency,
            reason: meta.reason,
          });
        } else if (meta.reason === null && before !== undefined && before !== null) {
          await this.events.emit("point.restored", p.app, { target: p.target, generation: meta.generation });
        }
      })
      .catch((error) => {
        end();
        this.log(`cut of ${p.app} for ${p.target}: ${errorBody(error).message}`);
      })
      .finally(() => this.cutting.delete(key));
    this.cutting.set(key, running);
    return running;
  }

  /** A protection that ended leaves no cut bookkeeping behind. */
  private forgetCuts(key: string): void {
    this.lastCut.delete(key);
    this.cutReason.delete(key);
  }

  /** At a target: drop the metadata of points its replicas no longer keep. */
  private async prunePoints(): Promise<void> {
    let listed: Map<string, Map<number, PointSummary>> | undefined;
    for (const p of this.catalog.protections.list()) {
      const app = this.catalog.apps.get(p.app);
      if (p.target !== this.site || app === undefined || app.active === this.site) continue;
      try {
        const kept = completePoints(await this.dataPlane.points(app.volumes));
        const oldest = kept.at(-1);
        if (oldest === undefined) continue;
        // One listing of the bucket for the whole pass.
        listed ??= await this.points.listAll();
        const points = listed.get(pointsKey(p.app, p.source)) ?? new Map<number, PointSummary>();
        await this.points.prune(p.app, p.source, oldest.generation, points);
      } catch (error) {
        this.log(`pruning recovery-point metadata of ${p.app}: ${errorBody(error).message}`);
      }
    }
  }

  /** The member adapters an application needs, with their members; fails naming what is missing. */
  private memberAdapters(app: Application): (MemberSet & { adapter: VmAdapter | K8sAdapter })[] {
    return memberSets(app, this.adapters).map((set) => {
      const { adapter } = set;
      if (adapter === undefined) {
        throw new FerryError(
          ErrorCode.failed,
          `application ${app.name} has ${set.what} members (${set.members.join(", ")}) but ferryd at site ` +
            `${this.site} has no ${set.what} adapter: start it with ${set.kind === "vm" ? "--libvirt URI" : "a kubeconfig"}`,
        );
      }
      return { ...set, adapter };
    });
  }

  /** Another site's operation on `app` involves this site: hold the application for it. */
  private async lockAcquire(app: string, operation: string, site: string): Promise<null> {
    const value = `${site}/${operation}`;
    if (this.catalog.locks.get(app) === value) return null;
    await this.ensureIdle(app);
    await this.catalog.locks.create(app, value).catch((error) => {
      if (error instanceof FerryError && error.code === ErrorCode.conflict) this.requireIdle(app);
      throw error;
    });
    return null;
  }

  private async lockRelease(app: string, operation: string): Promise<null> {
    const holder = this.catalog.locks.get(app);
    if (holder !== undefined && remoteHolder(holder)?.operation === operation) await this.catalog.locks.delete(app);
    return null;
  }

  /** Planned migration, at the site the application leaves: stop its members cleanly. */
  private async membersStop(appName: string): Promise<string[]> {
    const app = this.requireApp(appName);
    const stopped: string[] = [];
    for (const { adapter, members } of this.memberAdapters(app)) {
      await adapter.stop(members);
      stopped.push(...members);
    }
    return stopped;
  }

  // ---- operations ---------------------------------------------------------------------------------

  private operation(id: string): Operation {
    const op = this.catalog.operations.get(id);
    if (op === undefined) throw notFound(`operation ${id} is not known at site ${this.site}`);
    return op;
  }

  private operationList(app: string | null): Operation[] {
    return this.catalog.operations
      .list()
      .filter((o) => app === null || o.app === app)
      .sort((a, b) => a.startedAtMs - b.startedAtMs);
  }

  private holdsLock(app: string): boolean {
    return this.catalog.locks.get(app) !== undefined;
  }

  /**
   * Refuse while an operation holds `app` — one of this site's, or one another site runs on it
   * (lock value `<site>/<operation>`). A remote holder that no longer runs it (its lock release was
   * lost) is cleared here.
   */
  private async ensureIdle(app: string): Promise<void> {
    const holder = this.catalog.locks.get(app);
    const remote = holder === undefined ? null : remoteHolder(holder);
    if (remote !== null) {
      const op = await call<Operation>(this.nc, remote.site, "operationGet", { id: remote.operation }, 5_000).catch(
        (error) => {
          if (error instanceof FerryError && error.code === ErrorCode.notFound) return null;
          throw conflict(
            `application ${app} is held by operation ${remote.operation} of site ${remote.site}, which does not ` +
              `answer (${errorBody(error).message}); try again when it is back (\`ferry operation ${remote.operation} ` +
              `--site ${remote.site}\`)`,
          );
        },
      );
      if (op === null || op.state !== "running") {
        await this.catalog.locks.delete(app);
        return;
      }
    }
    this.requireIdle(app);
  }

  private requireIdle(app: string): void {
    const holder = this.catalog.locks.get(app);
    if (holder === undefined) return;
    const remote = remoteHolder(holder);
    if (remote !== null) {
      throw conflict(
        `application ${app} is busy with operation ${remote.operation} run by site ${remote.site}; wait for it to ` +
          `finish (\`ferry operation ${remote.operation} --site ${remote.site}\`) and try again`,
      );
    }
    const op = this.catalog.operations.get(holder);
    const step = op?.steps.find((s) => s.state === "running")?.name ?? "starting";
    throw conflict(
      `application ${app} is busy with ${op?.kind ?? "an operation"} ${holder} (step ${step}); wait for it to finish ` +
        `(\`ferry operation ${holder}\`) and try again`,
    );
  }

  /**
   * Create, lock and launch an operation; answers it as first persisted (state running). The
   * application is locked here and at the other site the operation involves, so neither starts
   * another on it meanwhile; an unreachable other site (an unplanned failover) does not stop it.
   */
  private async begin(kind: OperationKind, app: Application, from: string, point: number | null): Promise<Operation> {
    await this.ensureIdle(app.name);
    const op = newOperation(kind, { id: randomUUID(), app: app.name, to: this.site, from, point, nowMs: Date.now() });
    await this.catalog.locks.create(app.name, op.id).catch((error) => {
      if (error instanceof FerryError && error.code === ErrorCode.conflict) this.requireIdle(app.name);
      throw error;
    });
    if (from !== this.site) {
      try {
        await call(this.nc, from, "lockAcquire", { app: app.name, operation: op.id, site: this.site }, 5_000);
      } catch (error) {
        if (!(error instanceof FerryError && error.code === ErrorCode.unreachable)) {
          await this.catalog.locks.delete(app.name).catch(() => {});
          throw error;
        }
        this.log(`${kind} of ${app.name}: site ${from} does not answer; its side is not locked`);
      }
    }
    await this.catalog.operations.put(op.id, op);
    await this.events.emit("operation.started", app.name, { operation: op.id, kind, from, to: this.site });
    this.launch(op);
    return op;
  }

  private launch(op: Operation): void {
    if (this.running.has(op.id)) return;
    const run = runSteps(
      op,
      this.stepsFor(op),
      (o) => this.catalog.operations.put(o.id, o),
      (o, step) =>
        void this.events.emit("operation.step", o.app, {
          operation: o.id,
          kind: o.kind,
          step: step.name,
          state: step.state,
          detail: step.detail,
        }),
      errorBody,
    ).then(async (done) => {
      this.running.delete(op.id);
      await this.catalog.locks.delete(done.app).catch(() => {});
      if (done.from !== this.site) {
        await call(this.nc, done.from, "lockRelease", { app: done.app, operation: done.id }, 5_000).catch((error) =>
          this.log(`site ${done.from} not told that ${done.kind} ${done.id} ended: ${errorBody(error).message}`),
        );
      }
      const seconds = ((done.endedAtMs ?? Date.now()) - done.startedAtMs) / 1000;
      this.metrics.operations.inc({ kind: done.kind, result: done.state });
      this.metrics.operationSeconds.observe({ kind: done.kind }, seconds);
      await this.events.emit(done.state === "succeeded" ? "operation.completed" : "operation.failed", done.app, {
        operation: done.id,
        kind: done.kind,
        seconds,
        error: done.error,
        result: done.result,
      });
      return done;
    });
    this.running.set(op.id, run);
  }

  /** Wait for a running operation (tests and the CLI's --wait go through operationGet instead). */
  async settle(id: string): Promise<Operation | undefined> {
    return this.running.get(id);
  }

  private async startFailover(body: Record<string, unknown>): Promise<Operation> {
    const appName = str(body, "app");
    const to = optStr(body, "to") ?? this.site;
    const planned = body.planned === true;
    const test = body.test === true;
    if (planned && test) throw invalid("give either --planned or --test, not both");
    if (to !== this.site) {
      // The operation runs where the application is to be recovered: pass the request on.
      return call<Operation>(this.nc, to, "failover", { ...body, to }, PEER_TIMEOUT_MS);
    }
    const app = this.requireApp(appName);
    const point = body.point === undefined || body.point === null ? null : Number(body.point);
    if (point !== null && (!Number.isSafeInteger(point) || point < 0)) {
      throw invalid(
        `--point ${String(body.point)} is not a recovery point id: see \`ferry recovery-points ${appName}\``,
      );
    }
    if (planned && point !== null)
      throw invalid("a planned migration moves the latest data; --point applies to failover");
    const protection = this.catalog.protectionsOf(appName).find((p) => p.target === this.site);
    if (app.active === this.site && !test) {
      throw conflict(`application ${appName} runs at site ${this.site} already; nothing to fail over`);
    }
    if (protection === undefined) {
      throw notFound(`application ${appName} is not protected to site ${this.site}: no replica to recover here`);
    }
    const here = this.requireSite(this.site);
    this.checkResidency(appName, protection.settings, here, test ? "run a drill at" : "fail over to");
    await this.requirePoint(app, point);
    return this.begin(test ? "drill" : planned ? "migration" : "failover", app, app.active, point);
  }

  private async requirePoint(app: Application, point: number | null): Promise<number> {
    const replicas = await this.dataPlane.points(app.volumes).catch((error) => {
      throw new FerryError(
        ErrorCode.failed,
        `cannot read the recovery points of ${app.name}: ${errorBody(error).message}`,
      );
    });
    const points = completePoints(replicas);
    if (points.length === 0) {
      throw new FerryError(
        ErrorCode.notFound,
        `application ${app.name} has no recovery point at site ${this.site} yet: the first full copy has not ` +
          "completed (see `ferry status`)",
      );
    }
    if (point === null) return 0;
    const found = points.find((p) => p.generation === point);
    if (found === undefined) {
      throw notFound(
        `application ${app.name} has no recovery point ${point} at site ${this.site}; it has ` +
          `${points.map((p) => p.generation).join(", ")} (see \`ferry recovery-points ${app.name}\`)`,
      );
    }
    return found.back;
  }

  private async startFailback(appName: string): Promise<Operation> {
    const app = this.requireApp(appName);
    if (app.origin !== this.site) {
      return call<Operation>(this.nc, app.origin, "failback", { app: appName }, PEER_TIMEOUT_MS);
    }
    let active = app.active;
    if (active === this.site) {
      // This site may have been down while the application failed over: ask the targets.
      for (const p of this.catalog.protectionsOf(appName)) {
        if (p.target === this.site) continue;
        const view = await call<{ app: Application }>(
          this.nc,
          p.target,
          "appShow",
          { name: appName },
          PEER_TIMEOUT_MS,
        ).catch(() => null);
        if (view !== null && view.app.active === p.target) active = p.target;
      }
    }
    if (active === this.site) {
      throw conflict(`application ${appName} runs at its origin ${this.site} already; nothing to fail back`);
    }
    if (active !== app.active) await this.catalog.apps.put(appName, { ...app, active });
    return this.begin("failback", { ...app, active }, active, null);
  }

  private async startDrillCleanup(appName: string): Promise<Operation> {
    const app = this.requireApp(appName);
    const drill = this.catalog.operations
      .list()
      .filter((o) => o.app === appName && o.kind === "drill" && o.state === "succeeded" && o.result.cleaned !== "yes")
      .at(-1);
    if (drill === undefined) {
      // A drill runs at a target; the request may have come to the source: the target with one.
      const targets = this.catalog
        .protectionsOf(appName)
        .filter((p) => p.source === this.site && p.target !== this.site)
        .map((p) => p.target);
      for (const target of targets) {
        try {
          return await call<Operation>(this.nc, target, "drillCleanup", { app: appName }, PEER_TIMEOUT_MS);
        } catch (error) {
          if (!(error instanceof FerryError && error.code === ErrorCode.notFound) || targets.length === 1) throw error;
        }
      }
      throw notFound(`application ${appName} has no drill to clean up at site ${this.site}`);
    }
    const op = await this.begin("drill-cleanup", app, this.site, null);
    op.result.drill = drill.id;
    await this.catalog.operations.put(op.id, op);
    return op;
  }

  /**
   * How `a`'s Kubernetes objects are restored at this site, recovered from `peer`: the protection's
   * settings, written from the origin's names to the other site's. Coming home to the origin they
   * are read backwards (a namespace mapped shop → shop-dr maps back), and the transforms — meant for
   * the other site — are left out.
   */
  private restoreSettings(a: Application, peer: string): RestoreSettings {
    const between = (p: Protection) =>
      (p.source === peer && p.target === this.site) || (p.source === this.site && p.target === peer);
    const restore = this.catalog.protectionsOf(a.name).find(between)?.settings.restore ?? DEFAULT_RESTORE;
    if (this.site !== a.origin) return restore;
    const invert = (m: Record<string, string>) => Object.fromEntries(Object.entries(m).map(([k, v]) => [v, k]));
    return {
      namespaceMapping: invert(restore.namespaceMapping),
      storageClassMapping: invert(restore.storageClassMapping),
      onConflict: restore.onConflict,
      transforms: [],
    };
  }

  private stepsFor(op: Operation): Record<string, StepFn> {
    const app = () => this.requireApp(op.app);
    const peer = op.from;
    /** The peer ships a generation of its pair to this site now. */
    const syncPeer = () =>
      call<PairStatus>(this.nc, peer, "pairSync", { app: op.app, target: this.site }, SYNC_TIMEOUT_MS);
    const promote: StepFn = async (o) => {
      const a = app();
      const volumes = await this.dataPlane.listVolumes();
      const replicas = a.volumes.filter((v) => volumes.find((x) => x.name === v)?.replicaOf);
      if (replicas.length === 0) return { detail: "already promoted", skipped: true };
      const back = await this.requirePoint(a, o.point);
      const promoted = await this.dataPlane.promote(replicas, back);
      const generation = promoted[0]?.generation ?? null;
      o.result.point = generation;
      return { detail: `promoted ${replicas.join(", ")} at generation ${generation}` };
    };
    /** Bring the VMs and Kubernetes objects up from what was captured at the recovered point. */
    const recoverMembers =
      (drill: boolean): StepFn =>
      async (o) => {
        const a = app();
        if (a.vms.length === 0 && a.kubernetes === null)
          return { detail: "no VM or Kubernetes members", skipped: true };
        const adapters = this.memberAdapters(a);
        // The recovered generation (set by promote or clone); unknown only if that step ran before a crash.
        const generation = typeof o.result.point === "number" ? o.result.point : Number.MAX_SAFE_INTEGER;
        // The source writes a point's capture right after its cut, while the generation ships: a
        // generation that completed a moment ago may still be waiting for it.
        let meta = await this.points.forRecovery(a.name, peer, generation);
        for (let i = 0; meta === null && i < CAPTURE_WAIT_TRIES; i++) {
          await new Promise((resolve) => setTimeout(resolve, CAPTURE_WAIT_MS));
          meta = await this.points.forRecovery(a.name, peer, generation);
        }
        if (meta === null) {
          throw new FerryError(
            ErrorCode.notFound,
            `no VM or Kubernetes metadata was captured for ${a.name} up to generation ${generation} at site ` +
              `${this.site}: its volumes are recovered, its members must be started by hand`,
          );
        }
        const volumes = Object.fromEntries(a.volumes.map((v) => [v, drill ? drillVolume(v) : v]));
        const restore = this.restoreSettings(a, peer);
        const started: string[] = [];
        for (const { adapter, kind } of adapters) {
          const captures = meta.captures.filter((c) => c.kind === kind);
          const context = { app: a.name, site: this.site, drill, volumes, restore };
          started.push(...(await adapter.recover(captures, context)));
        }
        o.result.members = started.join(",");
        o.result.membersFrom = meta.generation;
        return {
          detail: `started ${started.join(", ") || "nothing"} from the capture of generation ${meta.generation}`,
        };
      };
    const activate: StepFn = async (o) => {
      const a = app();
      // Its Kubernetes objects live in the namespaces the restore mapped them to now.
      const k = a.kubernetes;
      const mapping = this.restoreSettings(a, peer).namespaceMapping;
      const kubernetes = k === null ? null : { ...k, namespaces: k.namespaces.map((n) => mapping[n] ?? n) };
      const moved: Application = { ...a, active: this.site, kubernetes };
      await this.catalog.apps.put(a.name, moved);
      const reversed = this.catalog.protections.get(protectionKey(a.name, peer));
      const current = reversed?.source === this.site && reversed.state === "protecting" ? reversed : null;
      const resumed: string[] = [];
      for (const p of this.catalog.protectionsOf(a.name)) {
        if (p !== current && p.target === this.site) {
          await this.catalog.protections.put(protectionKey(p.app, p.target), {
            ...p,
            state: "failed-over",
            updatedAtMs: Date.now(),
          });
        } else if (p.source === this.site && p.target !== peer && (p.state === "failed-over" || p.state === "paused")) {
          // Back where it was protected from: the targets the move paused protect it again (the
          // scheduler restarts their pairs; what they lack is found by block hashes).
          await this.catalog.protections.put(protectionKey(p.app, p.target), {
            ...p,
            state: "protecting",
            updatedAtMs: Date.now(),
          });
          await this.events.emit("protection.resumed", p.app, { target: p.target, policy: p.policy });
          resumed.push(p.target);
        }
      }
      const also = resumed.length === 0 ? "" : `; protecting it to ${resumed.join(", ")} again`;
      try {
        await call(this.nc, peer, "appActivated", { app: moved, protection: current }, PEER_TIMEOUT_MS);
      } catch (error) {
        return { detail: `active at ${this.site}${also}; site ${peer} not told (${errorBody(error).message})` };
      }
      return { detail: `${o.app} active at ${this.site}${also}` };
    };
    const migration: Record<string, StepFn> = {
      sync: async () => {
        const s = await syncPeer();
        return { detail: `site ${peer} shipped generation ${s.lastCompleteGeneration}` };
      },
      fence: async () => {
        await call(this.nc, peer, "fence", { app: op.app, fenced: true }, PEER_TIMEOUT_MS);
        return { detail: `writes to ${op.app} at ${peer} stopped` };
      },
      "stop-members": async () => {
        const a = app();
        if (a.vms.length === 0 && a.kubernetes === null)
          return { detail: "no VM or Kubernetes members", skipped: true };
        const stopped = await call<string[]>(this.nc, peer, "membersStop", { app: op.app }, SYNC_TIMEOUT_MS);
        return { detail: `stopped ${stopped.join(", ")} at ${peer}` };
      },
      "final-sync": async (o) => {
        const s = await syncPeer();
        o.result.finalGeneration = s.lastCompleteGeneration;
        return { detail: `site ${this.site} holds generation ${s.lastCompleteGeneration}, the last write at ${peer}` };
      },
      "stop-source": async () => {
        const stopped = await call<PairStatus | null>(
          this.nc,
          peer,
          "pairStop",
          { app: op.app, target: this.site, all: true },
          PEER_TIMEOUT_MS,
        );
        return stopped === null ? { detail: "no pair to stop", skipped: true } : { detail: `pair at ${peer} stopped` };
      },
      promote,
      "recover-members": recoverMembers(false),
      reverse: async () => {
        const existing = this.catalog.protections.get(protectionKey(op.app, peer));
        if (existing?.source === this.site && existing.state === "protecting") {
          return { detail: `replicating to ${peer} already`, skipped: true };
        }
        await this.reverseStart(op.app, peer);
        return { detail: `replicating ${op.app} back to ${peer}, changes only` };
      },
      activate,
    };
    switch (op.kind) {
      case "failover":
        return {
          check: async () => {
            await this.requirePoint(app(), op.point);
            return { detail: null };
          },
          "stop-source": async () => {
            try {
              const stopped = await call<PairStatus | null>(
                this.nc,
                peer,
                "pairStop",
                { app: op.app, target: this.site, all: true },
                5_000,
              );
              return stopped === null
                ? { detail: "no pair to stop", skipped: true }
                : { detail: `pair at ${peer} stopped` };
            } catch (error) {
              if (error instanceof FerryError && error.code === ErrorCode.unreachable) {
                return { detail: `site ${peer} unreachable: its pair is stopped at failback`, skipped: true };
              }
              throw error;
            }
          },
          promote,
          "recover-members": recoverMembers(false),
          activate,
        };
      case "migration":
        return {
          check: async () => {
            await call(this.nc, peer, "protectionStatus", { app: op.app }, PEER_TIMEOUT_MS);
            return { detail: `site ${peer} reachable` };
          },
          ...migration,
        };
      case "failback":
        return {
          check: async () => {
            await call(this.nc, peer, "protectionStatus", { app: op.app }, PEER_TIMEOUT_MS);
            return { detail: `site ${peer} reachable` };
          },
          "stop-stale-pair": async () => {
            const stopped = await this.pairStopAll(op.app, peer);
            return stopped === null
              ? { detail: "no stale pair", skipped: true }
              : { detail: `stale pair to ${peer} stopped` };
          },
          "reverse-back": async () => {
            const status = await call<ProtectionStatus[]>(
              this.nc,
              peer,
              "protectionStatus",
              { app: op.app },
              PEER_TIMEOUT_MS,
            );
            if (status.some((s) => s.source === peer && s.target === this.site && s.state !== "failed-over")) {
              return { detail: `site ${peer} replicates here already`, skipped: true };
            }
            await call(this.nc, peer, "reverseStart", { app: op.app, to: this.site }, PEER_TIMEOUT_MS);
            return { detail: `site ${peer} replicates ${op.app} back here, changes only` };
          },
          resync: async (o) => {
            const s = await syncPeer();
            o.result.bytesResynced = s.bytesRaw;
            return { detail: `resynced ${s.bytesRaw} bytes (generation ${s.lastCompleteGeneration})` };
          },
          ...migration,
        };
      case "drill":
        return {
          check: async () => {
            await this.requirePoint(app(), op.point);
            return { detail: null };
          },
          clone: async (o) => {
            const a = app();
            const names = a.volumes.map((v) => drillVolume(v));
            const existing = new Set((await this.dataPlane.listVolumes()).map((v) => v.name));
            if (names.every((n) => existing.has(n))) return { detail: "clones exist already", skipped: true };
            const back = await this.requirePoint(a, o.point);
            const cloned = await this.dataPlane.clone(a.volumes, back, names);
            o.result.point = cloned[0]?.generation ?? null;
            o.result.volumes = names.join(",");
            return { detail: `cloned ${names.join(", ")} at generation ${o.result.point}` };
          },
          "recover-members": recoverMembers(true),
          record: async () => ({ detail: "drill copy ready; replication goes on" }),
        };
      case "drill-cleanup":
        return {
          "cleanup-members": async () => {
            const a = app();
            if (a.vms.length === 0 && a.kubernetes === null) {
              return { detail: "no VM or Kubernetes members", skipped: true };
            }
            for (const { adapter } of this.memberAdapters(a)) await adapter.cleanupDrill(a.name);
            return { detail: "drill copies of the members removed" };
          },
          "delete-clones": async () => {
            const a = app();
            const existing = new Set((await this.dataPlane.listVolumes()).map((v) => v.name));
            const names = a.volumes.map((v) => drillVolume(v)).filter((n) => existing.has(n));
            for (const n of names) await this.dataPlane.deleteVolume(n);
            return names.length === 0
              ? { detail: "nothing left", skipped: true }
              : { detail: `deleted ${names.join(", ")}` };
          },
          record: async (o) => {
            const drillId = o.result.drill;
            const drill = typeof drillId === "string" ? this.catalog.operations.get(drillId) : undefined;
            if (drill !== undefined) {
              await this.catalog.operations.put(drill.id, { ...drill, result: { ...drill.result, cleaned: "yes" } });
            }
            return { detail: null };
          },
        };
    }
  }

  /** Events published by this ferryd, for tests. */
  recentEvents(limit = 100, app: string | null = null): Promise<FerryEvent[]> {
    return this.events.recent(limit, app);
  }
}

/** What every status row says of its protection, whichever end reports it. */
function statusBase(p: Protection) {
  return {
    app: p.app,
    source: p.source,
    target: p.target,
    policy: p.policy,
    mode: p.settings.mode,
    rpoSeconds: p.settings.rpoMs / 1000,
  };
}

/** A protection shipped from this site, as its data-plane pair reports it (undefined: no pair). */
function sourceStatus(p: Protection, pair: PairStatus | undefined): ProtectionStatus {
  const lag =
    pair === undefined || pair.lastCompleteGeneration === null
      ? null
      : pair.syncState === "active"
        ? 0
        : pair.lagSeconds;
  return {
    ...statusBase(p),
    state: pair?.state ?? "missing",
    syncState: pair?.syncState ?? null,
    lagSeconds: lag,
    rpoMet: lag !== null && lag * 1000 <= p.settings.rpoMs,
    lastRecoveryPoint:
      pair?.lastCompleteGeneration == null
        ? null
        : { generation: pair.lastCompleteGeneration, atMs: pair.lastCompleteAtMs ?? 0 },
    bytesRaw: pair?.bytesRaw ?? 0,
    bytesWire: pair?.bytesWire ?? 0,
    lastError: pair?.lastError ?? (pair === undefined ? "the data plane has no pair for this protection" : null),
    initialCopy: null,
    transfer: pair?.transfer ?? null,
  };
}

/**
 * The recovery points of a group's replicas (they share them; the first volume's stand for all),
 * newest first. Generation 0 is the data plane's "nothing complete yet", not a point.
 */
function completePoints(replicas: readonly ReplicaPoints[]): ReplicaPoints["points"] {
  return (replicas[0]?.points ?? []).filter((p) => p.generation > 0);
}

/** A site's pairs by target and volume set: found once per tick or request, not searched per protection. */
type PairIndex = Map<string, PairStatus>;

function pairKey(target: string, volumes: readonly string[]): string {
  return `${target}\u0000${[...volumes].sort().join("\u0000")}`;
}

function indexPairs(pairs: readonly PairStatus[]): PairIndex {
  return new Map(pairs.map((p) => [pairKey(p.target, p.volumes), p]));
}

/** A lock held for another site's operation: `<site>/<operation id>`; null for this site's own. */
function remoteHolder(holder: string): { site: string; operation: string } | null {
  const slash = holder.indexOf("/");
  return slash < 0 ? null : { site: holder.slice(0, slash), operation: holder.slice(slash + 1) };
}

/** The name of a drill's copy of a volume. */
export const drillVolume = (volume: string) => `${volume}-drill`;

function str(body: Record<string, unknown>, field: string): string {
  const v = body[field];
  if (typeof v !== "string" || v === "") throw invalid(`the request needs '${field}' (a non-empty string)`);
  return v;
}

function optStr(body: Record<string, unknown>, field: string): string | null {
  const v = body[field];
  if (v === undefined || v === null) return null;
  if (typeof v !== "string" || v === "") throw invalid(`'${field}' must be a non-empty string`);
  return v;
}

function num(body: Record<string, unknown>, field: string, fallback: number): number {
  const v = body[field];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0)
    throw invalid(`'${field}' must be a positive whole number`);
  return v;
}

function strs(body: Record<string, unknown>, field: string): string[] {
  const v = body[field];
  if (!Array.isArray(v) || v.length === 0 || v.some((x) => typeof x !== "string" || x === "")) {
    throw invalid(`the request needs '${field}' (a list of non-empty strings)`);
  }
  return v as string[];
}
