/**
 * An application's Kubernetes objects: captured at one cluster as portable manifests (what a
 * cluster assigned — uid, resourceVersion, clusterIP, a PVC's bound volume, status… — stripped),
 * and restored at another with namespace and storage-class mapping and JSON-patch transforms.
 * Restore is server-side apply under one field manager, so running it twice changes nothing, and
 * a conflict with an existing object is handled by a stated policy: `overwrite` (Ferry's fields
 * win, fields other managers own are kept) or `skip` (an existing object is left alone).
 *
 * PVCs on Ferry volumes: ferry-volumes.ts maps them to their volumes and makes the PVs at the
 * target; `volumeNames` binds the restored claims to those PVs.
 */
import {
  ApiextensionsV1Api,
  type KubeConfig,
  type KubernetesObject,
  KubernetesObjectApi,
  PatchStrategy,
} from "@kubernetes/client-node";
import { GROUP } from "./crds.js";
import { applyJsonPatch, type JsonPatchOperation } from "./json-patch.js";

/** The kinds an Application captures, in the order a restore creates them (dependencies first). */
export const CAPTURED_KINDS = [
  { apiVersion: "v1", kind: "ServiceAccount" },
  { apiVersion: "v1", kind: "ConfigMap" },
  { apiVersion: "v1", kind: "Secret" },
  { apiVersion: "v1", kind: "PersistentVolumeClaim" },
  { apiVersion: "v1", kind: "Service" },
  { apiVersion: "apps/v1", kind: "StatefulSet" },
  { apiVersion: "apps/v1", kind: "Deployment" },
  { apiVersion: "apps/v1", kind: "DaemonSet" },
] as const;

export interface LabelSelector {
  matchLabels?: Record<string, string>;
  matchExpressions?: { key: string; operator: "In" | "NotIn" | "Exists" | "DoesNotExist"; values?: string[] }[];
}

export interface Selection {
  namespaces: readonly string[];
  /** A metav1.LabelSelector, or one already in the query syntax (`app=shop,tier in (db)`). */
  labelSelector?: LabelSelector | string;
}

/** metav1.LabelSelector → the `?labelSelector=` query syntax (a string is that syntax already). */
export function selectorQuery(selector: LabelSelector | string | undefined): string | undefined {
  if (selector === undefined) return undefined;
  if (typeof selector === "string") return selector === "" ? undefined : selector;
  const terms = Object.entries(selector.matchLabels ?? {}).map(([k, v]) => `${k}=${v}`);
  for (const e of selector.matchExpressions ?? []) {
    const values = (e.values ?? []).join(",");
    if (e.operator === "In") terms.push(`${e.key} in (${values})`);
    else if (e.operator === "NotIn") terms.push(`${e.key} notin (${values})`);
    else if (e.operator === "Exists") terms.push(e.key);
    else terms.push(`!${e.key}`);
  }
  return terms.length === 0 ? undefined : terms.join(",");
}

const CLUSTER_ANNOTATIONS = [
  /^kubectl\.kubernetes\.io\/last-applied-configuration$/,
  /^deployment\.kubernetes\.io\//,
  /^pv\.kubernetes\.io\//,
  /^volume\.(beta\.)?kubernetes\.io\//,
];

export type Manifest = KubernetesObject & Record<string, unknown>;

/**
 * Set by a planned migration's stop at the cluster the application leaves: the replica count a
 * Deployment or StatefulSet ran with before it was scaled to 0. A restore brings that count back.
 */
export const STOPPED_REPLICAS_ANNOTATION = "ferry.io/stopped-replicas";

