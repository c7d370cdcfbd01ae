/**
 * The CLI's own error types, each with a stable `code` and the process exit status it maps to.
 * Errors thrown by the native data plane already carry a stable `code` (`ERR_UNKNOWN_VOLUME`, …)
 * and a message that names the input and the fix; `describeError` passes those through untouched.
 */

/** Exit statuses of the `ferry` command. */
export const ExitCode = {
  ok: 0,
  /** The operation was attempted and failed. */
  failed: 1,
  /** The command line itself was wrong; nothing was attempted. */
  usage: 2,
  /** Stopped by SIGINT (128 + 2, as shells report it). */
  interrupted: 130,
} as const;

export abstract class FerryCliError extends Error {
  abstract readonly code: string;
  readonly exitCode: number = ExitCode.failed;

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The native addon `@ferry/dataplane-native` could not be loaded (not built, or built for another platform). */
export class BindingUnavailable extends FerryCliError {
  readonly code = "ERR_BINDING_UNAVAILABLE";
}

/** An external program that a command needs (the demo's qemu-io, nbdinfo, nbdcopy) is not installed. */
export class ToolMissing extends FerryCliError {
  readonly code = "ERR_TOOL_MISSING";
}

/** An external program ran and reported failure. */
export class ToolFailed extends FerryCliError {
  readonly code = "ERR_TOOL_FAILED";
}

/** A long-running command (the demo) stopped by SIGINT/SIGTERM after cleaning up. */
export class Interrupted extends FerryCliError {
  readonly code = "ERR_INTERRUPTED";
  override readonly exitCode = ExitCode.interrupted;
}

/** A site of the two-site demo (its nats-server or its `ferry volume serve`) did not start. */
export class SiteStartFailed extends FerryCliError {
  readonly code = "ERR_SITE_START";
}

/** A check the demo makes did not hold, e.g. site B's bytes differ from site A's. */
export class DemoCheckFailed extends FerryCliError {
  readonly code = "ERR_DEMO_CHECK";
}

/** Output of the JSON stats document that does not have the documented shape. */
export class UnexpectedStats extends FerryCliError {
  readonly code = "ERR_UNEXPECTED_STATS";
}

/** A recovery operation ran and ended in failure (its error names the step). */
export class OperationFailed extends FerryCliError {
  readonly code = "ERR_OPERATION_FAILED";
}

/** Codes of errors that mean the request itself was wrong: bad usage, exit status 2. */
const USAGE_CODES = new Set(["ERR_INVALID"]);

export interface ErrorReport {
  code: string;
  message: string;
  exitCode: number;
}

/** Reduce anything thrown to the one line and exit status the user sees. */
export function describeError(error: unknown): ErrorReport {
  if (error instanceof FerryCliError) {
    return { code: error.code, message: oneLine(error.message), exitCode: error.exitCode };
  }
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    if (typeof code === "string" && code.startsWith("ERR_")) {
      return {
        code,
        message: oneLine(error.message),
        exitCode: USAGE_CODES.has(code) ? ExitCode.usage : ExitCode.failed,
      };
    }
    return {
      code: "ERR_INTERNAL",
      message: `internal error: ${oneLine(error.message)} (set FERRY_DEBUG=1 for the stack trace)`,
      exitCode: ExitCode.failed,
    };
  }
  return { code: "ERR_INTERNAL", message: `internal error: ${String(error)}`, exitCode: ExitCode.failed };
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, " ").trim();
}
