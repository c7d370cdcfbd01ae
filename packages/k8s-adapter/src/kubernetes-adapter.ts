/**
 * The orchestrator's `K8sAdapter`: an application's Kubernetes members, as ferryd sees them. A
 * member is one namespace with an optional label selector, written `namespace` or
 * `namespace?selector` (the orchestrator's `kubernetesMembers`).
 *
 * - volumesOf: the Ferry volumes under the selected PVCs (ferry-volumes.ts) join the application.
 * - capture (right after each cut): the selected objects — the built-in kinds, then the cluster's
 *   custom resources — as portable manifests plus the PVC → volume bindings, stored with the
 *   recovery point (custom kinds this identity may not list are named in `unreadable`).
 * - recover: PVs re-created for the recovered volumes at this cluster, then the objects applied
 *   (server-side apply: a second recover changes nothing). A drill restores into its own namespace
 *   `<namespace>-drill`, labelled with the application, beside whatever runs there.
 * - stop (planned migration, at the site the application leaves): Deployments and StatefulSets are
 *   scaled to 0; the replica count they had travels in an annotation, so the restore at the other
 *   cluster brings back the count the workload ran with.
 * - cleanupDrill: deletes what a drill restored (objects, namespace, PVs).
 * - quiesce: Kubernetes workloads cannot be frozen from here (that needs an exec into their pods
 *   through a kubelet); every member is reported not frozen, so a point asked to be
 *   application-consistent is honestly marked crash-consistent with that reason.
 */
import { DEFAULT_RESTORE, type K8sAdapter, type MemberCapture, type RecoverContext } from "@ferry/orchestrator";
import { type KubeConfig, type KubernetesObject, KubernetesObjectApi, PatchStrategy } from "@kubernetes/client-node";
import { captureVolumes, restoreVolumes, type VolumeBinding } from "./ferry-volumes.js";
import {
  CAPTURED_KINDS,
  captureSelection,
  customKinds,
  listSelected,
  type Manifest,
  type RestoreOptions,
  restoreObjects,
  type Selection,
  STOPPED_REPLICAS_ANNOTATION,
  type Transform,
} from "./manifests.js";

/** Who scales workloads down at a planned migration (apart from the restore's own manager). */
const STOP_FIELD_MANAGER = "ferry-stop";

/** The label a drill puts on what it restores: the application it is a drill of. */
export const DRILL_LABEL = "ferry.io/drill-of";

/** What capture stores for one member. */
export interface KubernetesCapture {
  namespace: string;
  labelSelector: string | null;
  objects: Manifest[];
  volumes: VolumeBinding[];
  /** Custom resource kinds this identity could not list (left out of the capture), with why. */
  unreadable?: string[];
}

/** `namespace` or `namespace?selector` → the selection it names. */
export function memberSelection(member: string): Selection & { namespaces: [string] } {
  const at = member.indexOf("?");
  const namespace = at < 0 ? member : member.slice(0, at);
  const labelSelector = at < 0 ? "" : member.slice(at + 1);
  if (!/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/.test(namespace)) {
    throw new Error(`Kubernetes member '${member}': '${namespace}' is not a namespace name (a DNS label)`);
  }
  return labelSelector === "" ? { namespaces: [namespace] } : { namespaces: [namespace], labelSelector };
}

/** The namespace a drill of `namespace` restores into (a DNS label, at most 63 characters). */
export function drillNamespace(namespace: string): string {
  return `${namespace.slice(0, 57)}-drill`;
}

export interface KubernetesAdapterOptions {
  kubeConfig: KubeConfig;
  /** Mappings, transforms and the conflict policy of every restore at this cluster. */
  restore?: RestoreOptions;
}

export class KubernetesAdapter implements K8sAdapter {
  private readonly kubeConfig: KubeConfig;
  private readonly restore: RestoreOptions;

  constructor(options: KubernetesAdapterOptions) {
    this.kubeConfig = options.kubeConfig;
    this.restore = options.restore ?? {};
  }

  async volumesOf(members: readonly string[]): Promise<string[]> {
    const volumes: string[] = [];
    for (const member of members) {
      for (const b of await captureVolumes(this.kubeConfig, memberSelection(member))) volumes.push(b.volume);
    }
    return [...new Set(volumes)];
  }

  async quiesce(members: readonly string[]): Promise<{ failed: { member: string; reason: string }[] }> {
    const reason =
      "Kubernetes workloads are not frozen by Ferry (that needs an exec into their pods): give the policy a " +
      "--pre-hook that freezes them, the point stays crash-consistent";
    return { failed: members.map((member) => ({ member, reason })) };
  }

  async thaw(): Promise<void> {}

