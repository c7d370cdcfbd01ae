/**
 * The CRDs against two real kube-apiservers (one etcd, see @ferry/testkit's two-clusters): they
 * install from the Helm chart with kubectl, the server accepts valid resources and refuses invalid
 * ones naming the field, and the status subresource behaves as Kubernetes defines it.
 */

import { Sandbox, startTwoClusters, type TwoClusters } from "@ferry/testkit";
import { type ApiException, CustomObjectsApi, KubeConfig } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { crdName } from "./crd-manifest.js";
import { GROUP, RESOURCES, VERSION } from "./crds.js";
import { CHART_DIR } from "./generate.js";
import type { Application, ProtectionPolicy } from "./resources.js";

const sandbox = new Sandbox();
let clusters: TwoClusters;

beforeAll(async () => {
  try {
    clusters = await startTwoClusters(sandbox);
    console.info(`kube-apiservers ready in ${clusters.a.startMs} ms and ${clusters.b.startMs} ms`);
    // The CRDs as the chart renders them, applied server-side (as `helm install` would create them).
    // helm renders every template before it picks some, so the workloads' image needs a name here too.
    const rendered = await clusters.helm([
      "template",
      "ferry",
      CHART_DIR,
      "--set",
      "image.repository=registry.example/ferry",
      "--show-only",
      "templates/crds/*.yaml",
    ]);
    expect(rendered.stderr).toBe("");
    for (const cluster of [clusters.a, clusters.b]) {
      const applied = await clusters.kubectl(cluster, ["apply", "--server-side", "-f", "-"], {
        input: rendered.stdout,
      });
      expect(applied.stderr).toBe("");
      expect(applied.code).toBe(0);
      const established = await clusters.kubectl(cluster, [
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        ...RESOURCES.map((r) => `crd/${crdName(r)}`),
      ]);
      expect(established.stderr).toBe("");
      expect(established.code).toBe(0);
    }
  } catch (error) {
    await sandbox.cleanup();
    throw error;
  }
});

afterAll(() => sandbox.cleanup());

const policy = (name: string, spec: Record<string, unknown>) =>
  JSON.stringify({ apiVersion: `${GROUP}/${VERSION}`, kind: "ProtectionPolicy", metadata: { name }, spec });

const application = (name: string, spec: Record<string, unknown>) =>
  JSON.stringify({ apiVersion: `${GROUP}/${VERSION}`, kind: "Application", metadata: { name }, spec });

async function apply(cluster: "a" | "b", manifest: string) {
  return clusters.kubectl(clusters[cluster], ["apply", "-f", "-", "-o", "json"], { input: manifest });
}

