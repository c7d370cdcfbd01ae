/** QEMU's `qemu-io` on a raw NBD export: the reference client for writing and verifying patterns. */
import type { Sandbox } from "@ferry/local-clusters";

/**
 * Run qemu-io commands (`write -P 0xab 0 1M`, `read -P 0xab 0 1M`, …) against an NBD URI and return
 * its stdout. Fails if qemu-io exits non-zero, which it does when a command fails or a pattern
 * does not verify.
 */
export async function qemuIo(sandbox: Sandbox, uri: string, commands: readonly string[]): Promise<string> {
  const args = ["-f", "raw", uri, ...commands.flatMap((command) => ["-c", command])];
  const result = await sandbox.run("qemu-io", args);
  if (result.code !== 0) {
    throw new Error(
      `qemu-io ${commands.join("; ")} on ${uri} exited ${result.code ?? result.signal}: ${result.stdout.trim()} ${result.stderr.trim()}`,
    );
  }
  return result.stdout;
}

/** sha256 of a whole NBD export, read with nbdcopy (what a user would compare between two sites). */
export async function exportSha256(sandbox: Sandbox, uri: string): Promise<string> {
  const result = await sandbox.run("bash", ["-o", "pipefail", "-c", 'nbdcopy "$1" - | sha256sum', "bash", uri]);
  if (result.code !== 0) throw new Error(`nbdcopy ${uri} - | sha256sum: ${result.stderr.trim()}`);
  return result.stdout.split(" ")[0] ?? "";
}
