/**
 * One Ferry site's nats-server on this machine (for `ferry demo` and the tests): renders a config
 * from the templates in `infra/nats/` into the site's directory, runs `nats-server -c … -P …` as a
 * child process and waits (bounded) until its monitoring port reports it healthy. It signals only
 * the process it started, by PID.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { endProcess } from "./end-process.js";
import { NatsServerFailed, NatsServerMissing } from "./errors.js";
import { onExit } from "./exit-guard.js";
import { waitFor } from "./wait-for.js";

export interface NatsCredentials {
  user: string;
  password: string;
}

/** A site's users (infra/nats/site.conf.tmpl): its ferryd, the CLI, another site's data plane. */
export interface SiteUsers {
  ferryd: NatsCredentials;
  cli: NatsCredentials;
  peer: NatsCredentials;
}

/** What a user of a started site sees (`SitePair.a`, `SitePair.b`). */
export interface Site {
  /** Site name; also its JetStream domain and the suffix of its server name (`ferry-<name>`). */
  readonly name: string;
  readonly region: string;
  /** `nats://ferryd:<password>@127.0.0.1:<clientPort>` — the site's ferryd user. */
  readonly url: string;
  /** The same server as the CLI user (narrower permissions, see infra/nats/site.conf.tmpl). */
  readonly cliUrl: string;
  /** `127.0.0.1:<clientPort>`, for clients that take credentials separately (nats.js). */
  readonly server: string;
  readonly users: Readonly<SiteUsers>;
  /** The same server as user `peer`: another site's `--peer-nats` to this one (replication only). */
  readonly peerUrl: string;
  readonly clientPort: number;
  /** HTTP monitoring port (`/varz`, `/healthz`, `/leafz`, …). */
  readonly monitorPort: number;
  /** The port this site accepts leafnode links on (site A only). */
  readonly leafPort?: number;
  readonly dir: string;
  readonly storeDir: string;
  readonly configFile: string;
  readonly logFile: string;
  /** PID of the running server; it changes on `restart()`. Throws when the server is not running. */
  readonly pid: number;
  readonly running: boolean;
  /** SIGTERM, then SIGKILL if it has not exited by the deadline. Idempotent. */
  stop(): Promise<void>;
  /** SIGKILL at once: a crash, for fault tests. */
  kill(): Promise<void>;
  /** Stop if running, then start again on the same ports with the same store; resolves once healthy. */
  restart(): Promise<void>;
  /** GET a monitoring endpoint (e.g. `"leafz?subs=1"`) and parse its JSON. */
  monitor<T = Record<string, unknown>>(endpoint: string): Promise<T>;
  /** Everything the server has logged so far (all of its runs). */
  log(): Promise<string>;
}

export interface NatsSiteSpec {
  name: string;
  region: string;
  /** Directory holding `infra/nats/*.tmpl`. */
  templateDir: string;
  /** The site's template, e.g. `site-a.conf.tmpl`; the templates it includes are rendered too. */
  template: string;
  /** The site's own directory: rendered configs, pid file, log and JetStream store go there. */
  dir: string;
  clientPort: number;
  monitorPort: number;
  leafPort?: number;
  users: SiteUsers;
  /** Placeholder values beyond the ones derived from the fields above (e.g. `LEAF_PASSWORD`). */
  values: Record<string, string>;
  natsServer: string;
  /** Bound on every wait: readiness, graceful stop. */
  timeoutMs: number;
}

export class NatsSite implements Site {
  readonly name: string;
  readonly region: string;
  readonly users: Readonly<SiteUsers>;
  readonly clientPort: number;
  readonly monitorPort: number;
  readonly leafPort?: number;
  readonly dir: string;
  readonly storeDir: string;
  readonly configFile: string;
  readonly logFile: string;
  private readonly pidFile: string;
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private releaseGuard: () => void = () => {};

  constructor(private readonly spec: NatsSiteSpec) {
    this.name = spec.name;
    this.region = spec.region;
    this.users = spec.users;
    this.clientPort = spec.clientPort;
    this.monitorPort = spec.monitorPort;
    if (spec.leafPort !== undefined) this.leafPort = spec.leafPort;
    this.dir = spec.dir;
    this.storeDir = join(spec.dir, "store");
    this.configFile = join(spec.dir, spec.template.replace(/\.tmpl$/, ""));
    this.logFile = join(spec.dir, "nats-server.log");
    this.pidFile = join(spec.dir, "nats-server.pid");
  }

  get server(): string {
    return `127.0.0.1:${this.clientPort}`;
  }

  get url(): string {
    return natsUrl(this.users.ferryd, this.server);
  }

  get cliUrl(): string {
    return natsUrl(this.users.cli, this.server);
  }

  get peerUrl(): string {
    return natsUrl(this.users.peer, this.server);
  }

  get running(): boolean {
    return this.child !== undefined;
  }

  get pid(): number {
    const pid = this.child?.pid;
    if (pid === undefined) throw new Error(`nats-server of site ${this.name} is not running`);
    return pid;
  }

