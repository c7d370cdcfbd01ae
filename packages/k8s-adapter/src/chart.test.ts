/** The Helm chart (infra/helm/ferry) through the real helm: lint, render, values schema, RBAC. */
import { k8sTools, Sandbox } from "@ferry/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { RESOURCES } from "./crds.js";
import { CHART_DIR } from "./generate.js";

const sandbox = new Sandbox();
afterAll(() => sandbox.cleanup());

interface Manifest {
  kind: string;
  metadata: { name: string; namespace?: string; annotations?: Record<string, string> };
  rules?: { apiGroups: string[]; resources: string[]; verbs: string[] }[];
  spec?: Record<string, unknown>;
  automountServiceAccountToken?: boolean;
}

async function helm(args: string[]) {
  const home = await sandbox.dir("ferry-helm-");
  const env = { ...process.env, HELM_CACHE_HOME: home, HELM_CONFIG_HOME: home, HELM_DATA_HOME: home };
  return sandbox.run(k8sTools().helm, args, { env });
}

async function render(...set: string[]): Promise<Manifest[]> {
  const result = await helm([
    "template",
    "ferry",
    CHART_DIR,
    "--namespace",
    "ferry-system",
    ...set.flatMap((s) => ["--set", s]),
  ]);
  expect(result.stderr).toBe("");
  expect(result.code).toBe(0);
  return parseAllDocuments(result.stdout)
    .map((doc) => doc.toJS() as Manifest | null)
    .filter((m): m is Manifest => m !== null);
}

describe("Helm chart infra/helm/ferry", () => {
  it("passes helm lint --strict", async () => {
    const lint = await helm(["lint", "--strict", CHART_DIR]);
    expect(lint.stdout).toContain("1 chart(s) linted, 0 chart(s) failed");
    expect(lint.code).toBe(0);
  });

  it("renders the CRDs (kept on uninstall), the operator, ferryd and their RBAC", async () => {
    const manifests = await render();
    const crds = manifests.filter((m) => m.kind === "CustomResourceDefinition");
    expect(crds.map((c) => c.metadata.name).sort()).toEqual(RESOURCES.map((r) => `${r.plural}.ferry.io`).sort());
    for (const crd of crds) expect(crd.metadata.annotations?.["helm.sh/resource-policy"]).toBe("keep");
    const kinds = manifests.map((m) => `${m.kind}/${m.metadata.name}`);
    expect(kinds).toEqual(
      expect.arrayContaining([
        "Deployment/ferry-operator",
        "StatefulSet/ferry-ferryd",
        "Service/ferry-ferryd",
        "ServiceAccount/ferry-operator",
        "ServiceAccount/ferry-ferryd",
        "ClusterRole/ferry-operator",
        "ClusterRoleBinding/ferry-operator",
        "Role/ferry-operator-leader-election",
      ]),
    );
    // ferryd never talks to the API server.
    const ferrydAccount = manifests.find((m) => m.kind === "ServiceAccount" && m.metadata.name === "ferry-ferryd");
    expect(ferrydAccount?.automountServiceAccountToken).toBe(false);
    // Least privilege: no wildcard anywhere, and no write to a user's workloads without restore.
    const roles = manifests.filter((m) => m.kind === "ClusterRole" || m.kind === "Role");
    for (const role of roles) {
      for (const rule of role.rules ?? []) {
        expect([...rule.apiGroups, ...rule.resources, ...rule.verbs]).not.toContain("*");
      }
    }
    const readOnly = (await render("operator.restore=false")).find(
      (m) => m.kind === "ClusterRole" && m.metadata.name === "ferry-operator",
    );
    const appsRule = readOnly?.rules?.find((r) => r.apiGroups.includes("apps") && r.resources.includes("statefulsets"));
    expect(appsRule?.verbs).toEqual(["get", "list", "watch"]);
  });

  it("leaves the CRDs out with manageCRDs=false and scopes RBAC to watchNamespaces", async () => {
    const manifests = await render("manageCRDs=false", "operator.watchNamespaces={shop,ledger}");
    expect(manifests.filter((m) => m.kind === "CustomResourceDefinition")).toEqual([]);
    const bindings = manifests.filter((m) => m.kind === "RoleBinding" && m.metadata.name === "ferry-operator");
    expect(bindings.map((b) => b.metadata.namespace)).toEqual(["shop", "ledger"]);
    expect(
      manifests.find((m) => m.kind === "ClusterRoleBinding" && m.metadata.name === "ferry-operator"),
    ).toBeUndefined();
  });

  it("runs `ferry operator` and `ferry daemon` with this site's settings", async () => {
    const manifests = await render("operator.watchNamespaces={shop,ledger}", "site.region=eu-de");
    type PodOwner = { template: { spec: { containers: { args: string[] }[] } } };
    const container = (kind: string) =>
      (manifests.find((m) => m.kind === kind)?.spec as PodOwner | undefined)?.template.spec.containers[0];
    expect(container("Deployment")?.args).toEqual(["operator", "--resync=30s", "--namespaces=shop,ledger"]);
    expect(container("StatefulSet")?.args).toEqual([
      "daemon",
      "--region=eu-de",
      "--data=/var/lib/ferry",
      "--listen=0.0.0.0:10809",
      "--metrics=0.0.0.0:9464",
    ]);
  });

  it("passes the NATS settings to both workloads", async () => {
    const manifests = await render("nats.urlSecret.name=ferry-nats", "site.name=site-b");
    for (const kind of ["Deployment", "StatefulSet"]) {
      const workload = manifests.find((m) => m.kind === kind);
      const text = JSON.stringify(workload);
      expect(text).toContain('{"name":"FERRY_NATS","valueFrom":{"secretKeyRef":{"name":"ferry-nats","key":"url"}}}');
      expect(text).toContain('{"name":"FERRY_SITE","value":"site-b"}');
    }
  });

  it("refuses values that break values.schema.json, naming the value", async () => {
    const bad = await helm(["template", "ferry", CHART_DIR, "--set", "site.region=EU DE"]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/site\.region|\/site\/region/);
    const unknown = await helm(["template", "ferry", CHART_DIR, "--set", "operatr.enabled=false"]);
    expect(unknown.code).not.toBe(0);
    expect(unknown.stderr).toContain("operatr");
  });
});
