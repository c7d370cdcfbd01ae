/**
 * Application → this site's ferryd: the application (`appCreate`, idempotent there), its
 * protection when `spec.protection` asks for one (`protect`), then what ferryd reports (`status`)
 * as the conditions a user reads — Protected, Replicating, RPOMet, Degraded — each with a reason.
 * A refusal (a residency violation, a missing policy or volume) shows as Protected=False with
 * ferryd's message, and nothing is replicated.
 *
 * A protected Application carries the finalizer `ferry.io/protection`: deleting it unprotects the
 * application at ferryd first (replication stops; replicas stay at the target), then lets it go.
 *
 * `spec.kubernetes` becomes the application's Kubernetes members at ferryd (namespaces — the
 * Application's own when the list is empty — and the label selector); ferryd's Kubernetes adapter
 * (`ferry daemon --kubeconfig`) captures those objects with every cut and finds the Ferry volumes
 * under their PVCs. An application that runs at another site now (failed over, migrated) reports
 * that site's protection of it. Not yet: pause.
 */
import { call, type Application as FerryApplication, type ProtectionStatus } from "@ferry/orchestrator";
import { setConditions, timestamp, type Verdict } from "./conditions.js";
import { refusal } from "./ferryd-refusal.js";
import { selectorQuery } from "./manifests.js";
import type { Outcome, ReconcileContext } from "./operator.js";
import type { Application, ApplicationStatus } from "./resources.js";

export const PROTECTION_FINALIZER = "ferry.io/protection";

export async function reconcileApplication(current: Application, context: ReconcileContext): Promise<Outcome> {
  const name = current.metadata?.name ?? "";
  const finalizers = current.metadata?.finalizers ?? [];
  if (current.metadata?.deletionTimestamp !== undefined) {
    if (!finalizers.includes(PROTECTION_FINALIZER)) return "settled";
    try {
      await call(context.nc, context.site, "unprotect", { app: name });
    } catch (error) {
      // Not protected (any more), or it runs at another site now, which holds the protection: nothing
      // to stop from here. Anything else (ferryd unreachable) keeps the finalizer and retries.
      const refused = refusal(error);
      if (refused.reason !== "NotFound" && refused.reason !== "Conflict") return "retry";
    }
    await context.setFinalizers(
      "applications",
      current,
      finalizers.filter((f) => f !== PROTECTION_FINALIZER),
    );
    return "settled";
  }
  const application =
    current.spec.protection !== undefined && !finalizers.includes(PROTECTION_FINALIZER)
      ? await context.setFinalizers("applications", current, [...finalizers, PROTECTION_FINALIZER])
      : current;
  const { spec } = application;
  const status: ApplicationStatus = { ...application.status };
  let verdicts: Verdict[];
  let outcome: Outcome = "settled";
  try {
    const app = await call<FerryApplication>(context.nc, context.site, "appCreate", {
      name,
      volumes: spec.volumes ?? [],
      vms: spec.vms ?? [],
      kubernetes: kubernetesMembers(application),
    });
    status.activeSite = app.active;
    if (spec.protection === undefined) {
      verdicts = [
        {
          type: "Protected",
          status: "False",
          reason: "NotProtected",
          message: "the application has no protection: set spec.protection (policy and targetSite)",
        },
      ];
    } else if (app.active !== context.site) {
      // Failed over or migrated: it runs (and is protected, if at all) from another site now.
      verdicts = await fromActiveSite(name, app.active, context);
    } else {
      const { policy, targetSite } = spec.protection;
      await call(context.nc, context.site, "protect", { app: name, policy, to: targetSite });
      const rows = await call<ProtectionStatus[]>(context.nc, context.site, "status", { app: name });
      const row = rows.find((r) => r.source === context.site && r.target === targetSite);
      verdicts = row === undefined ? unknownStatus(targetSite) : fromStatus(row);
      if (row !== undefined) {
        status.lagSeconds = row.lagSeconds ?? undefined;
        status.lastRecoveryPoint =
          row.lastRecoveryPoint === null
            ? undefined
            : { generation: row.lastRecoveryPoint.generation, time: timestamp(new Date(row.lastRecoveryPoint.atMs)) };
      }
    }
  } catch (error) {
    const refused = refusal(error);
    if (refused.transient) outcome = "retry";
    verdicts = [
      { type: "Protected", status: "False", reason: refused.reason, message: refused.message },
      { type: "Degraded", status: "True", reason: refused.reason, message: refused.message },
    ];
  }
  const generation = application.metadata?.generation ?? 0;
  status.observedGeneration = generation;
  status.conditions = setConditions(status.conditions, verdicts, generation, context.now());
  await context.writeStatus("applications", application, withoutUndefined(status));
  return outcome;
}

/** `spec.kubernetes` as ferryd's application spec takes it. */
function kubernetesMembers(application: Application): { namespaces: string[]; labelSelector: string | null } | null {
  const k = application.spec.kubernetes;
  if (k === undefined) return null;
  const own = application.metadata?.namespace ?? "default";
  const namespaces = k.namespaces === undefined || k.namespaces.length === 0 ? [own] : k.namespaces;
  return { namespaces, labelSelector: selectorQuery(k.labelSelector) ?? null };
}

/** The conditions of an application that runs at another site: that site's protections, if any. */
async function fromActiveSite(name: string, active: string, context: ReconcileContext): Promise<Verdict[]> {
  const rows = await call<ProtectionStatus[]>(context.nc, active, "status", { app: name });
  const row = rows.find((r) => r.source === active && r.state !== "failed-over");
  if (row === undefined) {
    const message =
      `application ${name} runs at site ${active} (failed over or migrated there) and is not protected from there: ` +
      "a Failback resource brings it home, replicating back first";
    return [
      { type: "Protected", status: "False", reason: "RunsElsewhere", message },
      { type: "Replicating", status: "False", reason: "RunsElsewhere", message },
    ];
  }
  return fromStatus(row).map((v) => ({ ...v, message: `runs at site ${active}: ${v.message}` }));
}

function unknownStatus(target: string): Verdict[] {
  const message = `ferryd reports no protection to ${target} yet`;
  return [{ type: "Protected", status: "Unknown", reason: "Pending", message }];
}

function fromStatus(row: ProtectionStatus): Verdict[] {
  const to = `to ${row.target} under policy ${row.policy} (${row.mode})`;
  const lag = row.lagSeconds === null ? "no recovery point yet" : `lag ${row.lagSeconds.toFixed(1)} s`;
  const failing = row.lastError !== null;
  return [
    { type: "Protected", status: "True", reason: "Protected", message: `protected ${to}` },
    {
      type: "Replicating",
      status: failing ? "False" : "True",
      reason: failing ? "ReplicationError" : "Replicating",
      message: failing ? (row.lastError ?? "") : `replicating ${to}: ${row.state}`,
    },
    {
      type: "RPOMet",
      status: row.rpoMet ? "True" : "False",
      reason: row.rpoMet ? "WithinRPO" : row.lagSeconds === null ? "InitialCopy" : "LagAboveRPO",
      message: `${lag}, RPO ${row.rpoSeconds} s`,
    },
    {
      type: "Degraded",
      status: failing ? "True" : "False",
      reason: failing ? "ReplicationError" : "Healthy",
      message: failing ? (row.lastError ?? "") : "no errors",
    },
  ];
}

/** The API server drops undefined fields anyway; dropping them here keeps the no-change check exact. */
function withoutUndefined<T extends object>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}
