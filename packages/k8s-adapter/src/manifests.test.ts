/**
 * Capture at cluster A, restore at cluster B — two real kube-apiservers. What is checked is what
 * lands in B: mapped namespace and storage class, transforms applied, cluster-assigned fields not
 * copied, the same bytes in Secrets and ConfigMaps, nothing changed by a second restore, and the
 * two conflict policies.
 */
import { Sandbox, startTwoClusters, type TwoClusters } from "@ferry/testkit";
import { KubeConfig } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { captureVolumes, restoreVolumes } from "./ferry-volumes.js";
import {
  captureObjects,
  captureSelection,
  portable,
  type RestoreOptions,
  restoreObjects,
  selectorQuery,
} from "./manifests.js";

const sandbox = new Sandbox();
let clusters: TwoClusters;
const config = { a: new KubeConfig(), b: new KubeConfig() };
/** The PVs the first restore made at B: every later restore binds the claims to them again. */
let volumeNames: Record<string, string> = {};

const SHOP = `
apiVersion: v1
kind: Namespace
metadata: { name: shop }
---
apiVersion: v1
kind: ConfigMap
metadata: { name: shop-config, namespace: shop, labels: { app: shop } }
data: { greeting: "hello from A" }
---
apiVersion: v1
kind: ConfigMap
metadata: { name: unrelated, namespace: shop, labels: { app: other } }
data: { x: "not captured" }
---
apiVersion: v1
kind: Secret
metadata: { name: shop-db, namespace: shop, labels: { app: shop } }
stringData: { password: "s3cret" }
---
apiVersion: v1
kind: Service
metadata: { name: shop, namespace: shop, labels: { app: shop } }
spec: { selector: { app: shop }, ports: [{ port: 80, targetPort: 8080 }] }
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: shop-logs, namespace: shop, labels: { app: shop } }
spec: { accessModes: [ReadWriteOnce], storageClassName: fast, resources: { requests: { storage: 1Gi } } }
---
apiVersion: v1
kind: PersistentVolume
metadata: { name: pv-shop-data }
spec:
  capacity: { storage: 2Gi }
  accessModes: [ReadWriteOnce]
  storageClassName: fast
  claimRef: { namespace: shop, name: shop-data }
  csi: { driver: csi.ferry.io, volumeHandle: shop-data-vol }
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: shop-data, namespace: shop, labels: { app: shop } }
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: fast
  volumeName: pv-shop-data
  resources: { requests: { storage: 2Gi } }
---
apiVersion: v1
kind: PersistentVolume
metadata: { name: pv-elsewhere }
spec:
  capacity: { storage: 1Gi }
  accessModes: [ReadWriteOnce]
  claimRef: { namespace: shop, name: shop-cache }
  hostPath: { path: /tmp/cache }
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: shop-cache, namespace: shop, labels: { app: shop } }
spec: { accessModes: [ReadWriteOnce], volumeName: pv-elsewhere, resources: { requests: { storage: 1Gi } } }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: shop-db, namespace: shop, labels: { app: shop } }
spec:
  replicas: 3
  serviceName: shop
  selector: { matchLabels: { app: shop } }
  template:
    metadata: { labels: { app: shop } }
    spec: { containers: [{ name: db, image: "postgres:16" }] }
  volumeClaimTemplates:
    - metadata: { name: data }
      spec: { accessModes: [ReadWriteOnce], storageClassName: fast, resources: { requests: { storage: 1Gi } } }
`;

const RESTORE: RestoreOptions = {
  namespaceMapping: { shop: "shop-dr" },
  storageClassMapping: { fast: "standard" },
  transforms: [{ kind: "StatefulSet", patch: [{ op: "replace", path: "/spec/replicas", value: 1 }] }],
};

beforeAll(async () => {
  try {
    clusters = await startTwoClusters(sandbox);
    config.a.loadFromFile(clusters.a.kubeconfig);
    config.b.loadFromFile(clusters.b.kubeconfig);
    const created = await clusters.kubectl(clusters.a, ["apply", "-f", "-"], { input: SHOP });
    expect(created.stderr).toBe("");
  } catch (error) {
    await sandbox.cleanup();
    throw error;
  }
});

afterAll(() => sandbox.cleanup());

async function getB(kind: string, name: string) {
  const got = await clusters.kubectl(clusters.b, ["get", kind, name, "-n", "shop-dr", "-o", "json"]);
  expect(got.stderr).toBe("");
  return JSON.parse(got.stdout) as {
    metadata: { resourceVersion: string; uid: string };
    spec: Record<string, unknown>;
    data?: Record<string, string>;
  };
}

