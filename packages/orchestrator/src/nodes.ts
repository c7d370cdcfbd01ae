/**
 * Several ferryd in one site: each runs on its own host (a *node*) with its own volume service, and
 * one of them leads (lease.ts). The leader orchestrates every application of the site, so it
 * reaches each node's data plane over the site's NATS:
 *
 * - every ferryd started with a node name serves its data plane on `ferry.node.<site>.<node>`
 *   (`serveNode`) and records itself and its volumes in the site's KV bucket `ferry-nodes` (every
 *   heartbeat, and when its volumes change); a ferryd without a node records itself as `_site`;
 * - the leader's `SiteDataPlane` sends each call to the node holding the volumes it names (an
 *   application's volumes share a node: they are one consistency group, cut together by one data
 *   plane), creates new volumes beside the application's others or on the node with the fewest,
 *   and merges what every node reports.
 *
 * Replication between sites is addressed to nodes too (`ferry.dp.<site>.<node>.…`): the target
 * site's leader names the node that keeps an application's replicas (`replicaRegister`, `replicaPlace`).
 */
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection, Subscription } from "@nats-io/transport-node";
import { answer, request } from "./client.js";
import type { DataPlane, PairStatus, VolumeInfo } from "./dataplane.js";
import { conflict, ErrorCode, errorBody, FerryError, notFound } from "./errors.js";

export const NODES_BUCKET = "ferry-nodes";

/** How a site's only ferryd (no `--node`) records itself in `ferry-nodes`. */
export const SITE_NODE = "_site";

export const nodeSubject = (site: string, node: string) => `ferry.node.${site}.${node}`;

/** A node as it records itself in `ferry-nodes`. */
export interface NodeRecord {
  node: string;
  /** When it last recorded itself. */
  atMs: number;
  /**
   * The volumes it held then: a leader knows where they are while the node is down, so it neither
   * loses them nor creates others of the same name elsewhere.
   */
  volumes?: string[];
  /** It stopped cleanly (its record stays, with its volumes). */
  stopped?: boolean;
}

/** A volume as the site's data plane lists it: with the node that holds it (none: one node only). */
export type SiteVolumeInfo = VolumeInfo & { node?: string };

/** Calls that may move a lot of data (a final sync, a clone of a recovery point) wait this long. */
const LONG_CALL_MS = 30 * 60_000;
const CALL_MS = 30_000;
const LONG_CALLS = new Set<keyof DataPlane>(["replicateSync", "clone", "promote"]);
/** What a node serves: the data plane's calls, nothing else. */
const METHODS: readonly (keyof DataPlane)[] = [
  "listVolumes",
  "createVolume",
  "replicateStart",
  "replicateStatus",
  "replicateSync",
  "cut",
  "replicateStop",
  "promote",
  "points",
  "fence",
  "clone",
  "deleteVolume",
];

/** Answer the site leader's data-plane calls for this node's volumes. */
export function serveNode(nc: NatsConnection, site: string, node: string, dp: DataPlane): Subscription {
  return nc.subscribe(nodeSubject(site, node), {
    callback: (_e, m) =>
      void answer(m, async () => {
        const { method, args } = m.json<{ method: keyof DataPlane; args: unknown[] }>();
        if (!METHODS.includes(method) || !Array.isArray(args)) {
          throw new FerryError(ErrorCode.invalid, `node ${node} of site ${site} has no data-plane call '${method}'`);
        }
        const fn = dp[method] as (...a: unknown[]) => Promise<unknown>;
        return fn.apply(dp, args);
      }),
  });
}

/** Another node's data plane, through its `serveNode`. */
export function remoteDataPlane(nc: NatsConnection, site: string, node: string): DataPlane {
  const call =
    (method: keyof DataPlane) =>
    (...args: unknown[]): Promise<never> =>
      request<never>(
        nc,
        nodeSubject(site, node),
        { method, args },
        LONG_CALLS.has(method) ? LONG_CALL_MS : CALL_MS,
        () => `node ${node} of site ${site} did not answer ${method}: is its ferryd (--node ${node}) running?`,
      );
  return Object.fromEntries(METHODS.map((m) => [m, call(m)])) as unknown as DataPlane;
}

