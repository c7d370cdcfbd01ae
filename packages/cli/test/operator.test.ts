/**
 * `ferry operator` against the real things: a kube-apiserver (site A's cluster, with the CRDs that
 * @ferry/k8s-adapter generates), two NATS sites with one ferryd each (`ferry daemon`), and the
 * operator as a process driving site A's ferryd. Resources go in with kubectl, as a user would;
 * the test checks what a user reads back: conditions, reasons, printer columns, and ferryd's own
 * view through the `ferry` CLI.
 */
import { fileURLToPath } from "node:url";
import {
  API_VERSION,
  type Application,
  crdName,
  crdYaml,
  type Drill,
  type Failback,
  type Failover,
  type ProtectionPolicy,
  RESOURCES,
} from "@ferry/k8s-adapter";
import type { Application as FerryApplication, ProtectionStatus, RecoveryPoint } from "@ferry/orchestrator";
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

const sandbox = new Sandbox();
let sites: TwoSites;
let clusters: TwoClusters;
let ferry: FerryCli;
const ferryd = {} as Record<"a" | "b", SiteService>;

/** The CLI against one site's ferryd, as that site's `cli` user. */
const at = (site: "a" | "b", args: readonly string[]) => [
  ...args,
  "--nats",
  sites[site].cliUrl,
  "--site",
  sites[site].name,
];

beforeAll(async () => {
  try {
    ferry = new FerryCli(sandbox, BIN);
    [sites, clusters] = await Promise.all([startTwoSites(), startTwoClusters(sandbox)]);
    // Each ferryd manages its site's cluster: Kubernetes objects can be application members.
    const managing = (s: "a" | "b") =>
      daemonSite(ferry, sandbox, sites[s], { extra: ["--kubeconfig", clusters[s].kubeconfig] });
    [ferryd.a, ferryd.b] = await Promise.all([managing("a"), managing("b")]);
    const crds = await clusters.kubectl(clusters.a, ["apply", "-f", "-"], {
      input: RESOURCES.map((r) => crdYaml(r)).join("---\n"),
    });
    expect(crds.stderr).toBe("");
    const established = await clusters.kubectl(clusters.a, [
      "wait",
      "--for=condition=Established",
      "--timeout=30s",
      ...RESOURCES.map((r) => `crd/${crdName(r)}`),
    ]);
    expect(established.stderr).toBe("");
    await waitFor("both sites to know each other", async () => {
      const list = await ferry.json<{ name: string }[]>(at("a", ["site", "list"]));
      return list.length === 2;
    });
    // As the chart runs it: site and NATS from the environment.
    const operator = sandbox.spawn(
      process.execPath,
      [BIN, "operator", "--kubeconfig", clusters.a.kubeconfig, "--namespaces", "default", "--resync", "1s"],
      { env: { ...process.env, FERRY_NATS: sites.a.cliUrl, FERRY_SITE: sites.a.name } },
    );
    let out = "";
    operator.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      out += chunk;
    });
    operator.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      out += chunk;
    });
    await waitFor("ferry operator to start watching", () => {
      if (operator.exitCode !== null) throw new Error(`ferry operator exited ${operator.exitCode}: ${out}`);
      return out.includes("ferry operator: watching namespaces default of https://127.0.0.1:");
    });
  } catch (error) {
    await afterAllCleanup();
    throw error;
  }
});

function sha256(s: "a" | "b", volume: string): Promise<string> {
  return exportSha256(sandbox, ferryd[s].serve.uri(volume));
}

async function afterAllCleanup() {
  await sandbox.cleanup();
  await sites?.stop();
}
afterAll(afterAllCleanup);

async function kubectlApply(manifest: object) {
  const result = await clusters.kubectl(clusters.a, ["apply", "-f", "-"], { input: JSON.stringify(manifest) });
  expect(result.stderr).toBe("");
}

/** Wait until the object's condition `type` has `status`; returns the object. */
async function condition<T extends Application | ProtectionPolicy | Drill | Failover | Failback>(
  plural: string,
  name: string,
  type: string,
  status: string,
): Promise<T> {
  let last: unknown;
  return waitFor(
    `${plural}/${name} ${type}=${status}`,
    async () => {
      const got = await clusters.kubectl(clusters.a, ["get", plural, name, "-o", "json"]);
      if (got.code !== 0) throw new Error(got.stderr);
      const object = JSON.parse(got.stdout) as T;
      last = object.status?.conditions;
      const found = object.status?.conditions?.find((c) => c.type === type);
      return found?.status === status && found.observedGeneration === object.metadata?.generation && object;
    },
    { timeoutMs: 30_000, intervalMs: 200 },
  ).catch((error: Error) => {
    throw new Error(`${error.message}; its conditions: ${JSON.stringify(last)}`);
  });
}

interface KubeEvent {
  type: string;
  reason: string;
  message: string;
  reportingInstance: string;
  involvedObject: { kind: string; name: string };
}

