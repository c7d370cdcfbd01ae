/**
 * Runs the real NBD tools the demo shows (qemu-io, nbdinfo) and returns their output; a missing
 * tool or a failed run becomes a typed error naming the tool and what to do.
 */
import { spawn } from "node:child_process";
import { ToolFailed, ToolMissing } from "../errors.js";

export interface ToolOutput {
  stdout: string;
  stderr: string;
}

/** Which Debian package brings each tool, for the "not installed" message. */
const PACKAGE_OF: Record<string, string> = { "qemu-io": "qemu-utils", nbdinfo: "libnbd-bin" };

export function runTool(tool: string, args: readonly string[], signal?: AbortSignal): Promise<ToolOutput> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ["ignore", "pipe", "pipe"], signal });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
      stdout += chunk;
    });
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
      stderr += chunk;
    });
    child.on("error", (error: NodeJS.ErrnoException) => {
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
      if (code === 0) return resolve({ stdout, stderr });
      const why = stderr.trim().split("\n").at(-1) || `exit ${code ?? killedBy}`;
      reject(new ToolFailed(`${tool} ${args.join(" ")} failed: ${why}`));
    });
  });
}