/** The site's nodes as `ferry-nodes` records them; this ferryd keeps its own record fresh. */
export class NodeDirectory {
  private constructor(
    private readonly kv: KV,
    /** A node unrecorded for this long is gone: nothing is placed there, its volumes are not listed. */
    private readonly staleMs: number,
  ) {}

  static async open(nc: NatsConnection, staleMs: number): Promise<NodeDirectory> {
    return new NodeDirectory(await new Kvm(nc).create(NODES_BUCKET, { history: 1 }), staleMs);
  }

  async record(node: string, volumes?: string[], nowMs = Date.now()): Promise<void> {
    await this.kv.put(node, JSON.stringify({ node, atMs: nowMs, volumes } satisfies NodeRecord));
  }

  /** A clean stop: the node is gone at once instead of going stale; what it holds stays known. */
  async stopped(node: string): Promise<void> {
    const entry = await this.kv.get(node).catch(() => null);
    if (entry === null || entry.operation !== "PUT") return;
    await this.kv.put(node, JSON.stringify({ ...entry.json<NodeRecord>(), stopped: true })).catch(() => {});
  }

  /** Every recorded node, newest record first, with whether it is live. */
  async list(nowMs = Date.now()): Promise<(NodeRecord & { live: boolean })[]> {
    const out: (NodeRecord & { live: boolean })[] = [];
    for await (const key of await this.kv.keys()) {
      const entry = await this.kv.get(key);
      if (entry === null || entry.operation !== "PUT") continue;
      const r = entry.json<NodeRecord>();
      out.push({ ...r, live: r.stopped !== true && nowMs - r.atMs <= this.staleMs });
    }
    return out.sort((a, b) => a.node.localeCompare(b.node));
  }
}

/**
 * The data plane of a whole site of several nodes, as the leader sees it. Volumes are found where
 * they are (each node lists its own); a call naming volumes goes to the node that holds them all.
 */
export class SiteDataPlane implements DataPlane {
  /** Where each volume was last seen. */
  private readonly where = new Map<string, string>();
  /** At the last `replicateStatus`: the live nodes, and those that did not answer (why). */
  private live = new Set<string>();
  private readonly failed = new Map<string, string>();

  constructor(
    private readonly nc: NatsConnection,
    private readonly site: string,
    private readonly self: string,
    private readonly local: DataPlane,
    private readonly directory: NodeDirectory,
  ) {}

  private dp(node: string): DataPlane {
    return node === this.self ? this.local : remoteDataPlane(this.nc, this.site, node);
  }

  /** The live nodes; the volumes of the others are known from their last records. */
  private async liveNodes(): Promise<string[]> {
    const records = (await this.directory.list()).filter((n) => n.node !== SITE_NODE && n.node !== this.self);
    for (const r of records) {
      if (r.live) continue;
      for (const v of r.volumes ?? []) if (!this.where.has(v)) this.where.set(v, r.node);
    }
    return [this.self, ...records.filter((n) => n.live).map((n) => n.node)];
  }

  /** Every node's volumes. A live node that does not answer fails the listing: its volumes are not "missing". */
  async listVolumes(): Promise<SiteVolumeInfo[]> {
    const nodes = await this.liveNodes();
    const lists = await Promise.all(nodes.map(async (n) => ({ n, volumes: await this.dp(n).listVolumes() })));
    const out: SiteVolumeInfo[] = [];
    for (const { n, volumes } of lists) {
      for (const v of volumes) {
        this.where.set(v.name, n);
        out.push({ ...v, node: n });
      }
    }
    return out;
  }