describe("capture and restore of an application's Kubernetes objects", () => {
  it("turns a label selector into the API's query syntax", () => {
    expect(
      selectorQuery({
        matchLabels: { app: "shop" },
        matchExpressions: [
          { key: "tier", operator: "In", values: ["db", "web"] },
          { key: "canary", operator: "DoesNotExist" },
        ],
      }),
    ).toBe("app=shop,tier in (db,web),!canary");
  });

  it("captures the selected objects, portable, in restore order", async () => {
    const captured = await captureObjects(config.a, {
      namespaces: ["shop"],
      labelSelector: { matchLabels: { app: "shop" } },
    });
    expect(captured.map((o) => `${o.kind}/${o.metadata?.name}`)).toEqual([
      "ConfigMap/shop-config",
      "Secret/shop-db",
      "PersistentVolumeClaim/shop-cache",
      "PersistentVolumeClaim/shop-data",
      "PersistentVolumeClaim/shop-logs",
      "Service/shop",
      "StatefulSet/shop-db",
    ]);
    for (const object of captured) {
      expect(Object.keys(object.metadata ?? {}).sort()).toEqual(["labels", "name", "namespace"]);
      expect(object).not.toHaveProperty("status");
    }
    const service = captured.find((o) => o.kind === "Service") as { spec: Record<string, unknown> };
    expect(service.spec).not.toHaveProperty("clusterIP");
    expect(service.spec).not.toHaveProperty("clusterIPs");
  });

  it("restores at B with mappings and transforms; a second restore changes nothing", async () => {
    const captured = await captureObjects(config.a, {
      namespaces: ["shop"],
      labelSelector: { matchLabels: { app: "shop" } },
    });
    // The PVC on a Ferry volume gets a PV pointing at B's copy of that volume; the other PVCs none.
    const bindings = await captureVolumes(config.a, {
      namespaces: ["shop"],
      labelSelector: { matchLabels: { app: "shop" } },
    });
    expect(bindings).toEqual([
      {
        namespace: "shop",
        claim: "shop-data",
        volume: "shop-data-vol",
        capacity: "2Gi",
        accessModes: ["ReadWriteOnce"],
        volumeMode: "Filesystem",
        storageClassName: "fast",
      },
    ]);
    volumeNames = await restoreVolumes(config.b, bindings, {
      ...RESTORE,
      volumes: { "shop-data-vol": "shop-data-vol-b" },
    });
    expect(volumeNames).toEqual({ "shop/shop-data": "ferry-shop-data-vol-b" });
    const first = await restoreObjects(config.b, captured, { ...RESTORE, volumeNames });
    expect(first.applied).toHaveLength(7);
    const pv = JSON.parse(
      (await clusters.kubectl(clusters.b, ["get", "pv", "ferry-shop-data-vol-b", "-o", "json"])).stdout,
    ) as { spec: Record<string, unknown> };
    expect(pv.spec).toMatchObject({
      csi: { driver: "csi.ferry.io", volumeHandle: "shop-data-vol-b" },
      claimRef: { namespace: "shop-dr", name: "shop-data" },
      storageClassName: "standard",
      persistentVolumeReclaimPolicy: "Retain",
    });
    expect((await getB("pvc", "shop-data")).spec.volumeName).toBe("ferry-shop-data-vol-b");
    expect((await getB("pvc", "shop-cache")).spec.volumeName).toBeUndefined();
    const secret = await getB("secret", "shop-db");
    expect(Buffer.from(secret.data?.password ?? "", "base64").toString()).toBe("s3cret");
    const pvc = await getB("pvc", "shop-logs");
    expect(pvc.spec.storageClassName).toBe("standard");
    const statefulSet = await getB("statefulset", "shop-db");
    expect(statefulSet.spec.replicas).toBe(1);
    expect(
      (statefulSet.spec.volumeClaimTemplates as { spec: { storageClassName: string } }[])[0]?.spec.storageClassName,
    ).toBe("standard");
    // B gave the Service an address of its own.
    expect((await getB("service", "shop")).spec.clusterIP).toMatch(/^10\.96\.0\.\d+$/);
    const unrelated = await clusters.kubectl(clusters.b, ["get", "configmap", "unrelated", "-n", "shop-dr"]);
    expect(unrelated.stderr).toContain("not found");

    // Compared as stored (uid included: nothing re-created), less resourceVersion: the API server
    // bumped a PVC's resourceVersion on an apply that changed none of its content (v1.37.2).
    const stored = async () =>
      Promise.all(
        [
          ["configmap", "shop-config"],
          ["secret", "shop-db"],
          ["pvc", "shop-logs"],
          ["pvc", "shop-data"],
          ["service", "shop"],
          ["statefulset", "shop-db"],
        ].map(async ([kind, name]) => {
          const object = await getB(kind ?? "", name ?? "");
          return { ...object, metadata: { ...object.metadata, resourceVersion: undefined } };
        }),
      );
    const before = await stored();
    await restoreVolumes(config.b, bindings, { ...RESTORE, volumes: { "shop-data-vol": "shop-data-vol-b" } });
    await restoreObjects(config.b, captured, { ...RESTORE, volumeNames });
    expect(await stored()).toEqual(before);
  });

  it("skips or overwrites an object changed at B, as the conflict policy says", async () => {
    const changed = await clusters.kubectl(clusters.b, [
      "patch",
      "configmap",
      "shop-config",
      "-n",
      "shop-dr",
      "--type=merge",
      "-p",
      '{"data":{"greeting":"changed at B"}}',
    ]);
    expect(changed.code).toBe(0);
    const captured = await captureObjects(config.a, {
      namespaces: ["shop"],
      labelSelector: { matchLabels: { app: "shop" } },
    });
    const skipped = await restoreObjects(config.b, captured, { ...RESTORE, volumeNames, onConflict: "skip" });
    expect(skipped.skipped).toContain("ConfigMap/shop-dr/shop-config");
    expect((await getB("configmap", "shop-config")).data?.greeting).toBe("changed at B");
    await restoreObjects(config.b, captured, { ...RESTORE, volumeNames, onConflict: "overwrite" });
    expect((await getB("configmap", "shop-config")).data?.greeting).toBe("hello from A");
  });

  it("refuses a transform that no longer fits, naming the object", async () => {
    const captured = await captureObjects(config.a, {
      namespaces: ["shop"],
      labelSelector: { matchLabels: { app: "shop" } },
    });
    const restore = restoreObjects(config.b, captured, {
      ...RESTORE,
      transforms: [{ kind: "Service", patch: [{ op: "replace", path: "/spec/externalName", value: "x" }] }],
    });
    await expect(restore).rejects.toThrow(
      "transform of Service shop: JSON patch replace /spec/externalName: no such value",
    );
  });

  it("keeps a headless Service headless", () => {
    const headless = portable({
      apiVersion: "v1",
      kind: "Service",
      metadata: { name: "db", namespace: "shop", uid: "u", resourceVersion: "7" },
      spec: { clusterIP: "None", clusterIPs: ["None"], ports: [{ port: 5432 }] },
    } as never) as { spec: Record<string, unknown> };
    expect(headless.spec.clusterIP).toBe("None");
  });
});

