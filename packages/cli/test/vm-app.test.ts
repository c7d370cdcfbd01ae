/**
 * A VM as a member of a protected application, across two sites: each site has its own libvirtd
 * (private, started by the harness) and its own ferryd with `--libvirt`. The test guest boots at A
 * from Ferry volumes and writes; the application (the VM's two disks) replicates to B with the
 * domain XML captured at every cut; an unplanned failover at B defines the VM from that capture,
 * on B's replicas, and boots it — and what the guest finds on its disks at B is what it wrote at A.
 */
import { rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Operation, ProtectionStatus, RecoveryPoint } from "@ferry/orchestrator";
import {
  buildTestGuest,
  expectedGuestSha256,
  FerryCli,
  type FerryServe,
  type LibvirtDaemon,
  libvirtInstalled,
  Sandbox,
  startLibvirtDaemon,
  startTwoSites,
  type TestGuestKernel,
  type TwoSites,
  testGuestXml,
  waitFor,
  waitForGuest,
} from "@ferry/testkit";
import { ferryDiskXml } from "@ferry/vm-adapter";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

if (!libvirtInstalled()) throw new Error("libvirtd/QEMU are not installed: run infra/setup-libvirt.sh");

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const SEED = 23;
const MB = 2;

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;
let kernel: TestGuestKernel;
const site: Record<"a" | "b", { libvirtd: LibvirtDaemon; ferryd: FerryServe; data: string; socket: string }> =
  {} as never;

function at(s: "a" | "b", args: readonly string[]) {
  return [...args, "--nats", sites[s].cliUrl, "--site", sites[s].name];
}

async function startSite(s: "a" | "b"): Promise<void> {
  const libvirtd = await startLibvirtDaemon(sandbox);
  const dir = await sandbox.dir(`vm-app-${s}-`);
  const data = join(dir, "data");
  const socket = join(dir, "nbd.sock");
  const n = sites[s];
  const ferryd = await ferry.daemon([
    "--data",
    data,
    "--socket",
    socket,
    "--site",
    n.name,
    "--region",
    n.region,
    "--nats",
    n.url,
    "--libvirt",
    libvirtd.uri,
  ]);
  site[s] = { libvirtd, ferryd, data, socket };
}

beforeAll(async () => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  [sites, kernel] = await Promise.all([startTwoSites(), buildTestGuest()]);
  await startSite("a");
  await startSite("b");
  await waitFor("both sites to know each other", async () => {
    const list = await ferry.json<{ name: string }[]>(at("a", ["site", "list"]));
    return list.length === 2;
  });
});

afterAll(async () => {
  for (const s of ["a", "b"] as const) await site[s]?.libvirtd.stop();
  await sandbox?.cleanup();
  await sites?.stop();
});

