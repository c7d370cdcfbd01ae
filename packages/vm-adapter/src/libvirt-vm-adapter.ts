/**
 * `LibvirtVmAdapter`: libvirt domains as members of a protected application (the orchestrator's
 * `VmAdapter`), plus what brings a VM under Ferry in the first place — listing and adopting.
 * A protected VM keeps every disk on a Ferry volume, attached as an NBD network disk on this
 * site's volume service socket; the adapter only reads and rewrites domain XML and asks libvirt
 * to act. It never touches volume data itself: imports and volume creation go through the
 * `VolumeStore` the composition root (cli) hands in.
 */
import type { MemberCapture, RecoverContext, VmAdapter } from "@ferry/orchestrator";
import { type DiskInfo, ferryDiskXml, forRecovery, isFerryDisk, parseDomainXml, withFerryDisks } from "./domain-xml.js";
import { NotAdopted, NotConfigured, ThawFailed, UnsupportedDisk, WrongDomainState } from "./errors.js";
import { Libvirt } from "./libvirt.js";

/** Where adopted disks go: Ferry's volume service of this site (implemented by cli). */
export interface VolumeStore {
  /** Copy a disk image file (raw, or qcow2 read through its backing chain) into a new volume of its size. */
  importVolume(name: string, path: string, format: "raw" | "qcow2"): Promise<void>;
  /** Create an empty volume (a live copy's destination). */
  createVolume(name: string, size: number): Promise<void>;
}

export interface LibvirtVmAdapterOptions {
  /** libvirt URI, e.g. `qemu:///system` or `qemu:///system?socket=/run/libvirt/libvirt-sock`. */
  uri: string;
  /** The volume service's unix socket, as QEMU at this site reaches it. */
  exportSocket: string;
  /** Seconds QEMU waits before reconnecting to a restarted volume service (default 5). */
  reconnectDelaySeconds?: number;
  /** Needed by `adopt` only. */
  volumes?: VolumeStore;
  /** How long a graceful shutdown may take before `stop` fails (default 120 s). */
  shutdownTimeoutMs?: number;
  /** How long a live copy may take to converge, per disk (default 30 min). */
  blockCopyTimeoutMs?: number;
  /** At recovery here: the source site's libvirt networks (or bridges) → this site's. */
  networkMapping?: Readonly<Record<string, string>>;
}

export interface VmSummary {
  name: string;
  uuid: string;
  state: string;
  persistent: boolean;
  disks: DiskInfo[];
  /** Disks already on a Ferry volume of this site's service. */
  ferryDisks: number;
}

export interface AdoptedDisk {
  target: string;
  /** The Ferry volume now holding it. */
  volume: string;
  /** What it was before, e.g. a file path. */
  from: string;
  /** Whether it was adopted just now (false: it was on Ferry already). */
  adopted: boolean;
}

export interface AdoptResult {
  domain: string;
  mode: "offline" | "live";
  disks: AdoptedDisk[];
}

/** What `capture` stores with a recovery point for each VM. */
export interface VmCaptureMetadata {
  /** The persistent domain XML at the cut. */
  xml: string;
  /** Disk target → the Ferry volume it is on. */
  disks: Record<string, string>;
}

const AGENT_FREEZE = JSON.stringify({ execute: "guest-fsfreeze-freeze" });
const AGENT_THAW = JSON.stringify({ execute: "guest-fsfreeze-thaw" });

/** A Ferry volume name for an adopted disk: 1-64 of [A-Za-z0-9._-], not starting with . or -. */
export function adoptedVolumeName(domain: string, target: string): string {
  const base = `${domain}-${target}`.replace(/[^A-Za-z0-9._-]/g, "-").replace(/^[.-]+/, "");
  if (base.length <= 64) return base;
  return `${base.slice(0, 64 - target.length - 1)}-${target}`;
}

/** The name a drill copy of a VM gets beside the original. */
export function drillName(domain: string): string {
  return `${domain}-drill`;
}

export class LibvirtVmAdapter implements VmAdapter {
  private readonly frozen = new Set<string>();
  private readonly reconnectDelay: number;

  private constructor(
    private readonly libvirt: Libvirt,
    private readonly options: LibvirtVmAdapterOptions,
  ) {
    this.reconnectDelay = options.reconnectDelaySeconds ?? 5;
  }

  static async connect(options: LibvirtVmAdapterOptions): Promise<LibvirtVmAdapter> {
    return new LibvirtVmAdapter(await Libvirt.connect(options.uri), options);
  }

  /** The connection itself, for what the adapter does not wrap. */
  get connection(): Libvirt {
    return this.libvirt;
  }

  async list(): Promise<VmSummary[]> {
    const domains = await this.libvirt.listDomains();
    return domains.map((d) => {
      const disks = parseDomainXml(d.xml).disks;
      return {
        name: d.name,
        uuid: d.uuid,
        state: d.state,
        persistent: d.persistent,
        disks,
        ferryDisks: disks.filter((disk) => isFerryDisk(disk, this.options.exportSocket)).length,
      };
    });
  }

