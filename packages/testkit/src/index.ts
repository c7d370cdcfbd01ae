/** Public face of @ferry/testkit. */
export {
  type Cluster,
  type K8sTools,
  k8sTools,
  killAndReap,
  type RunOptions,
  type RunResult,
  Sandbox,
  startTwoClusters,
  type TwoClusters,
  type TwoClustersOptions,
} from "@ferry/local-clusters";
export type { NatsCredentials, Site, WaitOptions } from "@ferry/nats-sites";
export { freePort, isAlive, waitFor } from "@ferry/nats-sites";
export {
  buildTestGuest,
  expectedGuestSha256,
  fileDiskXml,
  type GuestReport,
  type LibvirtDaemon,
  libvirtInstalled,
  parseGuestConsole,
  readGuestConsole,
  type TestGuestKernel,
  type TestGuestOptions,
  testGuestXml,
  waitForGuest,
} from "@ferry/test-guest";
export { type ExitStatus, FerryCli, FerryServe } from "./ferry-cli.js";
export { startLibvirtDaemon } from "./libvirt-daemon.js";
export { PassFailSummary } from "./pass-fail-summary.js";
export { exportSha256, qemuIo } from "./qemu-io.js";
export { type PartitionMode, TestLinkProxy } from "./test-link-proxy.js";
export { type SiteOptions, startTwoSites, type TwoSites, type TwoSitesOptions } from "./two-sites.js";
