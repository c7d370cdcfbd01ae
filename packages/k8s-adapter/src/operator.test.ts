/**
 * The operator against the real things: a kube-apiserver (cluster of site A, CRDs created through
 * the API from crd-manifest.ts), two NATS sites with one ferryd each (`ferry daemon`), and the
 * operator in this process driving site A's ferryd. Resources go in with kubectl, as a user would;
 * what the test checks is what a user reads back: conditions, reasons, printer columns, and
 * ferryd's own view through the `ferry` CLI.
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connectNats, type ProtectionStatus } from "@ferry/orchestrator";
import {
  FerryCli,
  Sandbox,
  startTwoClusters,
  startTwoSites,
  type TwoClusters,
  type TwoSites,
  waitFor,
} from "@ferry/testkit";
import { ApiextensionsV1Api, CustomObjectsApi, KubeConfig } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { crdName, customResourceDefinition } from "./crd-manifest.js";
import { API_VERSION, GROUP, RESOURCES, VERSION } from "./crds.js";
import { Operator } from "./operator.js";
import type { Application, ProtectionPolicy } from "./resources.js";

const BIN = fileURLToPath(new URL("../../cli/bin/ferry.js", import.meta.url));

const sandbox = new Sandbox();
let sites: TwoSites;
let clusters: TwoClusters;
let ferry: FerryCli;
let operator: Operator;
let nc: Awaited<ReturnType<typeof connectNats>>;
let objects: CustomObjectsApi;

/** The CLI against one site's ferryd, as that site's `cli` user. */
const at = (site: "a" | "b", args: readonly string[]) => [
  ...args,
  "--nats",
  sites[site].cliUrl,
  "--site",
  sites[site].name,
];

async function startFerryd(site: "a" | "b"): Promise<void> {
  const dir = await sandbox.dir(`ferryd-${site}-`);
  const s = sites[site];
  await ferry.daemon([
    "--data",
    dir,
    "--socket",
    join(dir, "nbd.sock"),
    "--site",
    s.name,
    "--region",
    s.region,
    "--nats",
    s.url,
  ]);
}

beforeAll(async () => {
  try {
    ferry = new FerryCli(sandbox, BIN);
    [sites, clusters] = await Promise.all([startTwoSites(), startTwoClusters(sandbox)]);
    await Promise.all([startFerryd("a"), startFerryd("b")]);
    const config = new KubeConfig();
    config.loadFromFile(clusters.a.kubeconfig);
    const extensions = config.makeApiClient(ApiextensionsV1Api);
    for (const resource of RESOURCES) {
      await extensions.createCustomResourceDefinition({ body: customResourceDefinition(resource) as never });
    }
    const established = await clusters.kubectl(clusters.a, [
      "wait",
      "--for=condition=Established",
      "--timeout=30s",
      ...RESOURCES.map((r) => `crd/${crdName(r)}`),
    ]);
    expect(established.stderr).toBe("");
    objects = config.makeApiClient(CustomObjectsApi);
    await waitFor("both sites to know each other", async () => {
      const list = await ferry.json<{ name: string }[]>(at("a", ["site", "list"]));
      return list.length === 2;
    });
    nc = await connectNats(sites.a.cliUrl, "ferry-operator-test");
    operator = new Operator({ kubeConfig: config, nc, site: sites.a.name, resyncMs: 1_000, log: () => {} });
    await operator.start();
  } catch (error) {
    await afterAllCleanup();
    throw error;
  }
});

async function afterAllCleanup() {
  await operator?.stop();
  await nc?.close();
  await sandbox.cleanup();
  await sites?.stop();
}
afterAll(afterAllCleanup);

async function kubectlApply(manifest: object) {
  const result = await clusters.kubectl(clusters.a, ["apply", "-f", "-"], { input: JSON.stringify(manifest) });
  expect(result.stderr).toBe("");
}

/** Wait until the object's condition `type` has `status`; returns the object. */
async function condition<T extends Application | ProtectionPolicy>(
  plural: string,
  name: string,
  type: string,
  status: string,
): Promise<T> {
  return waitFor(
    `${plural}/${name} ${type}=${status}`,
    async () => {
      const object = (await objects.getNamespacedCustomObject({
        group: GROUP,
        version: VERSION,
        namespace: "default",
        plural,
        name,
      })) as T;
      const found = object.status?.conditions?.find((c) => c.type === type);
      return found?.status === status && found.observedGeneration === object.metadata?.generation && object;
    },
    { timeoutMs: 30_000, intervalMs: 200 },
  );
}

