/**
 * Status conditions as Kubernetes defines them (metav1.Condition): one per type, and a condition's
 * lastTransitionTime moves only when its status changes — so a level-triggered reconcile that
 * arrives at the same verdict writes nothing new.
 */
import type { Condition } from "./resources.js";

export interface Verdict {
  type: string;
  status: "True" | "False" | "Unknown";
  /** One CamelCase word: what a user filters on. */
  reason: string;
  /** For a person: what happened and what to do. */
  message: string;
}

/** `conditions` with each verdict applied; other types are kept as they were. */
export function setConditions(
  conditions: readonly Condition[] | undefined,
  verdicts: readonly Verdict[],
  generation: number,
  now: Date,
): Condition[] {
  const next = [...(conditions ?? [])];
  for (const verdict of verdicts) {
    const index = next.findIndex((c) => c.type === verdict.type);
    const previous = index === -1 ? undefined : next[index];
    const condition: Condition = {
      ...verdict,
      observedGeneration: generation,
      lastTransitionTime:
        previous !== undefined && previous.status === verdict.status ? previous.lastTransitionTime : timestamp(now),
    };
    if (index === -1) next.push(condition);
    else next[index] = condition;
  }
  return next;
}

/** RFC 3339 in whole seconds, as the API server stores metav1.Time. */
export function timestamp(time: Date): string {
  return `${time.toISOString().slice(0, 19)}Z`;
}
