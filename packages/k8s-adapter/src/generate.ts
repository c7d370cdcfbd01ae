/**
 * `npm run generate -w @ferry/k8s-adapter`: writes what crds.ts defines into the two places that keep
 * a copy — the Helm chart's CRD templates and src/resources.ts (the TypeScript types). The tests call
 * `generatedFiles()` and compare, so a copy that drifts from crds.ts fails the suite.
 */
import { mkdir, readdir, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { JSONSchema } from "json-schema-to-typescript";
import { chartTemplates } from "./crd-manifest.js";
import { API_VERSION, RESOURCES, type Schema } from "./crds.js";

/** The repository root: this file is <root>/packages/k8s-adapter/{src,dist}/generate.{ts,js}. */
export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const CHART_DIR = join(REPO_ROOT, "infra", "helm", "ferry");
export const TYPES_FILE = join(REPO_ROOT, "packages", "k8s-adapter", "src", "resources.ts");

const BANNER = `/**
 * The ferry.io/v1alpha1 resources as TypeScript types. Generated from crds.ts by
 * \`npm run generate -w @ferry/k8s-adapter\`; do not edit.
 */`;

/** The TypeScript types for every resource: spec and status from the schemas, plus the envelope. */
export async function resourceTypes(): Promise<string> {
  // A dev-time tool only: the package's runtime never loads it.
  const { compile } = await import("json-schema-to-typescript");
  const options = {
    bannerComment: "",
    additionalProperties: false,
    ignoreMinAndMaxItems: true,
    unknownAny: true,
    // Formatted as biome formats the repository, so that `biome check` passes on the output.
    style: { printWidth: 120, singleQuote: false, trailingComma: "all", semi: true, tabWidth: 2 } as const,
  };
  const parts = [BANNER, 'import type { V1ObjectMeta } from "@kubernetes/client-node";', ""];
  // metav1.Condition once, referred to by every status.
  const conditions = RESOURCES[0]?.status.properties?.conditions;
  if (conditions?.items === undefined) throw new Error("crds.ts: a status without conditions");
  parts.push((await compile(asInput(conditions.items), "Condition", options)).trim(), "");
  // Resources that share a schema (the recovery operations' status) share its type.
  const emitted = new Map<object, string>();
  for (const resource of RESOURCES) {
    for (const [suffix, schema] of [
      ["Spec", resource.spec],
      ["Status", resource.status],
    ] as const) {
      const typeName = `${resource.kind}${suffix}`;
      const same = emitted.get(schema);
      if (same !== undefined) {
        parts.push(`export type ${typeName} = ${same};`, "");
        continue;
      }
      emitted.set(schema, typeName);
      const text = await compile(asInput(withConditionType(schema)), typeName, options);
      parts.push(text.trim(), "");
    }
    parts.push(
      `/** ${resource.description} */`,
      `export interface ${resource.kind} {`,
      `  apiVersion: "${API_VERSION}";`,
      `  kind: "${resource.kind}";`,
      "  metadata?: V1ObjectMeta;",
      `  spec: ${resource.kind}Spec;`,
      `  status?: ${resource.kind}Status;`,
      "}",
      "",
    );
  }
  return `${parts.join("\n").trimEnd()}\n`;
}

/**
 * The schemas are ours and plain JSON; compile() wants its own (wider) type. A node that keeps any
 * JSON (`x-kubernetes-preserve-unknown-fields` without a type) is `unknown` in TypeScript.
 */
function asInput(schema: Schema): JSONSchema {
  return JSON.parse(JSON.stringify(schema), (_key, value: unknown) => {
    const node = value as Schema | null;
    if (typeof node === "object" && node !== null && node["x-kubernetes-preserve-unknown-fields"] && !node.type) {
      return { ...node, tsType: "unknown" };
    }
    return value;
  }) as JSONSchema;
}

/** A status schema whose conditions are typed as the shared `Condition[]`. */
function withConditionType(schema: Schema): Schema {
  const conditions = schema.properties?.conditions;
  if (conditions === undefined) return schema;
  const typed = { description: conditions.description, tsType: "Condition[]" } as Schema;
  return { ...schema, properties: { ...schema.properties, conditions: typed } };
}

/** Absolute path → text of every generated file. */
export async function generatedFiles(): Promise<Map<string, string>> {
  const files = new Map<string, string>();
  for (const [path, text] of chartTemplates()) files.set(join(CHART_DIR, path), text);
  files.set(TYPES_FILE, await resourceTypes());
  return files;
}

async function main(): Promise<void> {
  const files = await generatedFiles();
  // A resource that was removed from crds.ts must not leave its CRD behind in the chart.
  const crdDir = join(CHART_DIR, "templates", "crds");
  await mkdir(crdDir, { recursive: true });
  for (const entry of await readdir(crdDir)) {
    if (!files.has(join(crdDir, entry))) await rm(join(crdDir, entry));
  }
  for (const [path, text] of files) {
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, text);
    process.stdout.write(`wrote ${path.slice(REPO_ROOT.length + 1)}\n`);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main();
