/**
 * Validation of what clients send: names, durations, policy specs, application specs. Shared by the
 * CLI (to refuse bad usage before anything is sent) and ferryd (which never trusts a client). Every
 * message names the field, the value given and a value that would work.
 */
import { invalid } from "./errors.js";
import {
  CONSISTENCIES,
  type Consistency,
  type KubernetesSelector,
  MODES,
  type Mode,
  type ProtectionPolicy,
  type RestoreSettings,
} from "./model.js";

const NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** Application, policy and site names: lower-case DNS labels (they become Kubernetes names too). */
export function checkName(what: string, name: unknown): string {
  if (typeof name !== "string" || !NAME.test(name)) {
    throw invalid(
      `${what} name ${JSON.stringify(name)} is not valid: use 1-63 lower-case letters, digits and '-', ` +
        "starting and ending with a letter or digit, e.g. shop-db",
    );
  }
  return name;
}

const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `500ms`, `5s`, `1.5m`, `1h`, `2d` → milliseconds; anything else is refused naming the option. */
export function parseDuration(option: string, text: string, minMs = 0): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(text.trim());
  const factor = match?.[2] === undefined ? undefined : DURATION_UNITS_MS[match[2]];
  if (match?.[1] === undefined || factor === undefined) {
    throw invalid(`${option} '${text}' is not a duration: use a number with ms, s, m, h or d, e.g. 500ms, 5s, 2m`);
  }
  const ms = Math.round(Number(match[1]) * factor);
  if (ms < minMs) throw invalid(`${option} '${text}' is too short: the shortest is ${formatDuration(minMs)}`);
  return ms;
}

export function formatDuration(ms: number): string {
  for (const unit of ["d", "h", "m", "s"] as const) {
    const factor = DURATION_UNITS_MS[unit] ?? 1;
    if (ms >= factor && ms % factor === 0) return `${ms / factor}${unit}`;
  }
  return `${ms}ms`;
}

/** The data plane cycles no more often than this. */
export const MIN_INTERVAL_MS = 100;
/** What `--continuous` means: a generation as soon as the previous one is in, at most every second. */
export const CONTINUOUS_INTERVAL_MS = 1_000;
export const DEFAULT_INTERVAL_MS = 5_000;
export const DEFAULT_RETAIN = 3;
export const MAX_RETAIN = 1_000;

/** A policy as a client sends it: durations as text, the rate already in bytes per second. */
export interface PolicySpec {
  name: string;
  mode: string;
  rpo?: string | null;
  interval?: string | null;
  continuous?: boolean | null;
  retain?: number | null;
  /** Drop recovery points older than this (a duration such as 7d); the latest is always kept. */
  retainAge?: string | null;
  allowedRegions?: string[] | null;
  rateBytes?: number | null;
  consistency?: string | null;
  hooks?: { pre?: string | null; post?: string | null } | null;
  restore?: Partial<RestoreSettings> | null;
}

