/** The Helm chart (infra/helm/ferry) through the real helm: lint, render, values schema, RBAC, image. */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { k8sTools, Sandbox } from "@ferry/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { parse, parseAllDocuments } from "yaml";
import { RESOURCES } from "./crds.js";
import { CHART_DIR, REPO_ROOT } from "./generate.js";
import { CAPTURED_KINDS } from "./manifests.js";

/** Ferry publishes no image, so every render names one, as a user's install must. */
const IMAGE_REPOSITORY = "registry.example:5000/dr/ferry";

const sandbox = new Sandbox();
afterAll(() => sandbox.cleanup());

interface Rule {
  apiGroups: string[];
  resources: string[];
  verbs: string[];
  resourceNames?: string[];
}

interface Manifest {
  kind: string;
  metadata: { name: string; namespace?: string; annotations?: Record<string, string> };
  rules?: Rule[];
  roleRef?: { kind: string; name: string };
  subjects?: { kind: string; name: string; namespace?: string }[];
  spec?: Record<string, unknown>;
  automountServiceAccountToken?: boolean;
}

type PodOwner = {
  template: {
    spec: { automountServiceAccountToken?: boolean; containers: { args: string[]; image: string; env?: unknown[] }[] };
  };
};

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
    // ferryd captures and restores this cluster's objects itself, through its service account.
    const ferrydAccount = manifests.find((m) => m.kind === "ServiceAccount" && m.metadata.name === "ferry-ferryd");
    expect(ferrydAccount?.automountServiceAccountToken).toBe(true);
    const ferryd = manifests.find((m) => m.kind === "StatefulSet")?.spec as PodOwner | undefined;
    expect(ferryd?.template.spec.automountServiceAccountToken).toBe(true);
    expect(ferryd?.template.spec.containers[0]?.args).toContain("--kubernetes");
  });

  it("grants no wildcard, in any combination of the RBAC values", async () => {
    for (const set of [
      [],
      ["ferryd.kubernetes.restore=false"],
      ["kubernetes.namespaces={shop,shop-drill}"],
      ["kubernetes.namespaces={shop}", "ferryd.kubernetes.restore=false"],
    ]) {
      const rules = (await render(...set)).flatMap((m) => m.rules ?? []);
      expect(rules.length, set.join(" ")).toBeGreaterThan(0);
      for (const rule of rules) {
        expect([...rule.apiGroups, ...rule.resources, ...rule.verbs], set.join(" ")).not.toContain("*");
        expect(rule.resourceNames, set.join(" ")).toBeUndefined();
      }
    }
  });

  it("gives the operator the ferry.io resources, Events and its Lease, and nothing of a user's workloads", async () => {
    const granted = permissions(await render(), "ferry-operator");
    const outsideFerry = [...granted].filter((p) => !p.startsWith("ferry.io/"));
    expect(outsideFerry.sort()).toEqual(
      [
        ...["create", "patch"].flatMap((verb) => [`/events:${verb}`, `events.k8s.io/events:${verb}`]),
        ...["get", "create", "update"].map((verb) => `coordination.k8s.io/leases:${verb}`),
      ].sort(),
    );
    // Drills carry the finalizer ferry.io/drill-cleanup: setting it needs drills/finalizers.
    expect(granted).toContain("ferry.io/drills/finalizers:update");
    expect(granted).toContain("ferry.io/applications/finalizers:update");
  });

  it("gives ferryd exactly what its Kubernetes adapter does: capture, recover, stop, drill cleanup", async () => {
    const all = ["get", "list", "create", "patch", "delete"];
    expect(permissions(await render(), "ferry-ferryd")).toEqual(
      new Set([
        // capture lists the kinds and reads a PVC's PV; recover applies them server-side (create +
        // patch) and reads existing PVCs and PVs; stop merge-patches Deployments and StatefulSets;
        // cleanupDrill lists and deletes them, the drill's namespaces and its PVs.
        ...CAPTURED_KINDS.flatMap(({ apiVersion, kind }) => all.map((verb) => grant(apiVersion, kind, verb))),
        ...all.map((verb) => grant("v1", "PersistentVolume", verb)),
        ...["list", "create", "patch", "delete"].map((verb) => grant("v1", "Namespace", verb)),
        // capture finds the custom resource kinds: their objects are listed where RBAC allows.
        "apiextensions.k8s.io/customresourcedefinitions:list",
      ]),
    );
  });

  it("grants the custom resources named in ferryd.kubernetes.customResources", async () => {
    const granted = permissions(
      await render(
        "ferryd.kubernetes.customResources[0].apiGroup=example.com",
        "ferryd.kubernetes.customResources[0].resources={widgets,gadgets}",
      ),
      "ferry-ferryd",
    );
    for (const verb of ["get", "list", "create", "patch", "delete"]) {
      expect(granted).toContain(`example.com/widgets:${verb}`);
      expect(granted).toContain(`example.com/gadgets:${verb}`);
    }
    const readOnly = permissions(
      await render(
        "ferryd.kubernetes.restore=false",
        "ferryd.kubernetes.customResources[0].apiGroup=example.com",
        "ferryd.kubernetes.customResources[0].resources={widgets}",
      ),
      "ferry-ferryd",
    );
    expect([...readOnly].filter((g) => g.startsWith("example.com/"))).toEqual([
      "example.com/widgets:get",
      "example.com/widgets:list",
    ]);
  });

  it("makes ferryd read-only with ferryd.kubernetes.restore=false: capture, and nothing else", async () => {
    expect(permissions(await render("ferryd.kubernetes.restore=false"), "ferry-ferryd")).toEqual(
      new Set([
        ...CAPTURED_KINDS.flatMap(({ apiVersion, kind }) => ["get", "list"].map((v) => grant(apiVersion, kind, v))),
        grant("v1", "PersistentVolume", "get"),
        "apiextensions.k8s.io/customresourcedefinitions:list",
      ]),
    );
  });

  it("binds ferryd to nothing, mounts no token and passes no --kubernetes with ferryd.kubernetes.enabled=false", async () => {
    const manifests = await render("ferryd.kubernetes.enabled=false");
    expect(permissions(manifests, "ferry-ferryd")).toEqual(new Set());
    const ferrydRbac = manifests.filter((m) => /Role/.test(m.kind) && m.metadata.name.startsWith("ferry-ferryd"));
    expect(ferrydRbac).toEqual([]);
    const account = manifests.find((m) => m.kind === "ServiceAccount" && m.metadata.name === "ferry-ferryd");
    expect(account?.automountServiceAccountToken).toBe(false);
    const ferryd = manifests.find((m) => m.kind === "StatefulSet")?.spec as PodOwner | undefined;
    expect(ferryd?.template.spec.automountServiceAccountToken).toBe(false);
    expect(ferryd?.template.spec.containers[0]?.args).not.toContain("--kubernetes");
    // The operator keeps its own.
    expect(permissions(manifests, "ferry-operator")).toContain("ferry.io/applications:watch");
  });

  it("leaves the CRDs out with manageCRDs=false and binds namespaced RBAC only in kubernetes.namespaces", async () => {
    const manifests = await render("manageCRDs=false", "kubernetes.namespaces={shop,ledger}");
    expect(manifests.filter((m) => m.kind === "CustomResourceDefinition")).toEqual([]);
    for (const name of ["ferry-operator", "ferry-ferryd"]) {
      const bindings = manifests.filter((m) => m.kind === "RoleBinding" && m.metadata.name === name);
      expect(bindings.map((b) => b.metadata.namespace)).toEqual(["shop", "ledger"]);
      expect(bindings.map((b) => b.roleRef)).toEqual([
        { apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name },
        { apiGroup: "rbac.authorization.k8s.io", kind: "ClusterRole", name },
      ]);
      expect(manifests.find((m) => m.kind === "ClusterRoleBinding" && m.metadata.name === name)).toBeUndefined();
    }
    // What no namespace can hold stays cluster-wide, and holds no namespaced kind.
    const clusterBound = manifests
      .filter((m) => m.kind === "ClusterRoleBinding")
      .map((m) => m.metadata.name)
      .sort();
    expect(clusterBound).toEqual(["ferry-ferryd-cluster", "ferry-operator-cluster"]);
    const clusterRules = manifests
      .filter((m) => m.kind === "ClusterRole" && clusterBound.includes(m.metadata.name))
      .flatMap((m) => m.rules ?? []);
    expect([...new Set(clusterRules.flatMap((r) => r.resources))].sort()).toEqual([
      "customresourcedefinitions",
      "namespaces",
      "persistentvolumes",
      "sites",
      "sites/status",
    ]);
  });

  it("runs `ferry operator` and `ferry daemon` with this site's settings", async () => {
    const manifests = await render("kubernetes.namespaces={shop,ledger}", "site.region=eu-de");
    const container = (kind: string) =>
      (manifests.find((m) => m.kind === kind)?.spec as PodOwner | undefined)?.template.spec.containers[0];
    expect(container("Deployment")?.args).toEqual(["operator", "--resync=30s", "--namespaces=shop,ledger"]);
    expect(container("StatefulSet")?.args).toEqual([
      "daemon",
      "--region=eu-de",
      "--data=/var/lib/ferry",
      "--listen=0.0.0.0:10809",
      "--metrics=0.0.0.0:9464",
      "--kubernetes",
    ]);
  });

  it("gives ferryd a direct route per ferryd.peers entry, its URL from the Secret", async () => {
    const manifests = await render(
      "ferryd.peers[0].site=site-b",
      "ferryd.peers[0].urlSecret.name=peer-b",
      "ferryd.peers[0].urlSecret.key=url",
      "ferryd.peers[1].site=site-c",
      "ferryd.peers[1].urlSecret.name=peer-c",
      "ferryd.peers[1].urlSecret.key=url",
    );
    const container = (manifests.find((m) => m.kind === "StatefulSet")?.spec as PodOwner | undefined)?.template.spec
      .containers[0];
    // In the environment, from the Secrets: no password on the command line.
    expect(container?.args.some((a) => a.startsWith("--peer-nats"))).toBe(false);
    const env = JSON.stringify(container?.env);
    expect(env).toContain('{"name":"FERRY_PEER_0","valueFrom":{"secretKeyRef":{"name":"peer-b","key":"url"}}}');
    expect(env).toContain('{"name":"FERRY_PEER_1","valueFrom":{"secretKeyRef":{"name":"peer-c","key":"url"}}}');
    // After the variables it refers to, as the kubelet's expansion needs.
    expect(env).toMatch(
      /FERRY_PEER_1.*"name":"FERRY_PEER_NATS","value":"site-b=\$\(FERRY_PEER_0\) site-c=\$\(FERRY_PEER_1\)"/,
    );
    const defaults = await render();
    const plain = (defaults.find((m) => m.kind === "StatefulSet")?.spec as PodOwner | undefined)?.template.spec
      .containers[0];
    expect(plain?.args.some((a) => a.startsWith("--peer-nats"))).toBe(false);
    expect(JSON.stringify(plain?.env)).not.toContain("FERRY_PEER");
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
    for (const [flag, value, field] of [
      ["--set-string", "ferryd.kubernetes.enabled=yes", /ferryd\.kubernetes\.enabled|\/ferryd\/kubernetes\/enabled/],
      ["--set", "ferryd.kubernetes.restore=1", /ferryd\.kubernetes\.restore|\/ferryd\/kubernetes\/restore/],
      ["--set", "kubernetes.namespaces=shop", /kubernetes\.namespaces|\/kubernetes\/namespaces/],
      ["--set", "kubernetes.namespaces={Shop}", /kubernetes\.namespaces|\/kubernetes\/namespaces/],
      ["--set", "ferryd.kubernetes.customResources[0].apiGroup=Example_Com", /customResources/],
      // Gone with the move of the workload permissions to ferryd: refused, not silently ignored.
      ["--set", "operator.restore=false", /restore/],
      ["--set", "operator.watchNamespaces={shop}", /watchNamespaces/],
    ] as const) {
      const wrong = await helm([
        "template",
        "ferry",
        CHART_DIR,
        "--set",
        `image.repository=${IMAGE_REPOSITORY}`,
        flag,
        value,
      ]);
      expect(wrong.code, value).not.toBe(0);
      expect(wrong.stderr, value).toMatch(field);
    }
  });
});

