/**
 * The ferry.io/v1alpha1 custom resources, defined once. Everything else is generated from here: the
 * CRD YAML in the Helm chart (`crd-manifest.ts`) and the TypeScript types (`resources.ts`, by
 * `npm run generate`). Tests check that both generated copies match this file.
 *
 * The schemas are OpenAPI v3 as the API server validates them (structural, with `x-kubernetes-*`
 * extensions and CEL rules); field semantics follow the orchestrator's model (model.ts) and
 * validation (validate.ts): the same names, the same duration syntax, the same ranges.
 */

/** A JSON schema as a CRD's `openAPIV3Schema` holds it (the subset Ferry uses, plus extensions). */
export interface Schema {
  type?: "object" | "array" | "string" | "integer" | "number" | "boolean";
  description?: string;
  properties?: Record<string, Schema>;
  required?: string[];
  items?: Schema;
  additionalProperties?: Schema | boolean;
  enum?: readonly (string | number | boolean)[];
  pattern?: string;
  format?: string;
  minimum?: number;
  maximum?: number;
  minLength?: number;
  maxLength?: number;
  minItems?: number;
  maxItems?: number;
  default?: unknown;
  "x-kubernetes-list-type"?: "atomic" | "set" | "map";
  "x-kubernetes-list-map-keys"?: string[];
  "x-kubernetes-validations"?: { rule: string; message: string; fieldPath?: string; reason?: string }[];
  "x-kubernetes-preserve-unknown-fields"?: boolean;
}

export interface PrinterColumn {
  name: string;
  type: "string" | "integer" | "number" | "boolean" | "date";
  jsonPath: string;
  description?: string;
  priority?: number;
}

export interface ResourceDefinition {
  kind: string;
  plural: string;
  singular: string;
  shortNames: string[];
  scope: "Namespaced" | "Cluster";
  description: string;
  spec: Schema;
  status: Schema;
  printerColumns: PrinterColumn[];
}

export const GROUP = "ferry.io";
export const VERSION = "v1alpha1";
export const API_VERSION = `${GROUP}/${VERSION}`;
/** The categories `kubectl get ferry` lists. */
export const CATEGORY = "ferry";

// --- Field types shared by several resources --------------------------------------------------

/** Application, policy, site and region names: lower-case DNS labels, as validate.ts checks them. */
export const NAME_PATTERN = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/** `500ms`, `5s`, `1.5m`, `1h`, `2d`: the orchestrator's `parseDuration` syntax. */
export const DURATION_PATTERN = "^[0-9]+(\\.[0-9]+)?(ms|s|m|h|d)$";
/** Bytes per second with the data plane's size suffixes (powers of 1024), above zero: `100M`. */
export const RATE_PATTERN = "^(0*[1-9][0-9]*(\\.[0-9]+)?|0*\\.[0-9]*[1-9][0-9]*)(K|M|G|T|Ki|Mi|Gi|Ti)?$";
/** validate.ts's MAX_RETAIN. */
export const MAX_RETAIN = 1_000;

const name = (description: string): Schema => ({
  type: "string",
  description,
  pattern: NAME_PATTERN,
  maxLength: 63,
});

const nameSet = (description: string, maxItems: number): Schema => ({
  type: "array",
  description,
  items: { type: "string", pattern: NAME_PATTERN, maxLength: 63 },
  maxItems,
  "x-kubernetes-list-type": "set",
});

const duration = (description: string): Schema => ({
  type: "string",
  description,
  pattern: DURATION_PATTERN,
  maxLength: 32,
});

const time = (description: string): Schema => ({ type: "string", format: "date-time", description });

