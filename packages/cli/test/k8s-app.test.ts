/**
 * Kubernetes objects as members of a protected application, across two sites: each site has its
 * own cluster (a real kube-apiserver) and its own ferryd with `--kubeconfig`. At A a namespace holds
 * a StatefulSet whose claim is bound to a Ferry volume, with a ConfigMap, a Secret and a Service;
 * the application is that namespace (by label), and its volume joins by the PVC. The objects are
 * captured with every cut; a drill at B restores them into an isolated namespace beside running
 * replication; a failover at B recreates them with the claim bound to B's replica — whose bytes are
 * A's; a failback brings the application home with the changes made at B, the objects included.
 */
import { fileURLToPath } from "node:url";
import type { Application, Operation, RecoveryPoint } from "@ferry/orchestrator";
import {
  exportSha256,
  FerryCli,
  qemuIo,
  Sandbox,
  startTwoClusters,
  startTwoSites,
  type TwoClusters,
  type TwoSites,
  waitFor,
} from "@ferry/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { shopObjects } from "./shop-objects.js";
import { daemonSite, type SiteService } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const VOLUME = "shop-data";

const sandbox = new Sandbox();
let sites: TwoSites;
let clusters: TwoClusters;
let ferry: FerryCli;
const ferryd: Record<"a" | "b", SiteService> = {} as never;

const at = (s: "a" | "b", args: readonly string[]) => [...args, "--nats", sites[s].cliUrl, "--site", sites[s].name];

const SHOP = shopObjects({ namespace: "shop", volume: VOLUME });
/** The policy's restore settings: at B the objects live in shop-dr, and the Service is marked. */
const RESTORE = [
  "--namespace-map",
  "shop=shop-dr",
  "--transform",
  JSON.stringify({ kind: "Service", patch: [{ op: "add", path: "/metadata/labels/site", value: "dr" }] }),
];

async function kubectl(s: "a" | "b", args: readonly string[], input?: string): Promise<string> {
  const result = await clusters.kubectl(clusters[s], args, input === undefined ? {} : { input });
  if (result.code !== 0) throw new Error(`kubectl ${args.join(" ")} at ${s}: ${result.stderr}`);
  return result.stdout;
}

async function getJson<T>(s: "a" | "b", kind: string, name: string, namespace?: string): Promise<T> {
  const ns = namespace === undefined ? [] : ["-n", namespace];
  return JSON.parse(await kubectl(s, ["get", kind, name, ...ns, "-o", "json"])) as T;
}

/** Does the object exist (and is not being deleted)? */
async function present(s: "a" | "b", kind: string, name: string, namespace?: string): Promise<boolean> {
  const ns = namespace === undefined ? [] : ["-n", namespace];
  const result = await clusters.kubectl(clusters[s], ["get", kind, name, ...ns, "-o", "json"]);
  if (result.code !== 0) return false;
  return (
    (JSON.parse(result.stdout) as { metadata: { deletionTimestamp?: string } }).metadata.deletionTimestamp === undefined
  );
}

function sha256(s: "a" | "b", volume: string): Promise<string> {
  return exportSha256(sandbox, ferryd[s].serve.uri(volume));
}

interface Kube {
  metadata: { labels?: Record<string, string>; annotations?: Record<string, string> };
  data?: Record<string, string>;
  spec: {
    replicas?: number;
    volumeName?: string;
    clusterIP?: string;
    csi?: { driver: string; volumeHandle: string };
    claimRef?: { namespace: string; name: string };
  };
}

beforeAll(async () => {
  try {
    ferry = new FerryCli(sandbox, BIN);
    [sites, clusters] = await Promise.all([startTwoSites(), startTwoClusters(sandbox)]);
    for (const s of ["a", "b"] as const) {
      ferryd[s] = await daemonSite(ferry, sandbox, sites[s], { extra: ["--kubeconfig", clusters[s].kubeconfig] });
    }
    await waitFor("both sites to know each other", async () => {
      const list = await ferry.json<{ name: string }[]>(at("a", ["site", "list"]));
      return list.length === 2;
    });
  } catch (error) {
    await cleanup();
    throw error;
  }
});

async function cleanup() {
  await sandbox.cleanup();
  await sites?.stop();
}
afterAll(cleanup);

