/**
 * Where VM and Kubernetes members plug into an application (ARCHITECTURE §3: the orchestrator
 * never imports an adapter; `cli` wires one in). Volumes are the orchestrator's own members; an
 * adapter maps its members to volumes, captures their metadata at each cut, and recovers them.
 */

import type { RestoreSettings } from "./model.js";

/** A member's metadata captured with a cut (domain XML, Kubernetes objects, hook output). */
export interface MemberCapture {
  kind: "vm" | "kubernetes";
  name: string;
  /** Serializable; stored with the recovery point. */
  metadata: unknown;
}

export interface RecoverContext {
  app: string;
  site: string;
  /** A drill recovers an isolated copy beside the running replication; cleanup removes it. */
  drill: boolean;
  /** Source volume name → the volume to use at this site (a promoted replica or a drill clone). */
  volumes: Record<string, string>;
  /** The protection's restore settings for Kubernetes objects (mappings, transforms, conflicts); defaults when left out. */
  restore?: RestoreSettings;
}

interface MemberAdapter {
  /** The Ferry volumes the members keep their data on (they replicate with the application). */
  volumesOf(members: readonly string[]): Promise<string[]>;
  /** Application consistency: freeze writes; members that could not be frozen are named with the reason. */
  quiesce(members: readonly string[], timeoutMs: number): Promise<{ failed: { member: string; reason: string }[] }>;
  thaw(members: readonly string[]): Promise<void>;
  capture(members: readonly string[]): Promise<MemberCapture[]>;
  /** Bring the members up at this site from their captures; answers what it started. */
  recover(captures: readonly MemberCapture[], context: RecoverContext): Promise<string[]>;
  /** Planned migration: stop the members cleanly at the site they leave, before the final sync. */
  stop(members: readonly string[]): Promise<void>;
  cleanupDrill(app: string): Promise<void>;
}

export interface VmAdapter extends MemberAdapter {}
export interface K8sAdapter extends MemberAdapter {}
