/**
 * The chart's RBAC against two real kube-apiservers (RBAC authorization, @ferry/testkit's
 * two-clusters): ferryd's Kubernetes adapter, run as ferryd's service account with the roles the
 * chart renders, captures at site A, runs a drill there and cleans it up, recovers at site B and
 * stops the workloads at A; with ferryd.kubernetes.restore=false it captures and every write is
 * refused; the operator's account can touch none of a user's workloads. chart.test.ts checks the
 * rendered rules are exactly these; this checks they are enough.
 */
import { DEFAULT_RESTORE, type MemberCapture } from "@ferry/orchestrator";
import { type Cluster, Sandbox, startTwoClusters, type TwoClusters } from "@ferry/testkit";
import { AppsV1Api, KubeConfig } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CHART_DIR } from "./generate.js";
import { DRILL_LABEL, KubernetesAdapter, type KubernetesCapture } from "./kubernetes-adapter.js";
import { STOPPED_REPLICAS_ANNOTATION } from "./manifests.js";

const sandbox = new Sandbox();
let clusters: TwoClusters;

/** The application at site A: one of each captured kind, a PVC on a Ferry volume. */
const SHOP = `
apiVersion: v1
kind: Namespace
metadata: { name: shop }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: shop, namespace: shop, labels: { app: shop } }
---
apiVersion: v1
kind: ConfigMap
metadata: { name: shop-config, namespace: shop, labels: { app: shop } }
data: { mode: live }
---
apiVersion: v1
kind: Secret
metadata: { name: shop-secret, namespace: shop, labels: { app: shop } }
stringData: { password: s3cret }
---
apiVersion: v1
kind: PersistentVolume
metadata: { name: shop-data-pv }
spec:
  capacity: { storage: 1Gi }
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  claimRef: { namespace: shop, name: shop-data }
  csi: { driver: csi.ferry.io, volumeHandle: shop-data-vol }
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: { name: shop-data, namespace: shop, labels: { app: shop } }
spec:
  accessModes: [ReadWriteOnce]
  resources: { requests: { storage: 1Gi } }
  storageClassName: ""
  volumeName: shop-data-pv
---
apiVersion: v1
kind: Service
metadata: { name: shop, namespace: shop, labels: { app: shop } }
spec: { selector: { app: shop }, ports: [{ port: 80 }] }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: shop-web, namespace: shop, labels: { app: shop } }
spec:
  replicas: 2
  selector: { matchLabels: { app: shop, tier: web } }
  template:
    metadata: { labels: { app: shop, tier: web } }
    spec: { containers: [{ name: web, image: registry.example/web:1 }] }
---
apiVersion: apps/v1
kind: StatefulSet
metadata: { name: shop-db, namespace: shop, labels: { app: shop } }
spec:
  replicas: 1
  serviceName: shop
  selector: { matchLabels: { app: shop, tier: db } }
  template:
    metadata: { labels: { app: shop, tier: db } }
    spec: { containers: [{ name: db, image: registry.example/db:1 }] }
---
apiVersion: apps/v1
kind: DaemonSet
metadata: { name: shop-agent, namespace: shop, labels: { app: shop } }
spec:
  selector: { matchLabels: { app: shop, tier: agent } }
  template:
    metadata: { labels: { app: shop, tier: agent } }
    spec: { containers: [{ name: agent, image: registry.example/agent:1 }] }
`;

async function kubectl(cluster: Cluster, args: string[], input?: string): Promise<string> {
  const result = await clusters.kubectl(cluster, args, input === undefined ? {} : { input });
  expect(result.code, `kubectl ${args.join(" ")}: ${result.stderr}`).toBe(0);
  return result.stdout;
}

