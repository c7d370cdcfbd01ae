/**
 * Orchestrator-driven cuts: for an application whose recovery points carry more than volume data
 * (VMs, Kubernetes objects, hooks, application consistency), the orchestrator takes every cut
 * itself — quiesce, pre-hook, cut, thaw, post-hook, capture the members — and stores what it
 * captured with the point (points.ts). The data plane ships the cut as any other generation.
 *
 * Plain crash-consistent volume applications never come here: their pairs cut on their own.
 */
import { spawn } from "node:child_process";
import type { K8sAdapter, MemberCapture, VmAdapter } from "./adapters.js";
import type { DataPlane } from "./dataplane.js";
import { errorBody } from "./errors.js";
import type { Application, Consistency, Protection } from "./model.js";
import type { HookRun, PointMetadata, PointStore } from "./points.js";

export interface Adapters {
  vm?: VmAdapter;
  k8s?: K8sAdapter;
}

/** How long members may take to freeze, and a hook to run, before the cut goes on without them. */
export const QUIESCE_TIMEOUT_MS = 10_000;
export const HOOK_TIMEOUT_MS = 30_000;
const OUTPUT_LIMIT = 64 * 1024;

/** Does this protection's every cut go through the orchestrator? */
export function orchestratedCuts(app: Application, p: Protection): boolean {
  const s = p.settings;
  return (
    app.vms.length > 0 ||
    app.kubernetes !== null ||
    s.consistency === "application" ||
    s.hooks.pre !== null ||
    s.hooks.post !== null
  );
}

/** Run a hook with `sh -c` at this site, bounded in time; never throws. */
export function runHook(command: string, env: Record<string, string>, timeoutMs = HOOK_TIMEOUT_MS): Promise<HookRun> {
  const started = Date.now();
  return new Promise((resolve) => {
    let output = "";
    const keep = (chunk: Buffer) => {
      output = (output + chunk.toString("utf8")).slice(-OUTPUT_LIMIT);
    };
    const child = spawn("/bin/sh", ["-c", command], {
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const timer = setTimeout(() => {
      output += `\n[ferry: hook killed after ${timeoutMs} ms]`;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.stdout.on("data", keep);
    child.stderr.on("data", keep);
    child.on("error", (error) => {
      clearTimeout(timer);
      resolve({ command, exitCode: null, output: `cannot run: ${error.message}`, ms: Date.now() - started });
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ command, exitCode: code, output, ms: Date.now() - started });
    });
  });
}

export interface CaptureResult {
  meta: PointMetadata;
  storedBytes: number;
}

/**
 * One orchestrated cut of `app` for protection `p`. The application is held (quiesced, pre-hook)
 * only around the cut; what fails to freeze makes the point crash-consistent, with the reason.
 */
export async function captureCut(
  app: Application,
  p: Protection,
  dataPlane: DataPlane,
  points: PointStore,
  adapters: Adapters,
): Promise<CaptureResult> {
  const want: Consistency = p.settings.consistency;
  const reasons: string[] = [];
  const env = { FERRY_APP: app.name, FERRY_SITE: p.source, FERRY_TARGET: p.target };
  const frozen: { adapter: VmAdapter | K8sAdapter; members: string[] }[] = [];
  const held = Date.now();
  let pre: HookRun | null = null;
  let post: HookRun | null = null;
  let cut: Awaited<ReturnType<DataPlane["cut"]>>;
  try {
    if (want === "application") {
      for (const { adapter, members, what } of memberSets(app, adapters)) {
        if (adapter === undefined) {
          reasons.push(`no ${what} adapter at site ${p.source} to quiesce ${members.join(", ")}`);
          continue;
        }
        const r = await adapter.quiesce(members, QUIESCE_TIMEOUT_MS).catch((error) => ({
          failed: members.map((member) => ({ member, reason: errorBody(error).message })),
        }));
        frozen.push({ adapter, members });
        for (const f of r.failed) reasons.push(`${what} ${f.member}: ${f.reason}`);
      }
    }
    if (p.settings.hooks.pre !== null) {
      pre = await runHook(p.settings.hooks.pre, env);
      if (pre.exitCode !== 0) reasons.push(`pre-hook exited with ${pre.exitCode ?? "no status"}`);
    }
    cut = await dataPlane.cut(app.volumes, p.target);
  } finally {
    for (const f of frozen) {
      // A member left frozen is worse than a point downgraded: the failure is named in the point's
      // reason (and so in the event that says why it is crash-consistent).
      await f.adapter.thaw(f.members).catch((error) => {
        reasons.push(`cannot thaw ${f.members.join(", ")}: ${errorBody(error).message}`);
      });
    }
    if (p.settings.hooks.post !== null) post = await runHook(p.settings.hooks.post, env);
  }
  const heldMs = Date.now() - held;
  const captures: MemberCapture[] = [];
  for (const { adapter, members, what } of memberSets(app, adapters)) {
    if (adapter === undefined) {
      reasons.push(`no ${what} adapter at site ${p.source}: ${members.join(", ")} not captured`);
      continue;
    }
    captures.push(
      ...(await adapter.capture(members).catch((error) => {
        reasons.push(`cannot capture ${what} ${members.join(", ")}: ${errorBody(error).message}`);
        return [];
      })),
    );
  }
  const generations = Object.fromEntries(cut.volumes.map((v) => [v.name, v.generation]));
  const consistency: Consistency = want === "application" && reasons.length === 0 ? "application" : "crash";
  const meta: PointMetadata = {
    app: app.name,
    source: p.source,
    target: p.target,
    generation: generations[app.volumes[0] as string] ?? 0,
    generations,
    atMs: cut.atMs,
    consistency,
    reason: reasons.length === 0 ? null : reasons.join("; "),
    captures,
    hooks: { pre, post },
    heldMs,
  };
  return { meta, storedBytes: await points.put(meta) };
}

/** The application's member sets: each with its adapter (if this site has one) and capture kind. */
export interface MemberSet {
  adapter: VmAdapter | K8sAdapter | undefined;
  members: string[];
  /** For messages. */
  what: "VM" | "Kubernetes";
  kind: MemberCapture["kind"];
}

export function memberSets(app: Application, adapters: Adapters): MemberSet[] {
  const sets: MemberSet[] = [];
  if (app.vms.length > 0) sets.push({ adapter: adapters.vm, members: app.vms, what: "VM", kind: "vm" });
  if (app.kubernetes !== null) {
    sets.push({ adapter: adapters.k8s, members: kubernetesMembers(app), what: "Kubernetes", kind: "kubernetes" });
  }
  return sets;
}

/** The Kubernetes adapter's members: one per namespace, with the selector after a `?`. */
export function kubernetesMembers(app: Application): string[] {
  const k = app.kubernetes;
  if (k === null) return [];
  return k.namespaces.map((ns) => (k.labelSelector === null ? ns : `${ns}?${k.labelSelector}`));
}
