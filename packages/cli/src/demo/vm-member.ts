/**
 * The VM of the demo's hybrid application: Ferry's test guest (a Debian kernel and a busybox
 * initramfs under TCG, @ferry/test-guest), defined at site A on two raw disk files, adopted into
 * Ferry volumes, booted to write its deterministic workload, and after the failover booted at
 * site B from the replicas — where the checksums it prints of what it finds must be what it wrote
 * at A (and what the demo computes it must have written). Sites A and B each run a private libvirtd
 * for it (its own /etc/libvirt, /run/libvirt … below the demo's temp directory), which the demo's
 * cleanup stops with the guests; the machine's own libvirt is neither read nor changed.
 */
import { mkdir, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import {
  buildTestGuest,
  expectedGuestSha256,
  fileDiskXml,
  type GuestReport,
  type LibvirtDaemon,
  libvirtInstalled,
  readGuestConsole,
  startPrivateLibvirtd,
  type TestGuestKernel,
  testGuestXml,
} from "@ferry/test-guest";
import { DemoCheckFailed, ToolMissing } from "../errors.js";
import type { DemoSite } from "./demo-host.js";
import type { HybridHost, HybridMember, MemberCheck } from "./hybrid-demo.js";

const DOMAIN = "web";
const DISKS = ["vda", "vdb"] as const;
const DISK_SIZE = "8M";
/** The guest's workload: MiB it writes per disk, from the seed that makes its bytes. */
const WORKLOAD_MIB = 4;
const SEED = 42;
const GUEST_TIMEOUT_MS = 120_000;

export class VmMember implements HybridMember {
  readonly title = `VM ${DOMAIN}`;
  private readonly daemons = new Map<string, LibvirtDaemon>();
  private kernel: TestGuestKernel | undefined;
  private wrote: Record<string, string> = {};
  private wroteAt = "";

  constructor(private readonly host: HybridHost) {}

  private get dir(): string {
    return join(this.host.root, "vm");
  }

  /** The guest's serial console; its definition travels with each recovery point, so B's guest writes here too. */
  private get console(): string {
    return join(this.dir, `${DOMAIN}.console`);
  }

  checkInstalled(): void {
    if (!libvirtInstalled()) {
      throw new ToolMissing(
        "libvirtd, virtlogd or QEMU is not installed, and the demo's hybrid application runs a VM: " +
          "run `bash infra/setup.sh` (it installs them)",
      );
    }
  }

  async prepare(sites: { a: string; b: string }): Promise<void> {
    const guest = buildTestGuest();
    const started = [sites.a, sites.b].map((site) => this.startLibvirtd(site));
    const [kernel, ...daemons] = await this.host.step(Promise.all([guest, ...started]));
    this.kernel = kernel;
    for (const [i, site] of [sites.a, sites.b].entries()) {
      const d = daemons[i];
      if (d !== undefined) this.daemons.set(site, d);
    }
  }

  /** Owned by the demo before it is awaited: an interrupted start is still stopped by the cleanup. */
  private startLibvirtd(site: string): Promise<LibvirtDaemon> {
    const dir = join(this.host.root, `libvirt-${site}`);
    const daemon = mkdir(dir, { recursive: true }).then(() => startPrivateLibvirtd(dir));
    this.host.own(`the libvirtd of ${site}`, async () => {
      const d = await daemon.catch(() => undefined);
      if (d === undefined) return `no libvirtd of ${site} to stop`;
      const { libvirtd } = await d.pids();
      await d.stop();
      return `stopped the libvirtd of ${site} (${libvirtd > 0 ? `pid ${libvirtd}` : "already gone"}), its virtlogd and its guests`;
    });
    return daemon;
  }

  async describe(): Promise<void> {
    const { narrator } = this.host;
    narrator.step("Sites A and B each run a libvirtd of their own, for the hybrid application's VM");
    for (const [site, d] of this.daemons) {
      const { libvirtd, virtlogd } = await this.host.step(d.pids());
      narrator.show(`${site}: libvirtd pid ${libvirtd} (virtlogd pid ${virtlogd}), ${d.uri}`);
    }
    narrator.show(
      "each in a mount namespace of its own, with /etc/libvirt, /run/libvirt and /var/lib/libvirt in the demo's directory",
    );
    narrator.show(
      `the VM's guest: a Debian kernel and a busybox initramfs, built by infra/guest/build-guest.sh (cached in ${dirname(this.kernel?.vmlinuz ?? "")})`,
    );
  }

  ferrydOptions(site: string): { libvirt?: string } {
    const d = this.daemons.get(site);
    return d === undefined ? {} : { libvirt: d.uri };
  }

  async create(a: DemoSite): Promise<string[]> {
    const { host } = this;
    const kernel = this.kernel;
    if (kernel === undefined) throw new DemoCheckFailed("the test guest was not built");
    await mkdir(this.dir, { recursive: true });
    const files = DISKS.map((d) => join(this.dir, `${DOMAIN}-${d}.raw`));
    host.narrator.show(
      "(at sites A and B, LIBVIRT_DEFAULT_URI and FERRY_LIBVIRT_URI name the site's libvirtd, FERRY_NBD_SOCKET its ferryd's socket)",
    );
    await host.tool(a, "truncate", ["-s", DISK_SIZE, ...files]);
    const xml = join(this.dir, `${DOMAIN}.xml`);
    await writeFile(
      xml,
      testGuestXml({
        name: DOMAIN,
        kernel,
        disks: DISKS.map((d, i) => fileDiskXml(d, files[i] ?? "")),
        console: this.console,
        seed: SEED,
        mb: WORKLOAD_MIB,
      }),
    );
    host.narrator.show(
      `(${xml}: the test guest under TCG, 256 MiB, vda and vdb on those files, its serial console in ${this.console})`,
    );
    await host.tool(a, "virsh", ["define", xml]);
    await host.ferry(a, ["vm", "list"]);
    await host.ferry(a, ["vm", "adopt", DOMAIN]);
    await host.ferry(a, ["vm", "list"]);
    return ["--vm", DOMAIN];
  }

  async write(a: DemoSite): Promise<void> {
    const { host } = this;
    await host.tool(a, "virsh", ["start", DOMAIN]);
    const report = await this.waitForConsole("the guest at site A to finish its workload", (r) => r.done);
    await this.showConsole(a);
    if (report.status !== "ok") throw new DemoCheckFailed(`the guest at site A failed: ${report.errors.join("; ")}`);
    for (const d of DISKS) {
      const written = report.wrote[d]?.[0] ?? "";
      const expected = expectedGuestSha256(SEED, d, 1, WORKLOAD_MIB);
      if (written !== expected) {
        throw new DemoCheckFailed(`the guest at site A wrote ${written || "nothing"} on ${d}, not ${expected}`);
      }
      this.wrote[d] = written;
    }
    this.wroteAt = a.nats.name;
    host.narrator.show(
      `the guest wrote ${WORKLOAD_MIB} MiB on each disk, the bytes seed ${SEED} makes (the sha256 it printed is the one they must have), and powers off`,
    );
    await host.waitFor(`the guest at site A to power off`, async () =>
      (await host.tool(a, "virsh", ["domstate", DOMAIN], { quiet: true })).includes("shut off"),
    );
    await host.tool(a, "virsh", ["domstate", DOMAIN]);
  }

  async up(
    _b: DemoSite,
    failoverStartedMs: number,
    abandoned: () => boolean,
  ): Promise<{ upAtMs: number; what: string }> {
    // The guest's first line (READY: kernel up, disks found), polled every quarter second.
    await this.waitForConsole("the guest's first line on its console at site B", (r) => r.ready || abandoned());
    if (abandoned()) throw new DemoCheckFailed("the failover failed: no guest at site B to wait for");
    const upAtMs = Date.now();
    const seconds = ((upAtMs - failoverStartedMs) / 1000).toFixed(1);
    return { upAtMs, what: `VM ${DOMAIN}'s first console line at B ${seconds}s after \`ferry failover\`` };
  }

  async leave(a: DemoSite): Promise<void> {
    // Both sites share this machine's file system and the captured definition names the same
    // console file: site A's lines are moved aside so that what is read after is site B's guest.
    await this.host.tool(a, "mv", [this.console, `${this.console}.${a.nats.name}`]);
  }

  async verify(b: DemoSite): Promise<MemberCheck[]> {
    await this.host.tool(b, "virsh", ["list", "--all"]);
    const report = await this.waitForConsole("the guest at site B to check its disks", (r) => r.done);
    await this.showConsole(b);
    await this.host.ferry(b, ["vm", "list"]);
    return DISKS.map((d) => ({
      source: `${this.wroteAt}:${DOMAIN} ${d} (guest wrote)`,
      sourceSha256: this.wrote[d] ?? "",
      copy: `${b.nats.name}:${DOMAIN} ${d} (guest found)`,
      copySha256: report.found[d] ?? "",
    }));
  }

  private async showConsole(site: DemoSite): Promise<void> {
    await this.host.tool(site, "grep", ["FERRY-GUEST", this.console]);
  }

  private async waitForConsole(what: string, until: (r: GuestReport) => boolean): Promise<GuestReport> {
    let report: GuestReport | undefined;
    await this.host.waitFor(
      what,
      async () => {
        report = await readGuestConsole(this.console);
        return until(report);
      },
      GUEST_TIMEOUT_MS,
    );
    if (report === undefined) throw new DemoCheckFailed(`no console of ${DOMAIN} at ${this.console}`);
    return report;
  }
}