/** metav1.Condition, as every Kubernetes API uses it. */
const conditions: Schema = {
  type: "array",
  description: "The latest observations of the resource's state, one per type.",
  maxItems: 16,
  "x-kubernetes-list-type": "map",
  "x-kubernetes-list-map-keys": ["type"],
  items: {
    type: "object",
    required: ["type", "status", "lastTransitionTime", "reason", "message"],
    properties: {
      type: {
        type: "string",
        description: "Protected, Replicating, RPOMet, Degraded, Ready, Succeeded, …",
        pattern:
          "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        maxLength: 316,
      },
      status: { type: "string", enum: ["True", "False", "Unknown"] },
      observedGeneration: { type: "integer", minimum: 0, description: "The generation the condition was set for." },
      lastTransitionTime: time("When the condition last changed status."),
      reason: {
        type: "string",
        description: "Why, in one CamelCase word.",
        pattern: "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        minLength: 1,
        maxLength: 1024,
      },
      message: { type: "string", description: "Why, for a person: what happened and what to do.", maxLength: 32768 },
    },
  },
};

const observedGeneration: Schema = {
  type: "integer",
  minimum: 0,
  description: "The metadata.generation the operator last acted on.",
};

/** A status with the conditions and observedGeneration every Ferry resource reports. */
const status = (description: string, extra: Record<string, Schema> = {}): Schema => ({
  type: "object",
  description,
  properties: { observedGeneration, conditions, ...extra },
});

const conditionColumn = (type: string, priority = 0): PrinterColumn => ({
  name: type,
  type: "string",
  jsonPath: `.status.conditions[?(@.type=="${type}")].status`,
  ...(priority === 0 ? {} : { priority }),
});

const age: PrinterColumn = { name: "Age", type: "date", jsonPath: ".metadata.creationTimestamp" };

/** A k8s LabelSelector (metav1.LabelSelector). */
const labelSelector: Schema = {
  type: "object",
  description: "Objects in the selected namespaces that carry these labels; leave out to select all of them.",
  properties: {
    matchLabels: {
      type: "object",
      additionalProperties: { type: "string", maxLength: 63 },
    },
    matchExpressions: {
      type: "array",
      maxItems: 32,
      "x-kubernetes-list-type": "atomic",
      items: {
        type: "object",
        required: ["key", "operator"],
        properties: {
          key: { type: "string", minLength: 1, maxLength: 317 },
          operator: { type: "string", enum: ["In", "NotIn", "Exists", "DoesNotExist"] },
          values: {
            type: "array",
            maxItems: 64,
            items: { type: "string", maxLength: 63 },
            "x-kubernetes-list-type": "atomic",
          },
        },
      },
    },
  },
};

/** Name → name maps (namespaces, storage classes): both sides DNS labels. */
const nameMap = (description: string): Schema => ({
  type: "object",
  description,
  additionalProperties: { type: "string", pattern: NAME_PATTERN, maxLength: 63 },
  "x-kubernetes-validations": [
    { rule: `self.all(k, k.matches('${NAME_PATTERN}'))`, message: "keys must be names such as shop or fast-ssd" },
  ],
});

/** How an application's Kubernetes objects are restored at another cluster (manifests.ts). */
const restore: Schema = {
  type: "object",
  description: "How the application's Kubernetes objects are restored at the target cluster.",
  properties: {
    namespaceMapping: nameMap("Source namespace → namespace at the target; unmapped ones keep their name."),
    storageClassMapping: nameMap("Source storage class → storage class at the target."),
    onConflict: {
      type: "string",
      enum: ["overwrite", "skip"],
      default: "overwrite",
      description: "An object that exists at the target: overwrite Ferry's fields (others' stay), or skip it.",
    },
    transforms: {
      type: "array",
      description: "JSON patches (RFC 6902) applied to restored objects, e.g. scale a StatefulSet down.",
      maxItems: 64,
      "x-kubernetes-list-type": "atomic",
      items: {
        type: "object",
        required: ["patch"],
        properties: {
          kind: { type: "string", description: "Only objects of this kind.", pattern: "^[A-Z][A-Za-z0-9]*$" },
          name: { type: "string", description: "Only the object of this name.", maxLength: 253 },
          patch: {
            type: "array",
            minItems: 1,
            maxItems: 64,
            "x-kubernetes-list-type": "atomic",
            items: {
              type: "object",
              required: ["op", "path"],
              properties: {
                op: { type: "string", enum: ["add", "remove", "replace", "test"] },
                path: { type: "string", description: "A JSON pointer.", pattern: "^(/([^/~]|~[01])*)+$" },
                value: { "x-kubernetes-preserve-unknown-fields": true },
              },
            },
          },
        },
      },
    },
  },
};

