/**
 * What the multi-site demos share: one temp directory, the nats-servers of the sites, a service
 * process per site (`ferry volume serve` or ferryd), the narration, Ctrl-C handling, and running
 * the tools a step shows (the `ferry` bin, qemu-io). A demo owns everything it starts and
 * `cleanup()` stops and removes all of it, newest first, on success, on failure and on Ctrl-C.
 */
import { rmSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  NatsServerFailed,
  onExit,
  type Site,
  type SitePair,
  type SitePairOptions,
  startSitePair,
} from "@ferry/nats-sites";
import { SiteStartFailed } from "../errors.js";
import type { ProgramIo } from "../program.js";
import { runTool } from "./external-tool.js";
import { Interruption } from "./interruption.js";
import { Narrator, shellWord } from "./narrator.js";
import { SiteService, type SiteServiceSpec } from "./site-service.js";

export const FERRY_BIN = fileURLToPath(new URL("../../bin/ferry.js", import.meta.url));
/** Bound on every command a demo runs. */
export const COMMAND_TIMEOUT_MS = 180_000;
const POLL_MS = 250;

/** A site as a demo drives it: its NATS server, data directory and service process. */
export interface DemoSite {
  nats: Site;
  dataDir: string;
  service: SiteService;
}

/** Run a demo, then its cleanup whatever happened; the demo's own error wins over the cleanup's. */
export async function runDemo(demo: { run(): Promise<void>; cleanup(failed: boolean): Promise<void> }) {
  let failed = false;
  try {
    await demo.run();
  } catch (error) {
    failed = true;
    throw error;
  } finally {
    await demo.cleanup(failed);
  }
}

export abstract class DemoHost {
  protected readonly interruption = new Interruption();
  protected readonly narrator: Narrator;
  protected root: string | undefined;
  private releaseRoot: () => void = () => {};
  /** Held as a promise: an interrupted start is still awaited, then stopped, by the cleanup. */
  private sitesStart: Promise<SitePair> | undefined;
  private readonly services: SiteService[] = [];
  /** Other things a demo started (a site's libvirtd and its guests), stopped before the services. */
  private readonly owned: { what: string; stop: () => Promise<string> }[] = [];

  constructor(io: ProgramIo) {
    this.narrator = new Narrator(io);
  }

  abstract run(): Promise<void>;

  /** The last heading, shown once everything is stopped after a successful run. */
  protected abstract doneMessage(): string;

  /** Create the demo's temp directory (removed by the cleanup, or by an exit guard). */
  protected async makeRoot(): Promise<string> {
    const root = await mkdtemp(join(tmpdir(), "ferry-demo-"));
    this.root = root;
    this.releaseRoot = onExit(() => rmSync(root, { recursive: true, force: true }));
    return root;
  }

  protected step<T>(work: Promise<T>): Promise<T> {
    return this.interruption.step(work);
  }

  protected async startSites(options: SitePairOptions): Promise<SitePair> {
    this.sitesStart = startSitePair(options);
    try {
      return await this.step(this.sitesStart);
    } catch (error) {
      if (error instanceof NatsServerFailed) {
        const said = error.lastLogLine === "" ? "" : `; it logged: ${error.lastLogLine}`;
        throw new SiteStartFailed(`${error.reason}${said}`, { cause: error });
      }
      throw error;
    }
  }

  /** Start a site's service process in `<root>/<site>`, shown as the command a user would type. */
  protected async startService(
    nats: Site,
    extra: Pick<SiteServiceSpec, "command" | "allowRegions" | "peerNats" | "libvirt" | "kubernetes">,
  ): Promise<DemoSite> {
    const dataDir = join(this.root ?? tmpdir(), nats.name);
    await mkdir(dataDir, { recursive: true });
    const spec: SiteServiceSpec = {
      bin: FERRY_BIN,
      site: nats.name,
      region: nats.region,
      nats: nats.url,
      dataDir,
      socket: join(dataDir, "nbd.sock"),
      ...extra,
    };
    this.narrator.command(nats.name, SiteService.commandLine(spec));
    const service = SiteService.spawn(spec);
    this.services.push(service);
    await this.step(service.ready());
    this.narrator.show(`${service.servingLine} (pid ${service.pid})`);
    return { nats, dataDir, service };
  }

  /**
   * Have the cleanup stop something else the demo started — before the site services, which a guest
   * may still use. `stop` answers the line to show once stopped. Register it before awaiting the
   * start, so that an interrupted start is still stopped.
   */
  protected own(what: string, stop: () => Promise<string>): void {
    this.owned.push({ what, stop });
  }

  /** Stop one service before the cleanup would (it leaves the cleanup's list once stopped). */
  protected async stopService(service: SiteService): Promise<void> {
    await this.step(service.stop());
    this.services.splice(this.services.indexOf(service), 1);
  }