/** `group/resource:verb` for one kind (`v1`, `PersistentVolume`, `get` → `/persistentvolumes:get`). */
function grant(apiVersion: string, kind: string, verb: string): string {
  const group = apiVersion.includes("/") ? apiVersion.split("/")[0] : "";
  return `${group}/${kind.toLowerCase()}s:${verb}`;
}

/** Every `group/resource:verb` the roles bound to the service account `account` grant it. */
function permissions(manifests: Manifest[], account: string): Set<string> {
  const roles = new Map(
    manifests
      .filter((m) => m.kind === "ClusterRole" || m.kind === "Role")
      .map((m) => [`${m.kind}/${m.metadata.namespace ?? ""}/${m.metadata.name}`, m]),
  );
  const granted = new Set<string>();
  for (const binding of manifests.filter((m) => m.kind === "ClusterRoleBinding" || m.kind === "RoleBinding")) {
    if (!binding.subjects?.some((s) => s.kind === "ServiceAccount" && s.name === account)) continue;
    const ref = binding.roleRef;
    if (ref === undefined) continue;
    const key = ref.kind === "Role" ? `Role/${binding.metadata.namespace}/${ref.name}` : `ClusterRole//${ref.name}`;
    const role = roles.get(key);
    expect(role, `${binding.kind} ${binding.metadata.name} refers to ${key}`).toBeDefined();
    for (const rule of role?.rules ?? []) {
      for (const group of rule.apiGroups) {
        for (const resource of rule.resources) {
          for (const verb of rule.verbs) granted.add(`${group}/${resource}:${verb}`);
        }
      }
    }
  }
  return granted;
}
