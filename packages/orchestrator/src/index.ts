export type { K8sAdapter, MemberCapture, RecoverContext, VmAdapter } from "./adapters.js";
export { type Adapters, HOOK_TIMEOUT_MS, QUIESCE_TIMEOUT_MS, runHook } from "./capture.js";
export { BUCKETS, Catalog } from "./catalog.js";
export { apiSubject, call, connectNats, DEFAULT_TIMEOUT_MS, natsHost, natsOptions } from "./client.js";
export type {
  ClonedVolume,
  CutTaken,
  DataPlane,
  InProcessService,
  PairSettings,
  PairStatus,
  PromotedVolume,
  ReplicaPoints,
  VolumeInfo,
} from "./dataplane.js";
export { nativeDataPlane } from "./dataplane.js";
export { ErrorCode, errorBody, FerryError } from "./errors.js";
export { EVENTS_STREAM, eventSubject, type FerryEvent } from "./events.js";
export { Metrics } from "./metrics.js";
export * from "./model.js";
export { PLANS } from "./operations.js";
export { drillVolume, Orchestrator, type OrchestratorOptions } from "./orchestrator.js";
export { type HookRun, POINTS_BUCKET, type PointMetadata, type PointSummary } from "./points.js";
export * from "./validate.js";
