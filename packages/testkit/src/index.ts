/** Public face of @ferry/testkit. */
export { type ExitStatus, FerryCli, FerryServe } from "./ferry-cli.js";
export { freePort } from "./free-port.js";
export { PassFailSummary } from "./pass-fail-summary.js";
export { qemuIo } from "./qemu-io.js";
export { killAndReap, type RunOptions, type RunResult, Sandbox } from "./sandbox.js";
export { type WaitOptions, waitFor } from "./wait-for.js";
