/** `ferry demo`: the narrated tour behind `npm run demo`. */
import type { Command } from "commander";
import { runTwoSiteDemo } from "../demo/two-site-demo.js";
import { runVolumeDemo } from "../demo/volume-demo.js";
import type { ProgramIo } from "../program.js";

export function registerDemoCommand(program: Command, io: ProgramIo): void {
  program
    .command("demo")
    .summary("replicate volumes to a second site, async and sync, fail over and verify, all on this machine")
    .description(
      "show Ferry's main job on this machine: two sites on loopback, each with its own nats-server and " +
        "`ferry volume serve`; two volumes at site A written over NBD with qemu-io, replicated continuously to " +
        "site B as one consistency group; a third replicated synchronously, each acknowledged write read at " +
        "site B at once, through a stop of site B's service (--on-peer-loss suspend) and back; then the group's " +
        "pair is stopped, site B promoted, and B's bytes compared with A's (sha256). Needs nats-server, qemu-io " +
        "and nbdcopy (`bash infra/setup.sh` installs them). Everything runs in a temporary directory and is " +
        "stopped and removed afterwards, also on failure and Ctrl-C.",
    )
    .option(
      "--single-site",
      "instead, the single-site tour of the volume service: serve a volume, write with qemu-io, read the dirty map, cut a generation",
    )
    .action(async (options: { singleSite?: boolean }) => {
      if (options.singleSite) await runVolumeDemo(io);
      else await runTwoSiteDemo(io);
    });
}
