/**
 * Errors of the control plane. Each has a stable `code` that travels over NATS unchanged, so the
 * CLI (or any other client) can tell bad input from a refused or failed operation; the message
 * names what failed, on what input, and what to do.
 */

export const ErrorCode = {
  /** The request itself is wrong (a bad policy value, a missing field); nothing was attempted. */
  invalid: "ERR_INVALID",
  notFound: "ERR_NOT_FOUND",
  /** It exists already with different settings, or another operation holds the application. */
  conflict: "ERR_CONFLICT",
  /** A residency rule forbids it; nothing moved. */
  residency: "ERR_RESIDENCY",
  /** A site's ferryd did not answer. */
  unreachable: "ERR_UNREACHABLE",
  /** It was attempted and failed (a data-plane error, a step that could not complete). */
  failed: "ERR_FAILED",
  /** This ferryd does not lead its site; another one answers. */
  notLeader: "ERR_NOT_LEADER",
} as const;

export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

export class FerryError extends Error {
  constructor(
    readonly code: string,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = "FerryError";
  }
}

export const invalid = (message: string) => new FerryError(ErrorCode.invalid, message);
export const notFound = (message: string) => new FerryError(ErrorCode.notFound, message);
export const conflict = (message: string) => new FerryError(ErrorCode.conflict, message);

/** Anything thrown, as the `{code, message}` a reply carries. Data-plane errors keep their own code. */
export function errorBody(error: unknown): { code: string; message: string } {
  if (error instanceof FerryError) return { code: error.code, message: error.message };
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return {
      code: typeof code === "string" && code.startsWith("ERR_") ? code : ErrorCode.failed,
      message: error.message,
    };
  }
  return { code: ErrorCode.failed, message: String(error) };
}
