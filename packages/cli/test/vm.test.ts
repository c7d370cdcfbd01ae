/**
 * `ferry vm` end to end with a real libvirtd (private, started by the harness), `ferry volume
 * serve` on a unix socket, and Ferry's TCG test guest: it boots from Ferry volumes and writes,
 * and the sha256 it prints on its console equals the bytes read back from the Ferry export with
 * nbdcopy. Offline adoption, live adoption while the guest writes, a drill copy recovered from a
 * capture and cleaned up, a qcow2 import, and bad input that changes nothing.
 */
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import {
  buildTestGuest,
  expectedGuestSha256,
  FerryCli,
  type FerryServe,
  fileDiskXml,
  type LibvirtDaemon,
  libvirtInstalled,
  readGuestConsole,
  Sandbox,
  startLibvirtDaemon,
  type TestGuestKernel,
  testGuestXml,
  waitForGuest,
} from "@ferry/testkit";
import { LibvirtVmAdapter } from "@ferry/vm-adapter";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

if (!libvirtInstalled()) throw new Error("libvirtd/QEMU are not installed: run infra/setup-libvirt.sh");

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const MiB = 2 ** 20;
const exec = promisify(execFile);

let sandbox: Sandbox;
let ferry: FerryCli;
let libvirtd: LibvirtDaemon;
let kernel: TestGuestKernel;
let serve: FerryServe;
let dir: string;
let data: string;
let socket: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  [libvirtd, kernel] = await Promise.all([startLibvirtDaemon(sandbox), buildTestGuest()]);
  dir = await sandbox.dir("ferry-vm-");
  data = join(dir, "data");
  socket = join(dir, "nbd.sock");
  env = { ...process.env, FERRY_LIBVIRT_URI: libvirtd.uri, FERRY_NBD_SOCKET: socket, FERRY_DATA: data };
  serve = await ferry.serve(["--data", data, "--socket", socket], { env });
});

afterAll(async () => {
  await libvirtd?.stop();
  await serve?.stop();
  await sandbox?.cleanup();
});

/** A Ferry volume's bytes, read over NBD by nbdcopy. */
async function volumeBytes(volume: string): Promise<Buffer> {
  const { stdout } = await exec("nbdcopy", [serve.uri(volume), "-"], { encoding: "buffer", maxBuffer: 64 * MiB });
  return stdout;
}

function sha256(bytes: Buffer): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** sha256 of the first `bytes` of a Ferry volume. */
async function volumeSha256(volume: string, bytes: number): Promise<string> {
  return sha256((await volumeBytes(volume)).subarray(0, bytes));
}

function virsh(...args: string[]) {
  return exec("virsh", ["-c", libvirtd.uri, ...args], { encoding: "utf8" });
}

interface VmJson {
  name: string;
  state: string;
  disks: { target: string; type: string; source: string; protocol?: string; socket?: string }[];
}

