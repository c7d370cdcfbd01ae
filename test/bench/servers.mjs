/**
 * The NBD servers the volume bench compares, and how each is made fair: every one serves a fresh
 * raw file of the same size in the same filesystem (the run's temp dir), as its own process, on
 * the same transport, with the page cache in play (no O_DIRECT anywhere), and is started by the
 * bench and stopped by PID.
 *
 *   ferry            `ferry volume serve` (the CLI as shipped), changed-block tracking on
 *   ferry-untracked  `ferry volume serve --untracked` (hidden, benchmarks only): no changed-block tracking
 *   qemu-nbd         qemu-nbd -f raw -t -e 8 --cache=writeback (aio=threads, its default)
 *   nbdkit           nbdkit file FILE (thread model parallel, 16 threads, its defaults)
 *
 * The copy source (`nbdkit sparse-random … percent=100`) also lives here.
 */
import { open } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort } from "@ferry/nats-sites";
import { createVolume } from "../../packages/dataplane-native/binding.js";

export const EXPORT = "bench";
const REPO = fileURLToPath(new URL("../..", import.meta.url));
const FERRY_CLI = join(REPO, "packages/cli/bin/ferry.js");

/**
 * Each server: `prepare(dir, size)` makes its fresh sparse backing file and says where it is;
 * `command(prepared, listen)` is the process that serves it.
 */
export const SERVERS = {
  ferry: {
    async prepare(dir, size) {
      const dataDir = join(dir, "ferry");
      await createVolume(dataDir, EXPORT, size);
      return { dataDir, file: join(dataDir, "volumes", EXPORT, "data.raw") };
    },
    command: ({ dataDir }, listen) => [
      process.execPath,
      [FERRY_CLI, "volume", "serve", "--data", dataDir, ...ferryListen(listen)],
    ],
  },
  "ferry-untracked": {
    prepare: (dir, size) => SERVERS.ferry.prepare(dir, size),
    command: ({ dataDir }, listen) => [
      process.execPath,
      [FERRY_CLI, "volume", "serve", "--data", dataDir, ...ferryListen(listen), "--untracked"],
    ],
  },
  "qemu-nbd": {
    prepare: (dir, size) => sparseFile(dir, size),
    command: ({ file }, listen) => [
      "qemu-nbd",
      [
        "-f",
        "raw",
        "--persistent",
        // nbdcopy opens 4 connections; room for more so a slow disconnect never blocks the next.
        "--shared=8",
        "--cache=writeback",
        "--export-name",
        EXPORT,
        ...(listen.socket ? ["--socket", listen.socket] : ["--bind", listen.host, "--port", String(listen.port)]),
        file,
      ],
    ],
  },
  nbdkit: {
    prepare: (dir, size) => sparseFile(dir, size),
    command: ({ file }, listen) => [
      "nbdkit",
      ["--foreground", "--exit-with-parent", ...nbdkitListen(listen), "file", file],
    ],
  },
};

export const PEERS = ["qemu-nbd", "nbdkit"];

/** The nbdcopy source: fully allocated, non-zero, generated (no disk behind it), same every run. */
export function copySourceCommand(size, listen) {
  return [
    "nbdkit",
    [
      "--foreground",
      "--exit-with-parent",
      ...nbdkitListen(listen),
      "sparse-random",
      String(size),
      "percent=100",
      "seed=1",
    ],
  ];
}

function ferryListen(listen) {
  return listen.socket ? ["--socket", listen.socket] : ["--listen", `${listen.host}:${listen.port}`];
}

function nbdkitListen(listen) {
  return listen.socket ? ["--unix", listen.socket] : ["--ipaddr", listen.host, "--port", String(listen.port)];
}

async function sparseFile(dir, size) {
  const file = join(dir, "disk.raw");
  const fh = await open(file, "wx");
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
  return { file };
}

/** Where a server listens: a unix socket in `dir`, or a free loopback TCP port. */
export async function listenOn(transport, dir, name) {
  if (transport === "unix") return { socket: join(dir, `${name}.sock`) };
  return { host: "127.0.0.1", port: await freePort() };
}

export function uriOf(listen) {
  return listen.socket
    ? `nbd+unix:///${EXPORT}?socket=${listen.socket}`
    : `nbd://${listen.host}:${listen.port}/${EXPORT}`;
}