/** Install the chart's service accounts and RBAC (release `release`, namespace ferry-system) at a cluster. */
async function installRbac(cluster: Cluster, release: string, ...set: string[]): Promise<void> {
  const rendered = await clusters.helm([
    "template",
    release,
    CHART_DIR,
    "--namespace",
    "ferry-system",
    ...["image.repository=registry.example/ferry", ...set].flatMap((s) => ["--set", s]),
    "--show-only",
    "templates/serviceaccounts.yaml",
    "--show-only",
    "templates/ferryd-rbac.yaml",
    "--show-only",
    "templates/operator-rbac.yaml",
  ]);
  expect(rendered.stderr).toBe("");
  expect(rendered.code).toBe(0);
  // helm leaves the release namespace out of namespaced objects: helm install (and here kubectl) adds it.
  await kubectl(cluster, ["apply", "--server-side", "-n", "ferry-system", "-f", "-"], rendered.stdout);
}

/** A kubeconfig for a service account: a token the API server issues, as the pod's mounted one. */
async function asServiceAccount(cluster: Cluster, account: string): Promise<KubeConfig> {
  const token = (await kubectl(cluster, ["create", "token", account, "-n", "ferry-system"])).trim();
  const config = new KubeConfig();
  config.loadFromOptions({
    clusters: [{ name: cluster.name, server: cluster.server, caData: Buffer.from(cluster.ca).toString("base64") }],
    users: [{ name: account, token }],
    contexts: [{ name: account, cluster: cluster.name, user: account }],
    currentContext: account,
  });
  return config;
}

beforeAll(async () => {
  try {
    clusters = await startTwoClusters(sandbox);
    for (const cluster of [clusters.a, clusters.b]) {
      await kubectl(cluster, ["create", "namespace", "ferry-system"]);
      await installRbac(cluster, "ferry");
    }
    await installRbac(clusters.a, "readonly", "ferryd.kubernetes.restore=false");
    await kubectl(clusters.a, ["apply", "--server-side", "-f", "-"], SHOP);
  } catch (error) {
    await sandbox.cleanup();
    throw error;
  }
}, 120_000);

afterAll(() => sandbox.cleanup());

const forbidden = expect.objectContaining({ code: 403 });