/** What another cluster must not receive: identity, versions, status, assigned addresses and volumes. */
export function portable(object: KubernetesObject): Manifest {
  const copy = structuredClone(object) as Manifest & { spec?: Record<string, unknown> };
  const { name, namespace, labels, annotations } = copy.metadata ?? {};
  const kept = Object.fromEntries(
    Object.entries(annotations ?? {}).filter(([k]) => !CLUSTER_ANNOTATIONS.some((re) => re.test(k))),
  );
  copy.metadata = {
    name,
    namespace,
    ...(labels === undefined ? {} : { labels }),
    ...(Object.keys(kept).length === 0 ? {} : { annotations: kept }),
  };
  delete copy.status;
  const spec = copy.spec;
  if (spec !== undefined) {
    if (copy.kind === "Service") {
      // A headless Service stays headless; any other gets its address from the target cluster.
      if (spec.clusterIP !== "None") {
        delete spec.clusterIP;
        delete spec.clusterIPs;
      }
      delete spec.healthCheckNodePort;
      for (const port of (spec.ports as Record<string, unknown>[] | undefined) ?? []) delete port.nodePort;
    }
    if (copy.kind === "PersistentVolumeClaim") delete spec.volumeName;
  }
  return copy;
}

/** Objects a cluster makes by itself for every namespace: never captured. */
function clusterMade(object: KubernetesObject & { type?: string }): boolean {
  const name = object.metadata?.name;
  return (
    (object.kind === "ServiceAccount" && name === "default") ||
    (object.kind === "ConfigMap" && name === "kube-root-ca.crt") ||
    (object.kind === "Secret" && object.type === "kubernetes.io/service-account-token")
  );
}

/** One kind's objects in one namespace (or cluster-wide) that carry the labels (`selectorQuery` syntax). */
export async function listSelected<T extends KubernetesObject>(
  api: KubernetesObjectApi,
  apiVersion: string,
  kind: string,
  namespace: string | undefined,
  labelSelector: string | undefined,
): Promise<T[]> {
  const list = await api.list<T>(
    apiVersion,
    kind,
    namespace,
    undefined,
    undefined,
    undefined,
    undefined,
    labelSelector,
  );
  return list.items;
}

/**
 * The namespaced custom resource kinds this cluster serves (their storage version), Ferry's own
 * excepted: an application's custom resources are captured after the built-in kinds, so a restore
 * applies them last. Answers the kinds, and why the cluster's definitions could not be read.
 */
export async function customKinds(
  kubeConfig: KubeConfig,
): Promise<{ kinds: { apiVersion: string; kind: string }[]; unreadable: string | null }> {
  try {
    const list = await kubeConfig.makeApiClient(ApiextensionsV1Api).listCustomResourceDefinition();
    const kinds = list.items
      .filter((crd) => crd.spec.scope === "Namespaced" && crd.spec.group !== GROUP)
      .map((crd) => {
        const version = crd.spec.versions.find((v) => v.storage) ?? crd.spec.versions[0];
        return { apiVersion: `${crd.spec.group}/${version?.name ?? "v1"}`, kind: crd.spec.names.kind };
      })
      .sort((a, b) => `${a.apiVersion}/${a.kind}`.localeCompare(`${b.apiVersion}/${b.kind}`));
    return { kinds, unreadable: null };
  } catch (error) {
    return { kinds: [], unreadable: `custom resource definitions: ${apiMessage(error)}` };
  }
}

/** The selected objects of every captured kind, portable, in restore order. */
export async function captureObjects(kubeConfig: KubeConfig, selection: Selection): Promise<Manifest[]> {
  return (await captureSelection(kubeConfig, selection)).objects;
}

/**
 * The selected objects of the built-in kinds and of the cluster's custom resources, portable, in
 * restore order; `unreadable` names the custom kinds this identity may not list (a capture goes on
 * without them and says so, rather than failing the whole application's point). `claims` are the
 * selected PersistentVolumeClaims as the cluster holds them (bound volume included), by namespace,
 * for `captureVolumes`. `custom`: the cluster's custom kinds when the caller listed them already
 * (one listing for every member of a capture).
 */
