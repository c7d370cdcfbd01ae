/**
 * Libvirt domain XML: what the adapter reads from it (disks, NICs, Ferry's drill marker) and the
 * rewrites it makes — disks onto Ferry NBD exports, and the changes a recovered or drill copy
 * needs (name, UUID, MACs, NICs). Pure functions over text, so every rewrite is tested without
 * libvirt. A DOM keeps elements it does not know, and their order, exactly as they were.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { DOMParser, type Document, type Element, XMLSerializer } from "@xmldom/xmldom";
import { InvalidDomainXml } from "./errors.js";

/** Namespace of Ferry's element in a domain's `<metadata>` (libvirt keeps one element per namespace). */
export const FERRY_XMLNS = "urn:ferry:libvirt:1";

export interface DiskInfo {
  /** The guest's name for it, e.g. `vda`. */
  target: string;
  bus: string | null;
  /** disk, cdrom, floppy, lun */
  device: string;
  /** file, block, network, volume, dir, nvme, vhostuser */
  type: string;
  /** The driver's format (raw, qcow2), if given. */
  format: string | null;
  /** The file or device path of a file/block disk. */
  path: string | null;
  /** For a network disk: its protocol (nbd, rbd, …), export name and unix socket. */
  protocol: string | null;
  exportName: string | null;
  socket: string | null;
  readonly: boolean;
}

export interface DomainXmlInfo {
  name: string;
  uuid: string | null;
  disks: DiskInfo[];
  interfaces: number;
  /** The application a drill copy was made for (Ferry's metadata marker), else null. */
  drillOf: string | null;
}

export interface FerryExport {
  /** The Ferry volume (the NBD export's name). */
  exportName: string;
  /** The volume service's unix socket as QEMU reaches it. */
  socket: string;
  /** Seconds QEMU waits before reconnecting after the service went away (a ferryd restart). */
  reconnectDelay: number;
}

function parse(xml: string): Element {
  const errors: string[] = [];
  let root: Element | null = null;
  try {
    // Fatal errors throw after the callback; errors and warnings only call it.
    root = new DOMParser({
      onError: (level, message) => {
        if (level !== "warning") errors.push(message);
      },
    }).parseFromString(xml, "text/xml").documentElement;
  } catch (error) {
    if (errors.length === 0) errors.push(error instanceof Error ? error.message : String(error));
  }
  if (errors.length > 0 || !root || root.tagName !== "domain") {
    throw new InvalidDomainXml(
      `not a libvirt domain XML: ${errors[0] ?? `root element is ${root?.tagName ?? "missing"}`}`,
    );
  }
  return root;
}

function docOf(el: Element): Document {
  const doc = el.ownerDocument;
  if (!doc) throw new InvalidDomainXml("domain XML element outside a document");
  return doc;
}

function serialize(root: Element): string {
  return new XMLSerializer().serializeToString(root);
}

/** Direct children with this tag name. */
function children(parent: Element, tag: string): Element[] {
  const out: Element[] = [];
  for (let n = parent.firstChild; n; n = n.nextSibling) {
    if (n.nodeType === 1 && (n as Element).tagName === tag) out.push(n as Element);
  }
  return out;
}

function child(parent: Element, tag: string): Element | null {
  return children(parent, tag)[0] ?? null;
}

function text(parent: Element, tag: string): string | null {
  const el = child(parent, tag);
  return el ? (el.textContent ?? "").trim() : null;
}

function attr(el: Element | null, name: string): string | null {
  return el?.hasAttribute(name) ? el.getAttribute(name) : null;
}

function devices(root: Element): Element {
  const d = child(root, "devices");
  if (!d) throw new InvalidDomainXml("domain XML has no <devices>");
  return d;
}

function diskInfo(disk: Element): DiskInfo {
  const source = child(disk, "source");
  const target = child(disk, "target");
  const host = source ? child(source, "host") : null;
  const type = attr(disk, "type") ?? "file";
  return {
    target: attr(target, "dev") ?? "",
    bus: attr(target, "bus"),
    device: attr(disk, "device") ?? "disk",
    type,
    format: attr(child(disk, "driver"), "type"),
    path: type === "block" ? attr(source, "dev") : type === "file" ? attr(source, "file") : null,
    protocol: type === "network" ? attr(source, "protocol") : null,
    exportName: type === "network" ? attr(source, "name") : null,
    socket: type === "network" && attr(host, "transport") === "unix" ? attr(host, "socket") : null,
    readonly: child(disk, "readonly") !== null,
  };
}

