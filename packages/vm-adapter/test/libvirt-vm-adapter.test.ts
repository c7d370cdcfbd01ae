/**
 * The adapter against a real libvirtd (private, started by the harness) and a real TCG guest:
 * listing, errors for bad input that leave the VM as it was, quiesce without a guest agent and with
 * one (qemu-ga in the guest), and a graceful stop that the guest ignores. The guest boots from a Ferry volume in the CLI suite
 * (packages/cli/test/vm.test.ts); here its disks are plain files.
 */
import { spawnSync } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  buildTestGuest,
  expectedGuestSha256,
  fileDiskXml,
  type GuestReport,
  type LibvirtDaemon,
  libvirtInstalled,
  Sandbox,
  startLibvirtDaemon,
  type TestGuestKernel,
  testGuestXml,
  waitFor,
  waitForGuest,
} from "@ferry/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LibvirtVmAdapter, type VolumeStore } from "../src/index.js";

if (!libvirtInstalled()) throw new Error("libvirtd/QEMU are not installed: run infra/setup-libvirt.sh");

const SOCKET = "/run/ferry-test/nbd.sock";
let sandbox: Sandbox;
let libvirtd: LibvirtDaemon;
let kernel: TestGuestKernel;
let dir: string;
let adapter: LibvirtVmAdapter;
/** What adopt asked of the volume store: nothing, in every test here. */
const storeCalls: string[] = [];
const store: VolumeStore = {
  importVolume: async (name, source) => {
    storeCalls.push(`import ${name} ${source}`);
  },
  createVolume: async (name, size) => {
    storeCalls.push(`create ${name} ${size}`);
  },
};

beforeAll(async () => {
  sandbox = new Sandbox();
  [libvirtd, kernel] = await Promise.all([startLibvirtDaemon(sandbox), buildTestGuest()]);
  dir = await sandbox.dir("ferry-vm-");
  adapter = await LibvirtVmAdapter.connect({ uri: libvirtd.uri, exportSocket: SOCKET, volumes: store });
});

afterAll(async () => {
  await libvirtd?.stop();
  await sandbox?.cleanup();
});

async function rawDisk(name: string, mb: number): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, Buffer.alloc(mb << 20));
  return path;
}

function guest(name: string, disks: string[], stayUp = false, more: { agent?: boolean; rounds?: number } = {}): string {
  return testGuestXml({ name, kernel, disks, console: join(dir, `${name}.console`), seed: 1, mb: 1, stayUp, ...more });
}

const FSFREEZE_STATUS = JSON.stringify({ execute: "guest-fsfreeze-status" });

