/**
 * A Ferry volume attached the way a Kubernetes node attaches it, as far as this machine allows: a
 * real node runs the kernel's `nbd-client` and gets /dev/nbdN; here there is no kernel NBD, so
 * `nbdfuse` presents the export as a file and a loop device makes it a block device (4 KiB
 * sectors, as `nbd-client -b 4096`). Then what the node plugin would do: mkfs on first use, mount,
 * write, unmount, detach. The data is checked from Ferry's side — the export read back with
 * nbdcopy and the file taken out of the image with debugfs (no kernel, no FUSE), the writes in the
 * volume's dirty map — and at the target site, where the replica is attached read-only.
 *
 * Loop devices and mounts need root; when the tests do not run as root (or /dev/fuse or
 * /dev/loop-control is missing) the attach tests are skipped with the reason printed.
 */
import { createHash, randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { access, mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FerryCli, type FerryServe, Sandbox, startTwoSites, type TwoSites, waitFor } from "@ferry/testkit";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { serveSite } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const MiB = 2 ** 20;
const VOLUME_SIZE = "64M";
// mkfs, nbdcopy and two sites on a shared 2-core machine: more than the suite's default minute.
const ATTACH_TIMEOUT_MS = 180_000;

interface Extent {
  offset: number;
  length: number;
}

/** Why this machine cannot attach a volume as a block device, or undefined when it can. */
async function attachBlocker(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return "loop devices and mounts need root, and these tests do not run as root";
  for (const device of ["/dev/fuse", "/dev/loop-control"]) {
    try {
      await access(device, constants.R_OK | constants.W_OK);
    } catch {
      return `${device} is missing or not usable`;
    }
  }
  return undefined;
}

const blocker = await attachBlocker();
if (blocker !== undefined) console.log(`node-attach: skipping the block-device attach tests: ${blocker}`);

let sandbox: Sandbox;
let ferry: FerryCli;
let teardown: Teardown;

beforeEach(() => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  teardown = new Teardown();
});

afterEach(async () => {
  // Unmount and detach first: the sandbox's cleanup SIGKILLs nbdfuse (which would leave its mount
  // behind) and removes the temp dirs (which must not hold a mounted filesystem).
  try {
    await teardown.run();
  } finally {
    await sandbox.cleanup();
  }
});

/** Undo steps run last-in first-out, every one even when another fails. */
class Teardown {
  private readonly steps: { what: string; undo: () => Promise<void> }[] = [];

  push(what: string, undo: () => Promise<void>): void {
    this.steps.push({ what, undo });
  }

  /** Run the step for `what` now (the test's own orderly detach) instead of at the end. */
  async now(what: string): Promise<void> {
    const index = this.steps.findLastIndex((step) => step.what === what);
    if (index < 0) throw new Error(`nothing to undo for ${what}`);
    const [step] = this.steps.splice(index, 1);
    await step?.undo();
  }

