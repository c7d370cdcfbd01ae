/** Public face of @ferry/local-clusters. */
export { killAndReap, type RunOptions, type RunResult, Sandbox } from "./sandbox.js";
export {
  type Cluster,
  type K8sTools,
  k8sTools,
  startTwoClusters,
  type TwoClusters,
  type TwoClustersOptions,
} from "./two-clusters.js";