export function validatePolicy(spec: PolicySpec, nowMs: number): ProtectionPolicy {
  if (typeof spec !== "object" || spec === null) throw invalid("a policy must be a JSON object");
  const name = checkName("policy", spec.name);
  if (!MODES.includes(spec.mode as Mode)) {
    throw invalid(`policy ${name}: mode ${JSON.stringify(spec.mode)} is not one of ${MODES.join(", ")}`);
  }
  const mode = spec.mode as Mode;
  if (spec.continuous && spec.interval != null) {
    throw invalid(`policy ${name}: give either --interval or --continuous, not both`);
  }
  const continuous = spec.continuous === true;
  const intervalMs = continuous
    ? CONTINUOUS_INTERVAL_MS
    : spec.interval == null
      ? DEFAULT_INTERVAL_MS
      : parseDuration("--interval", spec.interval, MIN_INTERVAL_MS);
  // Without an explicit RPO, async is in policy while at most two generations behind; sync at once.
  const rpoMs = spec.rpo == null ? (mode === "sync" ? 0 : 2 * intervalMs) : parseDuration("--rpo", spec.rpo);
  if (mode === "async" && spec.rpo != null && rpoMs < intervalMs) {
    throw invalid(
      `policy ${name}: --rpo ${spec.rpo} is shorter than the interval (${formatDuration(intervalMs)}): an async ` +
        "copy is at least one interval behind; lengthen --rpo or shorten --interval",
    );
  }
  const retain = spec.retain ?? DEFAULT_RETAIN;
  if (!Number.isInteger(retain) || retain < 1 || retain > MAX_RETAIN) {
    throw invalid(`policy ${name}: --retain ${retain} is not a whole number from 1 to ${MAX_RETAIN}`);
  }
  const retainAgeMs = spec.retainAge == null ? null : parseDuration("--retain-age", spec.retainAge, intervalMs);
  const allowedRegions = (spec.allowedRegions ?? []).map((r) => {
    if (typeof r !== "string" || !NAME.test(r)) {
      throw invalid(`policy ${name}: allowed region ${JSON.stringify(r)} is not a region name such as eu-de`);
    }
    return r;
  });
  const rateBytes = spec.rateBytes ?? null;
  if (rateBytes !== null && (!Number.isSafeInteger(rateBytes) || rateBytes <= 0)) {
    throw invalid(`policy ${name}: --rate must be above 0 bytes per second, e.g. 100M; leave it out for no limit`);
  }
  const consistency = (spec.consistency ?? "crash") as Consistency;
  if (!CONSISTENCIES.includes(consistency)) {
    throw invalid(
      `policy ${name}: consistency ${JSON.stringify(spec.consistency)} is not one of ${CONSISTENCIES.join(", ")}`,
    );
  }
  const hook = (which: "pre" | "post") => {
    const command = spec.hooks?.[which] ?? null;
    if (command !== null && (typeof command !== "string" || command.trim() === "")) {
      throw invalid(`policy ${name}: the ${which}-hook must be a shell command; leave it out for none`);
    }
    return command;
  };
  const hooks = { pre: hook("pre"), post: hook("post") };
  return {
    name,
    mode,
    rpoMs,
    intervalMs,
    continuous,
    retain,
    retainAgeMs,
    allowedRegions: [...new Set(allowedRegions)],
    rateBytes,
    consistency,
    hooks,
    restore: validateRestore(name, spec.restore ?? null),
    createdAtMs: nowMs,
  };
}

export const DEFAULT_RESTORE: RestoreSettings = {
  namespaceMapping: {},
  storageClassMapping: {},
  onConflict: "overwrite",
  transforms: [],
};

const PATCH_OPS = ["add", "remove", "replace", "test"];

function validateRestore(policy: string, spec: Partial<RestoreSettings> | null): RestoreSettings {
  if (spec === null) return DEFAULT_RESTORE;
  const mapping = (what: string, flag: string, value: unknown): Record<string, string> => {
    if (value === undefined || value === null) return {};
    const entries = typeof value === "object" && !Array.isArray(value) ? Object.entries(value) : null;
    const bad = entries?.find(([from, to]) => !NAME.test(from) || typeof to !== "string" || !NAME.test(to));
    if (entries === null || bad !== undefined) {
      throw invalid(
        `policy ${policy}: ${what} ${JSON.stringify(bad ?? value)} is not valid: give ${flag} FROM=TO with two names ` +
          "such as shop=shop-dr",
      );
    }
    return Object.fromEntries(entries as [string, string][]);
  };
  const onConflict = spec.onConflict ?? "overwrite";
  if (onConflict !== "overwrite" && onConflict !== "skip") {
    throw invalid(`policy ${policy}: --on-conflict ${JSON.stringify(onConflict)} is not overwrite or skip`);
  }
  const transforms = (spec.transforms ?? []).map((t, i) => {
    const where = `policy ${policy}: transform ${i + 1}`;
    if (typeof t !== "object" || t === null || !Array.isArray(t.patch) || t.patch.length === 0) {
      throw invalid(
        `${where} needs a non-empty "patch" list of JSON patch operations, e.g. {"patch":[{"op":"remove","path":"/spec/replicas"}]}`,
      );
    }
    for (const o of t.patch) {
      if (
        typeof o !== "object" ||
        o === null ||
        !PATCH_OPS.includes(o.op) ||
        typeof o.path !== "string" ||
        !o.path.startsWith("/")
      ) {
        throw invalid(
          `${where}: ${JSON.stringify(o)} is not an operation: op is one of ${PATCH_OPS.join(", ")}, path a JSON pointer such as /spec/replicas`,
        );
      }
      if (o.op !== "remove" && !("value" in o)) throw invalid(`${where}: ${o.op} ${o.path} needs a value`);
    }
    if (t.kind !== undefined && (typeof t.kind !== "string" || !/^[A-Z][A-Za-z0-9]*$/.test(t.kind))) {
      throw invalid(`${where}: kind ${JSON.stringify(t.kind)} is not a Kubernetes kind such as StatefulSet`);
    }
    return t;
  });
  return {
    namespaceMapping: mapping("namespace mapping", "--namespace-map", spec.namespaceMapping),
    storageClassMapping: mapping("storage class mapping", "--storage-class-map", spec.storageClassMapping),
    onConflict,
    transforms,
  };
}

