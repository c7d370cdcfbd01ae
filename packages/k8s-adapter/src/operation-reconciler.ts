/**
 * Failover, Migration, Failback and Drill resources → a recovery operation at ferryd, then its
 * progress mirrored into status (phase, steps, error, the `Succeeded` condition). Starting is an
 * idempotent ensure: before asking ferryd to start, the reconciler looks for an operation of that
 * kind it already started for this resource (a crash between the start and the status write must
 * not start a second one). The operation itself is ferryd's persisted state machine; this only
 * requests and reports it.
 *
 * A Drill carries the finalizer `ferry.io/drill-cleanup`: deleting it cleans the drill up at ferryd
 * first (its copies of the volumes, VMs and Kubernetes objects are removed by ferryd's drill-cleanup
 * operation), then lets it go.
 */
import { call, type Operation, type OperationKind } from "@ferry/orchestrator";
import { setConditions, timestamp, type Verdict } from "./conditions.js";
import { refusal } from "./ferryd-refusal.js";
import type { Outcome, ReconcileContext } from "./operator.js";
import type { Drill, Failback, Failover, FailoverStatus, Migration } from "./resources.js";

export type OperationResource = Failover | Migration | Failback | Drill;

export const DRILL_FINALIZER = "ferry.io/drill-cleanup";

export const OPERATION_PLURALS = ["failovers", "migrations", "failbacks", "drills"] as const;
export type OperationPlural = (typeof OPERATION_PLURALS)[number];

/** How often a running operation's progress is polled. */
const POLL_MS = 1_000;

/** The ferryd call that starts the operation a resource asks for. */
function request(resource: OperationResource): { op: string; kind: OperationKind; body: Record<string, unknown> } {
  const app = resource.spec.application;
  switch (resource.kind) {
    case "Failover":
      return {
        op: "failover",
        kind: "failover",
        body: { app, to: resource.spec.targetSite, point: resource.spec.recoveryPoint ?? null },
      };
    case "Migration":
      return { op: "failover", kind: "migration", body: { app, to: resource.spec.targetSite, planned: true } };
    case "Drill":
      return { op: "failover", kind: "drill", body: { app, to: resource.spec.site, test: true } };
    case "Failback":
      return { op: "failback", kind: "failback", body: { app } };
  }
}

export async function reconcileOperation(
  plural: OperationPlural,
  resource: OperationResource,
  context: ReconcileContext,
): Promise<Outcome | { after: number }> {
  const finalizers = resource.metadata?.finalizers ?? [];
  if (resource.kind === "Drill") {
    if (resource.metadata?.deletionTimestamp !== undefined) return cleanUpDrill(resource, context);
    if (!finalizers.includes(DRILL_FINALIZER) && resource.status?.phase !== "Failed") {
      resource = await context.setFinalizers(plural, resource, [...finalizers, DRILL_FINALIZER]);
    }
  }
  const status: FailoverStatus = { ...resource.status };
  if (status.phase === "Succeeded" || status.phase === "Failed") return "settled";
  const generation = resource.metadata?.generation ?? 0;
  let operation: Operation;
  try {
    if (status.operationId === undefined || status.operationSite === undefined) {
      operation = await ensureStarted(resource, context);
    } else {
      operation = await call<Operation>(context.nc, status.operationSite, "operationGet", { id: status.operationId });
    }
  } catch (error) {
    const refused = refusal(error);
    if (refused.transient) return "retry";
    // Refused before it started (a residency violation, nothing to fail over, …): final.
    status.phase = "Failed";
    status.error = { code: refused.reason, message: refused.message };
    status.completedAt = timestamp(context.now());
    const verdict: Verdict = { type: "Succeeded", status: "False", reason: refused.reason, message: refused.message };
    status.conditions = setConditions(status.conditions, [verdict], generation, context.now());
    status.observedGeneration = generation;
    await context.writeStatus(plural, resource, status);
    return "settled";
  }
  status.operationId = operation.id;
  status.operationSite = operation.to;
  status.phase = operation.state === "running" ? "Running" : operation.state === "succeeded" ? "Succeeded" : "Failed";
  status.startedAt = timestamp(new Date(operation.startedAtMs));
  if (operation.endedAtMs !== null) status.completedAt = timestamp(new Date(operation.endedAtMs));
  status.steps = operation.steps.map((step) => ({
    name: step.name,
    state: step.state,
    ...(step.detail === null ? {} : { detail: step.detail }),
    ...(step.startedAtMs === null ? {} : { startedAt: timestamp(new Date(step.startedAtMs)) }),
    ...(step.endedAtMs === null ? {} : { endedAt: timestamp(new Date(step.endedAtMs)) }),
  }));
  if (operation.error !== null) status.error = operation.error;
  const running = operation.steps.find((s) => s.state === "running")?.name;
  const verdict: Verdict =
    status.phase === "Running"
      ? {
          type: "Succeeded",
          status: "Unknown",
          reason: "Running",
          message: `${operation.kind} ${operation.id} at site ${operation.to}${running === undefined ? "" : `: ${running}`}`,
        }
      : status.phase === "Succeeded"
        ? {
            type: "Succeeded",
            status: "True",
            reason: "Succeeded",
            message: `${operation.kind} ${operation.id}: ${resource.spec.application} runs at site ${operation.to}`,
          }
        : {
            type: "Succeeded",
            status: "False",
            reason: "Failed",
            message: operation.error?.message ?? `${operation.kind} ${operation.id} failed`,
          };
  status.conditions = setConditions(status.conditions, [verdict], generation, context.now());
  status.observedGeneration = generation;
  await context.writeStatus(plural, resource, JSON.parse(JSON.stringify(status)));
  return status.phase === "Running" ? { after: POLL_MS } : "settled";
}