export function parseDomainXml(xml: string): DomainXmlInfo {
  const root = parse(xml);
  const name = text(root, "name");
  if (!name) throw new InvalidDomainXml("domain XML has no <name>");
  const devs = child(root, "devices");
  const metadata = child(root, "metadata");
  let drillOf: string | null = null;
  if (metadata) {
    for (let n = metadata.firstChild; n; n = n.nextSibling) {
      const el = n as Element;
      if (n.nodeType === 1 && el.namespaceURI === FERRY_XMLNS && el.localName === "drill") {
        drillOf = el.getAttribute("app");
      }
    }
  }
  return {
    name,
    uuid: text(root, "uuid"),
    disks: devs ? children(devs, "disk").map(diskInfo) : [],
    interfaces: devs ? children(devs, "interface").length : 0,
    drillOf,
  };
}

/** Whether a disk is a Ferry export on this socket (or on any socket when `socket` is null). */
export function isFerryDisk(disk: DiskInfo, socket: string | null): boolean {
  return (
    disk.type === "network" &&
    disk.protocol === "nbd" &&
    disk.exportName !== null &&
    disk.socket !== null &&
    (socket === null || disk.socket === socket)
  );
}

function setFerrySource(disk: Element, to: FerryExport): void {
  const doc = docOf(disk);
  disk.setAttribute("type", "network");
  for (const old of [...children(disk, "source"), ...children(disk, "backingStore")]) disk.removeChild(old);
  const source = doc.createElement("source");
  source.setAttribute("protocol", "nbd");
  source.setAttribute("name", to.exportName);
  const host = doc.createElement("host");
  host.setAttribute("transport", "unix");
  host.setAttribute("socket", to.socket);
  source.appendChild(host);
  const reconnect = doc.createElement("reconnect");
  reconnect.setAttribute("delay", String(to.reconnectDelay));
  source.appendChild(reconnect);
  // libvirt wants <source> before <target>; the driver stays where it is.
  const driver = child(disk, "driver");
  disk.insertBefore(source, driver ? driver.nextSibling : disk.firstChild);
  // An NBD export is a plain sequence of bytes: the format is raw whatever the file was.
  let drv = driver;
  if (!drv) {
    drv = doc.createElement("driver");
    drv.setAttribute("name", "qemu");
    disk.insertBefore(drv, source);
  }
  drv.setAttribute("type", "raw");
  // The volume service going away (a ferryd restart) fails the guest's I/O in flight where libvirt
  // drops <reconnect> (9.0): pause the guest on that error instead of passing it on; QEMU's NBD
  // client reconnects by itself, and `resumePausedOnError` lets the guest go on.
  drv.setAttribute("error_policy", "stop");
  drv.setAttribute("rerror_policy", "stop");
}

/**
 * Point disks (by target) at Ferry exports; other disks are left as they are. Throws when a
 * target named in `exports` is not a disk of the domain, so a typo cannot pass silently.
 */
export function withFerryDisks(xml: string, exports: Readonly<Record<string, FerryExport>>): string {
  const root = parse(xml);
  const disks = children(devices(root), "disk");
  for (const [target, to] of Object.entries(exports)) {
    const disk = disks.find((d) => attr(child(d, "target"), "dev") === target);
    if (!disk) throw new InvalidDomainXml(`domain has no disk ${target}`);
    setFerrySource(disk, to);
  }
  return serialize(root);
}

/** The `<disk>` element of a Ferry export, as a live block copy's destination. */
export function ferryDiskXml(to: FerryExport): string {
  const root = parse(
    "<domain><devices><disk type='network' device='disk'><driver name='qemu' type='raw'/></disk></devices></domain>",
  );
  const disk = children(devices(root), "disk")[0] as Element;
  setFerrySource(disk, to);
  return serialize(disk);
}

