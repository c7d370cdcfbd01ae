/**
 * One invocation of `ferry`: parse, run, and turn the outcome into an exit status and at most one
 * `ferry: <message>` line on stderr. Used by bin/ferry.js; never throws and never exits itself.
 */
import { CommanderError } from "commander";
import { describeError, ExitCode } from "./errors.js";
import { createProgram, type ProgramIo, processIo } from "./program.js";

/** Run one invocation and return the exit status; never throws. */
export async function main(argv: readonly string[], io: ProgramIo = processIo): Promise<number> {
  const program = createProgram(io);
  try {
    await program.parseAsync([...argv], { from: "user" });
    return ExitCode.ok;
  } catch (error) {
    if (error instanceof CommanderError) {
      // --help and --version end with exit code 0; everything else commander rejects is bad usage
      // (including `ferry volume` without a subcommand, which prints help to stderr).
      return error.exitCode === 0 ? ExitCode.ok : ExitCode.usage;
    }
    const report = describeError(error);
    io.writeErr(`ferry: ${report.message}\n`);
    if (process.env.FERRY_DEBUG && error instanceof Error && error.stack) {
      io.writeErr(`${error.stack}\n`);
    }
    return report.exitCode;
  }
}