  /**
   * Resume every VM on this site's Ferry exports that libvirt paused on a disk's I/O error: their
   * volume service went away (a ferryd restart) and the disks' error policy (`stop`, set when a
   * disk is put on Ferry) paused them instead of failing the guest's I/O; QEMU's NBD client
   * reconnects by itself, so they go on where they stopped. A VM paused for another reason (by a
   * user) is left alone, and so are the VMs named in `skip`. Answers the names resumed; ferryd calls
   * it every few seconds.
   */
  async resumePausedOnError(skip: ReadonlySet<string> = new Set()): Promise<string[]> {
    const paused = (await this.list()).filter((vm) => vm.state === "paused" && vm.ferryDisks > 0 && !skip.has(vm.name));
    const resumed: string[] = [];
    for (const vm of paused) {
      if (await this.libvirt.resumeIfPausedOnIoError(vm.name)) resumed.push(vm.name);
    }
    return resumed;
  }

  /**
   * Bring a VM's disks onto Ferry volumes. Offline (the VM is shut off): each raw or qcow2 file
   * disk is imported into a new volume, then the definition is rewritten to use them. Live (running):
   * each disk is copied by libvirt into a new volume while the guest runs, with synchronous
   * writes so it converges, then pivoted; the definition is rewritten after. Every disk is
   * checked before anything changes, so bad input leaves the VM as it was. Disks already on
   * Ferry are left alone, so adopting twice is harmless.
   */
  async adopt(domain: string, opts: { live?: boolean } = {}): Promise<AdoptResult> {
    const volumes = this.options.volumes;
    if (!volumes) throw new NotConfigured("adopting a VM needs a volume store (the site's data directory)");
    const live = opts.live === true;
    const state = await this.libvirt.state(domain);
    if (live && state !== "running") {
      throw new WrongDomainState(
        `domain ${domain} is ${state}: live adoption needs it running; adopt it offline (without --live) instead`,
      );
    }
    if (!live && state !== "shutoff") {
      throw new WrongDomainState(
        `domain ${domain} is ${state}: offline adoption needs it shut off; shut it down first or adopt it with --live`,
      );
    }
    const persistentXml = await this.libvirt.xml(domain, true);
    const disks = parseDomainXml(live ? await this.libvirt.xml(domain, false) : persistentXml).disks;
    const plan = disks
      .filter((d) => d.device === "disk" || d.device === "lun")
      .map((d) => this.planDisk(domain, d, live));

    const result: AdoptedDisk[] = [];
    const exports: Record<string, { exportName: string; socket: string; reconnectDelay: number }> = {};
    for (const p of plan) {
      exports[p.disk.target] = this.ferryExport(p.volume);
      if (p.already) {
        result.push({ target: p.disk.target, volume: p.volume, from: p.volume, adopted: false });
        continue;
      }
      const from = p.disk.path as string;
      if (live) {
        const size = await this.libvirt.diskCapacity(domain, p.disk.target);
        await volumes.createVolume(p.volume, size);
        await this.libvirt.blockCopy(domain, {
          disk: p.disk.target,
          destinationXml: ferryDiskXml(this.ferryExport(p.volume)),
          synchronousWrites: true,
          timeoutMs: this.options.blockCopyTimeoutMs ?? 30 * 60_000,
        });
      } else {
        await volumes.importVolume(p.volume, from, p.disk.format === "qcow2" ? "qcow2" : "raw");
      }
      result.push({ target: p.disk.target, volume: p.volume, from, adopted: true });
    }
    // The persistent definition follows last: until here a failure leaves it on the old disks
    // (a live copy that pivoted runs on Ferry already; the next adopt finds it there and only
    // rewrites the definition).
    await this.libvirt.define(withFerryDisks(persistentXml, exports));
    return { domain, mode: live ? "live" : "offline", disks: result };
  }

  private planDisk(
    domain: string,
    disk: DiskInfo,
    live: boolean,
  ): { disk: DiskInfo; volume: string; already: boolean } {
    if (isFerryDisk(disk, this.options.exportSocket)) {
      return { disk, volume: disk.exportName as string, already: true };
    }
    if (disk.type !== "file" || !disk.path) {
      throw new UnsupportedDisk(
        `disk ${disk.target} of domain ${domain} is a ${disk.type} disk${disk.protocol ? ` (${disk.protocol})` : ""}: Ferry adopts file disks only; nothing was changed`,
      );
    }
    // A live copy reads through QEMU, whatever the format; an offline import reads the file itself.
    if (!live && disk.format !== null && disk.format !== "raw" && disk.format !== "qcow2") {
      throw new UnsupportedDisk(
        `disk ${disk.target} of domain ${domain} is ${disk.format}: Ferry imports raw and qcow2 disks offline (convert it with \`qemu-img convert -O raw\`, or adopt the running VM with --live); nothing was changed`,
      );
    }
    return { disk, volume: adoptedVolumeName(domain, disk.target), already: false };
  }

  private ferryExport(volume: string) {
    return { exportName: volume, socket: this.options.exportSocket, reconnectDelay: this.reconnectDelay };
  }

