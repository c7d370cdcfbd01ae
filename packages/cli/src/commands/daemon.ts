/**
 * `ferry daemon` (also installed as `ferryd`): one site's ferryd — the volume service (NBD exports,
 * replication) and the orchestrator (catalog, API, scheduler, recovery operations, events) in one
 * process, with Prometheus `/metrics` and `/healthz` on an optional loopback address. SIGTERM or
 * SIGINT stops it cleanly; a restart resumes every replication pair (the data plane persists them)
 * and every recovery operation (the catalog persists them).
 */
import { createServer, type Server } from "node:http";
import { createRequire } from "node:module";
import { hostname } from "node:os";
import { type Adapters, connectNats, nativeDataPlane, natsHost, Orchestrator } from "@ferry/orchestrator";
import type { ProgramIo } from "../program.js";
import { vmAdapter } from "./vm.js";
import { nextStopSignal, type ServeRequest, type SiteJoin, startService, stopOnce } from "./volume-serve.js";

const { version } = createRequire(import.meta.url)("../../package.json") as { version: string };

export interface DaemonRequest extends ServeRequest {
  join: SiteJoin;
  /** `host:port` for /metrics and /healthz; none: no HTTP endpoint. */
  metrics?: string | undefined;
  /** libvirt URI: the VMs of this host become possible application members. */
  libvirt?: string | undefined;
  /** VMs recovered here: the source site's networks → this site's. */
  networkMapping?: Record<string, string> | undefined;
  /**
   * Manage a Kubernetes cluster: its objects and PVCs become possible application members. The
   * cluster of a kubeconfig file, else the default one (in-cluster, $KUBECONFIG, ~/.kube/config).
   */
  kubernetes?: { file: string | undefined } | undefined;
}

export async function runDaemon(request: DaemonRequest, io: ProgramIo): Promise<void> {
  const { service, serving } = await startService(request);
  let orchestrator: Orchestrator | undefined;
  let http: Server | undefined;
  let nc: Awaited<ReturnType<typeof connectNats>> | undefined;
  const adapters: Adapters = {};
  let libvirt: PausedVms | undefined;
  try {
    nc = await connectNats(request.join.nats, `ferryd ${request.join.site}`, {
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
    });
    if (request.libvirt !== undefined) {
      const { LibvirtVmAdapter } = await vmAdapter();
      const vm = await LibvirtVmAdapter.connect({
        uri: request.libvirt,
        exportSocket: request.socket ?? "",
        networkMapping: request.networkMapping ?? {},
      });
      adapters.vm = vm;
      libvirt = vm;
    }
    if (request.kubernetes !== undefined) {
      const { KubernetesAdapter, kubeConfigFrom } = await import("@ferry/k8s-adapter");
      adapters.k8s = new KubernetesAdapter({ kubeConfig: kubeConfigFrom(request.kubernetes.file) });
    }
    orchestrator = await Orchestrator.start({
      adapters,
      site: request.join.site,
      region: request.join.region,
      ...(request.join.node === undefined ? {} : { node: request.join.node }),
      nc,
      dataPlane: nativeDataPlane(request.dataDir, service),
      version,
      holder: `${hostname()}:${request.dataDir}`,
    });
    if (request.metrics !== undefined) http = await serveMetrics(request.metrics, orchestrator, nc);
  } catch (error) {
    await orchestrator?.stop();
    await nc?.close();
    await service.stop();
    throw error;
  }
  const stopWatching = libvirt === undefined ? () => {} : watchPausedVms(libvirt, io);
  const metrics = http === undefined ? "" : `; metrics on http://${address(http)}/metrics`;
  io.writeOut(
    `ferryd: ${serving}; orchestrator ${orchestrator.isLeader ? "leading" : "following"} site ${request.join.site}${metrics}\n`,
  );

  const signal = await nextStopSignal();
  io.writeErr(`ferryd: ${signal} received, stopping\n`);
  const o = orchestrator;
  const conn = nc;
  const server = http;
  await stopOnce(io, async () => {
    stopWatching();
    await o.stop();
    await conn.drain().catch(() => {});
    await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
    await service.stop();
  });
}

/** The VM adapter's part that resumes VMs paused on an I/O error (`LibvirtVmAdapter`). */
interface PausedVms {
  resumePausedOnError(skip?: ReadonlySet<string>): Promise<string[]>;
}

/** How often ferryd looks for VMs paused on an I/O error (their disks' server was away). */
const PAUSED_VM_CHECK_MS = 2_000;
/** A VM found paused again within this long of the end of its wait counts as failing again. */
const PAUSED_AGAIN_WITHIN_MS = 30_000;
/** The longest wait before a VM that keeps failing is resumed once more. */
const PAUSED_VM_MAX_WAIT_MS = 60_000;

