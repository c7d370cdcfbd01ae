/**
 * The ferry.io/v1alpha1 resources as TypeScript types. Generated from crds.ts by
 * `npm run generate -w @ferry/k8s-adapter`; do not edit.
 */
import type { V1ObjectMeta } from "@kubernetes/client-node";

export interface Condition {
  /**
   * Protected, Replicating, RPOMet, Degraded, Ready, Succeeded, …
   */
  type: string;
  status: "True" | "False" | "Unknown";
  /**
   * The generation the condition was set for.
   */
  observedGeneration?: number;
  /**
   * When the condition last changed status.
   */
  lastTransitionTime: string;
  /**
   * Why, in one CamelCase word.
   */
  reason: string;
  /**
   * Why, for a person: what happened and what to do.
   */
  message: string;
}

export interface SiteSpec {
  /**
   * The region the site is in; policies' allowedRegions refer to it, e.g. eu-de.
   */
  region: string;
  /**
   * The legal jurisdiction of the site's data, for residency reports, e.g. EU.
   */
  jurisdiction?: string;
  /**
   * How to reach the site's ferryd; leave out for the site this operator runs at.
   */
  nats?: {
    /**
     * A NATS server URL, e.g. nats://nats.ferry-system:4222.
     */
    url: string;
    /**
     * A Secret in the operator's namespace with NATS credentials (a .creds file).
     */
    credentialsSecret?: {
      name: string;
      key?: string;
    };
  };
}

/**
 * What the site last announced.
 */
export interface SiteStatus {
  /**
   * The metadata.generation the operator last acted on.
   */
  observedGeneration?: number;
  /**
   * The latest observations of the resource's state, one per type.
   */
  conditions?: Condition[];
  /**
   * The ferryd version.
   */
  version?: string;
  /**
   * When the site last announced itself.
   */
  lastSeen?: string;
}

/** A Ferry site: one ferryd with its volumes, in one region, reachable over NATS. */
export interface Site {
  apiVersion: "ferry.io/v1alpha1";
  kind: "Site";
  metadata?: V1ObjectMeta;
  spec: SiteSpec;
  status?: SiteStatus;
}

export interface ProtectionPolicySpec {
  /**
   * sync: a write is acknowledged once both sites hold it; async: copied every interval.
   */
  mode: "sync" | "async";
  /**
   * The recovery point objective: the lag above which the application is out of policy. Default: 0 for sync, two intervals for async.
   */
  rpo?: string;
  /**
   * Time between recovery points (async), e.g. 5s; at least 100ms. Default: 5s.
   */
  interval?: string;
  /**
   * Cut a recovery point as soon as the previous one is in (at most every second).
   */
  continuous?: boolean;
  /**
   * Recovery points kept at each target, the newest included.
   */
  retain?: number;
  /**
   * Regions allowed to hold a copy; empty means any.
   *
   * @maxItems 64
   */
  allowedRegions?: string[];
  /**
   * Bandwidth limit on the wire per target in bytes per second, e.g. 100M (powers of 1024).
   */
  rate?: string;
  /**
   * application: run the hooks and freeze the members around each cut.
   */
  consistency?: "crash" | "application";
  /**
   * How the application's Kubernetes objects are restored at the target cluster.
   */
  restore?: {
    /**
     * Source namespace → namespace at the target; unmapped ones keep their name.
     */
    namespaceMapping?: {
      [k: string]: string;
    };
    /**
     * Source storage class → storage class at the target.
     */
    storageClassMapping?: {
      [k: string]: string;
    };
    /**
     * An object that exists at the target: overwrite Ferry's fields (others' stay), or skip it.
     */
    onConflict?: "overwrite" | "skip";
    /**
     * JSON patches (RFC 6902) applied to restored objects, e.g. scale a StatefulSet down.
     *
     * @maxItems 64
     */
    transforms?: {
      /**
       * Only objects of this kind.
       */
      kind?: string;
      /**
       * Only the object of this name.
       */
      name?: string;
      /**
       * @minItems 1
       * @maxItems 64
       */
      patch: {
        op: "add" | "remove" | "replace" | "test";
        /**
         * A JSON pointer.
         */
        path: string;
        value?: unknown;
      }[];
    }[];
  };
  /**
   * Commands run at the active site around a cut (application consistency).
   */
  hooks?: {
    pre?: string;
    post?: string;
  };
}

/**
 * Whether the operator accepted the policy.
 */
export interface ProtectionPolicyStatus {
  /**
   * The metadata.generation the operator last acted on.
   */
  observedGeneration?: number;
  /**
   * The latest observations of the resource's state, one per type.
   */
  conditions?: Condition[];
}

/** How applications are protected: replication mode, RPO, schedule, retention, residency. */
export interface ProtectionPolicy {
  apiVersion: "ferry.io/v1alpha1";
  kind: "ProtectionPolicy";
  metadata?: V1ObjectMeta;
  spec: ProtectionPolicySpec;
  status?: ProtectionPolicyStatus;
}

export interface ApplicationSpec {
  /**
   * The Kubernetes objects that belong to the application.
   */
  kubernetes?: {
    /**
     * Namespaces to capture; the application's own namespace if empty.
     *
     * @maxItems 64
     */
    namespaces: string[];
    /**
     * Objects in the selected namespaces that carry these labels; leave out to select all of them.
     */
    labelSelector?: {
      matchLabels?: {
        [k: string]: string;
      };
      /**
       * @maxItems 32
       */
      matchExpressions?: {
        key: string;
        operator: "In" | "NotIn" | "Exists" | "DoesNotExist";
        /**
         * @maxItems 64
         */
        values?: string[];
      }[];
    };
  };
  /**
   * libvirt domain names at the active site.
   *
   * @maxItems 256
   */
  vms?: string[];
  /**
   * Ferry volumes protected with the application, besides those of its VMs and PVCs.
   *
   * @maxItems 256
   */
  volumes?: string[];
  /**
   * Protect the application under a policy to a target site; leave out to only define it.
   */
  protection?: {
    /**
     * A ProtectionPolicy in this namespace.
     */
    policy: string;
    /**
     * The Site that holds the copy.
     */
    targetSite: string;
    /**
     * Stop cutting recovery points.
     */
    paused?: boolean;
  };
}