  /**
   * The node holding every one of `volumes`; with `orNew`, a node for volumes none of which
   * exists yet: the live node holding the fewest volumes.
   */
  async nodeOf(volumes: readonly string[], orNew = false): Promise<string> {
    if (volumes.some((v) => !this.where.has(v))) await this.listVolumes();
    const held = new Map<string, string[]>();
    for (const v of volumes) {
      const n = this.where.get(v);
      if (n !== undefined) held.set(n, [...(held.get(n) ?? []), v]);
    }
    if (held.size > 1) {
      const spread = [...held].map(([n, vs]) => `${vs.join(", ")} on node ${n}`).join("; ");
      throw conflict(
        `volumes ${volumes.join(", ")} are on several nodes of site ${this.site} (${spread}); volumes used together ` +
          "(one application, one consistency group) must be on one node",
      );
    }
    const [node] = [...held.keys()];
    if (node !== undefined) {
      const missing = volumes.filter((v) => this.where.get(v) !== node);
      if (missing.length === 0 || orNew) return node;
      throw notFound(`volume ${missing.join(", ")} does not exist at site ${this.site}`);
    }
    if (!orNew) throw notFound(`volume ${volumes.join(", ")} does not exist at site ${this.site}`);
    const counts = new Map((await this.liveNodes()).map((n) => [n, 0]));
    for (const n of this.where.values()) if (counts.has(n)) counts.set(n, (counts.get(n) ?? 0) + 1);
    return [...counts].sort((a, b) => a[1] - b[1] || a[0].localeCompare(b[0]))[0]?.[0] ?? this.self;
  }

  private async on<T>(volumes: readonly string[], f: (dp: DataPlane) => Promise<T>): Promise<T> {
    return f(this.dp(await this.nodeOf(volumes)));
  }

  async createVolume(name: string, size: number, beside: readonly string[] = []): Promise<SiteVolumeInfo> {
    const node = await this.nodeOf([...beside, name], true);
    const info = await this.dp(node).createVolume(name, size);
    this.where.set(name, node);
    return { ...info, node };
  }

  /** Every node's pairs; a node that does not answer is left out (its pairs show as missing: `whyMissing`). */
  async replicateStatus(): Promise<PairStatus[]> {
    const nodes = await this.liveNodes();
    this.live = new Set(nodes);
    const all = await Promise.all(
      nodes.map((n) =>
        this.dp(n)
          .replicateStatus()
          .then((pairs) => {
            this.failed.delete(n);
            return pairs;
          })
          .catch((error) => {
            this.failed.set(n, errorBody(error).message);
            return [] as PairStatus[];
          }),
      ),
    );
    return all.flat();
  }

  /** Why the last `replicateStatus` had no pair of `volumes`, when their node is the reason. */
  whyMissing(volumes: readonly string[]): string | null {
    const node = volumes.map((v) => this.where.get(v)).find((n) => n !== undefined);
    if (node === undefined) return null;
    if (!this.live.has(node)) {
      return `node ${node} of site ${this.site}, which holds ${volumes.join(", ")}, is not running (its ferryd stopped or cannot reach NATS)`;
    }
    const failed = this.failed.get(node);
    return failed === undefined ? null : `node ${node} of site ${this.site} did not report its pairs: ${failed}`;
  }

  replicateStart: DataPlane["replicateStart"] = (s) => this.on(s.volumes, (dp) => dp.replicateStart(s));
  replicateSync: DataPlane["replicateSync"] = (v, to) => this.on(v, (dp) => dp.replicateSync(v, to));
  cut: DataPlane["cut"] = (v, to) => this.on(v, (dp) => dp.cut(v, to));
  replicateStop: DataPlane["replicateStop"] = (v, to) => this.on(v, (dp) => dp.replicateStop(v, to));
  promote: DataPlane["promote"] = (v, back) => this.on(v, (dp) => dp.promote(v, back));
  points: DataPlane["points"] = (v) => this.on(v, (dp) => dp.points(v));
  fence: DataPlane["fence"] = (v, fenced) => this.on(v, (dp) => dp.fence(v, fenced));
  clone: DataPlane["clone"] = async (v, back, names) => {
    const node = await this.nodeOf(v);
    const cloned = await this.dp(node).clone(v, back, names);
    for (const n of names) this.where.set(n, node);
    return cloned;
  };
  deleteVolume: DataPlane["deleteVolume"] = async (name) => {
    await this.on([name], (dp) => dp.deleteVolume(name));
    this.where.delete(name);
  };
}
