/** Public face of @ferry/k8s-adapter. */

export { setConditions, type Verdict } from "./conditions.js";
export { chartTemplate, chartTemplates, crdName, crdYaml, customResourceDefinition } from "./crd-manifest.js";
export {
  API_VERSION,
  CATEGORY,
  DURATION_PATTERN,
  GROUP,
  NAME_PATTERN,
  RATE_PATTERN,
  RESOURCES,
  type ResourceDefinition,
  VERSION,
} from "./crds.js";
export {
  captureVolumes,
  FERRY_CSI_DRIVER,
  persistentVolumeName,
  restoreVolumes,
  type VolumeBinding,
  type VolumeRestoreOptions,
} from "./ferry-volumes.js";
export { applyJsonPatch, type JsonPatchOperation } from "./json-patch.js";
export { kubeConfigFrom } from "./kube-config.js";
export {
  DRILL_LABEL,
  drillNamespace,
  KubernetesAdapter,
  type KubernetesAdapterOptions,
  type KubernetesCapture,
  memberSelection,
} from "./kubernetes-adapter.js";
export {
  CAPTURED_KINDS,
  captureObjects,
  captureSelection,
  customKinds,
  type LabelSelector,
  portable,
  RESTORE_FIELD_MANAGER,
  type RestoreOptions,
  restoredManifest,
  restoreObjects,
  type Selection,
  STOPPED_REPLICAS_ANNOTATION,
  selectorQuery,
  type Transform,
} from "./manifests.js";
export { Operator, type OperatorOptions } from "./operator.js";
export type * from "./resources.js";
