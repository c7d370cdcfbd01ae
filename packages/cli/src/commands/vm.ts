/**
 * `ferry vm …`: the libvirt VMs of this host, and adopting one — its disks become Ferry volumes
 * served by this site's volume service, attached to the VM as NBD network disks. The adapter
 * (`@ferry/vm-adapter`) does the work; this file owns arguments, the volume store it hands the
 * adapter (the data plane of `--data`), and presentation.
 */
import { spawn } from "node:child_process";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Command, Option } from "commander";
import { resolveDataDir } from "../data-dir.js";
import { dataplane } from "../dataplane.js";
import { BindingUnavailable, ToolFailed, ToolMissing } from "../errors.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { dataOption, jsonOption } from "./volume.js";

export const LIBVIRT_URI_ENV = "FERRY_LIBVIRT_URI";
export const NBD_SOCKET_ENV = "FERRY_NBD_SOCKET";
const DEFAULT_LIBVIRT_URI = "qemu:///system";

type VmAdapterModule = typeof import("@ferry/vm-adapter");

let loaded: Promise<VmAdapterModule> | undefined;

/** Loaded on first use, so `ferry --help` works without the native libvirt binding. */
export function vmAdapter(): Promise<VmAdapterModule> {
  loaded ??= import("@ferry/vm-adapter").catch((cause: unknown) => {
    const why = cause instanceof Error ? cause.message.split("\n")[0] : String(cause);
    throw new BindingUnavailable(
      `the VM adapter @ferry/vm-adapter cannot be loaded (${why}): build it with \`npm run build\` in the repository root`,
      { cause },
    );
  });
  return loaded;
}

function libvirtOption(): Option {
  return new Option("--libvirt <uri>", "libvirt connection URI").env(LIBVIRT_URI_ENV).default(DEFAULT_LIBVIRT_URI);
}

function socketOption(): Option {
  return new Option(
    "--socket <path>",
    "the unix socket of this site's volume service (`ferry volume serve --socket`), as QEMU reaches it",
  ).env(NBD_SOCKET_ENV);
}

interface VmOptions {
  libvirt: string;
  socket?: string;
  data?: string;
  json?: boolean;
}

export function registerVmCommands(program: Command, io: ProgramIo): void {
  const vm = program
    .command("vm")
    .description("libvirt VMs: list them, and adopt one so that its disks are Ferry volumes");
  const printJson = (value: unknown) => io.writeOut(`${JSON.stringify(value, null, 2)}\n`);

  vm.command("list")
    .description("list the libvirt domains with their state and disks (FERRY: disks on Ferry volumes)")
    .addOption(libvirtOption())
    .addOption(socketOption())
    .addOption(jsonOption())
    .action(async (options: VmOptions) => {
      const { LibvirtVmAdapter } = await vmAdapter();
      const adapter = await LibvirtVmAdapter.connect({ uri: options.libvirt, exportSocket: options.socket ?? "" });
      const vms = await adapter.list();
      if (options.json) {
        printJson(
          vms.map((v) => ({
            name: v.name,
            uuid: v.uuid,
            state: v.state,
            persistent: v.persistent,
            disks: v.disks.map((d) => ({
              target: d.target,
              device: d.device,
              type: d.type,
              format: d.format,
              source: d.path ?? d.exportName,
              ...(d.protocol ? { protocol: d.protocol } : {}),
              ...(d.socket ? { socket: d.socket } : {}),
            })),
          })),
        );
        return;
      }
      if (vms.length === 0) {
        io.writeOut(`no domains at ${options.libvirt}\n`);
        return;
      }
      const rows = vms.map((v) => [
        v.name,
        v.state,
        v.disks
          .map((d) => `${d.target}:${d.type === "network" ? `${d.protocol}:${d.exportName}` : (d.path ?? d.type)}`)
          .join(" "),
        options.socket ? `${v.ferryDisks}/${v.disks.filter((d) => d.device === "disk").length}` : "-",
      ]);
      io.writeOut(`${formatTable(["NAME", "STATE", "DISKS", "FERRY"], rows)}\n`);
    });

  vm.command("adopt")
    .description(
      "move a VM's disks onto Ferry volumes: offline (shut off: import each raw disk) or --live (running: " +
        "block copy with synchronous writes, then pivot); the definition then points at the volume service",
    )
    .argument("<domain>", "the libvirt domain name")
    .option("--live", "copy the disks of the running VM without stopping it")
    .addOption(libvirtOption())
    .addOption(socketOption())
    .addOption(dataOption())
    .addOption(jsonOption())
    .action(async (domain: string, options: VmOptions & { live?: boolean }) => {
      if (!options.socket) {
        throw Object.assign(
          new Error(`ferry vm adopt needs --socket (or $${NBD_SOCKET_ENV}): the volume service's unix socket`),
          { code: "ERR_INVALID" },
        );
      }
      const [{ LibvirtVmAdapter }, native] = await Promise.all([vmAdapter(), dataplane()]);
      const dataDir = resolveDataDir(options.data);
      const adapter = await LibvirtVmAdapter.connect({
        uri: options.libvirt,
        exportSocket: options.socket,
        volumes: {
          importVolume: async (name, path, format) => {
            if (format === "raw") {
              await native.importVolume(dataDir, name, path, null, null);
            } else {
              await throughQemuNbd(path, format, (uri) => native.importVolume(dataDir, name, uri, null, null));
            }
          },
          createVolume: async (name, size) => {
            await native.createVolume(dataDir, name, size, null);
          },
        },
      });
      const started = Date.now();
      const result = await adapter.adopt(domain, { live: options.live === true });
      const seconds = (Date.now() - started) / 1000;
      if (options.json) {
        printJson({ ...result, seconds });
        return;
      }
      for (const d of result.disks) {
        io.writeOut(
          d.adopted
            ? `${domain} ${d.target}: ${d.from} -> Ferry volume ${d.volume}\n`
            : `${domain} ${d.target}: already on Ferry volume ${d.volume}\n`,
        );
      }
      io.writeOut(`adopted ${domain} (${result.mode}) in ${seconds.toFixed(1)}s\n`);
    });
}

/**
 * Read a qcow2 image as the guest sees it (through its backing chain): `qemu-nbd` serves it
 * read-only on a private unix socket for the duration of `use`, then is ended by its PID.
 */
async function throughQemuNbd<T>(path: string, format: string, use: (uri: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), "ferry-qemu-nbd-"));
  const socket = join(dir, "nbd.sock");
  const child = spawn(
    "qemu-nbd",
    ["--read-only", `--format=${format}`, "--persistent", "--shared=8", `--socket=${socket}`, path],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
    stderr += chunk;
  });
  const exited = new Promise<void>((resolve) => child.once("close", () => resolve()));
  let spawnError: Error | undefined;
  child.once("error", (error) => {
    spawnError = error;
  });
  try {
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (spawnError) throw new ToolMissing(`qemu-nbd cannot run (${spawnError.message}): install qemu-utils`);
      const listening = await stat(socket).then(
        () => true,
        () => false,
      );
      if (listening) break;
      if (child.exitCode !== null || Date.now() > deadline) {
        throw new ToolFailed(`qemu-nbd could not serve ${path}: ${stderr.trim() || "no socket within 10 s"}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    return await use(`nbd+unix:///?socket=${socket}`);
  } finally {
    if (child.exitCode === null && child.pid !== undefined && !spawnError) {
      child.kill("SIGTERM");
      await exited;
    }
    await rm(dir, { recursive: true, force: true });
  }
}