describe("Kubernetes objects in a protected application", () => {
  let written: string;

  it("joins the PVC's Ferry volume to the application, and refuses members it cannot use", async () => {
    await ferry.ok(["volume", "create", VOLUME, "--size", "8M", "--data", ferryd.a.data]);
    await qemuIo(sandbox, ferryd.a.serve.uri(VOLUME), ["write -P 0x5a 0 1M", "write -P 0xa5 4M 512K"]);
    written = await sha256("a", VOLUME);
    await kubectl("a", ["apply", "-f", "-"], SHOP.map((o) => JSON.stringify(o)).join("\n"));

    const bad = await ferry.run(at("a", ["app", "create", "bad", "--namespace", "Not_A_Namespace"]));
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain("namespace 'Not_A_Namespace' is not a Kubernetes namespace name");
    const empty = await ferry.run(at("a", ["app", "create", "empty", "--namespace", "default"]));
    expect(empty.code).toBe(2);
    expect(empty.stderr).toContain("application empty has no Ferry volumes");
    const map = await ferry.run(at("a", ["policy", "create", "p", "--mode", "async", "--namespace-map", "shop"]));
    expect(map.code).toBe(2);
    expect(map.stderr).toContain("--namespace-map 'shop' is not FROM=TO");
    const patch = await ferry.run(at("a", ["policy", "create", "p", "--mode", "async", "--transform", '{"patch":[]}']));
    expect(patch.code).toBe(2);
    expect(patch.stderr).toContain('policy p: transform 1 needs a non-empty "patch" list');
    const usage = await ferry.run(at("a", ["app", "create", "x", "--volume", VOLUME, "--selector", "app=shop"]));
    expect(usage.code).not.toBe(0);
    expect(usage.stderr).toContain("--selector picks Kubernetes objects");

    const app = await ferry.json<Application>(
      at("a", ["app", "create", "shop", "--namespace", "shop", "--selector", "app=shop"]),
    );
    expect(app).toMatchObject({
      volumes: [VOLUME],
      kubernetes: { namespaces: ["shop"], labelSelector: "app=shop" },
    });
    // Idempotent: the same request answers the same application.
    const again = await ferry.json<Application>(
      at("a", ["app", "create", "shop", "--namespace", "shop", "--selector", "app=shop"]),
    );
    expect(again.createdAtMs).toBe(app.createdAtMs);
    const listed = await ferry.ok(at("a", ["app", "list"]));
    expect(listed).toContain("Kubernetes namespace shop (app=shop)");
  });

  let point: RecoveryPoint;

  it("captures the selected objects with every cut, stored at the target", async () => {
    await ferry.ok(
      at("a", ["policy", "create", "k8s-gold", "--mode", "async", "--interval", "1s", "--retain", "60", ...RESTORE]),
    );
    await ferry.ok(at("a", ["protect", "shop", "--policy", "k8s-gold", "--to", "site-b", "--wait"]));
    point = await waitFor(
      "a recovery point of shop with its Kubernetes objects",
      async () =>
        (await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "shop"]))).find((p) => p.members === 1),
      { timeoutMs: 60_000 },
    );
    const meta = await ferry.json<{
      captures: { kind: string; name: string; metadata: { objects: { kind: string; metadata: { name: string } }[] } }[];
    }>(at("b", ["recovery-points", "shop", "--point", point.id]));
    expect(meta.captures.map((c) => [c.kind, c.name])).toEqual([["kubernetes", "shop?app=shop"]]);
    const objects = meta.captures[0]?.metadata.objects.map((o) => `${o.kind}/${o.metadata.name}`);
    expect(objects).toEqual([
      "ConfigMap/shop-config",
      "Secret/shop-db",
      "PersistentVolumeClaim/data-db-0",
      "Service/db",
      "StatefulSet/db",
    ]);
  });

  it("drills at B in an isolated namespace beside running replication, and cleans it up", async () => {
    const drill = await ferry.json<Operation>(at("b", ["failover", "shop", "--to", "site-b", "--test"]));
    expect(drill.state, JSON.stringify(drill.error)).toBe("succeeded");
    expect(drill.steps.find((s) => s.name === "recover-members")?.detail).toContain("namespace shop-dr-drill");
    const ns = await getJson<Kube>("b", "namespace", "shop-dr-drill");
    expect(ns.metadata.labels?.["ferry.io/drill-of"]).toBe("shop");
    expect((await getJson<Kube>("b", "configmap", "shop-config", "shop-dr-drill")).data).toEqual({
      greeting: "hello from A",
    });
    const claim = await getJson<Kube>("b", "pvc", "data-db-0", "shop-dr-drill");
    const pv = await getJson<Kube>("b", "pv", claim.spec.volumeName ?? "none");
    expect(pv.spec.csi).toEqual({ driver: "csi.ferry.io", volumeHandle: `${VOLUME}-drill` });
    expect(pv.spec.claimRef).toMatchObject({ namespace: "shop-dr-drill", name: "data-db-0" });
    expect(await sha256("b", `${VOLUME}-drill`)).toBe(written);
    expect(await present("b", "namespace", "shop")).toBe(false);

    const cleanup = await ferry.json<Operation>(at("b", ["drill", "cleanup", "shop"]));
    expect(cleanup.state, JSON.stringify(cleanup.error)).toBe("succeeded");
    expect(await present("b", "configmap", "shop-config", "shop-dr-drill")).toBe(false);
    expect(await present("b", "pv", claim.spec.volumeName ?? "none")).toBe(false);
    expect(await present("b", "namespace", "shop-dr-drill")).toBe(false);
  });

  it("fails over to B: the objects are recreated with the claim bound to B's replica, whose bytes are A's", async () => {
    const op = await ferry.json<Operation>(at("b", ["failover", "shop", "--to", "site-b", "--point", point.id]));
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(op.steps.find((s) => s.name === "recover-members")?.detail).toContain(
      "namespace shop-dr (5 objects, 1 volume)",
    );
    expect((await getJson<Kube>("b", "configmap", "shop-config", "shop-dr")).data).toEqual({
      greeting: "hello from A",
    });
    const secret = await getJson<Kube>("b", "secret", "shop-db", "shop-dr");
    expect(Buffer.from(secret.data?.password ?? "", "base64").toString()).toBe("s3cret");
    expect((await getJson<Kube>("b", "statefulset", "db", "shop-dr")).spec.replicas).toBe(2);
    expect(await present("b", "configmap", "unrelated", "shop-dr")).toBe(false);
    const serviceA = await getJson<Kube>("a", "service", "db", "shop");
    const serviceB = await getJson<Kube>("b", "service", "db", "shop-dr");
    expect(serviceB.metadata.labels).toEqual({ app: "shop", site: "dr" });
    expect(await present("b", "namespace", "shop")).toBe(false);
    const [moved] = await ferry.json<Application[]>(at("b", ["app", "list"]));
    expect(moved?.kubernetes?.namespaces).toEqual(["shop-dr"]);
    expect(serviceB.spec.clusterIP).toBeDefined();
    expect(serviceB.spec.clusterIP).not.toBe("None");
    expect(serviceA.spec.clusterIP).toBeDefined();
    const claim = await getJson<Kube>("b", "pvc", "data-db-0", "shop-dr");
    const pv = await getJson<Kube>("b", "pv", claim.spec.volumeName ?? "none");
    expect(pv.spec.csi).toEqual({ driver: "csi.ferry.io", volumeHandle: VOLUME });
    expect(await sha256("b", VOLUME)).toBe(written);
  });

  it("fails back to A with B's changes: the workload is stopped at B and runs at A again", async () => {
    // Work goes on at B: data and configuration.
    await qemuIo(sandbox, ferryd.b.serve.uri(VOLUME), ["write -P 0xb2 2M 256K"]);
    await kubectl("b", [
      "patch",
      "configmap",
      "shop-config",
      "-n",
      "shop-dr",
      "-p",
      '{"data":{"greeting":"hello from B"}}',
    ]);
    const atB = await sha256("b", VOLUME);
    const failback = await ferry.json<Operation>(at("a", ["failback", "shop"]));
    expect(failback.state, JSON.stringify(failback.error)).toBe("succeeded");
    expect(await sha256("a", VOLUME)).toBe(atB);
    expect((await getJson<Kube>("a", "configmap", "shop-config", "shop")).data).toEqual({ greeting: "hello from B" });
    // Stopped at B before the final sync (the count it ran with kept aside), running at A with that count.
    const left = await getJson<Kube>("b", "statefulset", "db", "shop-dr");
    expect(left.spec.replicas).toBe(0);
    expect(left.metadata.annotations?.["ferry.io/stopped-replicas"]).toBe("2");
    const home = await getJson<Kube>("a", "statefulset", "db", "shop");
    expect(home.spec.replicas).toBe(2);
    expect(home.metadata.annotations?.["ferry.io/stopped-replicas"]).toBeUndefined();
    // Home: the namespace mapping read backwards.
    const [app] = await ferry.json<Application[]>(at("a", ["app", "list"]));
    expect(app?.kubernetes?.namespaces).toEqual(["shop"]);
  });
});
