/** The Helm chart (infra/helm/ferry) through the real helm: lint, render, values schema, RBAC, image. */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { k8sTools, Sandbox } from "@ferry/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { parse, parseAllDocuments } from "yaml";
import { RESOURCES } from "./crds.js";
import { CHART_DIR, REPO_ROOT } from "./generate.js";

/** Ferry publishes no image, so every render names one, as a user's install must. */
const IMAGE_REPOSITORY = "registry.example:5000/dr/ferry";

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
    ...[`image.repository=${IMAGE_REPOSITORY}`, ...set].flatMap((s) => ["--set", s]),
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

  it("runs the image named by image.repository, tagged with appVersion unless image.tag says otherwise", async () => {
    const chart = parse(await readFile(join(CHART_DIR, "Chart.yaml"), "utf8")) as { appVersion: string };
    type PodOwner = { template: { spec: { containers: { image: string }[] } } };
    const images = (manifests: Manifest[]) =>
      manifests
        .filter((m) => m.kind === "Deployment" || m.kind === "StatefulSet")
        .map((m) => (m.spec as PodOwner | undefined)?.template.spec.containers[0]?.image);
    expect(images(await render())).toEqual([
      `${IMAGE_REPOSITORY}:${chart.appVersion}`,
      `${IMAGE_REPOSITORY}:${chart.appVersion}`,
    ]);
    expect(images(await render("image.tag=0.2.0-rc.1"))).toEqual([
      `${IMAGE_REPOSITORY}:0.2.0-rc.1`,
      `${IMAGE_REPOSITORY}:0.2.0-rc.1`,
    ]);
  });

  it("refuses to render the workloads without an image, or with a malformed image name or tag", async () => {
    const none = await helm(["template", "ferry", CHART_DIR]);
    expect(none.code).not.toBe(0);
    expect(none.stderr).toContain("image.repository is required: build the image with infra/helm/ferry/Dockerfile");
    // CRDs alone need no image.
    const crdsOnly = await helm([
      "template",
      "ferry",
      CHART_DIR,
      "--set",
      "operator.enabled=false,ferryd.enabled=false",
    ]);
    expect(crdsOnly.stderr).toBe("");
    expect(crdsOnly.code).toBe(0);
    for (const [value, field] of [
      ["image.repository=ferry:latest", "/image/repository"],
      ["image.repository=Registry.example/Ferry", "/image/repository"],
      ["image.repository=registry.example/ferry@sha256:00", "/image/repository"],
      ["image.tag=not a tag", "/image/tag"],
    ] as const) {
      const bad = await helm([
        "template",
        "ferry",
        CHART_DIR,
        "--set",
        `image.repository=${IMAGE_REPOSITORY}`,
        "--set",
        value,
      ]);
      expect(bad.code, value).not.toBe(0);
      expect(bad.stderr, value).toContain(field);
    }
  });

  it("agrees with its Dockerfile on the entry point and the user", async () => {
    const dockerfile = await readFile(join(CHART_DIR, "Dockerfile"), "utf8");
    const values = parse(await readFile(join(CHART_DIR, "values.yaml"), "utf8")) as {
      podSecurityContext: { runAsUser: number; runAsGroup: number };
    };
    // The chart's args are `ferry` subcommands (daemon, operator): the entry point is the ferry bin.
    const entrypoint = JSON.parse(/^ENTRYPOINT (.+)$/m.exec(dockerfile)?.[1] ?? "[]") as string[];
    expect(entrypoint).toEqual(["node", "/opt/ferry/packages/cli/bin/ferry.js"]);
    await readFile(join(REPO_ROOT, "packages", "cli", "bin", "ferry.js")); // the bin it names exists
    expect(/^USER (.+)$/m.exec(dockerfile)?.[1]).toBe(
      `${values.podSecurityContext.runAsUser}:${values.podSecurityContext.runAsGroup}`,
    );
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