  async run(): Promise<void> {
    const failures: string[] = [];
    for (const step of this.steps.splice(0).reverse()) {
      try {
        await step.undo();
      } catch (error) {
        failures.push(`${step.what}: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    if (failures.length > 0) throw new Error(`cleanup failed: ${failures.join("; ")}`);
  }
}

/** Run a command to completion and require exit status 0; returns stdout. */
async function sh(command: string, args: readonly string[]): Promise<string> {
  const result = await sandbox.run(command, args, { timeoutMs: 120_000 });
  if (result.code !== 0) {
    throw new Error(`${command} ${args.join(" ")} exited ${result.code ?? result.signal}: ${result.stderr.trim()}`);
  }
  return result.stdout;
}

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

interface Attached {
  /** The block device, /dev/loopN (on a node: /dev/nbdN). */
  device: string;
  /** Where its filesystem is mounted. */
  mountpoint: string;
}

/**
 * Attach an export as a block device: nbdfuse (the stand-in for `nbd-client`), then a loop device
 * with 4 KiB sectors. Registers the undo steps: detach the loop device, stop nbdfuse.
 */
async function attach(uri: string, { readOnly }: { readOnly: boolean }): Promise<string> {
  const fuseDir = await sandbox.dir("ferry-nbdfuse-");
  const file = join(fuseDir, "disk");
  const pidFile = join(await sandbox.dir("ferry-nbdfuse-pid-"), "nbdfuse.pid");
  const nbdfuse = sandbox.spawn("nbdfuse", [...(readOnly ? ["-r"] : []), "-P", pidFile, file, uri]);
  let stderr = "";
  nbdfuse.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
    stderr += chunk;
  });
  const exited = new Promise<void>((resolve) => nbdfuse.once("exit", () => resolve()));
  teardown.push("nbdfuse", async () => {
    const pid = nbdfuse.pid;
    if (pid !== undefined && nbdfuse.exitCode === null && nbdfuse.signalCode === null) {
      process.kill(pid, "SIGTERM"); // nbdfuse unmounts itself on SIGTERM
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 10_000).unref())]);
    }
    if ((await mountedAt(fuseDir)) !== undefined) await sh("umount", ["--lazy", fuseDir]);
  });
  await waitFor(`nbdfuse to present ${uri} as ${file}`, async () => {
    if (nbdfuse.exitCode !== null) throw new Error(`nbdfuse exited ${nbdfuse.exitCode}: ${stderr.trim()}`);
    await access(pidFile);
    return (await stat(file)).isFile();
  });

  const device = (
    await sh("losetup", ["--find", "--show", "--sector-size", "4096", ...(readOnly ? ["--read-only"] : []), file])
  ).trim();
  teardown.push("loop", () => detachLoop(device));
  return device;
}

/** losetup -d, then wait until the kernel has let go of the backing file (detach is asynchronous). */
async function detachLoop(device: string): Promise<void> {
  const name = device.replace("/dev/", "");
  if (!(await isLoopBound(name))) return;
  await sh("losetup", ["--detach", device]);
  await waitFor(`${device} to be detached`, async () => !(await isLoopBound(name)), { timeoutMs: 10_000 });
}

async function isLoopBound(name: string): Promise<boolean> {
  try {
    await access(`/sys/block/${name}/loop/backing_file`);
    return true;
  } catch {
    return false;
  }
}

/** The device mounted at `dir` per /proc/self/mountinfo, or undefined. */
async function mountedAt(dir: string): Promise<string | undefined> {
  const mountinfo = await readFile("/proc/self/mountinfo", "utf8");
  for (const line of mountinfo.split("\n")) {
    const fields = line.split(" ");
    if (fields[4] === dir) return fields[fields.indexOf("-") + 2];
  }
  return undefined;
}

async function mount(device: string, options: string): Promise<Attached> {
  const mountpoint = await sandbox.dir("ferry-mnt-");
  await sh("mount", ["-t", "ext4", "-o", options, device, mountpoint]);
  teardown.push("mount", async () => {
    if ((await mountedAt(mountpoint)) === undefined) return;
    const result = await sandbox.run("umount", [mountpoint]);
    // Never leave a mounted filesystem under a directory the sandbox is about to remove.
    if (result.code !== 0) await sh("umount", ["--lazy", mountpoint]);
  });
  expect(await mountedAt(mountpoint)).toBe(device);
  return { device, mountpoint };
}

/** The orderly detach a node does: unmount, flush and detach the device, stop the NBD client. */
async function detachAll(): Promise<void> {
  await teardown.now("mount");
  await teardown.now("loop");
  await teardown.now("nbdfuse");
}

/** Format, mount and fill a volume as a pod's first use would; returns the file's checksum. */
async function firstUse(uri: string, payload: Buffer): Promise<string> {
  const device = await attach(uri, { readOnly: false });
  // First use: no filesystem yet (blkid finds nothing, exit 2), so make one — as the node plugin will.
  expect((await sandbox.run("blkid", ["-p", device])).code).toBe(2);
  await sh("mkfs.ext4", ["-q", "-F", "-L", "ferry-test", device]);
  const { mountpoint } = await mount(device, "rw");
  await mkdir(join(mountpoint, "app"));
  await writeFile(join(mountpoint, "app", "payload.bin"), payload);
  await sh("sync", ["-f", join(mountpoint, "app", "payload.bin")]);
  expect(sha256(await readFile(join(mountpoint, "app", "payload.bin")))).toBe(sha256(payload));
  await detachAll();
  return sha256(payload);
}

/** The file as the volume holds it: the whole export copied by nbdcopy, the file read by debugfs. */
async function fileFromExport(uri: string): Promise<Buffer> {
  const dir = await sandbox.dir("ferry-image-");
  const image = join(dir, "volume.img");
  await sh("nbdcopy", [uri, image]);
  // A clean filesystem, nothing for fsck to repair: everything reached the volume.
  await sh("e2fsck", ["-f", "-n", image]);
  expect((await sh("blkid", ["-o", "value", "-s", "LABEL", image])).trim()).toBe("ferry-test");
  const out = join(dir, "payload.bin");
  await sh("debugfs", ["-R", `dump /app/payload.bin ${out}`, image]);
  return readFile(out);
}

describe.skipIf(blocker !== undefined)("node attach through nbdfuse and a loop device", () => {
  it(
    "formats, mounts and writes a volume; the filesystem is in the Ferry volume",
    async () => {
      const data = await sandbox.dir();
      await ferry.ok(["volume", "create", "pvc-shop-0", "--size", VOLUME_SIZE, "--data", data]);
      await ferry.ok(["volume", "cut", "pvc-shop-0", "--data", data]);
      expect(await ferry.json<Extent[]>(["volume", "dirty", "pvc-shop-0", "--data", data])).toEqual([]);
      const serve: FerryServe = await ferry.serve(["--data", data, "--socket", join(data, "nbd.sock")]);
      const uri = serve.uri("pvc-shop-0");

      const payload = randomBytes(3 * MiB + 12_345);
      const written = await firstUse(uri, payload);

      expect(sha256(await fileFromExport(uri))).toBe(written);
      // The writes went through the volume service's write path: changed-block tracking saw them.
      const dirty = await ferry.json<Extent[]>(["volume", "dirty", "pvc-shop-0", "--data", data]);
      expect(dirty.reduce((sum, extent) => sum + extent.length, 0)).toBeGreaterThanOrEqual(payload.length);

      // The pod moves to another node: attach again, mount, and the file is there.
      const device = await attach(uri, { readOnly: false });
      const { mountpoint } = await mount(device, "rw");
      expect(sha256(await readFile(join(mountpoint, "app", "payload.bin")))).toBe(written);
      await detachAll();
      expect(await serve.stop()).toEqual({ code: 0, signal: null });
    },
    ATTACH_TIMEOUT_MS,
  );

  describe("at the target site", () => {
    let sites: TwoSites;

    beforeAll(async () => {
      sites = await startTwoSites();
    });

    afterAll(async () => {
      await sites?.stop();
    });

    it(
      "attaches the replica read-only and reads the file written at the source",
      async () => {
        const a = await serveSite(ferry, sandbox, sites.a);
        const b = await serveSite(ferry, sandbox, sites.b);
        await ferry.ok(["volume", "create", "pvc-ledger-0", "--size", VOLUME_SIZE, "--data", a.data]);
        const payload = Buffer.alloc(MiB, "ledger entry\n");
        const written = await firstUse(a.serve.uri("pvc-ledger-0"), payload);

        await ferry.ok(["replicate", "start", "pvc-ledger-0", "--to", "site-b", "--mode", "async", "--data", a.data]);
        await ferry.ok(["replicate", "sync", "pvc-ledger-0", "--data", a.data]);
        const replicaUri = b.serve.uri("pvc-ledger-0");
        expect(sha256(await fileFromExport(replicaUri))).toBe(written);

        // A replica takes no writes: the export says so, and the node attaches it read-only.
        const info = await sh("nbdinfo", ["--json", replicaUri]);
        const [replicaExport] = (JSON.parse(info) as { exports: { is_read_only: boolean }[] }).exports;
        expect(replicaExport?.is_read_only).toBe(true);
        const device = await attach(replicaUri, { readOnly: true });
        // noload: a read-only device cannot replay a journal, and a replica is what a crash leaves.
        const { mountpoint } = await mount(device, "ro,noload");
        expect(sha256(await readFile(join(mountpoint, "app", "payload.bin")))).toBe(written);
        await expect(writeFile(join(mountpoint, "app", "new.txt"), "x")).rejects.toMatchObject({ code: "EROFS" });
        await detachAll();

        await ferry.ok(["replicate", "stop", "pvc-ledger-0", "--data", a.data]);
        expect(await a.serve.stop()).toEqual({ code: 0, signal: null });
        expect(await b.serve.stop()).toEqual({ code: 0, signal: null });
      },
      ATTACH_TIMEOUT_MS,
    );
  });
});
