/**
 * The errors of @ferry/nats-sites, each with a stable `code`, so that a command (`ferry demo`) can
 * report them as one line and tests can tell them apart.
 */
export abstract class SiteError extends Error {
  abstract readonly code: string;

  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The `nats-server` binary is not there (Debian package nats-server; infra/setup.sh installs it). */
export class NatsServerMissing extends SiteError {
  readonly code = "ERR_TOOL_MISSING";
}

/**
 * A site's nats-server exited during startup or did not become healthy in time. `message` ends
 * with the tail of the server's log; `reason` is the first line alone, `logTail` the log.
 */
export class NatsServerFailed extends SiteError {
  readonly code = "ERR_NATS_SERVER";

  constructor(
    readonly reason: string,
    readonly logFile: string,
    readonly logTail: string,
    options?: ErrorOptions,
  ) {
    super(`${reason}\n--- ${logFile} ---\n${logTail}`, options);
  }

  /** The last line the server logged, which for a failed start says why (or "" if it logged nothing). */
  get lastLogLine(): string {
    return (
      this.logTail
        .split("\n")
        .map((line) => line.trim())
        .filter((line) => line !== "")
        .at(-1) ?? ""
    );
  }
}

/** A process outlived SIGKILL (it should never happen; it means the PID is stuck in the kernel). */
export class ProcessSurvived extends SiteError {
  readonly code = "ERR_PROCESS_SURVIVED";
}

/** `waitFor` reached its deadline before the condition held. */
export class WaitTimedOut extends SiteError {
  readonly code = "ERR_TIMEOUT";
}