describe("Ferry CRDs on a real API server", () => {
  it("both clusters serve every resource, with short names and the ferry category", async () => {
    const resources = await clusters.kubectl(clusters.b, ["api-resources", `--api-group=${GROUP}`, "-o", "wide"]);
    expect(resources.code).toBe(0);
    for (const resource of RESOURCES) {
      const line = resources.stdout.split("\n").find((l) => l.startsWith(`${resource.plural} `));
      expect(line, resource.plural).toBeDefined();
      expect(line).toContain(resource.shortNames[0]);
      expect(line).toContain(resource.kind);
      expect(line).toContain(resource.scope === "Namespaced" ? "true" : "false");
      expect(line).toMatch(/\sferry$/); // the CATEGORIES column
    }
  });

  it("accepts a valid ProtectionPolicy and fills in the defaults", async () => {
    const applied = await apply(
      "a",
      policy("gold", { mode: "async", rpo: "30s", interval: "5s", allowedRegions: ["eu-de", "eu-fr"], rate: "100M" }),
    );
    expect(applied.stderr).toBe("");
    const stored = JSON.parse(applied.stdout) as ProtectionPolicy;
    expect(stored.spec).toEqual({
      mode: "async",
      rpo: "30s",
      interval: "5s",
      allowedRegions: ["eu-de", "eu-fr"],
      rate: "100M",
      retain: 3,
      consistency: "crash",
    });
    // Printer columns: what `kubectl get` shows.
    const table = await clusters.kubectl(clusters.a, ["get", "fpol", "gold"]);
    expect(table.stdout.split("\n")[0]?.split(/\s+/)).toEqual(["NAME", "MODE", "RPO", "INTERVAL", "READY", "AGE"]);
    expect(table.stdout).toMatch(/^gold\s+async\s+30s\s+5s\s+/m);
    // The clusters are independent: site b does not see site a's policy.
    const inB = await clusters.kubectl(clusters.b, ["get", "protectionpolicy", "gold"]);
    expect(inB.code).not.toBe(0);
    expect(inB.stderr).toContain('protectionpolicies.ferry.io "gold" not found');
  });

  it("accepts a valid hybrid Application: namespaces, a label selector and libvirt VMs", async () => {
    const applied = await apply(
      "a",
      application("shop", {
        kubernetes: {
          namespaces: ["shop"],
          labelSelector: {
            matchLabels: { app: "shop" },
            matchExpressions: [{ key: "tier", operator: "In", values: ["db"] }],
          },
        },
        vms: ["shop-db-vm"],
        protection: { policy: "gold", targetSite: "site-b" },
      }),
    );
    expect(applied.stderr).toBe("");
    const stored = JSON.parse(applied.stdout) as Application;
    expect(stored.spec.vms).toEqual(["shop-db-vm"]);
    expect(stored.spec.protection).toEqual({ policy: "gold", targetSite: "site-b", paused: false });
  });

  const refusals: [string, string, string][] = [
    ["a mode outside the enum", policy("p1", { mode: "fast" }), 'spec.mode: Unsupported value: "fast"'],
    ["a missing mode", policy("p2", { rpo: "5s" }), "spec.mode: Required value"],
    ["an rpo that is not a duration", policy("p3", { mode: "async", rpo: "5 minutes" }), "spec.rpo: Invalid value"],
    [
      "retain 0",
      policy("p4", { mode: "async", retain: 0 }),
      "spec.retain: Invalid value: 0: spec.retain in body should be greater than or equal to 1",
    ],
    [
      "retain above 1000",
      policy("p5", { mode: "async", retain: 1001 }),
      "spec.retain in body should be less than or equal to 1000",
    ],
    ["a zero rate", policy("p6", { mode: "async", rate: "0M" }), "spec.rate: Invalid value"],
    [
      "an upper-case region",
      policy("p7", { mode: "async", allowedRegions: ["EU-DE"] }),
      "spec.allowedRegions[0]: Invalid value",
    ],
    [
      "a duplicate region",
      policy("p8", { mode: "async", allowedRegions: ["eu-de", "eu-de"] }),
      "spec.allowedRegions[1]: Duplicate value",
    ],
    [
      "consistency outside the enum",
      policy("p9", { mode: "sync", consistency: "full" }),
      'spec.consistency: Unsupported value: "full"',
    ],
    [
      "both interval and continuous",
      policy("p10", { mode: "async", interval: "5s", continuous: true }),
      "spec.interval: Forbidden: give either interval or continuous: true, not both",
    ],
    [
      "a restore transform with an unknown op",
      policy("p11", { mode: "async", restore: { transforms: [{ patch: [{ op: "move", path: "/a" }] }] } }),
      'spec.restore.transforms[0].patch[0].op: Unsupported value: "move"',
    ],
    [
      "a restore transform whose path is not a JSON pointer",
      policy("p12", { mode: "async", restore: { transforms: [{ patch: [{ op: "remove", path: "spec" }] }] } }),
      "spec.restore.transforms[0].patch[0].path: Invalid value",
    ],
    [
      "a namespace mapping from a name that is not a namespace",
      policy("p13", { mode: "async", restore: { namespaceMapping: { Shop_1: "shop" } } }),
      "keys must be names such as shop or fast-ssd",
    ],
    [
      "an application without members",
      application("a1", {}),
      "an application needs members: kubernetes, vms or volumes",
    ],
    [
      "an application protected without a target",
      application("a2", { vms: ["vm1"], protection: { policy: "gold" } }),
      "spec.protection.targetSite: Required value",
    ],
    [
      "a label selector with an unknown operator",
      application("a3", {
        kubernetes: { namespaces: ["x"], labelSelector: { matchExpressions: [{ key: "k", operator: "Has" }] } },
      }),
      'spec.kubernetes.labelSelector.matchExpressions[0].operator: Unsupported value: "Has"',
    ],
  ];
  it.each(refusals)("refuses %s, naming the field", async (_what, manifest, message) => {
    const applied = await apply("a", manifest);
    expect(applied.code).not.toBe(0);
    expect(applied.stderr).toContain(message);
    const name = (JSON.parse(manifest) as { metadata: { name: string } }).metadata.name;
    const kind = (JSON.parse(manifest) as { kind: string }).kind.toLowerCase();
    const after = await clusters.kubectl(clusters.a, ["get", kind, name]);
    expect(after.stderr).toContain("not found");
  });

  it("keeps status in its subresource: the main endpoint ignores it, /status ignores spec", async () => {
    const config = new KubeConfig();
    config.loadFromFile(clusters.a.kubeconfig);
    const api = config.makeApiClient(CustomObjectsApi);
    const where = { group: GROUP, version: VERSION, namespace: "default", plural: "applications" };
    const created = (await api.createNamespacedCustomObject({
      ...where,
      body: {
        apiVersion: `${GROUP}/${VERSION}`,
        kind: "Application",
        metadata: { name: "ledger" },
        spec: { volumes: ["ledger-data"] },
        status: { activeSite: "ignored" },
      } satisfies Application,
    })) as Application;
    expect(created.status).toBeUndefined();
    const generation = created.metadata?.generation;

    const conditions = [
      {
        type: "Protected",
        status: "False" as const,
        observedGeneration: generation,
        lastTransitionTime: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
        reason: "NoPolicy",
        message: "the application has no protection: set spec.protection",
      },
    ];
    const withStatus = (await api.replaceNamespacedCustomObjectStatus({
      ...where,
      name: "ledger",
      body: {
        ...created,
        spec: { volumes: ["changed-through-status"] },
        status: { observedGeneration: generation, conditions },
      },
    })) as Application;
    expect(withStatus.spec.volumes).toEqual(["ledger-data"]);
    expect(withStatus.status?.conditions?.[0]?.reason).toBe("NoPolicy");
    expect(withStatus.metadata?.generation).toBe(generation);

    // A status that breaks the schema is refused too.
    const badStatus = api.replaceNamespacedCustomObjectStatus({
      ...where,
      name: "ledger",
      body: { ...withStatus, status: { conditions: [{ ...conditions[0], status: "Maybe" }] } },
    });
    const refusal = await badStatus.then(
      () => undefined,
      (error: unknown) => error as ApiException<string>,
    );
    expect(refusal?.code).toBe(422);
    const causes = (JSON.parse(refusal?.body ?? "{}") as { details?: { causes?: { field: string; reason: string }[] } })
      .details?.causes;
    expect(causes).toContainEqual({
      reason: "FieldValueNotSupported",
      field: "status.conditions[0].status",
      message: 'Unsupported value: "Maybe": supported values: "True", "False", "Unknown"',
    });

    const table = await clusters.kubectl(clusters.a, ["get", "fapp", "ledger", "-o", "wide"]);
    expect(table.stdout.split("\n")[0]?.split(/\s+/)).toEqual([
      "NAME",
      "ACTIVE",
      "TARGET",
      "PROTECTED",
      "RPOMET",
      "LAG",
      "DEGRADED",
      "AGE",
    ]);
    // Active and Target are empty (no status.activeSite, no spec.protection): Protected is the first value.
    expect(table.stdout).toMatch(/^ledger\s+False\s+/m);
  });

  it("refuses changes to a recovery operation's spec", async () => {
    const failover = (targetSite: string) =>
      JSON.stringify({
        apiVersion: `${GROUP}/${VERSION}`,
        kind: "Failover",
        metadata: { name: "fo1" },
        spec: { application: "shop", targetSite },
      });
    expect((await apply("b", failover("site-b"))).code).toBe(0);
    const changed = await apply("b", failover("site-c"));
    expect(changed.code).not.toBe(0);
    expect(changed.stderr).toContain("an operation's spec is immutable: create a new one");
  });
});
