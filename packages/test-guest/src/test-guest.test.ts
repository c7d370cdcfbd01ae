import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { expectedGuestSha256, parseGuestConsole, type TestGuestOptions, testGuestXml } from "./test-guest.js";

describe("the test guest's console", () => {
  it("reads READY, FOUND, WROTE per round and DONE, ignoring the kernel's own lines", () => {
    const report = parseGuestConsole(
      [
        "[    0.912345] virtio_blk virtio1: [vda] 16384 512-byte logical blocks",
        "FERRY-GUEST READY uptime=1.52 kernel=6.1.0 seed=3 mb=2 rounds=2 disks=vda",
        "FERRY-GUEST FOUND disk=vda mb=2 sha256=aa",
        "FERRY-GUEST WROTE disk=vda round=1 mb=2 sha256=bb uptime=2.10",
        "FERRY-GUEST WROTE disk=vda round=2 mb=2 sha256=cc uptime=2.75",
        "FERRY-GUEST DONE status=ok uptime=2.80",
      ].join("\r\n"),
    );
    expect(report).toMatchObject({
      ready: true,
      readyUptime: 1.52,
      found: { vda: "aa" },
      wrote: { vda: ["bb", "cc"] },
      wroteAt: { vda: [2.1, 2.75] },
      done: true,
      status: "ok",
      doneUptime: 2.8,
      errors: [],
    });
    expect(report.lines).toHaveLength(5);
  });

  it("reads the guest agent's start and each freeze and thaw", () => {
    const report = parseGuestConsole(
      [
        "FERRY-GUEST AGENT started pid=60 port=vport1p1",
        "FERRY-GUEST READY uptime=1.52 kernel=6.1.0 seed=3 mb=2 rounds=2 disks=vda",
        "FERRY-GUEST FROZEN uptime=3.01",
        "FERRY-GUEST THAWED uptime=3.09",
        "FERRY-GUEST FROZEN uptime=4.20",
      ].join("\n"),
    );
    expect(report).toMatchObject({ agent: true, frozenAt: [3.01, 4.2], thawedAt: [3.09] });
    expect(parseGuestConsole("FERRY-GUEST READY uptime=1.0\n")).toMatchObject({ agent: false, frozenAt: [] });
  });

  it("says nothing is done before DONE", () => {
    expect(parseGuestConsole("FERRY-GUEST READY uptime=1.0\n")).toMatchObject({ ready: true, done: false });
  });
});

describe("expectedGuestSha256", () => {
  it("hashes each MiB as the line naming seed, disk, round and block, repeated", () => {
    const line = "ferry seed=7 disk=vdb round=1 block=0\n";
    const block = Buffer.alloc(1 << 20, line);
    expect(expectedGuestSha256(7, "vdb", 1, 1)).toBe(createHash("sha256").update(block).digest("hex"));
    expect(expectedGuestSha256(7, "vdb", 2, 1)).not.toBe(expectedGuestSha256(7, "vdb", 1, 1));
  });
});

describe("testGuestXml", () => {
  const web: TestGuestOptions = {
    name: "web",
    kernel: { vmlinuz: "/k/vmlinuz", initrd: "/k/initrd.img" },
    disks: ["<disk/>"],
    console: "/c/web.console",
    seed: 5,
    mb: 2,
  };

  it("boots under TCG with the workload on the kernel command line", () => {
    const xml = testGuestXml({ ...web, rounds: 3, stayUp: true });
    expect(xml).toContain("<domain type='qemu'>");
    expect(xml).toContain("ferry.seed=5 ferry.mb=2 ferry.rounds=3 ferry.halt=0");
    expect(xml).toContain("<source path='/c/web.console' append='on'/>");
    expect(xml).not.toContain("guest_agent");
    expect(xml).not.toContain("ferry.agent");
  });

  it("with the guest agent: its virtio channel, and the guest told to start it", () => {
    const xml = testGuestXml({ ...web, agent: true });
    expect(xml).toContain("ferry.halt=1 ferry.agent=1</cmdline>");
    expect(xml).toContain(
      "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n  </devices>",
    );
  });
});
