/**
 * Renders the CustomResourceDefinitions from the definitions in crds.ts: as objects (to create them
 * through the API), as YAML, and as the Helm chart's template files. Pure: no I/O here.
 */
import { stringify } from "yaml";
import { CATEGORY, GROUP, RESOURCES, type ResourceDefinition, type Schema, VERSION } from "./crds.js";

export interface CustomResourceDefinition {
  apiVersion: "apiextensions.k8s.io/v1";
  kind: "CustomResourceDefinition";
  metadata: { name: string; labels: Record<string, string>; annotations: Record<string, string> };
  spec: Record<string, unknown>;
}

export function crdName(resource: ResourceDefinition): string {
  return `${resource.plural}.${GROUP}`;
}

export function customResourceDefinition(resource: ResourceDefinition): CustomResourceDefinition {
  const openAPIV3Schema: Schema = {
    type: "object",
    description: resource.description,
    required: ["spec"],
    properties: {
      apiVersion: { type: "string" },
      kind: { type: "string" },
      metadata: { type: "object" },
      spec: resource.spec,
      status: resource.status,
    },
  };
  return {
    apiVersion: "apiextensions.k8s.io/v1",
    kind: "CustomResourceDefinition",
    metadata: {
      name: crdName(resource),
      labels: { "app.kubernetes.io/part-of": "ferry" },
      // An uninstall must never delete the CRDs: that would delete every Ferry resource with them.
      annotations: { "helm.sh/resource-policy": "keep" },
    },
    spec: {
      group: GROUP,
      names: {
        kind: resource.kind,
        listKind: `${resource.kind}List`,
        plural: resource.plural,
        singular: resource.singular,
        shortNames: resource.shortNames,
        categories: [CATEGORY],
      },
      scope: resource.scope,
      versions: [
        {
          name: VERSION,
          served: true,
          storage: true,
          subresources: { status: {} },
          additionalPrinterColumns: resource.printerColumns,
          schema: { openAPIV3Schema },
        },
      ],
    },
  };
}

export function crdYaml(resource: ResourceDefinition): string {
  return stringify(customResourceDefinition(resource), { lineWidth: 0 });
}

/** The chart's template for one CRD: installed only with `manageCRDs` (default true). */
export function chartTemplate(resource: ResourceDefinition): string {
  return [
    "# Generated from packages/k8s-adapter/src/crds.ts by `npm run generate -w @ferry/k8s-adapter`; do not edit.",
    "{{- if .Values.manageCRDs }}",
    crdYaml(resource).trimEnd(),
    "{{- end }}",
    "",
  ].join("\n");
}

/** Chart path (relative to infra/helm/ferry) → file text, for every CRD. */
export function chartTemplates(): Map<string, string> {
  return new Map(RESOURCES.map((r) => [`templates/crds/${r.plural}.yaml`, chartTemplate(r)]));
}
