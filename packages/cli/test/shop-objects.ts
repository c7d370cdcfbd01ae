/**
 * A small Kubernetes application for the tests, labelled app=shop in one namespace: a StatefulSet
 * whose claim is bound to a PV on a Ferry volume (CSI driver csi.ferry.io), a ConfigMap, a Secret,
 * a Service — and one ConfigMap with another label, which a selection of app=shop leaves out.
 */
export function shopObjects({ namespace, volume }: { namespace: string; volume: string }): object[] {
  return [
    { apiVersion: "v1", kind: "Namespace", metadata: { name: namespace } },
    {
      apiVersion: "v1",
      kind: "ConfigMap",
      metadata: { name: "shop-config", namespace, labels: { app: "shop" } },
      data: { greeting: "hello from A" },
    },
    {
      apiVersion: "v1",
      kind: "ConfigMap",
      metadata: { name: "unrelated", namespace, labels: { app: "other" } },
      data: { x: "not captured" },
    },
    {
      apiVersion: "v1",
      kind: "Secret",
      metadata: { name: "shop-db", namespace, labels: { app: "shop" } },
      stringData: { password: "s3cret" },
    },
    {
      apiVersion: "v1",
      kind: "Service",
      metadata: { name: "db", namespace, labels: { app: "shop" } },
      spec: { selector: { app: "shop" }, ports: [{ port: 5432 }] },
    },
    {
      apiVersion: "apps/v1",
      kind: "StatefulSet",
      metadata: { name: "db", namespace, labels: { app: "shop" } },
      spec: {
        replicas: 2,
        serviceName: "db",
        selector: { matchLabels: { app: "shop" } },
        template: {
          metadata: { labels: { app: "shop" } },
          spec: {
            containers: [{ name: "db", image: "postgres:17", volumeMounts: [{ name: "data", mountPath: "/d" }] }],
          },
        },
        volumeClaimTemplates: [
          {
            metadata: { name: "data", labels: { app: "shop" } },
            spec: { accessModes: ["ReadWriteOnce"], resources: { requests: { storage: "8Mi" } } },
          },
        ],
      },
    },
    {
      apiVersion: "v1",
      kind: "PersistentVolume",
      metadata: { name: `pv-${volume}` },
      spec: {
        capacity: { storage: "8Mi" },
        accessModes: ["ReadWriteOnce"],
        persistentVolumeReclaimPolicy: "Retain",
        claimRef: { namespace, name: "data-db-0" },
        csi: { driver: "csi.ferry.io", volumeHandle: volume },
      },
    },
    {
      apiVersion: "v1",
      kind: "PersistentVolumeClaim",
      metadata: { name: "data-db-0", namespace, labels: { app: "shop" } },
      spec: {
        accessModes: ["ReadWriteOnce"],
        resources: { requests: { storage: "8Mi" } },
        volumeName: `pv-${volume}`,
        storageClassName: "",
      },
    },
  ];
}