/**
 * When to resume a VM paused on an I/O error again. Once is the usual case (its disks' server
 * restarted); a VM paused again soon after each resume has disks failing for another reason, and
 * resuming it every few seconds would only run its guest into the error again: the wait doubles
 * with each repeat, up to a minute, and starts over once a resume holds for a while (the VM is
 * not found paused within 30 s of its wait's end).
 */
export class PausedVmBackoff {
  private readonly vms = new Map<string, { repeats: number; nextAt: number }>();

  /** VMs not to resume at `now`: their wait is not over. */
  waiting(now: number): Set<string> {
    return new Set([...this.vms].filter(([, v]) => v.nextAt > now).map(([name]) => name));
  }

  /** `name` was resumed at `now`; answers how often in a row it had been paused again soon after. */
  resumed(name: string, now: number): number {
    const last = this.vms.get(name);
    // Only checked every few seconds, and not at all while it waits: paused again soon after its
    // last resume shows as found paused soon after its wait ended.
    const repeats = last !== undefined && now - last.nextAt < PAUSED_AGAIN_WITHIN_MS ? last.repeats + 1 : 0;
    const wait = Math.min(PAUSED_VM_MAX_WAIT_MS, PAUSED_VM_CHECK_MS * 2 ** repeats);
    this.vms.set(name, { repeats, nextAt: now + wait });
    return repeats;
  }
}

/**
 * Resume this host's VMs that libvirt paused on an I/O error of a Ferry disk — what a restart of
 * ferryd (their NBD server) does to a running guest — at once and every few seconds (a VM that
 * keeps being paused again, less and less often: `PausedVmBackoff`); each resume is logged.
 * Answers how to stop it.
 */
function watchPausedVms(adapter: PausedVms, io: ProgramIo): () => void {
  let running = false;
  const backoff = new PausedVmBackoff();
  const check = () => {
    if (running) return;
    running = true;
    adapter
      .resumePausedOnError(backoff.waiting(Date.now()))
      .then((names) => {
        for (const name of names) {
          const repeats = backoff.resumed(name, Date.now());
          const again =
            repeats > 0
              ? ` (paused again soon after ${repeats} resume${repeats === 1 ? "" : "s"} in a row: check its disks; next resume waits longer)`
              : "";
          io.writeErr(
            `ferryd: resumed VM ${name}, paused on an I/O error while its Ferry disks' server was away${again}\n`,
          );
        }
      })
      .catch((error: Error) => io.writeErr(`ferryd: cannot check for VMs paused on an I/O error: ${error.message}\n`))
      .finally(() => {
        running = false;
      });
  };
  check();
  const timer = setInterval(check, PAUSED_VM_CHECK_MS);
  timer.unref();
  return () => clearInterval(timer);
}

function address(server: Server): string {
  const a = server.address();
  return typeof a === "object" && a !== null ? `${a.address}:${a.port}` : String(a);
}

/** `/metrics` (Prometheus text) and `/healthz` (200 while connected to NATS, else 503). */
async function serveMetrics(
  listen: string,
  orchestrator: Orchestrator,
  nc: Awaited<ReturnType<typeof connectNats>>,
): Promise<Server> {
  const match = /^(.+):(\d+)$/.exec(listen);
  if (match?.[1] === undefined || match[2] === undefined) {
    throw new Error(`--metrics '${listen}' is not host:port, e.g. 127.0.0.1:9464`);
  }
  const server = createServer((req, res) => {
    if (req.url === "/metrics") {
      orchestrator.metrics.registry
        .metrics()
        .then((text) => {
          res.writeHead(200, { "content-type": orchestrator.metrics.registry.contentType });
          res.end(text);
        })
        .catch((error: Error) => {
          res.writeHead(500).end(error.message);
        });
      return;
    }
    if (req.url === "/healthz") {
      const healthy = !nc.isClosed() && nc.info !== undefined;
      const body = {
        status: healthy ? "ok" : "nats-disconnected",
        site: orchestrator.site,
        leader: orchestrator.isLeader,
        nats: natsHost(`nats://${nc.getServer()}`),
      };
      res.writeHead(healthy ? 200 : 503, { "content-type": "application/json" }).end(JSON.stringify(body));
      return;
    }
    res.writeHead(404).end("not found: try /metrics or /healthz\n");
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(Number(match[2]), match[1], () => resolve());
  });
  return server;
}