// --- Resources ----------------------------------------------------------------------------------

const site: ResourceDefinition = {
  kind: "Site",
  plural: "sites",
  singular: "site",
  shortNames: ["fsite"],
  scope: "Cluster",
  description: "A Ferry site: one ferryd with its volumes, in one region, reachable over NATS.",
  spec: {
    type: "object",
    required: ["region"],
    properties: {
      region: name("The region the site is in; policies' allowedRegions refer to it, e.g. eu-de."),
      jurisdiction: {
        type: "string",
        description: "The legal jurisdiction of the site's data, for residency reports, e.g. EU.",
        maxLength: 64,
      },
      nats: {
        type: "object",
        description: "How to reach the site's ferryd; leave out for the site this operator runs at.",
        required: ["url"],
        properties: {
          url: {
            type: "string",
            description: "A NATS server URL, e.g. nats://nats.ferry-system:4222.",
            pattern: "^(nats|tls|ws|wss)://[^\\s/]+(:[0-9]{1,5})?/?$",
            maxLength: 512,
          },
          credentialsSecret: {
            type: "object",
            description: "A Secret in the operator's namespace with NATS credentials (a .creds file).",
            required: ["name"],
            properties: {
              name: { type: "string", pattern: NAME_PATTERN, maxLength: 63 },
              key: { type: "string", default: "nats.creds", maxLength: 253 },
            },
          },
        },
      },
    },
  },
  status: status("What the site last announced.", {
    version: { type: "string", description: "The ferryd version." },
    lastSeen: time("When the site last announced itself."),
  }),
  printerColumns: [
    { name: "Region", type: "string", jsonPath: ".spec.region" },
    conditionColumn("Ready"),
    { name: "Version", type: "string", jsonPath: ".status.version", priority: 1 },
    { name: "Last Seen", type: "date", jsonPath: ".status.lastSeen" },
    age,
  ],
};

const protectionPolicy: ResourceDefinition = {
  kind: "ProtectionPolicy",
  plural: "protectionpolicies",
  singular: "protectionpolicy",
  shortNames: ["fpol"],
  scope: "Namespaced",
  description: "How applications are protected: replication mode, RPO, schedule, retention, residency.",
  spec: {
    type: "object",
    required: ["mode"],
    "x-kubernetes-validations": [
      {
        rule: "!(has(self.interval) && has(self.continuous) && self.continuous)",
        message: "give either interval or continuous: true, not both",
        reason: "FieldValueForbidden",
        fieldPath: ".interval",
      },
    ],
    properties: {
      mode: {
        type: "string",
        enum: ["sync", "async"],
        description: "sync: a write is acknowledged once both sites hold it; async: copied every interval.",
      },
      rpo: duration(
        "The recovery point objective: the lag above which the application is out of policy. Default: 0 for sync, two intervals for async.",
      ),
      interval: duration("Time between recovery points (async), e.g. 5s; at least 100ms. Default: 5s."),
      continuous: {
        type: "boolean",
        description: "Cut a recovery point as soon as the previous one is in (at most every second).",
      },
      retain: {
        type: "integer",
        minimum: 1,
        maximum: MAX_RETAIN,
        default: 3,
        description: "Recovery points kept at each target, the newest included.",
      },
      allowedRegions: nameSet("Regions allowed to hold a copy; empty means any.", 64),
      rate: {
        type: "string",
        pattern: RATE_PATTERN,
        maxLength: 32,
        description: "Bandwidth limit on the wire per target in bytes per second, e.g. 100M (powers of 1024).",
      },
      consistency: {
        type: "string",
        enum: ["crash", "application"],
        default: "crash",
        description: "application: run the hooks and freeze the members around each cut.",
      },
      restore,
      hooks: {
        type: "object",
        description: "Commands run at the active site around a cut (application consistency).",
        properties: {
          pre: { type: "string", maxLength: 4096 },
          post: { type: "string", maxLength: 4096 },
        },
      },
    },
  },
  status: status("Whether the operator accepted the policy."),
  printerColumns: [
    { name: "Mode", type: "string", jsonPath: ".spec.mode" },
    { name: "RPO", type: "string", jsonPath: ".spec.rpo" },
    { name: "Interval", type: "string", jsonPath: ".spec.interval" },
    { name: "Retain", type: "integer", jsonPath: ".spec.retain", priority: 1 },
    { name: "Regions", type: "string", jsonPath: ".spec.allowedRegions", priority: 1 },
    conditionColumn("Ready"),
    age,
  ],
};