export async function captureSelection(
  kubeConfig: KubeConfig,
  selection: Selection,
  custom?: Awaited<ReturnType<typeof customKinds>>,
): Promise<{ objects: Manifest[]; unreadable: string[]; claims: Map<string, KubernetesObject[]> }> {
  const api = KubernetesObjectApi.makeApiClient(kubeConfig);
  const labelSelector = selectorQuery(selection.labelSelector);
  const captured: Manifest[] = [];
  custom ??= await customKinds(kubeConfig);
  const unreadable = custom.unreadable === null ? [] : [custom.unreadable];
  for (const { apiVersion, kind } of custom.kinds) {
    for (const namespace of selection.namespaces) {
      try {
        const items = await listSelected(api, apiVersion, kind, namespace, labelSelector);
        captured.push(...sortedPortable(items, apiVersion, kind));
      } catch (error) {
        unreadable.push(`${kind} (${apiVersion}) in ${namespace}: ${apiMessage(error)}`);
      }
    }
  }
  const builtIn: Manifest[] = [];
  const claims = new Map<string, KubernetesObject[]>();
  for (const { apiVersion, kind } of CAPTURED_KINDS) {
    for (const namespace of selection.namespaces) {
      const items = (await listSelected(api, apiVersion, kind, namespace, labelSelector)).filter(
        (item) => !clusterMade(item),
      );
      if (kind === "PersistentVolumeClaim") claims.set(namespace, items);
      builtIn.push(...sortedPortable(items, apiVersion, kind));
    }
  }
  return { objects: [...builtIn, ...captured], unreadable, claims };
}

function sortedPortable(items: KubernetesObject[], apiVersion: string, kind: string): Manifest[] {
  return items
    .map((item) => ({ ...item, apiVersion, kind }))
    .sort((a, b) => (a.metadata?.name ?? "").localeCompare(b.metadata?.name ?? ""))
    .map(portable);
}

export interface Transform {
  /** Only objects of this kind (all when left out). */
  kind?: string;
  /** Only the object of this name (all when left out). */
  name?: string;
  patch: JsonPatchOperation[];
}

export interface RestoreOptions {
  /** Source namespace → target namespace; unmapped namespaces keep their name. */
  namespaceMapping?: Record<string, string>;
  /** Source storage class → target storage class (PVCs and StatefulSet claim templates). */
  storageClassMapping?: Record<string, string>;
  transforms?: readonly Transform[];
  /** Source `namespace/claim` → the PV to bind it to (restoreVolumes answers these). */
  volumeNames?: Record<string, string>;
  /** `overwrite` (default): Ferry's fields win. `skip`: an object that exists is left alone. */
  onConflict?: "overwrite" | "skip";
  /** Labels for the namespaces the restore creates (a drill marks its own). */
  namespaceLabels?: Record<string, string>;
}

export const RESTORE_FIELD_MANAGER = "ferry-restore";

/** The manifest as it will be applied at the target: mapped and transformed. */
export function restoredManifest(manifest: Manifest, options: RestoreOptions): Manifest {
  let object = structuredClone(manifest) as Manifest & { spec?: Record<string, unknown> };
  const namespace = object.metadata?.namespace;
  if (namespace !== undefined && object.metadata !== undefined) {
    object.metadata.namespace = options.namespaceMapping?.[namespace] ?? namespace;
  }
  const classes = options.storageClassMapping ?? {};
  const mapClass = (spec: Record<string, unknown> | undefined) => {
    const from = spec?.storageClassName;
    if (spec !== undefined && typeof from === "string" && classes[from] !== undefined) {
      spec.storageClassName = classes[from];
    }
  };
  if (object.kind === "PersistentVolumeClaim") {
    mapClass(object.spec);
    const volumeName = options.volumeNames?.[`${namespace}/${object.metadata?.name}`];
    if (volumeName !== undefined && object.spec !== undefined) object.spec.volumeName = volumeName;
  }
  const stopped = object.metadata?.annotations?.[STOPPED_REPLICAS_ANNOTATION];
  if (stopped !== undefined && object.metadata?.annotations !== undefined) {
    delete object.metadata.annotations[STOPPED_REPLICAS_ANNOTATION];
    if (Object.keys(object.metadata.annotations).length === 0) delete object.metadata.annotations;
    // Only while still stopped: a workload scaled up again since then keeps its own count.
    if (object.spec?.replicas === 0 && /^\d+$/.test(stopped)) object.spec.replicas = Number(stopped);
  }
  if (object.kind === "StatefulSet") {
    for (const claim of (object.spec?.volumeClaimTemplates as { spec?: Record<string, unknown> }[] | undefined) ?? []) {
      mapClass(claim.spec);
    }
  }
  for (const transform of options.transforms ?? []) {
    if (transform.kind !== undefined && transform.kind !== object.kind) continue;
    if (transform.name !== undefined && transform.name !== object.metadata?.name) continue;
    try {
      object = applyJsonPatch(object, transform.patch);
    } catch (error) {
      throw new Error(`transform of ${object.kind} ${object.metadata?.name}: ${(error as Error).message}`);
    }
  }
  return object;
}

