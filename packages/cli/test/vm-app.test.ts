/**
 * A VM as a member of a protected application, across two sites: each site has its own libvirtd
 * (private, started by the harness) and its own ferryd with `--libvirt`. The test guest boots at A
 * from Ferry volumes and writes; the application (the VM's two disks) replicates to B with the
 * domain XML captured at every cut; an unplanned failover at B defines the VM from that capture,
 * on B's replicas, and boots it — and what the guest finds on its disks at B is what it wrote at A.
 * Once asynchronously with crash-consistent points, once synchronously with a plain volume beside
 * the VM and application-consistent points (qemu-ga in the guest freezes and thaws it at each cut).
 */
import { rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Operation, ProtectionStatus, RecoveryPoint } from "@ferry/orchestrator";
import {
  buildTestGuest,
  expectedGuestSha256,
  exportSha256,
  FerryCli,
  type FerryServe,
  type GuestReport,
  type LibvirtDaemon,
  libvirtInstalled,
  qemuIo,
  Sandbox,
  startLibvirtDaemon,
  startTwoSites,
  type TestGuestKernel,
  type TestGuestOptions,
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
const DB_SEED = 29;
/** Rounds of 1 MiB per disk: a few seconds of writing, so cuts (every second) freeze the guest as it writes. */
const DB_ROUNDS = 15;

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;
let kernel: TestGuestKernel;
const site: Record<"a" | "b", { libvirtd: LibvirtDaemon; ferryd: FerryServe; data: string; socket: string }> =
  {} as never;

function at(s: "a" | "b", args: readonly string[]) {
  return [...args, "--nats", sites[s].cliUrl, "--site", sites[s].name];
}

function virsh(s: "a" | "b", ...args: string[]) {
  return sandbox.run("virsh", ["-c", site[s].libvirtd.uri, ...args]);
}

/**
 * Define the test guest `name` at A on two new Ferry volumes of A, `NAME-vda` and `NAME-vdb` (as
 * `ferry vm adopt` leaves a VM's disks), and start it unless told not to. Returns its console's path.
 */
async function guestAtA(
  name: string,
  options: Pick<TestGuestOptions, "seed" | "mb" | "rounds" | "stayUp" | "agent">,
  start = true,
): Promise<string> {
  const targets = ["vda", "vdb"];
  for (const t of targets) await ferry.ok(["volume", "create", `${name}-${t}`, "--size", "8M", "--data", site.a.data]);
  const consoleLog = join(await sandbox.dir("vm-console-"), `${name}.console`);
  const disks = targets.map((t) =>
    ferryDiskXml({ exportName: `${name}-${t}`, socket: site.a.socket, reconnectDelay: 5 }).replace(
      "</disk>",
      `<target dev='${t}' bus='virtio'/></disk>`,
    ),
  );
  const xmlFile = join(await sandbox.dir("vm-xml-"), `${name}.xml`);
  await writeFile(xmlFile, testGuestXml({ name, kernel, disks, console: consoleLog, ...options }));
  expect((await virsh("a", "define", xmlFile)).code).toBe(0);
  if (start) expect((await virsh("a", "start", name)).code).toBe(0);
  return consoleLog;
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
    const consoleLog = await guestAtA("web", { seed: SEED, mb: MB });
    const atA = await waitForGuest(consoleLog);
    expect(atA.status).toBe("ok");
    const wrote = expectedGuestSha256(SEED, "vda", 1, MB);
    expect(atA.wrote.vda?.[0]).toBe(wrote);
    await waitFor("the guest at A to power off", async () =>
      (await virsh("a", "domstate", "web")).stdout.includes("shut off"),
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
    const drillXml = await virsh("b", "dumpxml", "web-drill");
    expect(drillXml.stdout).toContain("web-vda-drill");
    expect(drillXml.stdout).not.toContain("<interface");
    await waitFor("a new recovery point of web while the drill runs", async () => {
      const [now] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "web"]));
      return (now?.lastRecoveryPoint?.generation ?? 0) > (before[0]?.lastRecoveryPoint?.generation ?? 0);
    });
    const cleanup = await ferry.json<Operation>(at("b", ["drill", "cleanup", "web"]));
    expect(cleanup.state, JSON.stringify(cleanup.error)).toBe("succeeded");
    const left = await virsh("b", "list", "--all", "--name");
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
    const virshB = await virsh("b", "dumpxml", "web");
    expect(virshB.stdout).toContain(site.b.socket);
    // Three TCG boots (at A, the drill, the failover): 60 s is too tight on a busy 2-core machine.
  }, 120_000);

  it("protects a running VM with its guest agent and a plain volume in sync mode: application-consistent points (the agent froze and thawed the guest as it wrote); at failover to B the guest finds its last writes", async () => {
    // Defined now, started once protected: the guest writes (and is frozen) under protection.
    const consoleLog = await guestAtA(
      "db",
      { seed: DB_SEED, mb: 1, rounds: DB_ROUNDS, stayUp: true, agent: true },
      false,
    );
    const app = await ferry.json<{ volumes: string[]; vms: string[] }>(
      at("a", ["app", "create", "db", "--vm", "db", "--volume", "db-log", "--size", "8M"]),
    );
    expect(app.vms).toEqual(["db"]);
    expect([...app.volumes].sort()).toEqual(["db-log", "db-vda", "db-vdb"]);
    await ferry.ok(
      at("a", ["policy", "create", "vm-sync", "--mode", "sync", "--consistency", "application", "--interval", "1s"]),
    );
    await ferry.ok(at("a", ["protect", "db", "--policy", "vm-sync", "--to", "site-b", "--wait"]));
    const logUri = (s: "a" | "b") => `nbd+unix:///db-log?socket=${site[s].socket}`;
    await qemuIo(sandbox, logUri("a"), ["write -P 0x5a 0 8M"]);
    const log = await exportSha256(sandbox, logUri("a"));
    expect((await virsh("a", "start", "db")).code).toBe(0);

    const point = await waitFor(
      "an application-consistent recovery point of db with the VM captured",
      async () =>
        (await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "db"]))).find(
          (p) => p.consistency === "application" && p.members === 1,
        ),
      { timeoutMs: 60_000 },
    );
    expect(point.reason).toBeNull();
    // The agent froze the guest for the cut and thawed it; the guest went on writing after.
    const thawed = (r: GuestReport) => r.thawedAt[0] ?? Number.POSITIVE_INFINITY;
    const held = await waitForGuest(consoleLog, (r) => (r.wroteAt.vda ?? []).some((uptime) => uptime > thawed(r)));
    expect(held.agent).toBe(true);
    expect(held.frozenAt[0]).toBeLessThanOrEqual(thawed(held));
    const status = await waitFor("the guest agent to report the filesystems thawed", async () => {
      const r = await virsh("a", "qemu-agent-command", "db", JSON.stringify({ execute: "guest-fsfreeze-status" }));
      return r.code === 0 && JSON.parse(r.stdout).return === "thawed" ? r.stdout : undefined;
    });
    expect(JSON.parse(status)).toEqual({ return: "thawed" });
    const atA = await waitForGuest(consoleLog);
    expect(atA.status).toBe("ok");
    expect(atA.errors).toEqual([]);
    const last = expectedGuestSha256(DB_SEED, "vda", DB_ROUNDS, 1);
    expect(atA.wrote.vda?.at(-1)).toBe(last);
    // Every freeze was thawed, in order (the last one may be under way).
    expect(atA.frozenAt.length - atA.thawedAt.length).toBeLessThanOrEqual(1);
    atA.thawedAt.forEach((t, i) => {
      expect(atA.frozenAt[i]).toBeLessThanOrEqual(t);
    });

    // Site A is lost right after the guest's last write. The failover takes B's latest data (no
    // --point): in sync mode every write A acknowledged is at B already; the VM from its capture.
    expect((await virsh("a", "destroy", "db")).code).toBe(0);
    await rename(consoleLog, `${consoleLog}.at-a`);
    const op = await ferry.json<Operation>(at("b", ["failover", "db", "--to", "site-b"]));
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(op.steps.find((s) => s.name === "recover-members")?.detail).toContain("started db");
    const atB = await waitForGuest(consoleLog, (r) => r.found.vdb !== undefined);
    expect(atB.found).toEqual({ vda: last, vdb: expectedGuestSha256(DB_SEED, "vdb", DB_ROUNDS, 1) });
    expect(await exportSha256(sandbox, logUri("b"))).toBe(log);
  }, 120_000);
});
