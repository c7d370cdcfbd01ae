/**
 * A test's temp directories and child processes, all released by `cleanup()` — call it from
 * `afterEach`/`afterAll` so that a failing or timed-out test still leaves nothing behind. Processes
 * are ended by their own PID only.
 */
import { type ChildProcess, type SpawnOptions, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Kill the process (SIGKILL) after this long and fail; default 60 s. */
  timeoutMs?: number;
  input?: string | Buffer;
}

export interface RunResult {
  /** Exit status, or null when the process was ended by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export class Sandbox {
  private readonly dirs: string[] = [];
  private readonly children = new Set<ChildProcess>();

  /** A fresh temp directory, removed by `cleanup()`. */
  async dir(prefix = "ferry-test-"): Promise<string> {
    const dir = await mkdtemp(join(tmpdir(), prefix));
    this.dirs.push(dir);
    return dir;
  }

  /** Remove `dir` in `cleanup()` too (a directory made elsewhere than the temp dir, e.g. on tmpfs). */
  adopt(dir: string): string {
    this.dirs.push(dir);
    return dir;
  }

  /** Start a process that `cleanup()` will end if it is still running. */
  spawn(command: string, args: readonly string[], options: SpawnOptions = {}): ChildProcess {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"], ...options });
    this.children.add(child);
    child.once("exit", () => this.children.delete(child));
    return child;
  }

  /** Run a process to completion and collect its output; it never outlives its timeout. */
  run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    return new Promise((resolve, reject) => {
      const child = this.spawn(command, args, {
        stdio: [options.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
        env: options.env ?? process.env,
        cwd: options.cwd,
      });
      let stdout = "";
      let stderr = "";
      child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
        stdout += chunk;
      });
      child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
        stderr += chunk;
      });
      if (options.input !== undefined) child.stdin?.end(options.input);
      const timer = setTimeout(() => {
        child.kill("SIGKILL");
        reject(new Error(`${command} ${args.join(" ")} did not finish within ${timeoutMs} ms\n${stderr}`));
      }, timeoutMs);
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(error);
      });
      child.once("close", (code, signal) => {
        clearTimeout(timer);
        resolve({ code, signal, stdout, stderr });
      });
    });
  }

  /** End every process still running (SIGKILL, by PID) and remove every temp directory. */
  async cleanup(): Promise<void> {
    const running = [...this.children];
    this.children.clear();
    await Promise.all(running.map((child) => killAndReap(child)));
    const dirs = this.dirs.splice(0);
    await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
  }
}

/** SIGKILL a child by its PID and wait (bounded) until it has exited. */
export async function killAndReap(child: ChildProcess, timeoutMs = 10_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  try {
    process.kill(child.pid, "SIGKILL");
  } catch {
    return; // already gone
  }
  await Promise.race([exited, new Promise<void>((resolve) => setTimeout(resolve, timeoutMs).unref())]);
}
