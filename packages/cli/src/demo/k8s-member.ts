/**
 * The Kubernetes part of the demo's hybrid application: namespace `web` in site A's cluster — a
 * StatefulSet whose claim is bound to a PV on the Ferry volume `web-data` (CSI driver
 * `csi.ferry.io`, volume handle = the volume), a ConfigMap, a Secret and a Service, all labelled
 * app=web. The application selects them by namespace and label, so the volume under the claim joins
 * its consistency group and the objects are captured with every cut. After the failover, site B's
 * cluster holds the same objects with the claim bound to a PV on B's replica, whose bytes are what
 * was written at A.
 *
 * The clusters are real kube-apiservers (one etcd for both, `@ferry/local-clusters`, built once
 * per machine by infra/setup-k8s.sh), with no kubelet: the objects are what is checked, and the
 * volume's data is read over NBD as a node would attach it.
 */
import { createHash } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Cluster, k8sTools, Sandbox, startTwoClusters } from "@ferry/local-clusters";
import { DemoCheckFailed, ToolMissing } from "../errors.js";
import type { DemoSite } from "./demo-host.js";
import type { FerrydOptions, HybridHost, HybridMember, MemberCheck } from "./hybrid-demo.js";

const NAMESPACE = "web";
const VOLUME = "web-data";
const VOLUME_SIZE = "16M";
const CONFIG = { greeting: "hello from site A", tier: "gold" };
/** The objects a user reads back: their kinds and names in restore order. */
const SELECTED = ["configmap/web-config", "secret/web-db", "service/web", "statefulset/web-db", "pvc/data-web-db-0"];

export class K8sMember implements HybridMember {
  readonly title = `Kubernetes namespace ${NAMESPACE}`;
  private readonly clusters = new Map<string, Cluster>();
  private kubectlDir = "";
  private wrote = "";
  private objectsAtA = "";
  private wroteAt = "";

  constructor(private readonly host: HybridHost) {}

  checkInstalled(): void {
    try {
      this.kubectlDir = k8sTools().binDir;
    } catch (error) {
      throw new ToolMissing(
        `the demo's hybrid application has Kubernetes objects, but ${(error as Error).message.split("\n")[0]}: ` +
          "run `bash infra/setup.sh` (it builds them once)",
      );
    }
  }

  async prepare(sites: { a: string; b: string }): Promise<void> {
    const sandbox = new Sandbox();
    this.host.own("the Kubernetes API servers of both sites and their etcd", async () => {
      await sandbox.cleanup();
      return "stopped the kube-apiservers of both sites and their etcd";
    });
    const clusters = await this.host.step(startTwoClusters(sandbox));
    this.clusters.set(sites.a, clusters.a);
    this.clusters.set(sites.b, clusters.b);
  }

  async describe(): Promise<void> {
    const { narrator } = this.host;
    narrator.step("Sites A and B each have a Kubernetes cluster: a kube-apiserver of their own, one etcd for both");
    for (const [site, c] of this.clusters)
      narrator.show(`${site}: kube-apiserver ${c.server}, kubeconfig ${c.kubeconfig}`);
    narrator.show(
      `built from pinned sources by infra/setup-k8s.sh (cached in ${this.kubectlDir}); no kubelet runs here`,
    );
  }

  ferrydOptions(site: string): FerrydOptions {
    const c = this.clusters.get(site);
    return c === undefined ? {} : { kubernetes: { kubeconfig: c.kubeconfig, kubectlDir: this.kubectlDir } };
  }

  async create(a: DemoSite): Promise<string[]> {
    const { host } = this;
    host.narrator.show("(at sites A and B, KUBECONFIG names the site's cluster; ferryd runs with --kubeconfig)");
    await host.ferry(a, ["volume", "create", VOLUME, "--size", VOLUME_SIZE]);
    const file = join(host.root, `${NAMESPACE}-k8s.json`);
    await writeFile(file, JSON.stringify({ apiVersion: "v1", kind: "List", items: objects() }, null, 2));
    host.narrator.show(
      `(${file}: namespace ${NAMESPACE} — StatefulSet web-db with its claim data-web-db-0 bound to PV ${VOLUME} ` +
        `of driver csi.ferry.io on the Ferry volume ${VOLUME}, ConfigMap, Secret, Service; one more ConfigMap not labelled app=web)`,
    );
    await host.tool(a, "kubectl", ["apply", "-f", file]);
    return ["--namespace", NAMESPACE, "--selector", "app=web"];
  }

  async write(a: DemoSite): Promise<void> {
    const { host } = this;
    // What a pod on a node would write through its attached volume.
    await host.tool(a, "qemu-io", ["-f", "raw", a.service.uri(VOLUME), "-c", "write -P 0x77 0 4M"]);
    this.wrote = await this.volumeSha256(a);
    this.objectsAtA = await this.objectsSha256(a);
    this.wroteAt = a.nats.name;
    host.narrator.show(`4 MiB written on ${VOLUME} (the PV's Ferry volume)`);
  }

  async leave(): Promise<void> {}

