import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parse } from "yaml";
import { customResourceDefinition } from "./crd-manifest.js";
import { RESOURCES } from "./crds.js";
import { CHART_DIR, generatedFiles, REPO_ROOT } from "./generate.js";

describe("generated copies of crds.ts", () => {
  it("the chart's CRD templates and resources.ts are what `npm run generate` writes", async () => {
    const files = await generatedFiles();
    for (const [path, text] of files) {
      const onDisk = await readFile(path, "utf8").catch(() => "(missing)");
      expect(onDisk, `${path.slice(REPO_ROOT.length)} is stale: run npm run generate -w @ferry/k8s-adapter`).toBe(text);
    }
    // And no CRD in the chart that crds.ts no longer defines.
    const crdDir = join(CHART_DIR, "templates", "crds");
    const inChart = (await readdir(crdDir)).map((name) => join(crdDir, name)).sort();
    expect(inChart).toEqual([...files.keys()].filter((path) => path.startsWith(crdDir)).sort());
  });

  it("each chart template holds exactly its CRD, kept on uninstall, behind manageCRDs", async () => {
    for (const resource of RESOURCES) {
      const text = await readFile(join(CHART_DIR, "templates", "crds", `${resource.plural}.yaml`), "utf8");
      const lines = text.trimEnd().split("\n");
      expect(lines[1]).toBe("{{- if .Values.manageCRDs }}");
      expect(lines.at(-1)).toBe("{{- end }}");
      const crd = parse(lines.slice(2, -1).join("\n"));
      expect(crd).toEqual(customResourceDefinition(resource));
      expect(crd.metadata.annotations["helm.sh/resource-policy"]).toBe("keep");
    }
  });
});