/**
 * What the operator last saw at the application's active site.
 */
export interface ApplicationStatus {
  /**
   * The metadata.generation the operator last acted on.
   */
  observedGeneration?: number;
  /**
   * The latest observations of the resource's state, one per type.
   */
  conditions?: Condition[];
  /**
   * Where the application runs now.
   */
  activeSite?: string;
  /**
   * Age of the newest recovery point at the target.
   */
  lagSeconds?: number;
  lastRecoveryPoint?: {
    generation?: number;
    /**
     * When it was cut.
     */
    time?: string;
  };
}

/** A hybrid application protected as one entity: Kubernetes objects (namespaces + label selector), libvirt VMs and Ferry volumes, cut together. */
export interface Application {
  apiVersion: "ferry.io/v1alpha1";
  kind: "Application";
  metadata?: V1ObjectMeta;
  spec: ApplicationSpec;
  status?: ApplicationStatus;
}

export interface RecoveryPointSpec {
  /**
   * The Application.
   */
  application: string;
  /**
   * The site that holds the point.
   */
  site: string;
  /**
   * The site it was copied from.
   */
  sourceSite: string;
  /**
   * The data plane's generation number.
   */
  generation: number;
  /**
   * When it was cut.
   */
  time: string;
  consistency?: "crash" | "application";
}

/**
 * Whether the point is still held at its site.
 */
export interface RecoveryPointStatus {
  /**
   * The metadata.generation the operator last acted on.
   */
  observedGeneration?: number;
  /**
   * The latest observations of the resource's state, one per type.
   */
  conditions?: Condition[];
}

/** A complete generation of an application at a site: where it can be recovered to. Written by the operator. */
export interface RecoveryPoint {
  apiVersion: "ferry.io/v1alpha1";
  kind: "RecoveryPoint";
  metadata?: V1ObjectMeta;
  spec: RecoveryPointSpec;
  status?: RecoveryPointStatus;
}

export interface FailoverSpec {
  /**
   * The Application to recover.
   */
  application: string;
  /**
   * The site where the application ends up running.
   */
  targetSite: string;
  /**
   * The generation to recover to; the latest complete one if left out.
   */
  recoveryPoint?: number;
}

/**
 * The operation's progress; its steps are idempotent and resumed after a restart.
 */
export interface FailoverStatus {
  /**
   * The metadata.generation the operator last acted on.
   */
  observedGeneration?: number;
  /**
   * The latest observations of the resource's state, one per type.
   */
  conditions?: Condition[];
  phase?: "Pending" | "Running" | "Succeeded" | "Failed";
  /**
   * The orchestrator's operation id.
   */
  operationId?: string;
  /**
   * The site whose ferryd runs the operation.
   */
  operationSite?: string;
  /**
   * @maxItems 64
   */
  steps?: {
    name: string;
    state: "pending" | "running" | "done" | "skipped";
    detail?: string;
    /**
     * When the step started.
     */
    startedAt?: string;
    /**
     * When the step ended.
     */
    endedAt?: string;
  }[];
  error?: {
    code?: string;
    message?: string;
  };
  /**
   * When the operation started.
   */
  startedAt?: string;
  /**
   * When it succeeded or failed.
   */
  completedAt?: string;
}

/** Unplanned failover: promote a recovery point at the target site and start the application there. */
export interface Failover {
  apiVersion: "ferry.io/v1alpha1";
  kind: "Failover";
  metadata?: V1ObjectMeta;
  spec: FailoverSpec;
  status?: FailoverStatus;
}

export interface MigrationSpec {
  /**
   * The Application to recover.
   */
  application: string;
  /**
   * The site where the application ends up running.
   */
  targetSite: string;
}

export type MigrationStatus = FailoverStatus;

/** Planned migration: final sync, stop at the source, start at the target, reverse replication. No data loss. */
export interface Migration {
  apiVersion: "ferry.io/v1alpha1";
  kind: "Migration";
  metadata?: V1ObjectMeta;
  spec: MigrationSpec;
  status?: MigrationStatus;
}

export interface FailbackSpec {
  /**
   * The Application to recover.
   */
  application: string;
  /**
   * The site to return to; the application's origin if left out.
   */
  targetSite?: string;
}

export type FailbackStatus = FailoverStatus;

/** Failback after a failover: resync the changes back (delta), then migrate to the original site. */
export interface Failback {
  apiVersion: "ferry.io/v1alpha1";
  kind: "Failback";
  metadata?: V1ObjectMeta;
  spec: FailbackSpec;
  status?: FailbackStatus;
}

export interface DrillSpec {
  /**
   * The Application to recover.
   */
  application: string;
  /**
   * The site that runs the drill copy (it holds the replica).
   */
  site: string;
  /**
   * Recovered namespaces get this suffix, so the copy never meets the real one.
   */
  namespaceSuffix?: string;
}

export type DrillStatus = FailoverStatus;

/** Test failover: recover a clone of the latest recovery point in isolation while replication continues. Deleting the Drill removes the copy. */
export interface Drill {
  apiVersion: "ferry.io/v1alpha1";
  kind: "Drill";
  metadata?: V1ObjectMeta;
  spec: DrillSpec;
  status?: DrillStatus;
}