const policy = (name: string, spec: ProtectionPolicy["spec"]): ProtectionPolicy => ({
  apiVersion: API_VERSION,
  kind: "ProtectionPolicy",
  metadata: { name, namespace: "default" },
  spec,
});

const application = (name: string, spec: Application["spec"]): Application => ({
  apiVersion: API_VERSION,
  kind: "Application",
  metadata: { name, namespace: "default" },
  spec,
});

describe("operator", () => {
  it("puts a ProtectionPolicy into ferryd and says so in Ready", async () => {
    await kubectlApply(
      policy("gold", {
        mode: "async",
        interval: "500ms",
        rpo: "10s",
        allowedRegions: [sites.a.region, sites.b.region],
        rate: "64M",
      }),
    );
    const ready = await condition<ProtectionPolicy>("protectionpolicies", "gold", "Ready", "True");
    expect(ready.status?.conditions?.[0]).toMatchObject({ reason: "Accepted" });
    const atFerryd = await ferry.json<{ name: string; rpoMs: number; intervalMs: number; rateBytes: number }[]>(
      at("a", ["policy", "list"]),
    );
    expect(atFerryd.find((p) => p.name === "gold")).toMatchObject({
      rpoMs: 10_000,
      intervalMs: 500,
      rateBytes: 64 * 2 ** 20,
    });
  });

  it("shows what ferryd refuses beyond the schema as Ready=False with ferryd's message", async () => {
    // Valid for the CRD schema, but an async copy cannot be fresher than its interval.
    await kubectlApply(policy("too-tight", { mode: "async", interval: "5s", rpo: "1s" }));
    const refused = await condition<ProtectionPolicy>("protectionpolicies", "too-tight", "Ready", "False");
    expect(refused.status?.conditions?.[0]?.reason).toBe("Invalid");
    expect(refused.status?.conditions?.[0]?.message).toContain("--rpo 1s is shorter than the interval (5s)");
  });

  it("protects an Application: Protected, Replicating and RPOMet become True", async () => {
    await ferry.ok(at("a", ["app", "create", "shop", "--volume", "shop-db", "--size", "8M"]));
    await kubectlApply(
      application("shop", { volumes: ["shop-db"], protection: { policy: "gold", targetSite: sites.b.name } }),
    );
    await condition<Application>("applications", "shop", "Protected", "True");
    const met = await condition<Application>("applications", "shop", "RPOMet", "True");
    expect(met.status?.activeSite).toBe(sites.a.name);
    expect(met.status?.conditions?.find((c) => c.type === "Replicating")?.status).toBe("True");
    expect(met.status?.lastRecoveryPoint?.generation).toBeGreaterThanOrEqual(1);
    const rows = await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]));
    expect(rows.map((r) => [r.target, r.policy])).toEqual([[sites.b.name, "gold"]]);
    const table = await clusters.kubectl(clusters.a, ["get", "fapp", "shop"]);
    expect(table.stdout).toMatch(new RegExp(`^shop\\s+${sites.a.name}\\s+${sites.b.name}\\s+True\\s+True\\s+`, "m"));
  });

  it("shows a residency violation as a condition, and replicates nothing", async () => {
    await kubectlApply(policy("home-only", { mode: "async", allowedRegions: [sites.a.region] }));
    await condition<ProtectionPolicy>("protectionpolicies", "home-only", "Ready", "True");
    await ferry.ok(at("a", ["app", "create", "ledger", "--volume", "ledger-db", "--size", "8M"]));
    await kubectlApply(
      application("ledger", { volumes: ["ledger-db"], protection: { policy: "home-only", targetSite: sites.b.name } }),
    );
    const refused = await condition<Application>("applications", "ledger", "Protected", "False");
    const protectedCondition = refused.status?.conditions?.find((c) => c.type === "Protected");
    expect(protectedCondition?.reason).toBe("ResidencyViolation");
    expect(protectedCondition?.message).toContain(sites.b.region);
    expect(refused.status?.conditions?.find((c) => c.type === "Degraded")?.status).toBe("True");
    expect(await ferry.json<ProtectionStatus[]>(at("a", ["status", "ledger"]))).toEqual([]);
  });
});