export interface RecoveryTransform {
  /** Rename the domain (a drill copy beside the original must not clash); file consoles get `.<name>`. */
  name?: string;
  /** A fresh UUID (required when the original's definition may exist at this site). */
  newUuid?: boolean;
  /** Fresh MAC addresses for the NICs that stay. */
  newMacs?: boolean;
  /** Remove every NIC (a drill copy must not meet the production network). */
  dropNics?: boolean;
  /**
   * The source site's networks → this site's: a NIC on libvirt network (or host bridge) FROM is put
   * on TO. NICs on networks not named keep theirs.
   */
  networks?: Readonly<Record<string, string>>;
  /** Ferry disks: source export name → the export to use here (a promoted replica or a clone). */
  volumes: Readonly<Record<string, string>>;
  /** The volume service's socket at this site, and QEMU's reconnect delay. */
  socket: string;
  reconnectDelay: number;
  /** Mark the domain as a drill copy of this application (for cleanup). */
  drillOf?: string;
}

/**
 * A captured domain XML made ready to define at the recovery site. Every Ferry disk must have a
 * volume in `volumes`: recovering a VM with a disk left on the source site's storage would boot it
 * from data that is not the recovery point, so that is an error instead.
 */
export function forRecovery(xml: string, t: RecoveryTransform): string {
  const root = parse(xml);
  const doc = docOf(root);
  const devs = devices(root);
  if (t.name !== undefined) {
    const name = child(root, "name");
    if (name) name.textContent = t.name;
  }
  const uuid = child(root, "uuid");
  if (t.newUuid) {
    if (uuid) uuid.textContent = randomUUID();
  }
  for (const disk of children(devs, "disk")) {
    const info = diskInfo(disk);
    if (info.device === "cdrom" || info.device === "floppy") continue;
    if (!isFerryDisk(info, null)) {
      throw new InvalidDomainXml(
        `disk ${info.target} of domain ${text(root, "name")} is not on a Ferry volume (type ${info.type}); adopt the VM before protecting it`,
      );
    }
    const volume = t.volumes[info.exportName as string];
    if (volume === undefined) {
      throw new InvalidDomainXml(
        `disk ${info.target} of domain ${text(root, "name")} is on volume ${info.exportName}, which has no counterpart at this site`,
      );
    }
    setFerrySource(disk, { exportName: volume, socket: t.socket, reconnectDelay: t.reconnectDelay });
  }
  for (const nic of children(devs, "interface")) {
    if (t.dropNics) {
      devs.removeChild(nic);
      continue;
    }
    if (t.newMacs) {
      const mac = child(nic, "mac");
      if (mac) mac.setAttribute("address", randomMac());
    }
    const source = child(nic, "source");
    const kind = nic.getAttribute("type");
    const attribute = kind === "network" ? "network" : kind === "bridge" ? "bridge" : null;
    const from = attribute === null ? null : source?.getAttribute(attribute);
    const to = from === null || from === undefined ? undefined : t.networks?.[from];
    if (source && attribute !== null && to !== undefined) source.setAttribute(attribute, to);
  }
  if (t.name !== undefined) {
    // A renamed copy (a drill) beside the original must not write into the original's console log.
    for (const kind of ["serial", "console"]) {
      for (const dev of children(devs, kind)) {
        const source = dev.getAttribute("type") === "file" ? child(dev, "source") : null;
        const path = source?.getAttribute("path");
        if (source && path) source.setAttribute("path", `${path}.${t.name}`);
      }
    }
  }
  if (t.drillOf !== undefined) {
    let metadata = child(root, "metadata");
    if (!metadata) {
      metadata = doc.createElement("metadata");
      const after = uuid ?? child(root, "name");
      root.insertBefore(metadata, after ? after.nextSibling : root.firstChild);
    }
    const marker = doc.createElementNS(FERRY_XMLNS, "ferry:drill");
    marker.setAttribute("app", t.drillOf);
    metadata.appendChild(marker);
  }
  return serialize(root);
}

/** A locally administered unicast MAC in QEMU's 52:54:00 prefix, as libvirt itself generates. */
function randomMac(): string {
  const b = randomBytes(3);
  return `52:54:00:${[...b].map((x) => x.toString(16).padStart(2, "0")).join(":")}`;
}
