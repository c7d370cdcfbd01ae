/**
 * Recovery-point metadata: what was captured with a cut besides the volume data — the members'
 * metadata (domain XML, Kubernetes objects), the hooks' output and the consistency reached. It
 * lives at the target, next to the data it describes, so an unplanned failover finds it with the
 * source gone: the source writes it into the target site's JetStream domain, in an object store
 * (chunked, so a large application is not capped by KV value or message sizes), zstd-compressed.
 *
 * One object per cut: `<app>/<source>/<generation>`, generation being the application's first volume's.
 */
import { type JetStreamClient, jetstream } from "@nats-io/jetstream";
import { type ObjectStore, Objm } from "@nats-io/obj";
import type { NatsConnection } from "@nats-io/transport-node";
import { compress, decompress } from "zstd-napi";
import type { MemberCapture } from "./adapters.js";
import type { Consistency } from "./model.js";

export const POINTS_BUCKET = "ferry-points";

/** What one command printed and how it ended. */
export interface HookRun {
  command: string;
  exitCode: number | null;
  /** stdout and stderr, the last 64 KiB. */
  output: string;
  ms: number;
}

export interface PointMetadata {
  app: string;
  source: string;
  target: string;
  /** The point's id: the generation of the application's first volume (as recovery points list it). */
  generation: number;
  /** The generation each volume was cut at. */
  generations: Record<string, number>;
  atMs: number;
  /** `application` only when every quiesce and the pre-hook succeeded. */
  consistency: Consistency;
  /** Why a point asked to be application-consistent is crash-consistent. */
  reason: string | null;
  captures: MemberCapture[];
  hooks: { pre: HookRun | null; post: HookRun | null };
  /** How long the application was held (quiesce to thaw), ms. */
  heldMs: number;
}

/** What a listing tells without reading the object. */
export interface PointSummary {
  generation: number;
  consistency: Consistency;
  reason: string | null;
  members: number;
  bytes: number;
}

export const pointName = (app: string, source: string, generation: number) => `${app}/${source}/${generation}`;

/** How `listAll` groups the points of `app` from `source`. */
export const pointsKey = (app: string, source: string) => `${app}/${source}`;

/** Zstd level: metadata is small and written once per cut; level 3 is zstd's own default. */
const LEVEL = 3;

export class PointStore {
  private readonly stores = new Map<string, Promise<ObjectStore>>();

  constructor(
    private readonly nc: NatsConnection,
    private readonly site: string,
  ) {}

  /** The bucket of `site` (this site's own: created when missing; another's: opened). */
  private store(site: string): Promise<ObjectStore> {
    let s = this.stores.get(site);
    if (s === undefined) {
      const own = site === this.site;
      const js: JetStreamClient = own ? jetstream(this.nc) : jetstream(this.nc, { domain: site });
      s = own ? new Objm(js).create(POINTS_BUCKET) : new Objm(js).open(POINTS_BUCKET);
      // A failure (site unreachable) is not cached: the next cut tries again.
      s.catch(() => this.stores.delete(site));
      this.stores.set(site, s);
    }
    return s;
  }

  /** Create this site's bucket (at startup), so other sites can write into it. */
  async ensureOwn(): Promise<void> {
    await this.store(this.site);
  }

  async put(meta: PointMetadata): Promise<number> {
    const generation = meta.generation;
    const data = compress(Buffer.from(JSON.stringify(meta)), { compressionLevel: LEVEL });
    const os = await this.store(meta.target);
    await os.putBlob(
      {
        name: pointName(meta.app, meta.source, generation),
        metadata: {
          consistency: meta.consistency,
          reason: meta.reason ?? "",
          members: String(meta.captures.length),
          encoding: "zstd",
        },
      },
      data,
    );
    return data.length;
  }

  /** This site's metadata of one cut, or null when none was captured for it. */
  async get(app: string, source: string, generation: number): Promise<PointMetadata | null> {
    const os = await this.store(this.site);
    const blob = await os.getBlob(pointName(app, source, generation));
    if (blob === null) return null;
    return JSON.parse(decompress(Buffer.from(blob)).toString("utf8")) as PointMetadata;
  }

  /** Summaries of this site's points of `app` from `source`, by generation. */
  async list(app: string, source: string): Promise<Map<number, PointSummary>> {
    return (await this.listAll()).get(pointsKey(app, source)) ?? new Map();
  }

  /**
   * Summaries of every point this site holds, by `pointsKey(app, source)` and generation: one
   * listing of the bucket, for passes over all applications (a listing reads every object's info,
   * so one per application would cost the square of their number).
   */
  async listAll(): Promise<Map<string, Map<number, PointSummary>>> {
    const os = await this.store(this.site);
    const out = new Map<string, Map<number, PointSummary>>();
    for (const info of await os.list()) {
      if (info.deleted) continue;
      const slash = info.name.lastIndexOf("/");
      const generation = Number(info.name.slice(slash + 1));
      if (slash <= 0 || !Number.isSafeInteger(generation)) continue;
      const key = info.name.slice(0, slash);
      const points = out.get(key) ?? new Map<number, PointSummary>();
      out.set(key, points);
      points.set(generation, {
        generation,
        consistency: info.metadata?.consistency === "application" ? "application" : "crash",
        reason: info.metadata?.reason || null,
        members: Number(info.metadata?.members ?? 0),
        bytes: info.size,
      });
    }
    return out;
  }

  /**
   * The metadata to recover `generation` with: its own, else the newest captured before it (members
   * change seldom; the data is the generation's either way). Null when nothing was captured.
   */
  async forRecovery(app: string, source: string, generation: number): Promise<PointMetadata | null> {
    const exact = await this.get(app, source, generation);
    if (exact !== null) return exact;
    const older = [...(await this.list(app, source)).keys()].filter((g) => g < generation).sort((a, b) => b - a);
    return older.length === 0 ? null : this.get(app, source, older[0] as number);
  }

  /**
   * Drop this site's metadata of points no longer kept: everything older than the oldest kept
   * generation, except the newest such (the fallback of points captured without metadata).
   * `listed`: the points of `app` from `source` as a `listAll` just gave them (else listed here).
   */
  async prune(
    app: string,
    source: string,
    oldestKept: number,
    listed?: ReadonlyMap<number, PointSummary>,
  ): Promise<number> {
    const os = await this.store(this.site);
    const points = listed ?? (await this.list(app, source));
    const older = [...points.keys()].filter((g) => g < oldestKept).sort((a, b) => b - a);
    for (const g of older.slice(1)) await os.delete(pointName(app, source, g));
    return Math.max(0, older.length - 1);
  }
}
