/**
 * ProtectionPolicy → this site's ferryd (`policyCreate`, idempotent there). The verdict goes to the
 * `Ready` condition: what ferryd refused (an async RPO shorter than the interval, a name that
 * exists with other settings) is shown with ferryd's own message.
 *
 * ferryd's catalog has one policy namespace per site, so a policy keeps its name there: the same
 * name in two Kubernetes namespaces is one policy at ferryd (a second with other settings is
 * refused, reason Conflict).
 */
import type { PolicySpec } from "@ferry/orchestrator";
import { call } from "@ferry/orchestrator";
import { setConditions, type Verdict } from "./conditions.js";
import { refusal } from "./ferryd-refusal.js";
import type { Outcome, ReconcileContext } from "./operator.js";
import type { ProtectionPolicy, ProtectionPolicySpec } from "./resources.js";

const RATE_UNITS: Record<string, number> = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** `100M` → bytes per second (powers of 1024, as the data plane's size parser counts). */
export function rateBytes(rate: string): number {
  const match = /^([0-9.]+)([KMGT]?)i?$/.exec(rate);
  const factor = RATE_UNITS[match?.[2] ?? "?"];
  if (match?.[1] === undefined || factor === undefined) throw new Error(`rate ${rate} is not a size such as 100M`);
  return Math.round(Number(match[1]) * factor);
}

export function policySpec(name: string, spec: ProtectionPolicySpec): PolicySpec {
  return {
    name,
    mode: spec.mode,
    rpo: spec.rpo ?? null,
    interval: spec.interval ?? null,
    continuous: spec.continuous ?? null,
    retain: spec.retain ?? null,
    allowedRegions: spec.allowedRegions ?? null,
    rateBytes: spec.rate === undefined ? null : rateBytes(spec.rate),
    consistency: spec.consistency ?? null,
    hooks: spec.hooks ?? null,
    restore: spec.restore ?? null,
  };
}

export async function reconcilePolicy(policy: ProtectionPolicy, context: ReconcileContext): Promise<Outcome> {
  const name = policy.metadata?.name ?? "";
  let verdict: Verdict;
  let outcome: Outcome = "settled";
  try {
    await call(context.nc, context.site, "policyCreate", policySpec(name, policy.spec));
    verdict = {
      type: "Ready",
      status: "True",
      reason: "Accepted",
      message: `ferryd at site ${context.site} holds policy ${name}`,
    };
  } catch (error) {
    const refused = refusal(error);
    verdict = { type: "Ready", status: "False", reason: refused.reason, message: refused.message };
    if (refused.transient) outcome = "retry";
  }
  const generation = policy.metadata?.generation ?? 0;
  await context.writeStatus("protectionpolicies", policy, {
    ...policy.status,
    observedGeneration: generation,
    conditions: setConditions(policy.status?.conditions, [verdict], generation, context.now()),
  });
  return outcome;
}