  /** The volumes of each VM's disks; a VM with a disk not on Ferry is an error (adopt it first). */
  async volumesOf(members: readonly string[]): Promise<string[]> {
    const out: string[] = [];
    for (const m of members) {
      for (const disk of parseDomainXml(await this.libvirt.xml(m, true)).disks) {
        if (disk.device === "cdrom" || disk.device === "floppy") continue;
        if (!isFerryDisk(disk, this.options.exportSocket)) {
          throw new NotAdopted(
            `disk ${disk.target} of domain ${m} is not on a Ferry volume of this site: adopt the VM first (\`ferry vm adopt ${m}\`)`,
          );
        }
        out.push(disk.exportName as string);
      }
    }
    return out;
  }

  /** fsfreeze through the guest agent; a VM whose agent does not answer is named with the reason. */
  async quiesce(
    members: readonly string[],
    timeoutMs: number,
  ): Promise<{ failed: { member: string; reason: string }[] }> {
    const failed: { member: string; reason: string }[] = [];
    await Promise.all(
      members.map(async (m) => {
        try {
          await this.libvirt.agentCommand(m, AGENT_FREEZE, timeoutMs);
          this.frozen.add(m);
        } catch (err) {
          failed.push({ member: m, reason: err instanceof Error ? err.message : String(err) });
        }
      }),
    );
    return { failed };
  }

  /** Thaw the VMs this adapter froze; any that cannot be thawed make it throw, naming them. */
  async thaw(members: readonly string[]): Promise<void> {
    const errors: string[] = [];
    await Promise.all(
      members
        .filter((m) => this.frozen.has(m))
        .map(async (m) => {
          try {
            await this.libvirt.agentCommand(m, AGENT_THAW, 30_000);
            this.frozen.delete(m);
          } catch (err) {
            errors.push(`${m}: ${err instanceof Error ? err.message : String(err)}`);
          }
        }),
    );
    if (errors.length > 0) {
      throw new ThawFailed(`could not thaw the filesystems of ${errors.join("; ")}; retry the thaw`);
    }
  }

  async capture(members: readonly string[]): Promise<MemberCapture[]> {
    const out: MemberCapture[] = [];
    for (const m of members) {
      const xml = await this.libvirt.xml(m, true);
      const disks: Record<string, string> = {};
      for (const d of parseDomainXml(xml).disks) {
        if (isFerryDisk(d, null)) disks[d.target] = d.exportName as string;
      }
      const metadata: VmCaptureMetadata = { xml, disks };
      out.push({ kind: "vm", name: m, metadata });
    }
    return out;
  }

  /**
   * Define and start each captured VM here with its disks on this site's volumes. A drill copy
   * gets its own name, UUID and no NIC, and a marker for `cleanupDrill`; a failover keeps the
   * VM's identity. Idempotent: a VM already defined is redefined, one already running is left
   * running.
   */
  async recover(captures: readonly MemberCapture[], context: RecoverContext): Promise<string[]> {
    const started: string[] = [];
    for (const c of captures) {
      if (c.kind !== "vm") continue;
      const meta = c.metadata as VmCaptureMetadata;
      const name = context.drill ? drillName(c.name) : c.name;
      const xml = forRecovery(meta.xml, {
        volumes: context.volumes,
        socket: this.options.exportSocket,
        reconnectDelay: this.reconnectDelay,
        networks: this.options.networkMapping ?? {},
        ...(context.drill ? { name, newUuid: true, newMacs: true, dropNics: true, drillOf: context.app } : {}),
      });
      const existing = await this.stateOrNull(name);
      if (existing === "running") {
        started.push(name);
        continue;
      }
      if (existing !== null && context.drill) await this.libvirt.undefine(name);
      await this.libvirt.define(xml);
      await this.libvirt.start(name);
      started.push(name);
    }
    return started;
  }

  private async stateOrNull(name: string): Promise<string | null> {
    try {
      return await this.libvirt.state(name);
    } catch (err) {
      if ((err as { code?: string }).code === "ERR_VM_UNKNOWN") return null;
      throw err;
    }
  }

  /** Graceful shutdown of each VM; one that does not stop in time fails the call (still running). */
  async stop(members: readonly string[]): Promise<void> {
    const timeout = this.options.shutdownTimeoutMs ?? 120_000;
    await Promise.all(members.map((m) => this.libvirt.shutdown(m, timeout)));
  }

  /** Destroy and undefine every drill copy made for this application. */
  async cleanupDrill(app: string): Promise<void> {
    for (const d of await this.libvirt.listDomains()) {
      if (parseDomainXml(d.xml).drillOf !== app) continue;
      await this.libvirt.destroy(d.name);
      if (d.persistent) await this.libvirt.undefine(d.name);
    }
  }
}

/** The adapter ferryd plugs into the orchestrator (cli wires it). */
export function libvirtVmAdapter(options: LibvirtVmAdapterOptions): Promise<LibvirtVmAdapter> {
  return LibvirtVmAdapter.connect(options);
}
