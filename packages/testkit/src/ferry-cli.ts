/**
 * The built `ferry` executable driven as a user would: as a subprocess, one invocation per call,
 * and `ferry volume serve` as a long-running process that tests stop with a signal or kill -9.
 */
import type { ChildProcess } from "node:child_process";
import type { RunOptions, RunResult, Sandbox } from "@ferry/local-clusters";
import { waitFor } from "@ferry/nats-sites";

export class FerryCli {
  constructor(
    private readonly sandbox: Sandbox,
    /** Path of packages/cli/bin/ferry.js. */
    readonly bin: string,
  ) {}

  run(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
    return this.sandbox.run(process.execPath, [this.bin, ...args], options);
  }

  /** Run and require exit status 0; returns stdout. */
  async ok(args: readonly string[], options: RunOptions = {}): Promise<string> {
    const result = await this.run(args, options);
    if (result.code !== 0) {
      throw new Error(`ferry ${args.join(" ")} exited ${result.code ?? result.signal}: ${result.stderr.trim()}`);
    }
    return result.stdout;
  }

  /** Run with `--json` appended and parse stdout. */
  async json<T>(args: readonly string[], options: RunOptions = {}): Promise<T> {
    return JSON.parse(await this.ok([...args, "--json"], options)) as T;
  }

  /** Start `ferry volume serve` with these arguments and wait until it says where it serves. */
  serve(args: readonly string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<FerryServe> {
    return this.spawnService(["volume", "serve", ...args], options);
  }

  /** Start `ferry daemon` (ferryd) with these arguments and wait until it says where it serves. */
  daemon(args: readonly string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<FerryServe> {
    return this.spawnService(["daemon", ...args], options);
  }

  private async spawnService(
    args: readonly string[],
    options: { env?: NodeJS.ProcessEnv; timeoutMs?: number },
  ): Promise<FerryServe> {
    const child = this.sandbox.spawn(process.execPath, [this.bin, ...args], {
      env: options.env ?? process.env,
    });
    const serve = new FerryServe(child);
    await serve.ready(options.timeoutMs ?? 30_000);
    return serve;
  }
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class FerryServe {
  stdout = "";
  stderr = "";
  /** `host:port` when it serves TCP. */
  tcpAddress: string | undefined;
  /** The unix socket path when it serves one. */
  socketPath: string | undefined;
  readonly exited: Promise<ExitStatus>;

  constructor(private readonly child: ChildProcess) {
    child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      this.stdout += chunk;
    });
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      this.stderr += chunk;
    });
    this.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  }

  get pid(): number {
    if (this.child.pid === undefined) throw new Error("ferry volume serve has no PID (it did not start)");
    return this.child.pid;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The first line the service printed: `ferry: serving N volumes … on …`. */
  get servingLine(): string {
    return this.stdout.split("\n").find((line) => line.includes("serving")) ?? "";
  }

  async ready(timeoutMs: number): Promise<void> {
    await waitFor(
      "ferry volume serve to report where it serves",
      () => {
        if (!this.running) {
          throw new Error(`ferry volume serve exited before serving: ${this.stderr.trim() || this.stdout.trim()}`);
        }
        return this.servingLine !== "" && this.servingLine;
      },
      { timeoutMs },
    );
    const line = this.servingLine;
    this.tcpAddress = /nbd:\/\/([^/\s]+)\//.exec(line)?.[1];
    this.socketPath = /unix socket ([^)\s]+)\)/.exec(line)?.[1] ?? /nbd\+unix:\/\/\/\?socket=(\S+)/.exec(line)?.[1];
  }

  /** An NBD URI of one export, over the unix socket when there is one, else TCP. */
  uri(volume: string): string {
    if (this.socketPath) return `nbd+unix:///${volume}?socket=${this.socketPath}`;
    if (this.tcpAddress) return `nbd://${this.tcpAddress}/${volume}`;
    throw new Error(`cannot tell where ferry serves from: ${this.servingLine}`);
  }

  tcpUri(volume: string): string {
    if (!this.tcpAddress) throw new Error(`ferry does not serve TCP: ${this.servingLine}`);
    return `nbd://${this.tcpAddress}/${volume}`;
  }

  /** Send a signal and wait (bounded) for the exit status. */
  async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 30_000): Promise<ExitStatus> {
    if (this.running) process.kill(this.pid, signal);
    const timeout = new Promise<never>((_, reject) =>
      setTimeout(
        () => reject(new Error(`ferry volume serve did not exit within ${timeoutMs} ms of ${signal}`)),
        timeoutMs,
      ).unref(),
    );
    return Promise.race([this.exited, timeout]);
  }

  /** kill -9: no chance to persist anything. */
  kill9(): Promise<ExitStatus> {
    return this.stop("SIGKILL");
  }
}
