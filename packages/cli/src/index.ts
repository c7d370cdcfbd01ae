/** Public face of @ferry/cli: the command tree and its entry point, for embedding and tests. */

export {
  BindingUnavailable,
  DemoCheckFailed,
  describeError,
  ExitCode,
  FerryCliError,
  Interrupted,
  SiteStartFailed,
  ToolFailed,
  ToolMissing,
  UnexpectedStats,
} from "./errors.js";
export { main } from "./main.js";
export { createProgram, type ProgramIo } from "./program.js";
