import { describe, expect, it } from "vitest";
import { ferryDiskXml, forRecovery, parseDomainXml, withFerryDisks } from "./domain-xml.js";

const SOCKET = "/run/ferry/nbd.sock";

const DOMAIN = `<domain type='kvm'>
  <name>web</name>
  <uuid>8f3c2b0e-1111-4222-8333-944455556666</uuid>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web.raw'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web-data.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
    <serial type='file'><source path='/var/log/web.console'/><target port='0'/></serial>
  </devices>
</domain>`;

describe("parseDomainXml", () => {
  it("reads name, uuid, disks and NICs", () => {
    const info = parseDomainXml(DOMAIN);
    expect(info.name).toBe("web");
    expect(info.uuid).toBe("8f3c2b0e-1111-4222-8333-944455556666");
    expect(info.interfaces).toBe(1);
    expect(info.drillOf).toBeNull();
    expect(info.disks.map((d) => [d.target, d.device, d.type, d.format, d.path, d.readonly])).toEqual([
      ["vda", "disk", "file", "raw", "/var/lib/libvirt/images/web.raw", false],
      ["vdb", "disk", "file", "qcow2", "/var/lib/libvirt/images/web-data.qcow2", false],
      ["sda", "cdrom", "file", null, "/iso/install.iso", true],
    ]);
  });

  it("refuses what is not a domain", () => {
    expect(() => parseDomainXml("<network><name>x</name></network>")).toThrow(
      expect.objectContaining({ code: "ERR_VM_XML" }),
    );
    expect(() => parseDomainXml("<domain><name>x</name>")).toThrow(expect.objectContaining({ code: "ERR_VM_XML" }));
  });
});

describe("withFerryDisks", () => {
  it("turns the named disks into NBD network disks and keeps everything else", () => {
    const out = withFerryDisks(DOMAIN, {
      vda: { exportName: "web-vda", socket: SOCKET, reconnectDelay: 5 },
      vdb: { exportName: "web-vdb", socket: SOCKET, reconnectDelay: 5 },
    });
    const info = parseDomainXml(out);
    expect(info.disks.map((d) => [d.target, d.type, d.protocol, d.exportName, d.socket, d.format])).toEqual([
      ["vda", "network", "nbd", "web-vda", SOCKET, "raw"],
      ["vdb", "network", "nbd", "web-vdb", SOCKET, "raw"],
      ["sda", "file", null, null, null, null],
    ]);
    expect(out).toContain('<reconnect delay="5"/>');
    expect(out).not.toContain("backingStore");
    expect(out).toContain('cache="none"');
    expect(out).toContain('<boot order="1"/>');
    expect(out.indexOf("web-vda")).toBeLessThan(out.indexOf('<target dev="vda"'));
    expect(info.uuid).toBe("8f3c2b0e-1111-4222-8333-944455556666");
  });

  it("refuses a target the domain does not have", () => {
    expect(() => withFerryDisks(DOMAIN, { vdz: { exportName: "x", socket: SOCKET, reconnectDelay: 5 } })).toThrow(
      /no disk vdz/,
    );
  });
});

describe("ferryDiskXml", () => {
  it("is a network disk on the export", () => {
    const xml = ferryDiskXml({ exportName: "web-vda", socket: SOCKET, reconnectDelay: 3 });
    expect(xml).toMatch(/^<disk type="network" device="disk">/);
    expect(xml).toContain(`<source protocol="nbd" name="web-vda"><host transport="unix" socket="${SOCKET}"/>`);
    expect(xml).toContain('<reconnect delay="3"/>');
  });
});

describe("forRecovery", () => {
  const adopted = withFerryDisks(DOMAIN, {
    vda: { exportName: "web-vda", socket: "/site-a/nbd.sock", reconnectDelay: 5 },
    vdb: { exportName: "web-vdb", socket: "/site-a/nbd.sock", reconnectDelay: 5 },
  });

  it("points the disks at this site's volumes and keeps the identity for a failover", () => {
    const out = forRecovery(adopted, {
      volumes: { "web-vda": "web-vda", "web-vdb": "web-vdb-replica" },
      socket: SOCKET,
      reconnectDelay: 5,
    });
    const info = parseDomainXml(out);
    expect(info.name).toBe("web");
    expect(info.uuid).toBe("8f3c2b0e-1111-4222-8333-944455556666");
    expect(info.interfaces).toBe(1);
    expect(out).toContain("52:54:00:aa:bb:cc");
    expect(info.disks.filter((d) => d.device === "disk").map((d) => [d.exportName, d.socket])).toEqual([
      ["web-vda", SOCKET],
      ["web-vdb-replica", SOCKET],
    ]);
  });

  it("gives a drill copy its own name and UUID, no NIC, and a marker naming the application", () => {
    const out = forRecovery(adopted, {
      name: "web-drill",
      newUuid: true,
      dropNics: true,
      drillOf: "shop",
      volumes: { "web-vda": "drill-web-vda", "web-vdb": "drill-web-vdb" },
      socket: SOCKET,
      reconnectDelay: 5,
    });
    const info = parseDomainXml(out);
    expect(info.name).toBe("web-drill");
    expect(info.uuid).toMatch(/^[0-9a-f-]{36}$/);
    expect(info.uuid).not.toBe("8f3c2b0e-1111-4222-8333-944455556666");
    expect(info.interfaces).toBe(0);
    expect(info.drillOf).toBe("shop");
    expect(out).toContain('<source path="/var/log/web.console.web-drill"/>');
  });

  it("gives fresh MACs when asked", () => {
    const out = forRecovery(adopted, {
      newMacs: true,
      volumes: { "web-vda": "a", "web-vdb": "b" },
      socket: SOCKET,
      reconnectDelay: 5,
    });
    expect(out).not.toContain("52:54:00:aa:bb:cc");
    expect(out).toMatch(/<mac address="52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}"\/>/);
  });

  it("maps the NICs' networks to this site's, and leaves the ones not named", () => {
    const twoNics = adopted.replace(
      "</devices>",
      "<interface type='bridge'><source bridge='br-prod'/></interface><interface type='network'><source network='other'/></interface></devices>",
    );
    const out = forRecovery(twoNics, {
      networks: { default: "dr-net", "br-prod": "br-dr" },
      volumes: { "web-vda": "a", "web-vdb": "b" },
      socket: SOCKET,
      reconnectDelay: 5,
    });
    expect(out).toContain('<source network="dr-net"/>');
    expect(out).toContain('<source bridge="br-dr"/>');
    expect(out).toContain('<source network="other"/>');
    expect(out).not.toContain("default");
    expect(out).toContain("52:54:00:aa:bb:cc");
  });

  it("refuses a disk that is not on Ferry, or a volume with no counterpart here", () => {
    expect(() => forRecovery(DOMAIN, { volumes: {}, socket: SOCKET, reconnectDelay: 5 })).toThrow(
      /disk vda of domain web is not on a Ferry volume/,
    );
    expect(() => forRecovery(adopted, { volumes: { "web-vda": "a" }, socket: SOCKET, reconnectDelay: 5 })).toThrow(
      /volume web-vdb, which has no counterpart/,
    );
  });
});