/** Apply the manifests at the target cluster; answers what was applied and what was skipped. */
export async function restoreObjects(
  kubeConfig: KubeConfig,
  manifests: readonly Manifest[],
  options: RestoreOptions = {},
): Promise<{ applied: string[]; skipped: string[] }> {
  const api = KubernetesObjectApi.makeApiClient(kubeConfig);
  const objects = manifests.map((m) => restoredManifest(m, options));
  const applied: string[] = [];
  const skipped: string[] = [];
  const namespaces = new Set(objects.map((o) => o.metadata?.namespace).filter((n) => n !== undefined));
  for (const namespace of namespaces) {
    await api.patch(
      {
        apiVersion: "v1",
        kind: "Namespace",
        metadata: {
          name: namespace,
          ...(options.namespaceLabels === undefined ? {} : { labels: options.namespaceLabels }),
        },
      },
      undefined,
      undefined,
      RESTORE_FIELD_MANAGER,
      true,
      PatchStrategy.ServerSideApply,
    );
  }
  for (const object of objects) {
    const id = `${object.kind}/${object.metadata?.namespace}/${object.metadata?.name}`;
    if (options.onConflict === "skip" && (await exists(api, object))) {
      skipped.push(id);
      continue;
    }
    try {
      await api.patch(object, undefined, undefined, RESTORE_FIELD_MANAGER, true, PatchStrategy.ServerSideApply);
    } catch (error) {
      // The API server answers 404 for an unknown kind; the client refuses one it cannot discover.
      const unknownKind =
        (error as { code?: number }).code === 404 || /Unrecognized API version and kind/.test(String(error));
      const missing = unknownKind && !CAPTURED_KINDS.some((k) => k.kind === object.kind);
      const hint = missing ? ` (is the CustomResourceDefinition of ${object.kind} installed at this cluster?)` : "";
      throw new Error(`cannot apply ${id}: ${apiMessage(error)}${hint}`);
    }
    applied.push(id);
  }
  return { applied, skipped };
}

async function exists(api: KubernetesObjectApi, object: Manifest): Promise<boolean> {
  const ref = {
    apiVersion: object.apiVersion ?? "v1",
    kind: object.kind ?? "",
    metadata: { name: object.metadata?.name ?? "", namespace: object.metadata?.namespace ?? "" },
  };
  return (await readIfPresent(api, ref)) !== null;
}

/** The object as the cluster has it, or null when there is none. */
export async function readIfPresent<T extends KubernetesObject>(
  api: KubernetesObjectApi,
  ref: { apiVersion: string; kind: string; metadata: { name: string; namespace?: string } },
): Promise<T | null> {
  try {
    return await api.read<T>(ref);
  } catch (error) {
    if ((error as { code?: number }).code === 404) return null;
    throw error;
  }
}

/** What the API server said, in one line: its Status message rather than the whole HTTP exchange. */
export function apiMessage(error: unknown): string {
  const body = (error as { body?: unknown }).body;
  if (typeof body === "string") {
    try {
      const status = JSON.parse(body) as { message?: string };
      if (typeof status.message === "string") return status.message.split("\n")[0] ?? status.message;
    } catch {
      // not a Status: fall through
    }
  }
  return error instanceof Error ? (error.message.split("\n")[0] ?? error.message) : String(error);
}