describe("LibvirtVmAdapter with a real libvirtd", () => {
  it("lists a defined VM with its disks", async () => {
    const disk = await rawDisk("list.raw", 4);
    await adapter.connection.define(guest("list-vm", [fileDiskXml("vda", disk)]));
    const vms = await adapter.list();
    const vm = vms.find((v) => v.name === "list-vm");
    expect(vm).toMatchObject({ state: "shutoff", persistent: true, ferryDisks: 0 });
    expect(vm?.uuid).toMatch(/^[0-9a-f-]{36}$/);
    expect(vm?.disks.map((d) => [d.target, d.type, d.path])).toEqual([["vda", "file", disk]]);
    // What virsh sees agrees (the only virsh here: a check from outside).
    const virsh = spawnSync("virsh", ["-c", libvirtd.uri, "domuuid", "list-vm"], { encoding: "utf8" });
    expect(virsh.stdout.trim()).toBe(vm?.uuid);
    await adapter.connection.undefine("list-vm");
  });

  it("names an unknown domain in the error, for every call", async () => {
    await expect(adapter.adopt("no-such-vm")).rejects.toMatchObject({
      code: "ERR_VM_UNKNOWN",
      message: expect.stringContaining("'no-such-vm'"),
    });
    await expect(adapter.volumesOf(["no-such-vm"])).rejects.toMatchObject({ code: "ERR_VM_UNKNOWN" });
    await expect(adapter.capture(["no-such-vm"])).rejects.toMatchObject({ code: "ERR_VM_UNKNOWN" });
    await expect(adapter.stop(["no-such-vm"])).rejects.toMatchObject({ code: "ERR_VM_UNKNOWN" });
  });

  it("refuses to adopt a vmdk or an rbd disk offline and changes nothing", async () => {
    const raw = await rawDisk("mixed.raw", 4);
    const vmdk = join(dir, "mixed.vmdk");
    expect(spawnSync("qemu-img", ["create", "-q", "-f", "vmdk", vmdk, "4M"]).status).toBe(0);
    await adapter.connection.define(guest("mixed-vm", [fileDiskXml("vda", raw), fileDiskXml("vdb", vmdk, "vmdk")]));
    const before = await adapter.connection.xml("mixed-vm", true);
    await expect(adapter.adopt("mixed-vm")).rejects.toMatchObject({
      code: "ERR_VM_DISK_UNSUPPORTED",
      message: expect.stringMatching(/disk vdb of domain mixed-vm is vmdk.*nothing was changed/),
    });
    await adapter.connection.define(
      guest("rbd-vm", [
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='pool/img'><host name='127.0.0.1' port='6789'/></source><target dev='vda' bus='virtio'/></disk>",
      ]),
    );
    await expect(adapter.adopt("rbd-vm")).rejects.toMatchObject({
      code: "ERR_VM_DISK_UNSUPPORTED",
      message: expect.stringContaining("is a network disk (rbd)"),
    });
    expect(storeCalls).toEqual([]);
    expect(await adapter.connection.xml("mixed-vm", true)).toBe(before);
    await expect(adapter.volumesOf(["mixed-vm"])).rejects.toMatchObject({
      code: "ERR_VM_NOT_ADOPTED",
      message: expect.stringContaining("ferry vm adopt mixed-vm"),
    });
    await adapter.connection.undefine("mixed-vm");
    await adapter.connection.undefine("rbd-vm");
  });

  it("on a running guest: offline adopt refused, quiesce reports the missing agent, stop times out", async () => {
    const disk = await rawDisk("run.raw", 4);
    await adapter.connection.define(guest("run-vm", [fileDiskXml("vda", disk)], true));
    await adapter.connection.start("run-vm");
    try {
      expect(await adapter.connection.state("run-vm")).toBe("running");
      await expect(adapter.adopt("run-vm")).rejects.toMatchObject({
        code: "ERR_VM_STATE",
        message: expect.stringContaining("adopt it with --live"),
      });
      const { failed } = await adapter.quiesce(["run-vm"], 2_000);
      expect(failed).toHaveLength(1);
      expect(failed[0]?.member).toBe("run-vm");
      expect(failed[0]?.reason).toMatch(/guest agent of domain 'run-vm'/);
      // Nothing was frozen, so thawing has nothing to do and succeeds.
      await adapter.thaw(["run-vm"]);

      // The test guest has no ACPI daemon: a graceful stop cannot succeed, and says so.
      const impatient = await LibvirtVmAdapter.connect({
        uri: libvirtd.uri,
        exportSocket: SOCKET,
        shutdownTimeoutMs: 1_500,
      });
      await expect(impatient.stop(["run-vm"])).rejects.toMatchObject({
        code: "ERR_VM_TIMEOUT",
        message: expect.stringContaining("still running"),
      });
      expect(await adapter.connection.state("run-vm")).toBe("running");
      expect(storeCalls).toEqual([]);
    } finally {
      await adapter.connection.destroy("run-vm");
      await adapter.connection.undefine("run-vm");
    }
    expect(await adapter.list()).toEqual([]);
  });

  it("with qemu-ga in the guest: quiesce freezes, thaw thaws, and the guest writes on", async () => {
    const disk = await rawDisk("agent.raw", 4);
    const consoleLog = join(dir, "agent-vm.console");
    // Rounds enough to outlast the test: the guest is destroyed at the end.
    await adapter.connection.define(
      guest("agent-vm", [fileDiskXml("vda", disk)], true, { agent: true, rounds: 10_000 }),
    );
    await adapter.connection.start("agent-vm");
    try {
      await waitForGuest(consoleLog, (r) => r.ready);
      // qemu-ga opens its port a moment after it starts; libvirt says "not connected" until then.
      await waitFor("the guest agent to answer", async () =>
        adapter.connection.agentCommand("agent-vm", JSON.stringify({ execute: "guest-ping" }), 2_000).then(
          () => true,
          () => undefined,
        ),
      );
      const { failed } = await adapter.quiesce(["agent-vm"], 10_000);
      expect(failed).toEqual([]);
      // The guest's only filesystems are in memory (it writes its disks raw), so qemu-ga freezes
      // none and its status stays "thawed"; its fsfreeze hook shows that the freeze ran and that
      // nothing thawed it before the adapter did.
      const frozen = await waitForGuest(consoleLog, (r) => r.frozenAt.length > 0);
      expect(frozen.thawedAt).toEqual([]);
      await adapter.thaw(["agent-vm"]);
      expect(JSON.parse(await adapter.connection.agentCommand("agent-vm", FSFREEZE_STATUS, 5_000))).toEqual({
        return: "thawed",
      });
      const thawedAt = (r: GuestReport) => r.thawedAt[0] ?? Number.POSITIVE_INFINITY;
      const after = await waitForGuest(consoleLog, (r) => (r.wroteAt.vda ?? []).some((uptime) => uptime > thawedAt(r)));
      expect(after.agent).toBe(true);
      expect(after.frozenAt).toHaveLength(1);
      expect(after.thawedAt).toHaveLength(1);
      expect(after.frozenAt[0]).toBeLessThanOrEqual(thawedAt(after));
      expect(after.errors).toEqual([]);
      const rounds = after.wrote.vda ?? [];
      expect(rounds.length).toBeGreaterThan(1);
      // Each round rewrites the disk with bytes of its own.
      rounds.forEach((sum, i) => {
        expect(sum).toBe(expectedGuestSha256(1, "vda", i + 1, 1));
      });
    } finally {
      await adapter.connection.destroy("agent-vm");
      await adapter.connection.undefine("agent-vm");
    }
  });
});