  /** Render the config (first start only) and start the server; resolves once `/healthz` says ok. */
  async start(): Promise<void> {
    if (this.child) throw new Error(`nats-server of site ${this.name} is already running (pid ${this.child.pid})`);
    await mkdir(this.storeDir, { recursive: true });
    await renderConfig(this.spec.templateDir, this.spec.template, this.dir, {
      SITE: this.name,
      REGION: this.region,
      PORT: String(this.clientPort),
      HTTP_PORT: String(this.monitorPort),
      STORE: this.storeDir,
      FERRYD_PASSWORD: this.users.ferryd.password,
      CLI_PASSWORD: this.users.cli.password,
      PEER_PASSWORD: this.users.peer.password,
      ...(this.leafPort === undefined ? {} : { LEAF_PORT: String(this.leafPort) }),
      ...this.spec.values,
    });

    const logFd = openSync(this.logFile, "a");
    let child: ChildProcess;
    try {
      child = spawn(this.spec.natsServer, ["-c", this.configFile, "-P", this.pidFile], {
        stdio: ["ignore", logFd, logFd],
        // Replication frames are MiB-sized: with Go's default GC target the server spends a third
        // of its CPU collecting them (infra/nats/README.md, "Tuning"). A caller's GOGC wins.
        env: { ...process.env, GOGC: process.env.GOGC ?? NATS_GOGC },
      });
    } finally {
      closeSync(logFd);
    }
    this.child = child;
    this.releaseGuard = onExit(() => {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        process.kill(child.pid, "SIGKILL");
      }
    });
    // Settles when the process is gone, however it went (spawn error included).
    this.exited = new Promise<void>((resolve) => {
      child.once("exit", () => resolve());
      child.once("error", () => resolve());
    });
    let failure: Error | undefined;
    child.once("error", (error: NodeJS.ErrnoException) => {
      const message = `cannot start ${this.spec.natsServer} for site ${this.name}: ${error.message}`;
      failure =
        error.code === "ENOENT"
          ? new NatsServerMissing(`${message} (Debian package nats-server; infra/setup.sh installs it)`, {
              cause: error,
            })
          : new NatsServerFailed(message, this.logFile, "", { cause: error });
    });
    this.exited.then(() => {
      if (this.child === child) {
        this.child = undefined;
        this.releaseGuard();
      }
    });

    const healthy = waitFor(
      `nats-server of site ${this.name} to report healthy on http://127.0.0.1:${this.monitorPort}/healthz`,
      async () => {
        const health = await this.monitor<{ status?: string }>("healthz");
        return health.status === "ok";
      },
      { timeoutMs: this.spec.timeoutMs, intervalMs: 25 },
    );
    const diedEarly = this.exited.then(() => {
      throw failure ?? new Error(`nats-server of site ${this.name} exited during startup`);
    });
    try {
      await Promise.race([healthy, diedEarly]);
    } catch (error) {
      await this.kill();
      if (error instanceof NatsServerMissing || error instanceof NatsServerFailed) throw error;
      const reason = error instanceof Error ? error.message : String(error);
      throw new NatsServerFailed(reason, this.logFile, await this.logTail(), { cause: error });
    } finally {
      diedEarly.catch(() => {});
      healthy.catch(() => {});
    }
  }

  async stop(): Promise<void> {
    await this.signal("SIGTERM", this.spec.timeoutMs);
  }

  async kill(): Promise<void> {
    await this.signal("SIGKILL", this.spec.timeoutMs);
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  async monitor<T = Record<string, unknown>>(endpoint: string): Promise<T> {
    const url = `http://127.0.0.1:${this.monitorPort}/${endpoint}`;
    const response = await fetch(url, { signal: AbortSignal.timeout(2_000) });
    const body = await response.text();
    // /healthz answers 503 with a JSON reason while JetStream is still starting.
    if (!response.ok && response.status !== 503) throw new Error(`GET ${url}: HTTP ${response.status} ${body}`);
    return JSON.parse(body) as T;
  }

  async log(): Promise<string> {
    return readFile(this.logFile, "utf8").catch(() => "");
  }

  private async logTail(lines = 40): Promise<string> {
    return (await this.log()).split("\n").slice(-lines).join("\n");
  }

  /** Send `signal` to the server by PID; SIGKILL it if it is still there after `graceMs`. */
  private async signal(signal: NodeJS.Signals, graceMs: number): Promise<void> {
    const child = this.child;
    if (child === undefined) return;
    await endProcess(child, `nats-server of site ${this.name}`, { signal, graceMs });
    await this.exited;
  }
}

function natsUrl({ user, password }: NatsCredentials, server: string): string {
  return `nats://${encodeURIComponent(user)}:${encodeURIComponent(password)}@${server}`;
}

/** Go's GC target for the sites' nats-servers (Go's default is 100); see infra/nats/README.md. */
export const NATS_GOGC = "400";

const PLACEHOLDER = /\{\{([A-Z0-9_]+)\}\}/g;
const INCLUDE = /^\s*include\s+"([^"]+)"/gm;

/**
 * Render `template` (and, recursively, every file it `include "x"`s, from `x.tmpl`) into `outDir`.
 * Fails on a placeholder without a value, and on a value that could break out of a quoted string.
 */
export async function renderConfig(
  templateDir: string,
  template: string,
  outDir: string,
  values: Record<string, string>,
): Promise<void> {
  for (const [name, value] of Object.entries(values)) {
    if (/["\\\n\r]/.test(value)) throw new Error(`value of {{${name}}} has a quote, backslash or newline: ${value}`);
  }
  const source = await readFile(join(templateDir, template), "utf8");
  const rendered = source.replace(PLACEHOLDER, (_, name: string) => {
    const value = values[name];
    if (value === undefined) throw new Error(`${join(templateDir, template)}: no value for {{${name}}}`);
    return value;
  });
  await writeFile(join(outDir, template.replace(/\.tmpl$/, "")), rendered);
  for (const [, included] of rendered.matchAll(INCLUDE)) {
    if (included !== undefined) await renderConfig(templateDir, `${included}.tmpl`, outDir, values);
  }
}