/** Wait for an Event about `name` that `match` picks; returns it. */
function eventsOf(name: string, match: (event: KubeEvent) => boolean): Promise<KubeEvent> {
  return waitFor(`an event about ${name}`, async () => {
    const got = await clusters.kubectl(clusters.a, [
      "get",
      "events",
      "--field-selector",
      `involvedObject.name=${name}`,
      "-o",
      "json",
    ]);
    return (JSON.parse(got.stdout) as { items: KubeEvent[] }).items.find(match);
  });
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
    // And as a Warning Event, which `kubectl describe` shows.
    const warning = await eventsOf("ledger", (e) => e.message.startsWith("Protected=False: "));
    expect(warning).toMatchObject({ type: "Warning", reason: "ResidencyViolation", reportingInstance: sites.a.name });
  });

  it("runs a Drill as ferryd's operation and reports its steps until Succeeded", async () => {
    await kubectlApply({
      apiVersion: API_VERSION,
      kind: "Drill",
      metadata: { name: "shop-drill-1", namespace: "default" },
      spec: { application: "shop", site: sites.b.name },
    } satisfies Drill);
    const drill = await condition<Drill>("drills", "shop-drill-1", "Succeeded", "True");
    expect(drill.status?.phase).toBe("Succeeded");
    expect(drill.status?.operationSite).toBe(sites.b.name);
    expect(drill.status?.steps?.length).toBeGreaterThan(0);
    expect(drill.status?.steps?.every((step) => step.state === "done" || step.state === "skipped")).toBe(true);
    // ferryd at B ran exactly that one operation.
    const operations = await ferry.json<{ id: string; kind: string; state: string }[]>(
      at("b", ["operation", "--app", "shop"]),
    );
    expect(operations.filter((o) => o.kind === "drill")).toEqual([
      expect.objectContaining({ id: drill.status?.operationId, state: "succeeded" }),
    ]);
    const succeeded = await eventsOf("shop-drill-1", (e) => e.reason === "Succeeded");
    expect(succeeded).toMatchObject({ type: "Normal", involvedObject: { kind: "Drill", name: "shop-drill-1" } });
    const table = await clusters.kubectl(clusters.a, ["get", "fdr", "shop-drill-1"]);
    expect(table.stdout).toMatch(new RegExp(`^shop-drill-1\\s+shop\\s+${sites.b.name}\\s+Succeeded\\s+`, "m"));
  });

  it("cleans a Drill up at ferryd before Kubernetes deletes it (finalizer)", async () => {
    const got = await clusters.kubectl(clusters.a, [
      "get",
      "fdr",
      "shop-drill-1",
      "-o",
      "jsonpath={.metadata.finalizers}",
    ]);
    expect(got.stdout).toBe('["ferry.io/drill-cleanup"]');
    const drillCopies = async () =>
      (await ferry.json<{ name: string }[]>(["volume", "list", "--data", ferryd.b.data]))
        .map((v) => v.name)
        .filter((n) => n.endsWith("-drill"));
    expect(await drillCopies()).not.toEqual([]);
    const deleted = await clusters.kubectl(clusters.a, ["delete", "fdr", "shop-drill-1", "--timeout=60s"]);
    expect(deleted.stderr).toBe("");
    expect(await drillCopies()).toEqual([]);
    const operations = await ferry.json<{ kind: string; state: string }[]>(at("b", ["operation", "--app", "shop"]));
    expect(operations.filter((o) => o.kind === "drill-cleanup")).toEqual([
      expect.objectContaining({ state: "succeeded" }),
    ]);
  });

  it("protects an Application's Kubernetes objects with their PVC's volume, fails it over with a Failover resource and back with a Failback", async () => {
    const regions = [sites.a.region, sites.b.region];
    await kubectlApply(
      policy("store-gold", { mode: "async", interval: "1s", rpo: "10s", retain: 60, allowedRegions: regions }),
    );
    await condition<ProtectionPolicy>("protectionpolicies", "store-gold", "Ready", "True");
    // The workload at cluster A: a StatefulSet whose claim is on the Ferry volume store-data.
    await ferry.ok(["volume", "create", "store-data", "--size", "8M", "--data", ferryd.a.data]);
    await qemuIo(sandbox, ferryd.a.serve.uri("store-data"), ["write -P 0x3c 0 1M"]);
    const written = await sha256("a", "store-data");
    const objects = shopObjects({ namespace: "store", volume: "store-data" });
    const applied = await clusters.kubectl(clusters.a, ["apply", "-f", "-"], {
      input: objects.map((o) => JSON.stringify(o)).join("\n"),
    });
    expect(applied.stderr).toBe("");
    await kubectlApply(
      application("store", {
        kubernetes: { namespaces: ["store"], labelSelector: { matchLabels: { app: "shop" } } },
        protection: { policy: "store-gold", targetSite: sites.b.name },
      }),
    );
    await condition<Application>("applications", "store", "Protected", "True");
    await condition<Application>("applications", "store", "RPOMet", "True");
    const [app] = (await ferry.json<FerryApplication[]>(at("a", ["app", "list"]))).filter((a) => a.name === "store");
    expect(app).toMatchObject({
      volumes: ["store-data"],
      kubernetes: { namespaces: ["store"], labelSelector: "app=shop" },
    });
    // The point to recover: one whose capture is stored (a newer generation may complete before its
    // capture is written), kept long enough by the store-gold policy.
    const point = await waitFor(
      "a recovery point of store with its objects",
      async () =>
        (await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "store"]))).find((p) => p.members === 1),
      { timeoutMs: 30_000 },
    );

    await kubectlApply({
      apiVersion: API_VERSION,
      kind: "Failover",
      metadata: { name: "store-failover-1", namespace: "default" },
      spec: { application: "store", targetSite: sites.b.name, recoveryPoint: point.generation },
    } satisfies Failover);
    const failedOver = await condition<Failover>("failovers", "store-failover-1", "Succeeded", "True");
    expect(failedOver.status?.steps?.find((s) => s.name === "recover-members")?.detail).toContain("namespace store");
    const atB = async (kind: string, name: string) =>
      JSON.parse((await clusters.kubectl(clusters.b, ["get", kind, name, "-n", "store", "-o", "json"])).stdout) as {
        data?: Record<string, string>;
        spec: { volumeName?: string; replicas?: number; csi?: { volumeHandle: string } };
      };
    expect((await atB("configmap", "shop-config")).data).toEqual({ greeting: "hello from A" });
    const claim = await atB("pvc", "data-db-0");
    const pv = JSON.parse(
      (await clusters.kubectl(clusters.b, ["get", "pv", claim.spec.volumeName ?? "none", "-o", "json"])).stdout,
    ) as { spec: { csi: { volumeHandle: string } } };
    expect(pv.spec.csi.volumeHandle).toBe("store-data");
    expect(await sha256("b", "store-data")).toBe(written);
    // The Application at A says where it runs now, and that nothing protects it from there yet.
    const moved = await condition<Application>("applications", "store", "Protected", "False");
    expect(moved.status?.activeSite).toBe(sites.b.name);
    expect(moved.status?.conditions?.find((c) => c.type === "Protected")).toMatchObject({
      reason: "RunsElsewhere",
      message: expect.stringContaining(`runs at site ${sites.b.name}`),
    });

    // Home again: the application left B stopped (replicas 0) and runs at A with B's data.
    await qemuIo(sandbox, ferryd.b.serve.uri("store-data"), ["write -P 0xc3 1M 64K"]);
    const changed = await sha256("b", "store-data");
    await kubectlApply({
      apiVersion: API_VERSION,
      kind: "Failback",
      metadata: { name: "store-failback-1", namespace: "default" },
      spec: { application: "store" },
    } satisfies Failback);
    await condition<Failback>("failbacks", "store-failback-1", "Succeeded", "True");
    expect(await sha256("a", "store-data")).toBe(changed);
    expect((await atB("statefulset", "db")).spec.replicas).toBe(0);
    // Home: while the failback runs the Application still reports site B (protected back to A by
    // then); it says site A once the operator's next reconcile sees it there.
    await waitFor(
      "the Application to report it runs at site A again, protected",
      async () => {
        const got = JSON.parse(
          (await clusters.kubectl(clusters.a, ["get", "fapp", "store", "-o", "json"])).stdout,
        ) as Application;
        const protectedNow = got.status?.conditions?.find((c) => c.type === "Protected")?.status === "True";
        return got.status?.activeSite === sites.a.name && protectedNow;
      },
      { timeoutMs: 30_000 },
    );
  });

  it("fails a Failover that ferryd refuses, with ferryd's reason, starting nothing", async () => {
    // shop runs at site A: there is nothing to fail over to A.
    await kubectlApply({
      apiVersion: API_VERSION,
      kind: "Failover",
      metadata: { name: "shop-to-a", namespace: "default" },
      spec: { application: "shop", targetSite: sites.a.name },
    } satisfies Failover);
    const failed = await condition<Failover>("failovers", "shop-to-a", "Succeeded", "False");
    expect(failed.status?.phase).toBe("Failed");
    expect(failed.status?.error?.code).toBe("Conflict");
    expect(failed.status?.error?.message).toContain(`runs at site ${sites.a.name} already; nothing to fail over`);
    for (const site of ["a", "b"] as const) {
      const operations = await ferry.json<{ kind: string }[]>(at(site, ["operation", "--app", "shop"]));
      expect(operations.filter((o) => o.kind === "failover")).toEqual([]);
    }
  });

  it("unprotects an Application at ferryd before Kubernetes deletes it (finalizer)", async () => {
    const got = await clusters.kubectl(clusters.a, ["get", "fapp", "shop", "-o", "jsonpath={.metadata.finalizers}"]);
    expect(got.stdout).toBe('["ferry.io/protection"]');
    expect(await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]))).toHaveLength(1);
    const deleted = await clusters.kubectl(clusters.a, ["delete", "fapp", "shop", "--timeout=30s"]);
    expect(deleted.stderr).toBe("");
    expect(deleted.stdout).toContain('application.ferry.io "shop" deleted');
    expect(await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]))).toEqual([]);
  });
});