/** A custom resource definition, namespaced, in group example.com. */
const crd = (plural: string, kind: string) => `
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: { name: ${plural}.example.com }
spec:
  group: example.com
  scope: Namespaced
  names: { plural: ${plural}, singular: ${kind.toLowerCase()}, kind: ${kind} }
  versions:
    - name: v1
      served: true
      storage: true
      schema: { openAPIV3Schema: { type: object, x-kubernetes-preserve-unknown-fields: true } }
`;

describe("custom resources", () => {
  it("captures the selected custom resources after the built-in kinds, and restores them where their CRD exists", async () => {
    for (const [cluster, input] of [
      [clusters.a, `${crd("widgets", "Widget")}---${crd("gadgets", "Gadget")}`],
      [clusters.b, crd("widgets", "Widget")],
    ] as const) {
      const applied = await clusters.kubectl(cluster, ["apply", "-f", "-"], { input });
      expect(applied.stderr).toBe("");
      const ready = await clusters.kubectl(cluster, [
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/widgets.example.com",
      ]);
      expect(ready.stderr).toBe("");
    }
    await clusters.kubectl(clusters.a, [
      "wait",
      "--for=condition=Established",
      "--timeout=30s",
      "crd/gadgets.example.com",
    ]);
    const objects = `
apiVersion: example.com/v1
kind: Widget
metadata: { name: w1, namespace: shop, labels: { app: shop } }
spec: { size: 3 }
---
apiVersion: example.com/v1
kind: Widget
metadata: { name: w2, namespace: shop, labels: { app: other } }
spec: { size: 9 }
`;
    expect((await clusters.kubectl(clusters.a, ["apply", "-f", "-"], { input: objects })).stderr).toBe("");
    const selection = { namespaces: ["shop"], labelSelector: { matchLabels: { app: "shop" } } };
    const { objects: captured, unreadable } = await captureSelection(config.a, selection);
    expect(unreadable).toEqual([]);
    expect(captured.slice(-1)).toEqual([
      {
        apiVersion: "example.com/v1",
        kind: "Widget",
        metadata: { name: "w1", namespace: "shop", labels: { app: "shop" } },
        spec: { size: 3 },
      },
    ]);
    await restoreObjects(config.b, captured, { ...RESTORE, volumeNames });
    expect((await getB("widget", "w1")).spec).toEqual({ size: 3 });

    // A custom resource whose definition the target lacks: the restore says which.
    const gadget = `
apiVersion: example.com/v1
kind: Gadget
metadata: { name: g1, namespace: shop, labels: { app: shop } }
`;
    expect((await clusters.kubectl(clusters.a, ["apply", "-f", "-"], { input: gadget })).stderr).toBe("");
    const withGadget = await captureObjects(config.a, selection);
    await expect(restoreObjects(config.b, withGadget, { ...RESTORE, volumeNames })).rejects.toThrow(
      /cannot apply Gadget\/shop-dr\/g1: .*\(is the CustomResourceDefinition of Gadget installed at this cluster\?\)/,
    );
  });
});
