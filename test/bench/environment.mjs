/**
 * What a bench run records about where it ran: the versions of the tools it drives, Node, the CPU
 * count and the commit of Ferry measured. A tool that does not answer `--version` is not installed,
 * and the run stops before it starts anything.
 */
import { cpus } from "node:os";
import { firstLine } from "./processes.mjs";

/** `tools`: `{ key: "command" }`; resolves to `{ key: first line of command --version, …, node, cpus, commit }`. */
export async function environment(tools) {
  const entries = Object.entries(tools);
  const [versions, commit, dirty] = await Promise.all([
    Promise.all(entries.map(([, command]) => firstLine(command, ["--version"]))),
    firstLine("git", ["rev-parse", "--short", "HEAD"]),
    firstLine("git", ["status", "--porcelain", "--untracked-files=no"]),
  ]);
  const out = {};
  for (const [i, [key, command]] of entries.entries()) {
    if (versions[i] === "unknown") throw new Error(`${command} is not installed: run \`bash infra/setup.sh\``);
    out[key] = versions[i];
  }
  return {
    ...out,
    node: process.version,
    cpus: cpus().length,
    commit: `${commit}${dirty && dirty !== "unknown" ? " (with uncommitted changes)" : ""}`,
  };
}
