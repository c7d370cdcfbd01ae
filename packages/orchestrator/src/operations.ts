/**
 * Recovery operations as plans of named, idempotent steps (ARCHITECTURE §5). The runner persists
 * the operation before and after every step, so a ferryd that restarts mid-way runs the step it was
 * in again and goes on; each step therefore checks what is already done before it acts.
 *
 *  failover  (unplanned, at the target): check → stop-source (best effort) → promote
 *                                        → recover-members → activate
 *  migration (planned, at the target):   check → sync → stop-members → fence → final-sync
 *                                        → stop-source → promote → recover-members → reverse → activate
 *  failback  (at the site the application failed over from): check → stop-stale-pair → reverse-back
 *                                        → resync → then the migration's steps from `sync` on
 *  drill     (at the target, replication keeps running): check → clone → recover-members → record
 *  drill-cleanup: cleanup-members → delete-clones → record
 *
 * `*-members` steps act on the application's VMs and Kubernetes objects through the adapters, with
 * the metadata captured at the recovery point; an application of volumes alone skips them.
 */
import type { Operation, OperationKind, OperationStep } from "./model.js";

/** What a step reports: a detail line for `ferry operation`, or that there was nothing to do. */
export type StepOutcome = { detail: string | null; skipped?: boolean };

export type StepFn = (op: Operation) => Promise<StepOutcome>;

export const MIGRATION_STEPS = [
  "sync",
  "stop-members",
  "fence",
  "final-sync",
  "stop-source",
  "promote",
  "recover-members",
  "reverse",
  "activate",
] as const;

export const PLANS: Record<OperationKind, readonly string[]> = {
  failover: ["check", "stop-source", "promote", "recover-members", "activate"],
  migration: ["check", ...MIGRATION_STEPS],
  failback: ["check", "stop-stale-pair", "reverse-back", "resync", ...MIGRATION_STEPS],
  drill: ["check", "clone", "recover-members", "record"],
  "drill-cleanup": ["cleanup-members", "delete-clones", "record"],
};

export function newOperation(
  kind: OperationKind,
  fields: { id: string; app: string; to: string; from: string; point: number | null; nowMs: number },
): Operation {
  return {
    id: fields.id,
    kind,
    app: fields.app,
    to: fields.to,
    from: fields.from,
    point: fields.point,
    state: "running",
    steps: PLANS[kind].map(
      (name): OperationStep => ({
        name,
        state: "pending",
        detail: null,
        startedAtMs: null,
        endedAtMs: null,
      }),
    ),
    error: null,
    startedAtMs: fields.nowMs,
    endedAtMs: null,
    result: {},
  };
}

/**
 * Run the operation's remaining steps in order, persisting after each change. Resolves with the
 * final operation (succeeded or failed); never rejects for a step's failure, which it records.
 */
export async function runSteps(
  op: Operation,
  steps: Record<string, StepFn>,
  persist: (op: Operation) => Promise<void>,
  onStep: (op: Operation, step: OperationStep) => void,
  errorBody: (error: unknown) => { code: string; message: string },
): Promise<Operation> {
  for (const step of op.steps) {
    if (step.state === "done" || step.state === "skipped") continue;
    const fn = steps[step.name];
    step.state = "running";
    step.startedAtMs ??= Date.now();
    await persist(op);
    try {
      if (fn === undefined) throw new Error(`no implementation for step ${step.name} of a ${op.kind}`);
      const outcome = await fn(op);
      step.state = outcome.skipped ? "skipped" : "done";
      step.detail = outcome.detail;
      step.endedAtMs = Date.now();
      await persist(op);
      onStep(op, step);
    } catch (error) {
      const body = errorBody(error);
      step.detail = body.message;
      step.endedAtMs = Date.now();
      op.state = "failed";
      op.error = { code: body.code, message: `step ${step.name} failed: ${body.message}` };
      op.endedAtMs = Date.now();
      await persist(op);
      return op;
    }
  }
  op.state = "succeeded";
  op.endedAtMs = Date.now();
  op.result.rtoMs = op.endedAtMs - op.startedAtMs;
  await persist(op);
  return op;
}
