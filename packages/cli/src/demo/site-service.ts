/**
 * One site's `ferry volume serve`, run by the two-site demo as a process of its own, as a site runs
 * it: joined to the site's NATS (the URL, which holds a password, goes in the environment, never on
 * the command line). Ready once it prints where it serves; stopped with SIGTERM (a clean stop), then
 * SIGKILL after a grace period, by its PID only — and killed by an exit guard should the demo's
 * process exit first.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { endProcess, hasExited, onExit } from "@ferry/nats-sites";
import { SiteStartFailed } from "../errors.js";
import { shellWord } from "./narrator.js";

export interface SiteServiceSpec {
  /** packages/cli/bin/ferry.js */
  bin: string;
  /** `ferry volume serve` (default) or `ferry daemon` (ferryd: volume service + orchestrator). */
  command?: "serve" | "daemon";
  site: string;
  region: string;
  /** `nats://ferryd:<password>@host:port` of the site's NATS server. */
  nats: string;
  dataDir: string;
  socket: string;
  /** Regions allowed to hold copies of this site's volumes; empty: any. */
  allowRegions: readonly string[];
  /** `SITE=nats://peer:<password>@host:port` of the sites it sends to straight (the direct route). */
  peerNats?: readonly string[] | undefined;
  /** ferryd only: the site's libvirtd, whose VMs can then be application members. */
  libvirt?: string | undefined;
  /** ferryd only: the site's Kubernetes cluster, whose objects can then be application members. */
  kubernetes?: { kubeconfig: string; kubectlDir: string } | undefined;
}

const READY_TIMEOUT_MS = 30_000;
const STOP_GRACE_MS = 30_000;

export class SiteService {
  private stdout = "";
  private stderr = "";
  private readonly releaseGuard: () => void;

  private constructor(
    readonly spec: SiteServiceSpec,
    private readonly child: ChildProcess,
  ) {
    child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      this.stdout += chunk;
    });
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      this.stderr += chunk;
    });
    this.releaseGuard = onExit(() => {
      if (child.pid !== undefined && !hasExited(child)) process.kill(child.pid, "SIGKILL");
    });
    child.once("exit", () => this.releaseGuard());
  }

  /** Start the process; `ready()` says when it serves. Synchronous, so the caller holds it at once. */
  static spawn(spec: SiteServiceSpec): SiteService {
    const child = spawn(process.execPath, [spec.bin, ...subcommand(spec), ...serveArgs(spec)], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, FERRY_DATA: spec.dataDir, FERRY_NATS: spec.nats, FERRY_PEER_NATS: peers(spec) },
    });
    return new SiteService(spec, child);
  }

  /** The command as a user at the site would type it, with the NATS password left out. */
  static commandLine(spec: SiteServiceSpec): string {
    const hide = (url: string) => url.replace(/\/\/([^:@/]+):[^@/]*@/g, "//$1:…@");
    const direct = spec.peerNats?.length ? `FERRY_PEER_NATS=${shellWord(hide(peers(spec)))} ` : "";
    return `FERRY_NATS=${hide(spec.nats)} ${direct}ferry ${subcommand(spec).join(" ")} ${serveArgs(spec).map(shellWord).join(" ")} &`;
  }

  /** `ferry volume serve` or `ferryd`, for messages. */
  get what(): string {
    return this.spec.command === "daemon" ? "ferryd" : "ferry volume serve";
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** The line it printed once serving: `ferry: serving N volumes on … as site …`. */
  get servingLine(): string {
    return this.stdout.split("\n").find((line) => /^ferryd?: serving/.test(line)) ?? "";
  }

  /** An NBD URI of one of its exports (over its unix socket). */
  uri(volume: string): string {
    return `nbd+unix:///${volume}?socket=${this.spec.socket}`;
  }

  /** Resolves once it serves; fails with what it printed if it exits first or takes too long. */
  ready(): Promise<void> {
    const what = `${this.what} of ${this.spec.site}`;
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.servingLine === "") return;
        done();
        resolve();
      };
      const exited = (code: number | null, signal: NodeJS.Signals | null) => {
        done();
        const said =
          this.stderr
            .trim()
            .split("\n")
            .at(-1)
            ?.replace(/^ferry: /, "") || `exit ${code ?? signal}`;
        reject(new SiteStartFailed(`${what} exited before serving: ${said}`));
      };
      const failed = (error: Error) => {
        done();
        reject(new SiteStartFailed(`${what} could not be started: ${error.message}`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new SiteStartFailed(`${what} did not report serving within ${READY_TIMEOUT_MS / 1000} s`));
      }, READY_TIMEOUT_MS);
      const done = () => {
        clearTimeout(timer);
        this.child.stdout?.off("data", check);
        this.child.off("exit", exited);
        this.child.off("error", failed);
      };
      this.child.stdout?.on("data", check);
      this.child.once("exit", exited);
      this.child.once("error", failed);
      if (hasExited(this.child)) exited(this.child.exitCode, this.child.signalCode);
      else check();
    });
  }

  /** SIGTERM and wait for the clean stop; SIGKILL if it takes longer than the grace period. */
  async stop(): Promise<void> {
    await endProcess(this.child, `${this.what} of ${this.spec.site}`, { graceMs: STOP_GRACE_MS });
    this.releaseGuard();
  }
}

/** The value of $FERRY_PEER_NATS: every peer, space-separated (the URLs hold passwords: not on the command line). */
function peers(spec: SiteServiceSpec): string {
  return (spec.peerNats ?? []).join(" ");
}

function subcommand(spec: SiteServiceSpec): string[] {
  return spec.command === "daemon" ? ["daemon"] : ["volume", "serve"];
}

function serveArgs(spec: SiteServiceSpec): string[] {
  const args = ["--socket", spec.socket, "--site", spec.site, "--region", spec.region];
  if (spec.allowRegions.length > 0) args.push("--allow-regions", spec.allowRegions.join(","));
  if (spec.libvirt !== undefined) args.push("--libvirt", spec.libvirt);
  if (spec.kubernetes !== undefined) args.push("--kubeconfig", spec.kubernetes.kubeconfig);
  return args;
}
