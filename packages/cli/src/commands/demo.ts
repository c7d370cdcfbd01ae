/** `ferry demo`: the narrated tour behind `npm run demo`. */
import type { Command } from "commander";
import { runVolumeDemo } from "../demo/volume-demo.js";
import type { ProgramIo } from "../program.js";

export function registerDemoCommand(program: Command, io: ProgramIo): void {
  program
    .command("demo")
    .description(
      "show the volume service at work: create a volume, serve it, write with qemu-io, read the dirty map, cut a generation (uses a temporary directory, removed afterwards)",
    )
    .action(async () => {
      await runVolumeDemo(io);
    });
}