  async capture(members: readonly string[]): Promise<MemberCapture[]> {
    const captures: MemberCapture[] = [];
    // The cluster's custom kinds once for all members, each member's claims once for both uses.
    const custom = members.length === 0 ? undefined : await customKinds(this.kubeConfig);
    for (const member of members) {
      const selection = memberSelection(member);
      const { objects, unreadable, claims } = await captureSelection(this.kubeConfig, selection, custom);
      const metadata: KubernetesCapture = {
        namespace: selection.namespaces[0],
        labelSelector: typeof selection.labelSelector === "string" ? selection.labelSelector : null,
        objects,
        volumes: await captureVolumes(this.kubeConfig, selection, claims),
        ...(unreadable.length === 0 ? {} : { unreadable }),
      };
      captures.push({ kind: "kubernetes", name: member, metadata });
    }
    return captures;
  }

  async recover(captures: readonly MemberCapture[], context: RecoverContext): Promise<string[]> {
    // The protection's settings over this cluster's own (these set by whoever started ferryd).
    const policy = context.restore ?? DEFAULT_RESTORE;
    const restore: RestoreOptions = {
      ...this.restore,
      namespaceMapping: { ...this.restore.namespaceMapping, ...policy.namespaceMapping },
      storageClassMapping: { ...this.restore.storageClassMapping, ...policy.storageClassMapping },
      onConflict: policy.onConflict,
      transforms: [...(this.restore.transforms ?? []), ...(policy.transforms as Transform[])],
    };
    const recovered: string[] = [];
    for (const capture of captures) {
      const c = capture.metadata as KubernetesCapture;
      const mapped = restore.namespaceMapping?.[c.namespace] ?? c.namespace;
      const target = context.drill ? drillNamespace(mapped) : mapped;
      const namespaceMapping = { ...restore.namespaceMapping, [c.namespace]: target };
      const labels = context.drill ? { [DRILL_LABEL]: context.app } : undefined;
      const volumeNames = await restoreVolumes(this.kubeConfig, c.volumes, {
        namespaceMapping,
        storageClassMapping: restore.storageClassMapping ?? {},
        volumes: context.volumes,
        ...(labels === undefined ? {} : { labels }),
      });
      const { applied, skipped } = await restoreObjects(this.kubeConfig, c.objects, {
        ...restore,
        namespaceMapping,
        volumeNames,
        ...(labels === undefined ? {} : { namespaceLabels: labels }),
      });
      const kept = skipped.length === 0 ? "" : `, ${count(skipped.length, "existing object")} left as they were`;
      recovered.push(
        `namespace ${target} (${count(applied.length, "object")}${kept}, ${count(c.volumes.length, "volume")})`,
      );
    }
    return recovered;
  }

  async stop(members: readonly string[]): Promise<void> {
    const api = KubernetesObjectApi.makeApiClient(this.kubeConfig);
    for (const member of members) {
      const selection = memberSelection(member);
      for (const kind of ["Deployment", "StatefulSet"]) {
        const items = await listSelected<Scalable>(
          api,
          "apps/v1",
          kind,
          selection.namespaces[0],
          selection.labelSelector as string | undefined,
        );
        for (const item of items) {
          const replicas = item.spec?.replicas ?? 1;
          if (replicas === 0) continue;
          await api.patch(
            {
              apiVersion: "apps/v1",
              kind,
              metadata: {
                name: item.metadata?.name ?? "",
                namespace: selection.namespaces[0],
                annotations: { [STOPPED_REPLICAS_ANNOTATION]: String(replicas) },
              },
              spec: { replicas: 0 },
            } as KubernetesObject,
            undefined,
            undefined,
            STOP_FIELD_MANAGER,
            undefined,
            PatchStrategy.MergePatch,
          );
        }
      }
    }
  }

  async cleanupDrill(app: string): Promise<void> {
    const api = KubernetesObjectApi.makeApiClient(this.kubeConfig);
    const selector = `${DRILL_LABEL}=${app}`;
    const namespaces = await listSelected(api, "v1", "Namespace", undefined, selector);
    for (const ns of namespaces) {
      const namespace = ns.metadata?.name ?? "";
      // The objects first: without a namespace controller a namespace's deletion never empties it.
      for (const { apiVersion, kind } of [...CAPTURED_KINDS].reverse()) {
        for (const item of await listSelected(api, apiVersion, kind, namespace, undefined)) {
          await deleteIfPresent(api, { apiVersion, kind, metadata: { name: item.metadata?.name ?? "", namespace } });
        }
      }
      await deleteIfPresent(api, { apiVersion: "v1", kind: "Namespace", metadata: { name: namespace } });
    }
    const volumes = await listSelected(api, "v1", "PersistentVolume", undefined, selector);
    for (const pv of volumes) {
      await deleteIfPresent(api, {
        apiVersion: "v1",
        kind: "PersistentVolume",
        metadata: { name: pv.metadata?.name ?? "" },
      });
    }
  }
}

function count(n: number, what: string): string {
  return `${n} ${what}${n === 1 ? "" : "s"}`;
}

interface Scalable extends KubernetesObject {
  spec?: { replicas?: number };
}

async function deleteIfPresent(api: KubernetesObjectApi, object: KubernetesObject): Promise<void> {
  try {
    await api.delete(object);
  } catch (error) {
    if ((error as { code?: number }).code !== 404) throw error;
  }
}
