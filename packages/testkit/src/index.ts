/** Public face of @ferry/testkit. */
export { type ExitStatus, FerryCli, FerryServe } from "./ferry-cli.js";
export { freePort } from "./free-port.js";
export type { NatsCredentials, Site } from "./nats-site.js";
export { PassFailSummary } from "./pass-fail-summary.js";
export { qemuIo } from "./qemu-io.js";
export { killAndReap, type RunOptions, type RunResult, Sandbox } from "./sandbox.js";
export { type PartitionMode, TestLinkProxy } from "./test-link-proxy.js";
export { type SiteOptions, startTwoSites, type TwoSites, type TwoSitesOptions } from "./two-sites.js";
export { type WaitOptions, waitFor } from "./wait-for.js";