describe("ferry vm", () => {
  it("adopts a shut-off VM offline; the guest boots from the Ferry volumes and writes what it reports", async () => {
    const disks = { vda: join(dir, "web.raw"), vdb: join(dir, "web-data.raw") };
    const original = { vda: randomBytes(8 * MiB), vdb: randomBytes(4 * MiB) };
    await writeFile(disks.vda, original.vda);
    await writeFile(disks.vdb, original.vdb);
    const console = join(dir, "web.console");
    await virsh(
      "define",
      await xmlFile(
        "web",
        testGuestXml({
          name: "web",
          kernel,
          disks: [fileDiskXml("vda", disks.vda), fileDiskXml("vdb", disks.vdb)],
          console,
          seed: 11,
          mb: 2,
        }),
      ),
    );

    const before = await ferry.json<VmJson[]>(["vm", "list"], { env });
    expect(before.find((v) => v.name === "web")).toMatchObject({
      state: "shutoff",
      disks: [
        { target: "vda", type: "file", source: disks.vda },
        { target: "vdb", type: "file", source: disks.vdb },
      ],
    });

    const out = await ferry.ok(["vm", "adopt", "web"], { env });
    expect(out).toContain(`web vda: ${disks.vda} -> Ferry volume web-vda`);
    expect(out).toContain(`web vdb: ${disks.vdb} -> Ferry volume web-vdb`);
    const after = await ferry.json<VmJson[]>(["vm", "list"], { env });
    expect(after.find((v) => v.name === "web")?.disks).toEqual(
      ["vda", "vdb"].map((target) => ({
        target,
        device: "disk",
        type: "network",
        format: "raw",
        source: `web-${target}`,
        protocol: "nbd",
        socket,
      })),
    );

    const started = Date.now();
    await virsh("start", "web");
    const report = await waitForGuest(console);
    const seconds = (Date.now() - started) / 1000;
    // A figure for the README, not an assertion: boot time under TCG on this machine.
    process.stdout.write(
      `test guest: READY at ${report.readyUptime}s guest uptime, DONE ${seconds.toFixed(1)}s after virsh start\n`,
    );
    expect(report.status).toBe("ok");
    expect(report.errors).toEqual([]);
    for (const target of ["vda", "vdb"] as const) {
      // What the guest found is the raw disk it was adopted from ...
      expect(report.found[target]).toBe(sha256(original[target].subarray(0, 2 * MiB)));
      // ... and what it wrote is what the Ferry volume holds.
      const wrote = report.wrote[target]?.[0];
      expect(wrote).toBe(expectedGuestSha256(11, target, 1, 2));
      const volume = await volumeBytes(`web-${target}`);
      expect(sha256(volume.subarray(0, 2 * MiB))).toBe(wrote);
      // Beyond the written region the imported bytes are intact.
      expect(Buffer.compare(volume.subarray(2 * MiB), original[target].subarray(2 * MiB))).toBe(0);
    }
    await waitFor(async () => (await virsh("domstate", "web")).stdout.trim() === "shut off");
  });

  it("adopts a running VM live while the guest writes, losing nothing", async () => {
    const rounds = 16;
    const { disk, console } = await defineWritingGuest("db", 22, rounds);
    await virsh("start", "db");
    try {
      // Adopt mid-workload: the guest has finished round 2 and goes on writing.
      await waitForGuest(console, (r) => (r.wrote.vda?.length ?? 0) >= 2);
      const adopt = await ferry.json<{ mode: string; seconds: number; disks: { volume: string }[] }>(
        ["vm", "adopt", "db", "--live"],
        { env },
      );
      expect(adopt.mode).toBe("live");
      // The guest was still in its workload when the copy pivoted.
      const atPivot = (await readGuestConsole(console)).wrote.vda?.length ?? 0;
      expect(atPivot).toBeLessThan(rounds);
      expect(adopt.disks.map((d) => d.volume)).toEqual(["db-vda"]);
      // Running on the Ferry export now, and so is the definition.
      expect((await virsh("domblklist", "db")).stdout).toMatch(/vda\s+db-vda/);
      expect((await virsh("dumpxml", "--inactive", "db")).stdout).toContain("name='db-vda'");

      const report = await waitForGuest(console);
      expect(report.status).toBe("ok");
      expect(report.wrote.vda).toHaveLength(rounds);
      const last = expectedGuestSha256(22, "vda", rounds, 4);
      expect(report.wrote.vda?.[rounds - 1]).toBe(last);
      expect(await volumeSha256("db-vda", 4 * MiB)).toBe(last);
      // The old file stopped receiving writes at the pivot.
      expect(sha256((await readFile(disk)).subarray(0, 4 * MiB))).not.toBe(last);
      // Figures, not assertions: the guest's time per 4 MiB round (O_DIRECT) before the copy,
      // on the local file, and after the pivot, on the Ferry export.
      const at = report.wroteAt.vda ?? [];
      const perRound = (from: number, to: number) => ((at[to] ?? 0) - (at[from] ?? 0)) / (to - from);
      process.stdout.write(
        `live adoption of an 8 MiB disk under writes: ${adopt.seconds.toFixed(2)}s; guest round (4 MiB) ` +
          `${perRound(0, 1).toFixed(2)}s before, ${atPivot + 1 < rounds - 1 ? perRound(atPivot + 1, rounds - 1).toFixed(2) : "?"}s on Ferry after\n`,
      );
    } finally {
      await virsh("destroy", "db").catch(() => undefined);
    }
  });

  it("recovers a drill copy from a capture, cleans it up, then recovers the VM itself (failover)", async () => {
    const adapter = await LibvirtVmAdapter.connect({ uri: libvirtd.uri, exportSocket: socket });
    const [capture] = await adapter.capture(["web"]);
    expect(capture?.metadata).toMatchObject({ disks: { vda: "web-vda", vdb: "web-vdb" } });
    expect(await adapter.volumesOf(["web"])).toEqual(["web-vda", "web-vdb"]);
    // The drill's volumes: copies of web's as they are now (what web wrote in the first test).
    for (const target of ["vda", "vdb"]) {
      await ferry.ok(["volume", "import", `web-${target}-drill`, "--from", serve.uri(`web-${target}`)], { env });
    }
    const console = join(dir, "web.console");
    await writeFile(console, "");

    const started = await adapter.recover(capture ? [capture] : [], {
      app: "shop",
      site: "site-a",
      drill: true,
      volumes: { "web-vda": "web-vda-drill", "web-vdb": "web-vdb-drill" },
    });
    expect(started).toEqual(["web-drill"]);
    // The drill copy writes its console beside the original's, never into it.
    const report = await waitForGuest(`${console}.web-drill`);
    expect(await readFile(console, "utf8")).toBe("");
    for (const target of ["vda", "vdb"]) {
      expect(report.found[target]).toBe(expectedGuestSha256(11, target, 1, 2));
      expect(await volumeSha256(`web-${target}-drill`, 2 * MiB)).toBe(report.wrote[target]?.[0]);
    }
    const drillXml = (await virsh("dumpxml", "--inactive", "web-drill")).stdout;
    expect(drillXml).toContain("name='web-vda-drill'");
    expect(drillXml).not.toContain((await virsh("domuuid", "web")).stdout.trim());

    await adapter.cleanupDrill("shop");
    const names = (await ferry.json<VmJson[]>(["vm", "list"], { env })).map((v) => v.name);
    expect(names).not.toContain("web-drill");
    expect(names).toContain("web");

    // A failover recovers the VM itself (same name and UUID, redefined) onto the recovered
    // volumes; here the drill's copies stand in for a promoted replica.
    const uuid = (await virsh("domuuid", "web")).stdout.trim();
    await writeFile(console, "");
    const recovered = await adapter.recover(capture ? [capture] : [], {
      app: "shop",
      site: "site-a",
      drill: false,
      volumes: { "web-vda": "web-vda-drill", "web-vdb": "web-vdb-drill" },
    });
    expect(recovered).toEqual(["web"]);
    const failover = await waitForGuest(console);
    expect(failover.found.vda).toBe(expectedGuestSha256(11, "vda", 1, 2));
    expect((await virsh("domuuid", "web")).stdout.trim()).toBe(uuid);
    expect((await virsh("domblklist", "web")).stdout).toMatch(/vdb\s+web-vdb-drill/);
  });

  it("keeps a guest through a restart of its volume service: paused on the I/O error, resumed, nothing lost", async () => {
    const rounds = 12;
    const { console } = await defineWritingGuest("cache", 33, rounds);
    await ferry.ok(["vm", "adopt", "cache"], { env });
    // Adopted disks stop the guest on an I/O error instead of failing its writes.
    expect((await virsh("dumpxml", "--inactive", "cache")).stdout).toMatch(
      /<driver name='qemu' type='raw' error_policy='stop' rerror_policy='stop'\/>/,
    );
    const adapter = await LibvirtVmAdapter.connect({ uri: libvirtd.uri, exportSocket: socket, networkMapping: {} });
    await virsh("start", "cache");
    try {
      await waitForGuest(console, (r) => (r.wrote.vda?.length ?? 0) >= 2);
      // The volume service goes away while the guest writes (what a ferryd restart does) ...
      await serve.stop();
      await waitFor(async () => (await virsh("domstate", "--reason", "cache")).stdout.includes("paused (I/O error)"));
      // ... and once it is back on the same socket, the guest goes on where it stopped.
      const before = (await readGuestConsole(console)).wrote.vda?.length ?? 0;
      serve = await ferry.serve(["--data", data, "--socket", socket], { env });
      // As ferryd does every 2 s: QEMU's NBD client reconnects on its own schedule (backing off
      // up to seconds), and a resume before that pauses the guest again at its next write.
      const resumed = new Set<string>();
      await waitFor(async () => {
        for (const name of await adapter.resumePausedOnError()) resumed.add(name);
        return ((await readGuestConsole(console)).wrote.vda?.length ?? 0) > before;
      }, 60_000);
      expect([...resumed]).toEqual(["cache"]);
      const report = await waitForGuest(console);
      expect(report.status).toBe("ok");
      expect(report.errors).toEqual([]);
      expect(report.wrote.vda).toHaveLength(rounds);
      const last = expectedGuestSha256(33, "vda", rounds, 4);
      expect(report.wrote.vda?.[rounds - 1]).toBe(last);
      expect(await volumeSha256("cache-vda", 4 * MiB)).toBe(last);
      // A VM paused by a user is none of ferryd's business.
      await virsh("suspend", "cache");
      expect(await adapter.resumePausedOnError()).toEqual([]);
      expect((await virsh("domstate", "--reason", "cache")).stdout).toContain("paused (user)");
    } finally {
      await virsh("destroy", "cache").catch(() => undefined);
    }
  });

  it("imports a qcow2 disk through its backing chain when adopting offline", async () => {
    const base = join(dir, "base.raw");
    const overlay = join(dir, "app.qcow2");
    const baseBytes = randomBytes(4 * MiB);
    await writeFile(base, baseBytes);
    await exec("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, overlay]);
    await exec("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 1M 512K", overlay]);
    await virsh(
      "define",
      await xmlFile(
        "app",
        testGuestXml({
          name: "app",
          kernel,
          disks: [fileDiskXml("vda", overlay, "qcow2")],
          console: join(dir, "app.console"),
          seed: 1,
          mb: 1,
        }),
      ),
    );
    expect(await ferry.ok(["vm", "adopt", "app"], { env })).toContain(`app vda: ${overlay} -> Ferry volume app-vda`);
    // What the guest would see: the base with the overlay's write on top.
    const expected = Buffer.from(baseBytes);
    expected.fill(0x5a, 1 * MiB, 1 * MiB + 512 * 1024);
    expect(sha256(await volumeBytes("app-vda"))).toBe(sha256(expected));
    expect((await virsh("dumpxml", "--inactive", "app")).stdout).toContain("name='app-vda'");
    await virsh("undefine", "app");
  });

  it("refuses an unknown domain and a vmdk disk with a clear error, changing nothing", async () => {
    const unknown = await ferry.run(["vm", "adopt", "no-such-vm"], { env });
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toBe(
      "ferry: no domain named 'no-such-vm' in libvirt (see `ferry vm list` for the domains there)\n",
    );

    const vmdk = join(dir, "legacy.vmdk");
    await exec("qemu-img", ["create", "-q", "-f", "vmdk", vmdk, "8M"]);
    await virsh(
      "define",
      await xmlFile(
        "legacy",
        testGuestXml({
          name: "legacy",
          kernel,
          disks: [fileDiskXml("vda", vmdk, "vmdk")],
          console: join(dir, "legacy.console"),
          seed: 1,
          mb: 1,
        }),
      ),
    );
    const before = (await virsh("dumpxml", "--inactive", "legacy")).stdout;
    const volumesBefore = await ferry.json<unknown[]>(["volume", "list"], { env });
    const refused = await ferry.run(["vm", "adopt", "legacy"], { env });
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/^ferry: disk vda of domain legacy is vmdk: .*nothing was changed\n$/);
    expect((await virsh("dumpxml", "--inactive", "legacy")).stdout).toBe(before);
    expect(await ferry.json<unknown[]>(["volume", "list"], { env })).toEqual(volumesBefore);

    const noSocket = await ferry.run(["vm", "adopt", "legacy"], { env: { ...env, FERRY_NBD_SOCKET: "" } });
    expect(noSocket.code).toBe(2);
    expect(noSocket.stderr).toContain("needs --socket");
  });
});

/** A test guest with one 8 MiB zeroed file disk that writes 4 MiB `rounds` times, then stays up; defined, not started. */
async function defineWritingGuest(
  name: string,
  seed: number,
  rounds: number,
): Promise<{ disk: string; console: string }> {
  const disk = join(dir, `${name}.raw`);
  await writeFile(disk, Buffer.alloc(8 * MiB));
  const console = join(dir, `${name}.console`);
  const xml = testGuestXml({
    name,
    kernel,
    disks: [fileDiskXml("vda", disk)],
    console,
    seed,
    mb: 4,
    rounds,
    stayUp: true,
  });
  await virsh("define", await xmlFile(name, xml));
  return { disk, console };
}

async function xmlFile(name: string, xml: string): Promise<string> {
  const path = join(dir, `${name}.xml`);
  await writeFile(path, xml);
  return path;
}

async function waitFor(probe: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error("condition not reached in time");
    await new Promise((r) => setTimeout(r, 200));
  }
}
