/** The `ferry daemon` command line (the daemon itself: daemon.ts). */
import { type Command, Option } from "commander";
import { resolveDataDir } from "../data-dir.js";
import type { ProgramIo } from "../program.js";
import { runDaemon } from "./daemon.js";
import { LIBVIRT_URI_ENV } from "./vm.js";
import { type DataOption, dataOption } from "./volume.js";
import {
  DEFAULT_LISTEN,
  joinedSite,
  nodeOption,
  peerNatsOption,
  SiteOptionsError,
  siteOptions,
} from "./volume-serve.js";

interface DaemonOptions extends DataOption {
  listen?: string;
  socket?: string;
  region?: string;
  allowRegions?: string;
  peerNats: string[];
  node?: string;
  metrics?: string;
  libvirt?: string;
  kubeconfig?: string;
  kubernetes?: boolean;
  vmNetworkMap: string[];
}

export const KUBECONFIG_ENV = "FERRY_KUBECONFIG";

export function registerDaemonCommand(program: Command, io: ProgramIo): void {
  program
    .command("daemon")
    .summary("run this site's ferryd: volume service + orchestrator (also installed as `ferryd`)")
    .description(
      "run one site's ferryd in the foreground: the volume service (NBD exports of the data directory, replication " +
        "over the site's NATS) and the orchestrator (applications, policies, protection, recovery operations, " +
        "events; the other `ferry` commands talk to it over NATS). SIGTERM or SIGINT stops it cleanly; a restart " +
        `resumes replication and any operation under way. Needs --site, --region and --nats. NBD on ${DEFAULT_LISTEN} ` +
        "unless --listen or --socket is given.",
    )
    .addOption(dataOption())
    .option("--listen <host:port>", `NBD over TCP (default: ${DEFAULT_LISTEN} when --socket is not given)`)
    .option("--socket <path>", "NBD over a unix socket")
    .option("--region <region>", "this site's region (residency rules name regions)")
    .option("--allow-regions <regions>", "comma-separated regions allowed to hold copies of this site's volumes")
    .addOption(peerNatsOption())
    .addOption(nodeOption())
    .addOption(new Option("--metrics <host:port>", "serve Prometheus /metrics and /healthz here, e.g. 127.0.0.1:9464"))
    .addOption(
      new Option(
        "--libvirt <uri>",
        "manage this host's libvirt VMs as application members (capture, quiesce, recover), e.g. qemu:///system; " +
          "needs --socket (QEMU reaches the volumes there)",
      ).env(LIBVIRT_URI_ENV),
    )
    .addOption(
      new Option(
        "--kubeconfig <file>",
        "manage this site's Kubernetes cluster: objects and PVCs on Ferry volumes become application members " +
          "(capture at each cut, restore at recovery)",
      ).env(KUBECONFIG_ENV),
    )
    .option(
      "--vm-network-map <from=to>",
      "VMs recovered here: a NIC on the source site's libvirt network (or bridge) FROM is put on TO (repeat)",
      (value: string, all: string[]) => [...all, value],
      [],
    )
    .option(
      "--kubernetes",
      "manage the Kubernetes cluster ferryd runs in (its pod's service account, else $KUBECONFIG or ~/.kube/config) " +
        "as --kubeconfig does",
    )
    .action(async (options: DaemonOptions, command: Command) => {
      let join: Awaited<ReturnType<typeof joinedSite>>;
      try {
        join = await joinedSite(siteOptions(command, options));
      } catch (error) {
        if (error instanceof SiteOptionsError) command.error(`${error.message}`, { code: "ferry.siteOptions" });
        throw error;
      }
      if (join === undefined) {
        command.error("ferryd needs its site: give --site, --region and --nats", { code: "ferry.siteOptions" });
      }
      if (options.libvirt !== undefined && options.socket === undefined) {
        command.error("--libvirt needs --socket: VMs reach their Ferry volumes over a unix socket", {
          code: "ferry.usage",
        });
      }
      const networkMapping: Record<string, string> = {};
      for (const pair of options.vmNetworkMap) {
        const [from, to, ...rest] = pair.split("=");
        if (!from || !to || rest.length > 0) {
          command.error(`--vm-network-map '${pair}' is not FROM=TO, e.g. --vm-network-map prod=dr-prod`, {
            code: "ferry.usage",
          });
        }
        networkMapping[from] = to;
      }
      await runDaemon(
        {
          dataDir: resolveDataDir(options.data),
          listen: options.listen,
          socket: options.socket,
          join,
          metrics: options.metrics,
          libvirt: options.libvirt,
          networkMapping,
          kubernetes:
            options.kubeconfig !== undefined || options.kubernetes === true ? { file: options.kubeconfig } : undefined,
        },
        io,
      );
    });
}
