/** `ferry demo`: the narrated tour behind `npm run demo`. */
import type { Command } from "commander";
import { runAppDemo } from "../demo/app-demo.js";
import { runTwoSiteDemo } from "../demo/two-site-demo.js";
import { runVolumeDemo } from "../demo/volume-demo.js";
import type { ProgramIo } from "../program.js";

export function registerDemoCommand(program: Command, io: ProgramIo): void {
  program
    .command("demo")
    .summary(
      "protect applications (volumes and a VM) across sites on this machine: drill, failover, failback, migration, verified",
    )
    .description(
      "show Ferry's main job on this machine: three sites on loopback (eu-es, eu-de, us-east), each with its own " +
        "nats-server and ferryd; two applications at site A, one replicated async and continuous, one synchronous; " +
        "a copy in us-east refused by the policy; a write workload with the lag sampled; a DR drill beside running " +
        "replication, an unplanned failover, a failback and a planned migration, each checked by sha256 of the " +
        "volumes at both sites; then a hybrid application with a VM (a test guest on a private libvirtd per site) " +
        "that fails over and boots at site B, its checksums compared; a summary of RPO, RTO and bytes resynced. " +
        "Needs nats-server, qemu-io, nbdcopy, libvirtd and QEMU (`bash infra/setup.sh` installs them). Everything runs in a temporary directory and is stopped and removed " +
        "afterwards, also on failure and Ctrl-C.",
    )
    .option(
      "--replication",
      "instead, the volume-level replication tour: two sites with `ferry volume serve`, `ferry replicate` async and " +
        "sync (through a stop of site B's service), promote and verify",
    )
    .option(
      "--single-site",
      "instead, the single-site tour of the volume service: serve a volume, write with qemu-io, read the dirty map, cut a generation",
    )
    .action(async (options: { singleSite?: boolean; replication?: boolean }) => {
      if (options.singleSite) await runVolumeDemo(io);
      else if (options.replication) await runTwoSiteDemo(io);
      else await runAppDemo(io);
    });
}
