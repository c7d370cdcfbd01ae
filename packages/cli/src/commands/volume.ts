/**
 * `ferry volume …`: create, list and delete volumes, serve them over NBD, read their changed-block
 * map, cut generations, import existing disks and read I/O statistics. Every action is a thin call
 * into the native data plane; this file owns only arguments and presentation.
 */
import { type Command, Option } from "commander";
import { formatBytes } from "../bytes.js";
import { DATA_DIR_ENV, DEFAULT_DATA_DIR, resolveDataDir } from "../data-dir.js";
import { dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { importVolumeWithProgress } from "./volume-import.js";
import {
  DEFAULT_LISTEN,
  joinedSite,
  nodeOption,
  peerNatsOption,
  type SiteJoin,
  SiteOptionsError,
  serveVolumes,
  siteOptions,
} from "./volume-serve.js";
import { VolumeStatsDocument } from "./volume-stats.js";

export interface DataOption {
  data?: string;
}
export interface JsonOption {
  json?: boolean;
}
interface ServeOptions {
  listen?: string;
  socket?: string;
  site?: string;
  region?: string;
  nats?: string;
  allowRegions?: string;
  peerNats: string[];
  node?: string;
  untracked?: boolean;
}

// Shared with `ferry replicate` (commands/replicate.ts), so that --data and --json read the same
// everywhere.
export function dataOption(): Option {
  return new Option(
    "--data <dir>",
    `data directory holding the volumes (default: $${DATA_DIR_ENV} or ${DEFAULT_DATA_DIR})`,
  );
}

export function jsonOption(): Option {
  return new Option("--json", "print JSON instead of a table");
}

export function registerVolumeCommands(program: Command, io: ProgramIo): void {
  const volume = program
    .command("volume")
    .description("manage volumes: block devices served over NBD with changed-block tracking");
  const printJson = (value: unknown) => io.writeOut(`${JSON.stringify(value, null, 2)}\n`);

  volume
    .command("create")
    .description("create an empty (sparse) volume")
    .argument("<name>", "volume name: 1-64 characters from [A-Za-z0-9._-]")
    .requiredOption("--size <size>", "volume size in bytes or with a K/M/G/T suffix, e.g. 1G")
    .option("--granularity <size>", "changed-block tracking granularity (default: 64K)")
    .addOption(dataOption())
    .action(async (name: string, options: DataOption & { size: string; granularity?: string }) => {
      const native = await dataplane();
      const size = native.parseSize(options.size);
      const granularity = options.granularity === undefined ? null : native.parseSize(options.granularity);
      const dataDir = resolveDataDir(options.data);
      const info = await native.createVolume(dataDir, name, size, granularity);
      io.writeOut(
        `created volume ${info.name}: ${formatBytes(info.size)}, granularity ${formatBytes(info.granularity)}, in ${dataDir}\n`,
      );
    });

  volume
    .command("list")
    .description("list the volumes of a data directory")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (options: DataOption & JsonOption) => {
      const native = await dataplane();
      const dataDir = resolveDataDir(options.data);
      const volumes = await native.listVolumes(dataDir);
      if (options.json) return printJson(volumes);
      if (volumes.length === 0) {
        io.writeOut(`no volumes in ${dataDir}\n`);
        return;
      }
      const rows = volumes.map((v) => [
        v.name,
        formatBytes(v.size),
        formatBytes(v.granularity),
        v.openGeneration,
        v.generations.length === 0 ? "-" : v.generations.join(","),
        formatBytes(v.dirtyBytes),
        v.readOnly ? "ro" : v.fenced ? "fenced" : "rw",
      ]);
      io.writeOut(
        `${formatTable(["NAME", "SIZE", "GRANULARITY", "OPEN GEN", "CLOSED GENS", "DIRTY", "MODE"], rows)}\n`,
      );
    });

  volume
    .command("delete")
    .summary("delete a volume")
    .description("delete a volume and its generations (refused while a client has it open)")
    .argument("<name>", "volume name")
    .addOption(dataOption())
    .action(async (name: string, options: DataOption) => {
      const native = await dataplane();
      await native.deleteVolume(resolveDataDir(options.data), name);
      io.writeOut(`deleted volume ${name}\n`);
    });

  volume
    .command("serve")
    .summary("serve the volumes over NBD in the foreground")
    .description(
      "serve every volume of the data directory over NBD, in the foreground; SIGTERM or SIGINT stops it cleanly.\n" +
        `Listens on ${DEFAULT_LISTEN} unless --listen or --socket is given.\n` +
        "With --site, --region and --nats (all three) the service joins that site's NATS to send and receive replication (see `ferry replicate`).",
    )
    .addOption(dataOption())
    .option("--listen <host:port>", `TCP address to listen on (default: ${DEFAULT_LISTEN} when --socket is not given)`)
    .option("--socket <path>", "unix socket to listen on")
    .option("--region <region>", "this site's region (residency rules name regions)")
    .option(
      "--allow-regions <regions>",
      "comma-separated regions allowed to hold copies of this site's volumes (default: any)",
    )
    .addOption(peerNatsOption())
    .addOption(nodeOption())
    .addOption(new Option("--untracked", "benchmarks only: serve without changed-block tracking").hideHelp())
    .action(async (options: DataOption & ServeOptions, command: Command) => {
      let join: SiteJoin | undefined;
      try {
        join = await joinedSite(siteOptions(command, options));
      } catch (error) {
        if (error instanceof SiteOptionsError) command.error(error.message, { code: "ferry.siteOptions" });
        throw error;
      }
      await serveVolumes(
        {
          dataDir: resolveDataDir(options.data),
          listen: options.listen,
          socket: options.socket,
          join,
          untracked: options.untracked,
        },
        io,
      );
    });

  volume
    .command("dirty")
    .description("list the extents changed since the last cut (the open generation's dirty map)")
    .argument("<name>", "volume name")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (name: string, options: DataOption & JsonOption) => {
      const native = await dataplane();
      const extents = await native.dirtyExtents(resolveDataDir(options.data), name);
      if (options.json) return printJson(extents);
      const total = extents.reduce((sum, e) => sum + e.length, 0);
      if (extents.length > 0) {
        const rows = extents.map((e) => [e.offset, e.length, formatBytes(e.offset), formatBytes(e.length)]);
        io.writeOut(`${formatTable(["OFFSET", "LENGTH", "AT", "SIZE"], rows)}\n`);
      }
      io.writeOut(
        `${name}: ${extents.length} dirty extent${extents.length === 1 ? "" : "s"}, ${formatBytes(total)} changed since the last cut\n`,
      );
    });

  volume
    .command("cut")
    .summary("close the open generation of volumes (one consistency group)")
    .description(
      "close the open generation of one or more volumes atomically (one consistency group) and open the next; prints the closed generation numbers",
    )
    .argument("<names...>", "volume names")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (names: string[], options: DataOption & JsonOption) => {
      const native = await dataplane();
      const results = await native.cutVolumes(resolveDataDir(options.data), names);
      if (options.json) return printJson(results);
      io.writeOut(
        `${formatTable(
          ["VOLUME", "CLOSED GENERATION"],
          results.map((r) => [r.volume, r.generation]),
        )}\n`,
      );
    });

  volume
    .command("import")
    .description("create a volume from an existing disk: an NBD export (nbd://…, nbd+unix://…) or a raw file")
    .argument("<name>", "name of the new volume")
    .requiredOption("--from <source>", "nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, or a raw image file")
    .option("--size <size>", "size of the new volume (default: the size of the source)")
    .addOption(dataOption())
    .action(async (name: string, options: DataOption & { from: string; size?: string }) => {
      const native = await dataplane();
      const size = options.size === undefined ? null : native.parseSize(options.size);
      const info = await importVolumeWithProgress(
        native,
        { dataDir: resolveDataDir(options.data), name, source: options.from, size },
        io,
      );
      io.writeOut(`imported volume ${info.name}: ${formatBytes(info.size)} from ${options.from}\n`);
    });

  volume
    .command("stats")
    .description("per-volume I/O statistics from the running volume service of the data directory")
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (options: DataOption & JsonOption) => {
      const native = await dataplane();
      const stats = VolumeStatsDocument.parse(await native.volumeStats(resolveDataDir(options.data)));
      if (options.json) return printJson(stats.raw);
      io.writeOut(`${stats.toTable()}\n`);
    });
}
