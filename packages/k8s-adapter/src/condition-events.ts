/**
 * Kubernetes Events for what changed: one Event per condition whose status changed in a status
 * write (`kubectl describe` and `kubectl get events` show them), Warning when the change is bad
 * news. Events come from transitions only, so a level-triggered reconcile that arrives at the same
 * verdict adds none.
 */
import type { CoreV1Event, KubernetesObject } from "@kubernetes/client-node";
import type { Condition } from "./resources.js";

/** Conditions of `after` that are new or whose status differs from `before`. */
export function transitions(before: readonly Condition[] | undefined, after: readonly Condition[] | undefined) {
  return (after ?? []).filter((c) => before?.find((b) => b.type === c.type)?.status !== c.status);
}

/** Bad news: a Degraded that became True, or any other condition that became False. */
function isWarning(condition: Condition): boolean {
  return condition.type === "Degraded" ? condition.status === "True" : condition.status === "False";
}

export function conditionEvent(object: KubernetesObject, condition: Condition, site: string, now: Date): CoreV1Event {
  const name = object.metadata?.name ?? "";
  return {
    metadata: { generateName: `${name}.`, namespace: object.metadata?.namespace },
    involvedObject: {
      apiVersion: object.apiVersion,
      kind: object.kind,
      name,
      namespace: object.metadata?.namespace,
      uid: object.metadata?.uid,
      resourceVersion: object.metadata?.resourceVersion,
    },
    type: isWarning(condition) ? "Warning" : "Normal",
    reason: condition.reason,
    message: `${condition.type}=${condition.status}: ${condition.message}`,
    source: { component: "ferry-operator" },
    reportingComponent: "ferry.io/operator",
    reportingInstance: site,
    firstTimestamp: now,
    lastTimestamp: now,
    count: 1,
  };
}
