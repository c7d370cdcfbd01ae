/** The Kubernetes adapter's pure parts: member names, drill namespaces, replicas brought back after a stop. */
import { describe, expect, it } from "vitest";
import { drillNamespace, memberSelection } from "./kubernetes-adapter.js";
import { restoredManifest, STOPPED_REPLICAS_ANNOTATION } from "./manifests.js";

describe("Kubernetes members", () => {
  it("reads `namespace` and `namespace?selector`, and refuses what is not a namespace", () => {
    expect(memberSelection("shop")).toEqual({ namespaces: ["shop"] });
    expect(memberSelection("shop?app=shop,tier in (db)")).toEqual({
      namespaces: ["shop"],
      labelSelector: "app=shop,tier in (db)",
    });
    expect(memberSelection("shop?")).toEqual({ namespaces: ["shop"] });
    expect(() => memberSelection("Shop?app=x")).toThrow("'Shop' is not a namespace name");
  });

  it("names a drill's namespace within the 63 characters of a DNS label", () => {
    expect(drillNamespace("shop")).toBe("shop-drill");
    expect(drillNamespace("n".repeat(63))).toHaveLength(63);
  });
});

describe("a workload stopped by a planned migration", () => {
  const stopped = (replicas: number) => ({
    apiVersion: "apps/v1",
    kind: "StatefulSet",
    metadata: { name: "db", namespace: "shop", annotations: { [STOPPED_REPLICAS_ANNOTATION]: "3", keep: "me" } },
    spec: { replicas },
  });

  it("comes back with the count it ran with, and without the annotation", () => {
    expect(restoredManifest(stopped(0), {})).toEqual({
      ...stopped(0),
      metadata: { name: "db", namespace: "shop", annotations: { keep: "me" } },
      spec: { replicas: 3 },
    });
  });

  it("keeps its own count when it was scaled up again since", () => {
    expect(restoredManifest(stopped(5), {}).spec).toEqual({ replicas: 5 });
  });
});