  /**
   * The environment a command at this site runs with. At a site with a libvirtd, `ferry vm` and
   * `virsh` reach it, and QEMU reaches the site's volumes on the service's socket.
   */
  protected env(site: DemoSite): NodeJS.ProcessEnv {
    const { libvirt, socket, kubernetes } = site.service.spec;
    return {
      ...process.env,
      FERRY_DATA: site.dataDir,
      ...(libvirt === undefined
        ? {}
        : { FERRY_LIBVIRT_URI: libvirt, LIBVIRT_DEFAULT_URI: libvirt, FERRY_NBD_SOCKET: socket }),
      ...(kubernetes === undefined
        ? {}
        : { KUBECONFIG: kubernetes.kubeconfig, PATH: `${kubernetes.kubectlDir}:${process.env.PATH ?? ""}` }),
    };
  }

  /** Run `ferry ARGS` at a site, as shown; returns its stdout. */
  protected async ferry(site: DemoSite, args: readonly string[]): Promise<string> {
    this.narrator.command(site.nats.name, ["ferry", ...args].map(shellWord).join(" "));
    const out = await this.ferryQuiet(site, args);
    this.narrator.show(out);
    return out;
  }

  protected async ferryQuiet(site: DemoSite, args: readonly string[]): Promise<string> {
    const { stdout } = await this.step(
      runTool(process.execPath, [FERRY_BIN, ...args], {
        signal: this.interruption.signal,
        timeoutMs: COMMAND_TIMEOUT_MS,
        env: this.env(site),
        label: ["ferry", ...args].join(" "),
      }),
    );
    return stdout;
  }

  /** qemu-io on a site's export, shown with what it wrote or read (not its timing lines). */
  protected async qemuIo(
    site: DemoSite,
    volume: string,
    commands: readonly string[],
    { readOnly = false, quiet = false } = {},
  ): Promise<void> {
    const args = [...(readOnly ? ["-r"] : []), "-f", "raw", ...commands.flatMap((c) => ["-c", c])];
    const uri = site.service.uri(volume);
    if (!quiet) this.narrator.command(site.nats.name, `qemu-io ${args.map(shellWord).join(" ")} '${uri}'`);
    const { stdout } = await this.step(
      runTool("qemu-io", [...args, uri], { signal: this.interruption.signal, timeoutMs: COMMAND_TIMEOUT_MS }),
    );
    if (quiet) return;
    this.narrator.show(
      stdout
        .split("\n")
        .filter((line) => /^(wrote|read|[0-9a-f]{8}:)/.test(line))
        .join("\n"),
    );
  }

  /** A text file of numbered, recognisable lines (`<label> | line N`), for qemu-io's `write -s`. */
  protected async textFile(name: string, label: string, size: number): Promise<string> {
    const lines: string[] = [];
    let length = 0;
    for (let i = 1; length < size; i++) {
      const line = `${label} | line ${String(i).padStart(6, "0")}\n`;
      lines.push(line);
      length += line.length;
    }
    const file = join(this.root ?? tmpdir(), `${name}.txt`);
    await writeFile(file, lines.join("").slice(0, size));
    return file;
  }

  protected pause(ms: number): Promise<void> {
    return this.step(new Promise((resolve) => setTimeout(resolve, ms)));
  }

  /** Poll until `done` holds; `onTimeout` makes the error. */
  protected async until(done: () => Promise<boolean>, timeoutMs: number, onTimeout: () => Error): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (await done()) return;
      if (Date.now() > deadline) throw onTimeout();
      await this.pause(POLL_MS);
    }
  }

  /**
   * Stop everything started, newest first, and remove the temp directory. A step that fails here is
   * reported in the narration; it fails the demo unless the demo failed already (that error is the
   * one to report then).
   */
  async cleanup(failed: boolean): Promise<void> {
    const { narrator } = this;
    narrator.step("Stopping everything the demo started");
    const errors: unknown[] = [];
    /** `work` answers the line to show once done. */
    const attempt = async (what: string, work: () => Promise<string>) => {
      try {
        narrator.show(await work());
      } catch (error) {
        errors.push(error);
        narrator.show(`could not ${what}: ${error instanceof Error ? error.message : String(error)}`);
      }
    };
    const then = (work: () => Promise<void>, done: string) => async () => {
      await work();
      return done;
    };
    for (const { what, stop } of [...this.owned].reverse()) await attempt(`stop ${what}`, stop);
    for (const service of [...this.services].reverse()) {
      const name = `${service.what} of ${service.spec.site}`;
      await attempt(
        `stop ${name}`,
        then(() => service.stop(), `stopped ${name} (pid ${service.pid})`),
      );
    }
    const sites = await this.sitesStart?.catch(() => undefined);
    if (sites) {
      // Read before stopping: a Ctrl-C at the terminal reaches the servers too, and they may be gone.
      const all = [sites.c, sites.b, sites.a].filter((s): s is Site => s !== undefined);
      const pids = all.map((site) => `${site.name} (${site.running ? `pid ${site.pid}` : "already gone"})`);
      await attempt(
        "stop the nats-servers",
        then(() => sites.stop(), `stopped the nats-servers of ${pids.join(" and ")}`),
      );
    }
    const root = this.root;
    if (root !== undefined) {
      await attempt(
        `remove ${root}`,
        then(() => rm(root, { recursive: true, force: true }), `removed ${root}`),
      );
      this.releaseRoot();
    }
    this.interruption.dispose();
    if (failed) return;
    if (errors.length > 0) throw errors[0];
    narrator.step(this.doneMessage());
  }
}