/** The operation this resource started, found at ferryd, or a new one. */
async function ensureStarted(resource: OperationResource, context: ReconcileContext): Promise<Operation> {
  const { op, kind, body } = request(resource);
  const created = Date.parse(resource.metadata?.creationTimestamp?.toString() ?? "");
  // Where the operation runs: the target for failover, migration and drill, the origin for failback.
  const where = "to" in body && typeof body.to === "string" ? body.to : context.site;
  const earlier = await call<Operation[]>(context.nc, where, "operationList", { app: resource.spec.application }).catch(
    () => [] as Operation[],
  );
  // Whole seconds in creationTimestamp: an operation started in the same second belongs to it.
  const mine = earlier.find((o) => o.kind === kind && Number.isFinite(created) && o.startedAtMs >= created);
  if (mine !== undefined) return mine;
  return call<Operation>(context.nc, context.site, op, body);
}

/**
 * A Drill being deleted: ferryd's drill-cleanup of the operation it started runs to its end (started
 * here when none runs), then the finalizer goes. A drill that never succeeded left nothing to clean.
 */
async function cleanUpDrill(resource: Drill, context: ReconcileContext): Promise<Outcome> {
  const finalizers = resource.metadata?.finalizers ?? [];
  if (!finalizers.includes(DRILL_FINALIZER)) return "settled";
  const { operationId, operationSite } = resource.status ?? {};
  if (operationId !== undefined && operationSite !== undefined) {
    try {
      const drill = await call<Operation>(context.nc, operationSite, "operationGet", { id: operationId });
      if (drill.state === "running") return { after: POLL_MS };
      if (drill.state === "succeeded" && drill.result.cleaned !== "yes") {
        const app = resource.spec.application;
        const cleanups = (await call<Operation[]>(context.nc, operationSite, "operationList", { app })).filter(
          (o) => o.kind === "drill-cleanup" && o.result.drill === operationId,
        );
        const last = cleanups.at(-1);
        if (last?.state === "running") return { after: POLL_MS };
        if (last?.state === "failed") {
          // Start it again, after the backoff: a failed cleanup must not spin.
          await call(context.nc, operationSite, "drillCleanup", { app });
          return "retry";
        }
        await call(context.nc, operationSite, "drillCleanup", { app });
        return { after: POLL_MS };
      }
    } catch (error) {
      // ferryd forgot the operation (NotFound): nothing left to clean. Anything else: try again.
      if (refusal(error).reason !== "NotFound") return "retry";
    }
  }
  await context.setFinalizers(
    "drills",
    resource,
    finalizers.filter((f) => f !== DRILL_FINALIZER),
  );
  return "settled";
}
