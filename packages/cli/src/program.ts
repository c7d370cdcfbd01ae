/**
 * The `ferry` command tree. Help text, defaults and usage errors all come from these definitions;
 * the actions live next to their commands. Nothing here exits the process: `main` decides the
 * exit status.
 */
import { createRequire } from "node:module";
import { Command, Option } from "commander";
import { registerControlCommands } from "./commands/control.js";
import { registerDaemonCommand } from "./commands/daemon-command.js";
import { registerDemoCommand } from "./commands/demo.js";
import { registerOperatorCommand } from "./commands/operator-command.js";
import { registerReplicateCommands } from "./commands/replicate.js";
import { registerVmCommands } from "./commands/vm.js";
import { registerVolumeCommands } from "./commands/volume.js";
import { NATS_ENV, SITE_ENV } from "./commands/volume-serve.js";

const { version } = createRequire(import.meta.url)("../package.json") as { version: string };

export interface ProgramIo {
  writeOut(text: string): void;
  writeErr(text: string): void;
}

export const processIo: ProgramIo = {
  writeOut: (text) => process.stdout.write(text),
  writeErr: (text) => process.stderr.write(text),
};

export function createProgram(io: ProgramIo = processIo): Command {
  const program = new Command("ferry")
    .description(
      "Ferry keeps applications (VMs and Kubernetes workloads) recoverable at a second site.\n" +
        "Each site runs ferryd (`ferry daemon`): volumes served over NBD with changed-block tracking, replicated\n" +
        "to other sites over NATS, and the orchestrator that protects applications under policies and runs\n" +
        "failover, planned migration, failback and DR drills. The other commands talk to a site's ferryd.",
    )
    .version(version, "-V, --version", "print the ferry version")
    .helpOption("-h, --help", "show help for a command")
    .helpCommand("help [command]", "show help for a command")
    .showSuggestionAfterError(true)
    .exitOverride()
    .configureOutput({ writeOut: io.writeOut, writeErr: io.writeErr })
    .configureHelp({ showGlobalOptions: true })
    // Global: they may stand before or after the subcommand.
    .addOption(
      new Option(
        "--nats <url>",
        `the site's NATS server, nats://user:password@host:port (prefer $${NATS_ENV}: other users can read a command line)`,
      ).env(NATS_ENV),
    )
    .addOption(
      new Option("--site <name>", "the site whose ferryd to ask (or to join, for daemon/serve)").env(SITE_ENV),
    );

  registerVolumeCommands(program, io);
  registerDaemonCommand(program, io);
  registerControlCommands(program, io);
  registerOperatorCommand(program, io);
  registerReplicateCommands(program, io);
  registerDemoCommand(program, io);
  registerVmCommands(program, io);

  // Usage errors become one `ferry: …` line that names the command's help. Set per command
  // because only then the message can say which `--help` to read.
  for (const command of walk(program)) {
    command.configureOutput({
      outputError: (text, write) => write(`ferry: ${usageLine(text)} (see '${commandPath(command)} --help')\n`),
    });
  }
  return program;
}

function* walk(command: Command): Generator<Command> {
  yield command;
  for (const child of command.commands) yield* walk(child);
}

function commandPath(command: Command): string {
  const names: string[] = [];
  for (let c: Command | null = command; c; c = c.parent) names.unshift(c.name());
  return names.join(" ");
}

/** Commander's "error: unknown option '--x'\n(Did you mean --y?)" as one line without the prefix. */
function usageLine(text: string): string {
  return text
    .replace(/^error:\s*/, "")
    .replace(/\s*\n\s*/g, " ")
    .trim();
}