const application: ResourceDefinition = {
  kind: "Application",
  plural: "applications",
  singular: "application",
  shortNames: ["fapp"],
  scope: "Namespaced",
  description:
    "A hybrid application protected as one entity: Kubernetes objects (namespaces + label selector), libvirt VMs and Ferry volumes, cut together.",
  spec: {
    type: "object",
    "x-kubernetes-validations": [
      {
        rule: "has(self.kubernetes) || (has(self.vms) && size(self.vms) > 0) || (has(self.volumes) && size(self.volumes) > 0)",
        message: "an application needs members: kubernetes, vms or volumes",
        reason: "FieldValueRequired",
      },
    ],
    properties: {
      kubernetes: {
        type: "object",
        description: "The Kubernetes objects that belong to the application.",
        required: ["namespaces"],
        properties: {
          namespaces: { ...nameSet("Namespaces to capture; the application's own namespace if empty.", 64) },
          labelSelector,
        },
      },
      vms: {
        type: "array",
        description: "libvirt domain names at the active site.",
        maxItems: 256,
        "x-kubernetes-list-type": "set",
        items: { type: "string", pattern: "^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$" },
      },
      volumes: {
        type: "array",
        description: "Ferry volumes protected with the application, besides those of its VMs and PVCs.",
        maxItems: 256,
        "x-kubernetes-list-type": "set",
        items: { type: "string", pattern: "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$" },
      },
      protection: {
        type: "object",
        description: "Protect the application under a policy to a target site; leave out to only define it.",
        required: ["policy", "targetSite"],
        properties: {
          policy: name("A ProtectionPolicy in this namespace."),
          targetSite: name("The Site that holds the copy."),
          paused: { type: "boolean", default: false, description: "Stop cutting recovery points." },
        },
      },
    },
  },
  status: status("What the operator last saw at the application's active site.", {
    activeSite: { type: "string", description: "Where the application runs now." },
    lagSeconds: { type: "number", minimum: 0, description: "Age of the newest recovery point at the target." },
    lastRecoveryPoint: {
      type: "object",
      properties: {
        generation: { type: "integer", minimum: 0 },
        time: time("When it was cut."),
      },
    },
  }),
  printerColumns: [
    { name: "Active", type: "string", jsonPath: ".status.activeSite" },
    { name: "Target", type: "string", jsonPath: ".spec.protection.targetSite" },
    conditionColumn("Protected"),
    conditionColumn("RPOMet"),
    { name: "Lag", type: "number", jsonPath: ".status.lagSeconds" },
    conditionColumn("Degraded", 1),
    age,
  ],
};

const recoveryPoint: ResourceDefinition = {
  kind: "RecoveryPoint",
  plural: "recoverypoints",
  singular: "recoverypoint",
  shortNames: ["frp"],
  scope: "Namespaced",
  description:
    "A complete generation of an application at a site: where it can be recovered to. Written by the operator.",
  spec: {
    type: "object",
    required: ["application", "site", "sourceSite", "generation", "time"],
    "x-kubernetes-validations": [{ rule: "self == oldSelf", message: "a recovery point is immutable" }],
    properties: {
      application: name("The Application."),
      site: name("The site that holds the point."),
      sourceSite: name("The site it was copied from."),
      generation: { type: "integer", minimum: 0, description: "The data plane's generation number." },
      time: time("When it was cut."),
      consistency: { type: "string", enum: ["crash", "application"] },
    },
  },
  status: status("Whether the point is still held at its site."),
  printerColumns: [
    { name: "Application", type: "string", jsonPath: ".spec.application" },
    { name: "Site", type: "string", jsonPath: ".spec.site" },
    { name: "Generation", type: "integer", jsonPath: ".spec.generation" },
    { name: "Consistency", type: "string", jsonPath: ".spec.consistency" },
    { name: "Cut", type: "date", jsonPath: ".spec.time" },
  ],
};