describe("ferryd's RBAC from the chart, against real API servers", () => {
  it("with ferryd.kubernetes.restore=false, lets ferryd capture and refuses every write (before anything stopped)", async () => {
    const readOnly = new KubernetesAdapter({ kubeConfig: await asServiceAccount(clusters.a, "readonly-ferry-ferryd") });
    const captures = await readOnly.capture(["shop?app=shop"]);
    expect(captured(captures).objects).toHaveLength(8);
    const drill = {
      app: "shop",
      site: "site-a",
      drill: true,
      volumes: { "shop-data-vol": "shop-data-clone-2" },
      restore: DEFAULT_RESTORE,
    };
    await expect(readOnly.recover(captures, drill)).rejects.toThrow(/forbidden/);
    await expect(readOnly.stop(["shop?app=shop"])).rejects.toEqual(forbidden);
    await expect(readOnly.cleanupDrill("shop")).rejects.toEqual(forbidden);
  });

  it("is enough for capture, a drill and its cleanup, recovery at the other site, and stop", async () => {
    const atA = new KubernetesAdapter({ kubeConfig: await asServiceAccount(clusters.a, "ferry-ferryd") });
    const atB = new KubernetesAdapter({ kubeConfig: await asServiceAccount(clusters.b, "ferry-ferryd") });

    expect(await atA.volumesOf(["shop?app=shop"])).toEqual(["shop-data-vol"]);
    const captures = await atA.capture(["shop?app=shop"]);
    expect(captured(captures).objects.map((o) => `${o.kind}/${o.metadata?.name}`)).toEqual([
      "ServiceAccount/shop",
      "ConfigMap/shop-config",
      "Secret/shop-secret",
      "PersistentVolumeClaim/shop-data",
      "Service/shop",
      "StatefulSet/shop-db",
      "Deployment/shop-web",
      "DaemonSet/shop-agent",
    ]);
    expect(captured(captures).volumes.map((v) => v.volume)).toEqual(["shop-data-vol"]);

    // A drill at A: a namespace of its own and a PV for the clone, then cleanup deletes both.
    const drill = {
      app: "shop",
      site: "site-a",
      drill: true,
      volumes: { "shop-data-vol": "shop-data-clone" },
      restore: DEFAULT_RESTORE,
    };
    expect(await atA.recover(captures, drill)).toEqual(["namespace shop-drill (8 objects, 1 volume)"]);
    expect(await kubectl(clusters.a, ["get", "pv", "-l", `${DRILL_LABEL}=shop`, "-o", "name"])).toBe(
      "persistentvolume/ferry-shop-data-clone\n",
    );
    expect(await kubectl(clusters.a, ["get", "configmap", "shop-config", "-n", "shop-drill", "-o", "name"])).toBe(
      "configmap/shop-config\n",
    );
    await atA.cleanupDrill("shop");
    // No controller-manager here to remove the protection finalizers: deleted is "being deleted".
    expect(await live(clusters.a, ["pv", "-l", `${DRILL_LABEL}=shop`])).toEqual([]);
    expect(await live(clusters.a, ["namespace", "shop-drill"])).toEqual([]);
    expect(await live(clusters.a, ["all,configmaps,secrets,serviceaccounts,pvc", "-n", "shop-drill"])).toEqual([]);

    // Failover to B: the namespace, the PV and the objects made there; a second recover changes nothing.
    const failover = {
      app: "shop",
      site: "site-b",
      drill: false,
      volumes: { "shop-data-vol": "shop-data-vol" },
      restore: DEFAULT_RESTORE,
    };
    expect(await atB.recover(captures, failover)).toEqual(["namespace shop (8 objects, 1 volume)"]);
    expect(await atB.recover(captures, failover)).toEqual(["namespace shop (8 objects, 1 volume)"]);
    expect(
      (
        await kubectl(clusters.b, ["get", "pvc", "shop-data", "-n", "shop", "-o", "jsonpath={.spec.volumeName}"])
      ).trim(),
    ).toBe("ferry-shop-data-vol");

    // A planned migration stops the workloads at the site it leaves.
    await atA.stop(["shop?app=shop"]);
    const apps = (await asAdmin(clusters.a)).makeApiClient(AppsV1Api);
    const web = await apps.readNamespacedDeployment({ name: "shop-web", namespace: "shop" });
    expect(web.spec?.replicas).toBe(0);
    expect(web.metadata?.annotations?.[STOPPED_REPLICAS_ANNOTATION]).toBe("2");
    expect((await apps.readNamespacedStatefulSet({ name: "shop-db", namespace: "shop" })).spec?.replicas).toBe(0);
  });

  it("gives the operator's account nothing of a user's workloads", async () => {
    for (const [verb, resource] of [
      ["list", "secrets"],
      ["get", "configmaps"],
      ["patch", "deployments.apps"],
      ["create", "statefulsets.apps"],
      ["patch", "persistentvolumes"],
      ["create", "namespaces"],
    ] as const) {
      const can = await clusters.kubectl(clusters.a, [
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        "shop",
        "--as=system:serviceaccount:ferry-system:ferry-operator",
      ]);
      expect(can.stdout.trim(), `${verb} ${resource}`).toBe("no");
    }
  });
});

function captured(captures: readonly MemberCapture[]): KubernetesCapture {
  expect(captures).toHaveLength(1);
  return captures[0]?.metadata as KubernetesCapture;
}

/** What `kubectl get` lists that is not being deleted, as kind/name. */
async function live(cluster: Cluster, args: string[]): Promise<string[]> {
  type Item = { kind: string; metadata: { name: string; deletionTimestamp?: string } };
  const out = await kubectl(cluster, ["get", ...args, "--ignore-not-found", "-o", "json"]);
  if (out.trim() === "") return [];
  const parsed = JSON.parse(out) as Item & { items?: Item[] };
  return (parsed.items ?? [parsed])
    .filter((i) => i.metadata.deletionTimestamp === undefined)
    .map((i) => `${i.kind}/${i.metadata.name}`);
}

async function asAdmin(cluster: Cluster): Promise<KubeConfig> {
  const config = new KubeConfig();
  config.loadFromFile(cluster.kubeconfig);
  return config;
}
