/** A failed call to ferryd as a condition's reason and message, and whether to try again soon. */
import { ErrorCode, FerryError } from "@ferry/orchestrator";

export interface Refusal {
  reason: string;
  message: string;
  /** ferryd was not reachable or failed: retry with backoff rather than wait for the next resync. */
  transient: boolean;
}

const REASONS: Record<string, string> = {
  [ErrorCode.invalid]: "Invalid",
  [ErrorCode.notFound]: "NotFound",
  [ErrorCode.conflict]: "Conflict",
  [ErrorCode.residency]: "ResidencyViolation",
  [ErrorCode.unreachable]: "SiteUnreachable",
  [ErrorCode.failed]: "Failed",
  [ErrorCode.notLeader]: "NotLeader",
};

export function refusal(error: unknown): Refusal {
  if (error instanceof FerryError) {
    const reason = REASONS[error.code] ?? "Failed";
    return {
      reason,
      message: error.message,
      transient: reason === "SiteUnreachable" || reason === "NotLeader" || reason === "Failed",
    };
  }
  return { reason: "Failed", message: error instanceof Error ? error.message : String(error), transient: true };
}
