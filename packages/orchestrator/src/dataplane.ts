/**
 * What the orchestrator asks of its site's volume service. ferryd runs the service in-process; the
 * calls go through the data plane's control interface of the data directory, exactly as the
 * `ferry volume` / `ferry replicate` commands do, so the orchestrator never touches a block.
 */

/** One replication pair as the data plane reports it: a consistency group shipped to one site. */
export interface PairStatus {
  group: string;
  volumes: string[];
  target: string;
  /** The target site's node holding the replicas, when that site runs several ferryds. */
  targetNode?: string;
  mode: string;
  /** `starting`, `syncing` (first full copy), `shipping`, `idle`, `error` or `stopped`. */
  state: string;
  /** The newest generation the target holds completely (per volume numbers: the highest). */
  lastCompleteGeneration: number | null;
  lastCompleteAtMs: number | null;
  lagSeconds: number;
  /** Bytes of volume data shipped, before and after compression (since the service started). */
  bytesRaw: number;
  bytesWire: number;
  generationsShipped: number;
  /** Bytes of volume data per byte on the wire. */
  compressionRatio: number;
  lastError: string | null;
  /** Sync pairs: `catching-up`, `active` (every write waits for the target), `suspended` or `blocked`. */
  syncState?: string;
  /** Sync pairs: writes the target acknowledged, and times the target was lost. */
  syncWrites: number;
  suspensions: number;
  /** The last generation shipped whole: cut to the target's commit, and the bytes it took. */
  lastCycle: {
    generation: number;
    ms: number;
    bytesRaw: number;
    bytesWire: number;
    /** Where `ms` went: cut, the target's begin, frames until the last was acknowledged, commit. */
    cutMs: number;
    beginMs: number;
    shipMs: number;
    commitMs: number;
  } | null;
  /** While a generation ships: its volume data sent so far and in all. */
  transfer?: { generation: number; doneBytes: number; totalBytes: number } | null;
  /**
   * How messages reach the target now: `direct` (a connection to the target site's server,
   * `--peer-nats`) or `leafnode` (through this site's server and the link).
   */
  route: "direct" | "leafnode" | "";
}

/** A target site's replica and the generations it can be promoted at. */
export interface ReplicaPoints {
  volume: string;
  sourceSite: string;
  keep: number;
  points: { back: number; generation: number; atMs: number }[];
}

/** A replica made writable by `promote`: the generation (of its former source) it now holds. */
export interface PromotedVolume {
  volume: string;
  generation: number;
}

export interface VolumeInfo {
  name: string;
  size: number;
  granularity: number;
  openGeneration: number;
  generations: number[];
  readOnly: boolean;
  dirtyBytes: number;
  replicaOf?: string | null;
  replicaGeneration?: number | null;
  fenced?: boolean;
}

export interface PairSettings {
  volumes: string[];
  to: string;
  /** The target site's node holding the replicas (none: the site's one volume service). */
  toNode?: string | undefined;
  mode: "sync" | "async";
  intervalMs: number;
  rate: number | null;
  recoveryPoints: number;
  /** Recovery points older than this are dropped at the target; null keeps them by count only. */
  pointsMaxAgeMs: number | null;
  /** false: the pair cuts only when `cut` asks (the orchestrator's quiesce/capture cycle). */
  scheduled: boolean;
  reverse: boolean;
}

/** A cut taken on request: the generation of each volume (it ships after). */
export interface CutTaken {
  group: string;
  volumes: { name: string; generation: number }[];
  atMs: number;
}

export interface DataPlane {
  listVolumes(): Promise<VolumeInfo[]>;
  /** Create a volume; where a site has several nodes, beside the volumes `beside` (an application's others). */
  createVolume(name: string, size: number, beside?: readonly string[]): Promise<VolumeInfo>;
  replicateStart(settings: PairSettings): Promise<PairStatus>;
  replicateStatus(): Promise<PairStatus[]>;
  /** `to`: the pair's target site, needed when the volumes replicate to several. */
  replicateSync(volumes: string[], to?: string): Promise<PairStatus>;
  /** Cut the pair holding `volumes` (to `to`) now; answers once the cut is taken, while it ships. */
  cut(volumes: string[], to?: string): Promise<CutTaken>;
  replicateStop(volumes: string[], to?: string): Promise<PairStatus>;
  promote(volumes: string[], back: number): Promise<PromotedVolume[]>;
  points(volumes: string[]): Promise<ReplicaPoints[]>;
  /** Refuse (or allow again) writes to ordinary volumes; writes in flight finish first. */
  fence(volumes: string[], fenced: boolean): Promise<{ volume: string; fenced: boolean }[]>;
  /** At a target: new writable volumes holding the replicas at a recovery point (drills). */
  clone(volumes: string[], back: number, names: string[]): Promise<ClonedVolume[]>;
  deleteVolume(name: string): Promise<void>;
}

export interface ClonedVolume {
  volume: string;
  clone: string;
  generation: number;
}

/** The running volume service, when it runs in this process (ferryd): its status needs no socket. */
export interface InProcessService {
  replicationStatus(): Promise<string>;
}

/**
 * The data plane of `dataDir` through the native addon (loaded on first use); with `service`, the
 * status every scheduler tick asks for comes straight from the in-process service.
 */
export function nativeDataPlane(dataDir: string, service?: InProcessService): DataPlane {
  let loaded: Promise<typeof import("@ferry/dataplane-native")> | undefined;
  const native = () => {
    loaded ??= import("@ferry/dataplane-native");
    return loaded;
  };
  const replicate = async <T>(body: Record<string, unknown>): Promise<T> =>
    JSON.parse(await (await native()).replicate(dataDir, JSON.stringify(body))) as T;
  return {
    listVolumes: async () => (await (await native()).listVolumes(dataDir)) as VolumeInfo[],
    createVolume: async (name, size) => (await (await native()).createVolume(dataDir, name, size)) as VolumeInfo,
    replicateStart: (s) =>
      replicate<PairStatus>({
        op: "replicateStart",
        volumes: s.volumes,
        to: s.to,
        toNode: s.toNode ?? null,
        mode: s.mode,
        intervalMs: s.intervalMs,
        rate: s.rate,
        level: null,
        onLoss: null,
        blockTimeoutMs: null,
        recoveryPoints: s.recoveryPoints,
        pointsMaxAgeMs: s.pointsMaxAgeMs,
        scheduled: s.scheduled,
        maxMessage: null,
        reverse: s.reverse,
      }),
    replicateStatus: async () =>
      service === undefined
        ? replicate<PairStatus[]>({ op: "replicateStatus" })
        : (JSON.parse(await service.replicationStatus()) as PairStatus[]),
    replicateSync: (volumes, to) => replicate<PairStatus>({ op: "replicateSync", volumes, to: to ?? null }),
    cut: (volumes, to) => replicate<CutTaken>({ op: "replicateCut", volumes, to: to ?? null }),
    replicateStop: (volumes, to) => replicate<PairStatus>({ op: "replicateStop", volumes, to: to ?? null }),
    promote: (volumes, back) => replicate<PromotedVolume[]>({ op: "replicatePromote", volumes, back }),
    points: (volumes) => replicate<ReplicaPoints[]>({ op: "replicaPoints", volumes }),
    fence: (volumes, fenced) => replicate({ op: "fence", volumes, fenced }),
    clone: (volumes, back, names) => replicate<ClonedVolume[]>({ op: "replicaClone", volumes, back, names }),
    deleteVolume: async (name) => (await native()).deleteVolume(dataDir, name),
  };
}