  async up(
    b: DemoSite,
    failoverStartedMs: number,
    abandoned: () => boolean,
  ): Promise<{ upAtMs: number; what: string }> {
    await this.host.waitFor(
      `the StatefulSet of namespace ${NAMESPACE} in site B's cluster`,
      async () =>
        abandoned() ||
        (await this.kubectl(b, ["get", "statefulset", "web-db", "-n", NAMESPACE, "--ignore-not-found", "-o", "name"]))
          .trim()
          .endsWith("web-db"),
    );
    if (abandoned()) throw new DemoCheckFailed("the failover failed: no Kubernetes objects at site B to wait for");
    const upAtMs = Date.now();
    const seconds = ((upAtMs - failoverStartedMs) / 1000).toFixed(1);
    return { upAtMs, what: `namespace ${NAMESPACE} recreated in B's cluster ${seconds}s after \`ferry failover\`` };
  }

  async verify(b: DemoSite): Promise<MemberCheck[]> {
    const { host } = this;
    await host.tool(b, "kubectl", ["get", "-n", NAMESPACE, ...SELECTED]);
    const claim = (
      await this.kubectl(b, ["get", "pvc", "data-web-db-0", "-n", NAMESPACE, "-o", "jsonpath={.spec.volumeName}"])
    ).trim();
    const handle = await host.tool(b, "kubectl", [
      "get",
      "pv",
      claim,
      "-o",
      "jsonpath={.spec.csi.driver} {.spec.csi.volumeHandle}{'\\n'}",
    ]);
    if (handle.trim() !== `csi.ferry.io ${VOLUME}`) {
      throw new DemoCheckFailed(
        `the claim at site B is bound to PV ${claim} (${handle.trim()}), not to the replica ${VOLUME}`,
      );
    }
    return [
      {
        source: `${this.wroteAt}:${VOLUME} (under PVC data-web-db-0)`,
        sourceSha256: this.wrote,
        copy: `${b.nats.name}:${VOLUME} (PV ${claim})`,
        copySha256: await this.volumeSha256(b),
      },
      {
        source: `${this.wroteAt}:namespace ${NAMESPACE} (ConfigMap, Secret data)`,
        sourceSha256: this.objectsAtA,
        copy: `${b.nats.name}:namespace ${NAMESPACE} (restored)`,
        copySha256: await this.objectsSha256(b),
      },
    ];
  }

  /** kubectl at a site, not shown. */
  private kubectl(site: DemoSite, args: readonly string[]): Promise<string> {
    return this.host.tool(site, "kubectl", args, { quiet: true });
  }

  private async volumeSha256(site: DemoSite): Promise<string> {
    const out = await this.host.tool(
      site,
      "bash",
      ["-o", "pipefail", "-c", 'nbdcopy "$1" - | sha256sum', "bash", site.service.uri(VOLUME)],
      { quiet: true },
    );
    return out.split(" ")[0] ?? "";
  }

  /** sha256 of the data the application keeps in its ConfigMap and Secret, as the cluster returns it. */
  private async objectsSha256(site: DemoSite): Promise<string> {
    const data = await this.kubectl(site, [
      "get",
      "configmap/web-config",
      "secret/web-db",
      "-n",
      NAMESPACE,
      "-o",
      "jsonpath={range .items[*]}{.kind} {.data}{'\\n'}{end}",
    ]);
    return createHash("sha256").update(data).digest("hex");
  }
}

/** The application's objects at site A (and one that is not the application's). */
function objects(): object[] {
  const labels = { app: "web" };
  const metadata = (name: string) => ({ name, namespace: NAMESPACE, labels });
  return [
    { apiVersion: "v1", kind: "Namespace", metadata: { name: NAMESPACE } },
    { apiVersion: "v1", kind: "ConfigMap", metadata: metadata("web-config"), data: CONFIG },
    {
      apiVersion: "v1",
      kind: "ConfigMap",
      metadata: { name: "scratch", namespace: NAMESPACE, labels: { app: "other" } },
      data: { note: "not the application's: not captured" },
    },
    { apiVersion: "v1", kind: "Secret", metadata: metadata("web-db"), stringData: { password: "correct horse" } },
    {
      apiVersion: "v1",
      kind: "Service",
      metadata: metadata("web"),
      spec: { selector: labels, ports: [{ port: 5432 }] },
    },
    {
      apiVersion: "apps/v1",
      kind: "StatefulSet",
      metadata: metadata("web-db"),
      spec: {
        replicas: 1,
        serviceName: "web",
        selector: { matchLabels: labels },
        template: {
          metadata: { labels },
          spec: {
            containers: [
              { name: "db", image: "postgres:17", volumeMounts: [{ name: "data", mountPath: "/var/lib/postgresql" }] },
            ],
          },
        },
        volumeClaimTemplates: [
          {
            metadata: { name: "data", labels },
            spec: {
              accessModes: ["ReadWriteOnce"],
              resources: { requests: { storage: VOLUME_SIZE.replace("M", "Mi") } },
            },
          },
        ],
      },
    },
    {
      apiVersion: "v1",
      kind: "PersistentVolume",
      metadata: { name: VOLUME },
      spec: {
        capacity: { storage: VOLUME_SIZE.replace("M", "Mi") },
        accessModes: ["ReadWriteOnce"],
        persistentVolumeReclaimPolicy: "Retain",
        storageClassName: "",
        claimRef: { namespace: NAMESPACE, name: "data-web-db-0" },
        csi: { driver: "csi.ferry.io", volumeHandle: VOLUME },
      },
    },
    {
      apiVersion: "v1",
      kind: "PersistentVolumeClaim",
      metadata: metadata("data-web-db-0"),
      spec: {
        accessModes: ["ReadWriteOnce"],
        storageClassName: "",
        volumeName: VOLUME,
        resources: { requests: { storage: VOLUME_SIZE.replace("M", "Mi") } },
      },
    },
  ];
}
