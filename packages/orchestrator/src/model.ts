/**
 * The control plane's model (ARCHITECTURE §5). Everything here is plain JSON: it is what the
 * catalog stores, what the API carries and what `--json` prints.
 */

export type Mode = "sync" | "async";
export const MODES: readonly Mode[] = ["sync", "async"];

export type Consistency = "crash" | "application";
export const CONSISTENCIES: readonly Consistency[] = ["crash", "application"];

/** A site as its ferryd announces itself; sites learn of each other over the leafnode link. */
export interface Site {
  name: string;
  region: string;
  /** The ferryd's version and when it last announced itself (ms since the epoch). */
  version: string;
  lastSeenMs: number;
}

/** Which Kubernetes objects belong to an application (filled in by the Kubernetes adapter). */
export interface KubernetesSelector {
  namespaces: string[];
  labelSelector: string | null;
}

/** A set of members protected as one entity. */
export interface Application {
  name: string;
  volumes: string[];
  /** libvirt domain names (the VM adapter's members). */
  vms: string[];
  kubernetes: KubernetesSelector | null;
  /** The site the application was created at. */
  origin: string;
  /** The site where it runs now: its volumes are writable there and replicas elsewhere. */
  active: string;
  createdAtMs: number;
}

/** Hooks run around a cut (application consistency); commands, run at the active site. */
export interface Hooks {
  pre: string | null;
  post: string | null;
}

/** One RFC 6902 operation of a restore transform. */
export interface PatchOperation {
  op: "add" | "remove" | "replace" | "test";
  path: string;
  value?: unknown;
}

/** How an application's Kubernetes objects are restored at a target (the Kubernetes adapter applies it). */
export interface RestoreSettings {
  /** Source namespace → namespace at the target; unmapped ones keep their name. */
  namespaceMapping: Record<string, string>;
  /** Source storage class → storage class at the target. */
  storageClassMapping: Record<string, string>;
  /** An object that exists at the target: `overwrite` Ferry's fields (others' stay), or `skip` it. */
  onConflict: "overwrite" | "skip";
  /** JSON patches applied to restored objects, to one kind and/or name or to all. */
  transforms: { kind?: string; name?: string; patch: PatchOperation[] }[];
}

export interface ProtectionPolicy {
  name: string;
  mode: Mode;
  /** The recovery point objective: the lag above which the application is out of policy. */
  rpoMs: number;
  /** Time between generations; `continuous` policies cut as often as the data plane allows. */
  intervalMs: number;
  continuous: boolean;
  /** Recovery points kept at each target (the newest included). */
  retain: number;
  /** Recovery points older than this are dropped at the target (the latest stays); null: by count only. */
  retainAgeMs: number | null;
  /** Regions allowed to hold a copy; empty means any. */
  allowedRegions: string[];
  /** Bandwidth limit on the wire per target, bytes per second; null means none. */
  rateBytes: number | null;
  consistency: Consistency;
  hooks: Hooks;
  /** Absent in policies made before restore settings existed: the defaults then. */
  restore?: RestoreSettings;
  createdAtMs: number;
}

export type ProtectionState = "starting" | "protecting" | "paused" | "failed-over" | "error";

/** One application protected to one target under one policy; both sites hold the record. */
export interface Protection {
  app: string;
  policy: string;
  source: string;
  target: string;
  /** The target site's node that keeps the replicas, when that site runs several ferryds. */
  targetNode?: string;
  state: ProtectionState;
  /** The policy as it was applied (a later edit of the policy does not change a running protection). */
  settings: ProtectionPolicy;
  createdAtMs: number;
  updatedAtMs: number;
}

/** A complete generation at a target: where the application can be recovered to. */
export interface RecoveryPoint {
  /** `<generation>` at the target; stable, and what `failover --point` takes. */
  id: string;
  app: string;
  site: string;
  source: string;
  generation: number;
  /** How many points are newer (0: the latest). */
  back: number;
  atMs: number;
  consistency: Consistency;
  /** Why a point the policy wanted application-consistent is crash-consistent. */
  reason?: string | null;
  /** VM and Kubernetes members captured with the point (their metadata is stored with it). */
  members?: number;
  /** Compressed size of the metadata stored with the point; null: none (volume data only). */
  metadataBytes?: number | null;
}

/** What `status` reports, per application and target. */
export interface ProtectionStatus {
  app: string;
  source: string;
  target: string;
  policy: string;
  mode: Mode;
  /** The data plane's pair state (`syncing`, `shipping`, `idle`, …), or the protection's own. */
  state: string;
  syncState: string | null;
  lagSeconds: number | null;
  rpoSeconds: number;
  rpoMet: boolean;
  lastRecoveryPoint: { generation: number; atMs: number } | null;
  bytesRaw: number;
  bytesWire: number;
  lastError: string | null;
  /** While the first full copy runs (no recovery point yet): bytes shipped of the volumes' total. */
  initialCopy?: { doneBytes: number; totalBytes: number } | null;
  /** While a generation ships (at the source): its bytes sent so far and in all. */
  transfer?: { generation: number; doneBytes: number; totalBytes: number } | null;
}

export type OperationKind = "failover" | "migration" | "failback" | "drill" | "drill-cleanup";
export type OperationState = "running" | "succeeded" | "failed";
export type StepState = "pending" | "running" | "done" | "skipped";

export interface OperationStep {
  name: string;
  state: StepState;
  detail: string | null;
  startedAtMs: number | null;
  endedAtMs: number | null;
}

/** A recovery operation: a persisted state machine of idempotent steps, resumed after a restart. */
export interface Operation {
  id: string;
  kind: OperationKind;
  app: string;
  /** Where the application ends up active. */
  to: string;
  /** Where it was active when the operation started. */
  from: string;
  /** Failover to an older recovery point (its generation); null: the latest. */
  point: number | null;
  state: OperationState;
  steps: OperationStep[];
  error: { code: string; message: string } | null;
  startedAtMs: number;
  endedAtMs: number | null;
  /** Filled by steps: bytes resynced by a reverse, bytes changed, the point recovered to. */
  result: Record<string, number | string | null>;
}