/** Two policies are the same when everything but the creation time matches (idempotent create). */
export function samePolicy(a: ProtectionPolicy, b: ProtectionPolicy): boolean {
  return JSON.stringify({ ...a, createdAtMs: 0 }) === JSON.stringify({ ...b, createdAtMs: 0 });
}

export interface ApplicationSpec {
  name: string;
  volumes: string[];
  vms?: string[] | null;
  /** Kubernetes objects (and the Ferry volumes under their PVCs): namespaces and a label selector. */
  kubernetes?: { namespaces: string[]; labelSelector?: string | null } | null;
  /** Bytes for volumes that do not exist yet; null: every volume must exist. */
  sizeBytes?: number | null;
}

export function validateApplication(spec: ApplicationSpec): {
  name: string;
  volumes: string[];
  vms: string[];
  kubernetes: KubernetesSelector | null;
  sizeBytes: number | null;
} {
  if (typeof spec !== "object" || spec === null) throw invalid("an application must be a JSON object");
  const name = checkName("application", spec.name);
  const volumes = spec.volumes ?? [];
  const vms = spec.vms ?? [];
  if (!Array.isArray(volumes) || !volumes.every((v) => typeof v === "string" && v !== "")) {
    throw invalid(`application ${name}: volumes must be a list of volume names`);
  }
  const kubernetes = validateKubernetes(name, spec.kubernetes ?? null);
  if (volumes.length + vms.length === 0 && kubernetes === null) {
    throw invalid(`application ${name} has no members: give at least one --volume, --vm or --namespace`);
  }
  const duplicate = volumes.find((v, i) => volumes.indexOf(v) !== i);
  if (duplicate !== undefined) throw invalid(`application ${name}: volume ${duplicate} is listed twice`);
  const sizeBytes = spec.sizeBytes ?? null;
  if (sizeBytes !== null && (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0)) {
    throw invalid(`application ${name}: --size must be above 0, e.g. 1G`);
  }
  return { name, volumes, vms, kubernetes, sizeBytes };
}

function validateKubernetes(app: string, spec: ApplicationSpec["kubernetes"]): KubernetesSelector | null {
  if (spec === null || spec === undefined) return null;
  const { namespaces, labelSelector = null } = spec;
  if (!Array.isArray(namespaces) || namespaces.length === 0) {
    throw invalid(`application ${app}: Kubernetes members need at least one namespace (--namespace NAME)`);
  }
  for (const ns of namespaces) {
    if (typeof ns !== "string" || !NAME.test(ns)) {
      throw invalid(
        `application ${app}: namespace '${String(ns)}' is not a Kubernetes namespace name (lower-case letters, ` +
          "digits and '-', at most 63)",
      );
    }
  }
  const twice = namespaces.find((n, i) => namespaces.indexOf(n) !== i);
  if (twice !== undefined) throw invalid(`application ${app}: namespace ${twice} is listed twice`);
  if (labelSelector !== null && (typeof labelSelector !== "string" || labelSelector.includes("?"))) {
    throw invalid(`application ${app}: the label selector must be a string like app=shop,tier in (db)`);
  }
  return { namespaces, labelSelector: labelSelector === "" ? null : labelSelector };
}
