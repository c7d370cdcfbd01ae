/**
 * `ferry operator`: this site's Kubernetes operator (the Operator of @ferry/k8s-adapter) as a
 * process — what the Helm chart's Deployment runs. It drives the site's ferryd over NATS from the
 * ferry.io resources of one cluster. SIGTERM or SIGINT stops it cleanly.
 */
import { connectNats, natsHost, parseDuration } from "@ferry/orchestrator";
import type { Command } from "commander";
import type { ProgramIo } from "../program.js";
import { NATS_ENV, nextStopSignal, SITE_ENV, stopOnce } from "./volume-serve.js";

interface OperatorOptions {
  kubeconfig?: string;
  namespaces?: string;
  resync: string;
}

export function registerOperatorCommand(program: Command, io: ProgramIo): void {
  program
    .command("operator")
    .summary("run this site's Kubernetes operator: ferry.io resources → this site's ferryd")
    .description(
      "run the Kubernetes operator of one site in the foreground: it watches the ferry.io ProtectionPolicies and " +
        "Applications of one cluster, puts them into the site's ferryd over NATS and reports in their status " +
        "conditions (Ready; Protected, Replicating, RPOMet, Degraded). Needs --site and --nats (the site's `cli` " +
        "user). The cluster: --kubeconfig, else $KUBECONFIG or ~/.kube/config, else the pod's service account.",
    )
    .option("--kubeconfig <path>", "the cluster's kubeconfig file")
    .option("--namespaces <names>", "comma-separated namespaces to watch (default: all)")
    .option("--resync <duration>", "reconcile everything this often, changed or not", "30s")
    .action(async (options: OperatorOptions, command: Command) => {
      const { nats, site } = command.optsWithGlobals<{ nats?: string; site?: string }>();
      if (!nats) command.error(`give the site's NATS server with --nats or $${NATS_ENV}`, { code: "ferry.noNats" });
      if (!site) command.error(`say which site this is with --site NAME or $${SITE_ENV}`, { code: "ferry.noSite" });
      const resyncMs = parseDuration("--resync", options.resync, 1_000);
      const namespaces = options.namespaces?.split(",").filter((n) => n !== "") ?? [];
      // Loaded here, not at the top: the Kubernetes client takes most of a second to import, and every
      // other `ferry` command would pay for it.
      const { kubeConfigFrom, Operator } = await import("@ferry/k8s-adapter");
      const kubeConfig = kubeConfigFrom(options.kubeconfig);
      const nc = await connectNats(nats, `ferry operator ${site}`, {
        maxReconnectAttempts: -1,
        reconnectTimeWait: 500,
      });
      const operator = new Operator({
        kubeConfig,
        nc,
        site,
        namespaces,
        resyncMs,
        log: (line) => io.writeErr(`ferry operator: ${line}\n`),
      });
      try {
        await operator.start();
      } catch (error) {
        await operator.stop();
        await nc.close();
        throw error;
      }
      const watching = namespaces.length === 0 ? "all namespaces" : `namespaces ${namespaces.join(", ")}`;
      io.writeOut(
        `ferry operator: watching ${watching} of ${kubeConfig.getCurrentCluster()?.server ?? "the cluster"} ` +
          `for site ${site} via NATS ${natsHost(nats)}\n`,
      );
      const signal = await nextStopSignal();
      io.writeErr(`ferry operator: ${signal} received, stopping\n`);
      await stopOnce(io, async () => {
        await operator.stop();
        await nc.drain().catch(() => {});
      });
    });
}
