/**
 * PVCs on Ferry volumes. A PersistentVolume whose CSI driver is Ferry's names a Ferry volume in its
 * volume handle: such a PVC's data replicates with the application. At capture the claims are
 * mapped to their volumes; at restore a PV is created per claim pointing at the target site's
 * volume (pre-bound through claimRef, reclaim policy Retain — deleting the claim never deletes a
 * replica), and the claim is restored with that PV as its volumeName.
 */
import { type KubeConfig, KubernetesObjectApi, PatchStrategy, type V1PersistentVolume } from "@kubernetes/client-node";
import {
  apiMessage,
  listSelected,
  RESTORE_FIELD_MANAGER,
  readIfPresent,
  type Selection,
  selectorQuery,
} from "./manifests.js";

/** The CSI driver name Ferry's node plugin registers. */
export const FERRY_CSI_DRIVER = "csi.ferry.io";

export interface VolumeBinding {
  namespace: string;
  claim: string;
  /** The Ferry volume at the source site. */
  volume: string;
  capacity: string;
  accessModes: string[];
  volumeMode: string;
  storageClassName: string | null;
}

/**
 * The selected PVCs that are bound to Ferry volumes, with those volumes. `claims`: the selected PVCs
 * by namespace when the caller listed them already (`captureSelection` does).
 */
export async function captureVolumes(
  kubeConfig: KubeConfig,
  selection: Selection,
  claims?: ReadonlyMap<string, readonly KubeClaim[]>,
): Promise<VolumeBinding[]> {
  const api = KubernetesObjectApi.makeApiClient(kubeConfig);
  const labelSelector = selectorQuery(selection.labelSelector);
  const bindings: VolumeBinding[] = [];
  for (const namespace of selection.namespaces) {
    const listed =
      claims?.get(namespace) ??
      (await listSelected<KubeClaim>(api, "v1", "PersistentVolumeClaim", namespace, labelSelector));
    for (const claim of listed) {
      const pvName = claim.spec?.volumeName;
      if (pvName === undefined || pvName === "") continue;
      const pv = await readIfPresent<V1PersistentVolume>(api, {
        apiVersion: "v1",
        kind: "PersistentVolume",
        metadata: { name: pvName },
      });
      if (pv?.spec?.csi?.driver !== FERRY_CSI_DRIVER) continue;
      bindings.push({
        namespace,
        claim: claim.metadata?.name ?? "",
        volume: pv.spec.csi.volumeHandle,
        capacity: pv.spec.capacity?.storage ?? claim.spec?.resources?.requests?.storage ?? "",
        accessModes: pv.spec.accessModes ?? claim.spec?.accessModes ?? ["ReadWriteOnce"],
        volumeMode: pv.spec.volumeMode ?? "Filesystem",
        storageClassName: pv.spec.storageClassName ?? null,
      });
    }
  }
  return bindings.sort((a, b) => `${a.namespace}/${a.claim}`.localeCompare(`${b.namespace}/${b.claim}`));
}

export interface KubeClaim {
  apiVersion?: string;
  kind?: string;
  metadata?: { name?: string; namespace?: string };
  spec?: {
    volumeName?: string;
    accessModes?: string[];
    resources?: { requests?: Record<string, string> };
  };
}

export interface VolumeRestoreOptions {
  namespaceMapping?: Record<string, string>;
  storageClassMapping?: Record<string, string>;
  /** Source Ferry volume → the volume to use at this site (a promoted replica or a drill clone). */
  volumes: Record<string, string>;
  /** More labels for the PVs (a drill marks its own). */
  labels?: Record<string, string>;
}

/** The PV name for a Ferry volume at this cluster: one PV per volume, so a second restore finds it. */
export function persistentVolumeName(volume: string): string {
  return `ferry-${volume}`
    .toLowerCase()
    .replace(/[^a-z0-9.-]/g, "-")
    .slice(0, 253);
}

/**
 * Create (or re-apply) the PVs for the bindings; answers `namespace/claim` → PV name, which
 * restoreObjects takes as `volumeNames`. A binding without a volume in `volumes` is refused: its
 * data was not recovered here.
 */
export async function restoreVolumes(
  kubeConfig: KubeConfig,
  bindings: readonly VolumeBinding[],
  options: VolumeRestoreOptions,
): Promise<Record<string, string>> {
  const api = KubernetesObjectApi.makeApiClient(kubeConfig);
  const volumeNames: Record<string, string> = {};
  for (const binding of bindings) {
    const volume = options.volumes[binding.volume];
    if (volume === undefined) {
      throw new Error(
        `PVC ${binding.namespace}/${binding.claim} is on Ferry volume ${binding.volume}, which has no recovered volume here`,
      );
    }
    const namespace = options.namespaceMapping?.[binding.namespace] ?? binding.namespace;
    const storageClassName =
      binding.storageClassName === null
        ? undefined
        : (options.storageClassMapping?.[binding.storageClassName] ?? binding.storageClassName);
    const bound = await boundVolume(api, namespace, binding.claim);
    if (bound !== null) {
      // The claim is here already (a failback home): it keeps its PV if that PV is on this volume.
      if (bound.driver === FERRY_CSI_DRIVER && bound.handle === volume) {
        volumeNames[`${binding.namespace}/${binding.claim}`] = bound.name;
        continue;
      }
      throw new Error(
        `PVC ${namespace}/${binding.claim} exists here bound to PV ${bound.name} (${bound.driver ?? "no CSI driver"} ` +
          `${bound.handle ?? ""}), not to the recovered Ferry volume ${volume}: delete that claim and recover again`,
      );
    }
    const name = persistentVolumeName(volume);
    try {
      await api.patch(
        {
          apiVersion: "v1",
          kind: "PersistentVolume",
          metadata: { name, labels: { ...options.labels, "app.kubernetes.io/managed-by": "ferry" } },
          spec: {
            capacity: { storage: binding.capacity },
            accessModes: binding.accessModes,
            volumeMode: binding.volumeMode,
            persistentVolumeReclaimPolicy: "Retain",
            ...(storageClassName === undefined ? {} : { storageClassName }),
            claimRef: { apiVersion: "v1", kind: "PersistentVolumeClaim", namespace, name: binding.claim },
            csi: { driver: FERRY_CSI_DRIVER, volumeHandle: volume },
          },
        } as V1PersistentVolume,
        undefined,
        undefined,
        RESTORE_FIELD_MANAGER,
        true,
        PatchStrategy.ServerSideApply,
      );
    } catch (error) {
      throw new Error(`cannot make PV ${name} for PVC ${namespace}/${binding.claim}: ${apiMessage(error)}`);
    }
    volumeNames[`${binding.namespace}/${binding.claim}`] = name;
  }
  return volumeNames;
}

/** The PV an existing claim is bound to, with its CSI driver and handle; null when there is no such claim. */
async function boundVolume(
  api: KubernetesObjectApi,
  namespace: string,
  claim: string,
): Promise<{ name: string; driver: string | undefined; handle: string | undefined } | null> {
  const found = await readIfPresent<KubeClaim>(api, {
    apiVersion: "v1",
    kind: "PersistentVolumeClaim",
    metadata: { name: claim, namespace },
  });
  const name = found?.spec?.volumeName;
  if (name === undefined || name === "") return null;
  const pv = await readIfPresent<V1PersistentVolume>(api, {
    apiVersion: "v1",
    kind: "PersistentVolume",
    metadata: { name },
  });
  return { name, driver: pv?.spec?.csi?.driver, handle: pv?.spec?.csi?.volumeHandle };
}
