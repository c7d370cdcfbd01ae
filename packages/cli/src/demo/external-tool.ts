/**
 * Runs the programs the demos show (qemu-io, nbdinfo, nbdcopy, the `ferry` command itself) and
 * returns their output; a missing tool or a failed run becomes a typed error naming the command
 * and what went wrong. A run is judged by its exit status, never by its output alone.
 */
import { spawn } from "node:child_process";
import { basename } from "node:path";
import { ToolFailed, ToolMissing } from "../errors.js";

export interface ToolOutput {
  stdout: string;
  stderr: string;
}

export interface ToolOptions {
  /** Ends the run (SIGTERM) when aborted. */
  signal?: AbortSignal | undefined;
  env?: NodeJS.ProcessEnv | undefined;
  /** The command as messages name it; default the tool and its arguments. */
  label?: string | undefined;
  /** Takes stdout as it comes instead of collecting it (`ToolOutput.stdout` is then empty). */
  onStdout?: ((chunk: Buffer) => void) | undefined;
  /** Kill the run (SIGKILL) and fail after this long; default: no limit. */
  timeoutMs?: number | undefined;
}

/** Which Debian package brings each tool, for the "not installed" message. */
const PACKAGE_OF: Record<string, string> = { "qemu-io": "qemu-utils", nbdinfo: "libnbd-bin", nbdcopy: "libnbd-bin" };

export function runTool(tool: string, args: readonly string[], options: ToolOptions = {}): Promise<ToolOutput> {
  const label = options.label ?? [tool, ...args].join(" ");
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ["ignore", "pipe", "pipe"], signal: options.signal, env: options.env });
    let stdout = "";
    let stderr = "";
    const onStdout = options.onStdout;
    if (onStdout) {
      child.stdout.on("data", (chunk: Buffer) => onStdout(chunk));
    } else {
      child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
        stdout += chunk;
      });
    }
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
      stderr += chunk;
    });
    const timer =
      options.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            child.kill("SIGKILL");
            reject(new ToolFailed(`${label} did not finish within ${(options.timeoutMs ?? 0) / 1000} s`));
          }, options.timeoutMs);
    child.on("error", (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (error.code === "ENOENT") {
        const pkg = PACKAGE_OF[tool];
        reject(
          new ToolMissing(
            `${tool} is not installed${pkg ? ` (Debian package ${pkg})` : ""}: run \`bash infra/setup.sh\``,
          ),
        );
      } else {
        reject(error);
      }
    });
    child.on("close", (code, killedBy) => {
      clearTimeout(timer);
      if (code === 0) return resolve({ stdout, stderr });
      reject(new ToolFailed(`${label} failed: ${lastLine(stderr, label) || `exit ${code ?? killedBy}`}`));
    });
  });
}

/** The last line a tool printed on stderr, without its own `tool:` prefix (the message names it). */
function lastLine(stderr: string, label: string): string {
  const line = stderr.trim().split("\n").at(-1) ?? "";
  const name = basename(label.split(" ")[0] ?? "");
  return line.startsWith(`${name}: `) ? line.slice(name.length + 2) : line;
}