describe("a VM in a protected application", () => {
  it("drills at B beside running replication, then fails over to B: the VM is defined there from its capture and boots on the replicas with what it wrote at A", async () => {
    const { libvirtd, socket } = site.a;
    // The VM's disks are Ferry volumes at A (as `ferry vm adopt` leaves them).
    for (const v of ["web-vda", "web-vdb"])
      await ferry.ok(["volume", "create", v, "--size", "8M", "--data", site.a.data]);
    const consoleLog = join(await sandbox.dir("vm-console-"), "web.console");
    const disk = (target: string) =>
      ferryDiskXml({ exportName: `web-${target}`, socket, reconnectDelay: 5 }).replace(
        "</disk>",
        `<target dev='${target}' bus='virtio'/></disk>`,
      );
    const xml = testGuestXml({
      name: "web",
      kernel,
      disks: [disk("vda"), disk("vdb")],
      console: consoleLog,
      seed: SEED,
      mb: MB,
    });
    const xmlFile = join(await sandbox.dir("vm-xml-"), "web.xml");
    await writeFile(xmlFile, xml);
    const virshA = (...args: string[]) => sandbox.run("virsh", ["-c", libvirtd.uri, ...args]);
    expect((await virshA("define", xmlFile)).code).toBe(0);
    expect((await virshA("start", "web")).code).toBe(0);
    const atA = await waitForGuest(consoleLog);
    expect(atA.status).toBe("ok");
    const wrote = expectedGuestSha256(SEED, "vda", 1, MB);
    expect(atA.wrote.vda?.[0]).toBe(wrote);
    await waitFor("the guest at A to power off", async () =>
      (await virshA("domstate", "web")).stdout.includes("shut off"),
    );

    // The application is the VM: its disks join as volumes.
    const unknown = await ferry.run(at("a", ["app", "create", "nope", "--vm", "no-such-vm"]));
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain("no-such-vm");
    const app = await ferry.json<{ volumes: string[]; vms: string[] }>(
      at("a", ["app", "create", "web", "--vm", "web"]),
    );
    expect(app).toMatchObject({ volumes: ["web-vda", "web-vdb"], vms: ["web"] });

    // Cuts every second: keep enough points that the one picked below is still there at failover.
    await ferry.ok(at("a", ["policy", "create", "vm-gold", "--mode", "async", "--interval", "1s", "--retain", "60"]));
    await ferry.ok(at("a", ["protect", "web", "--policy", "vm-gold", "--to", "site-b", "--wait"]));
    const point = await waitFor(
      "a recovery point of web with the VM captured",
      async () => (await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "web"]))).find((p) => p.members === 1),
      { timeoutMs: 30_000 },
    );
    expect(point.consistency).toBe("crash");
    const meta = await ferry.json<{ captures: { kind: string; name: string }[] }>(
      at("b", ["recovery-points", "web", "--point", point.id]),
    );
    expect(meta.captures).toMatchObject([{ kind: "vm", name: "web" }]);

    // A drill at B beside running replication: an isolated copy (renamed, new UUID, no NIC) boots on
    // the drill clones of the latest point and finds what the guest wrote at A; its console is its own.
    const before = await ferry.json<ProtectionStatus[]>(at("a", ["status", "web"]));
    const drill = await ferry.json<Operation>(at("b", ["failover", "web", "--to", "site-b", "--test"]));
    expect(drill.state, JSON.stringify(drill.error)).toBe("succeeded");
    expect(drill.steps.find((s) => s.name === "recover-members")?.detail).toContain("started web-drill");
    const inDrill = await waitForGuest(`${consoleLog}.web-drill`);
    expect(inDrill.found.vda).toBe(wrote);
    const drillXml = await sandbox.run("virsh", ["-c", site.b.libvirtd.uri, "dumpxml", "web-drill"]);
    expect(drillXml.stdout).toContain("web-vda-drill");
    expect(drillXml.stdout).not.toContain("<interface");
    await waitFor("a new recovery point of web while the drill runs", async () => {
      const [now] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "web"]));
      return (now?.lastRecoveryPoint?.generation ?? 0) > (before[0]?.lastRecoveryPoint?.generation ?? 0);
    });
    const cleanup = await ferry.json<Operation>(at("b", ["drill", "cleanup", "web"]));
    expect(cleanup.state, JSON.stringify(cleanup.error)).toBe("succeeded");
    const left = await sandbox.run("virsh", ["-c", site.b.libvirtd.uri, "list", "--all", "--name"]);
    expect(left.stdout.trim()).toBe("");

    // Site A is lost with its VM; B recovers the application at that point.
    await rename(consoleLog, `${consoleLog}.at-a`);
    const op = await ferry.json<Operation>(at("b", ["failover", "web", "--to", "site-b", "--point", point.id]));
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(op.steps.find((s) => s.name === "recover-members")).toMatchObject({
      state: "done",
      detail: expect.stringContaining("started web"),
    });
    const atB = await waitForGuest(consoleLog);
    expect(atB.found.vda).toBe(wrote);
    expect(atB.status).toBe("ok");
    const virshB = await sandbox.run("virsh", ["-c", site.b.libvirtd.uri, "dumpxml", "web"]);
    expect(virshB.stdout).toContain(site.b.socket);
  });
});