/** What every recovery operation reports: a persisted state machine of steps (operations.ts). */
const operationStatus = status("The operation's progress; its steps are idempotent and resumed after a restart.", {
  phase: { type: "string", enum: ["Pending", "Running", "Succeeded", "Failed"] },
  operationId: { type: "string", description: "The orchestrator's operation id." },
  operationSite: { type: "string", description: "The site whose ferryd runs the operation." },
  steps: {
    type: "array",
    maxItems: 64,
    "x-kubernetes-list-type": "atomic",
    items: {
      type: "object",
      required: ["name", "state"],
      properties: {
        name: { type: "string" },
        state: { type: "string", enum: ["pending", "running", "done", "skipped"] },
        detail: { type: "string" },
        startedAt: time("When the step started."),
        endedAt: time("When the step ended."),
      },
    },
  },
  error: {
    type: "object",
    properties: { code: { type: "string" }, message: { type: "string" } },
  },
  startedAt: time("When the operation started."),
  completedAt: time("When it succeeded or failed."),
});

const operationColumns: PrinterColumn[] = [
  { name: "Application", type: "string", jsonPath: ".spec.application" },
  { name: "Phase", type: "string", jsonPath: ".status.phase" },
  age,
];

/** Operations are requests: once made, their spec does not change (make a new one instead). */
const immutable = { rule: "self == oldSelf", message: "an operation's spec is immutable: create a new one" };

const operation = (
  kind: string,
  plural: string,
  shortName: string,
  description: string,
  properties: Record<string, Schema>,
  required: string[],
  columns: PrinterColumn[],
): ResourceDefinition => ({
  kind,
  plural,
  singular: kind.toLowerCase(),
  shortNames: [shortName],
  scope: "Namespaced",
  description,
  spec: {
    type: "object",
    required: ["application", ...required],
    "x-kubernetes-validations": [immutable],
    properties: { application: name("The Application to recover."), ...properties },
  },
  status: operationStatus,
  printerColumns: [...operationColumns.slice(0, 1), ...columns, ...operationColumns.slice(1)],
});

const targetSite = name("The site where the application ends up running.");
const site_column: PrinterColumn = { name: "Target", type: "string", jsonPath: ".spec.targetSite" };

const failover = operation(
  "Failover",
  "failovers",
  "ffo",
  "Unplanned failover: promote a recovery point at the target site and start the application there.",
  {
    targetSite,
    recoveryPoint: {
      type: "integer",
      minimum: 0,
      description: "The generation to recover to; the latest complete one if left out.",
    },
  },
  ["targetSite"],
  [site_column],
);

const migration = operation(
  "Migration",
  "migrations",
  "fmig",
  "Planned migration: final sync, stop at the source, start at the target, reverse replication. No data loss.",
  { targetSite },
  ["targetSite"],
  [site_column],
);

const failback = operation(
  "Failback",
  "failbacks",
  "ffb",
  "Failback after a failover: resync the changes back (delta), then migrate to the original site.",
  { targetSite: name("The site to return to; the application's origin if left out.") },
  [],
  [site_column],
);

const drill = operation(
  "Drill",
  "drills",
  "fdr",
  "Test failover: recover a clone of the latest recovery point in isolation while replication continues. Deleting the Drill removes the copy.",
  {
    site: name("The site that runs the drill copy (it holds the replica)."),
    namespaceSuffix: {
      type: "string",
      pattern: "^-[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$",
      default: "-drill",
      description: "Recovered namespaces get this suffix, so the copy never meets the real one.",
    },
  },
  ["site"],
  [{ name: "Site", type: "string", jsonPath: ".spec.site" }],
);

/** Every Ferry resource, in the order the chart and the docs list them. */
export const RESOURCES: readonly ResourceDefinition[] = [
  site,
  protectionPolicy,
  application,
  recoveryPoint,
  failover,
  migration,
  failback,
  drill,
];
