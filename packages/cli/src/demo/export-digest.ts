/** The sha256 of a whole NBD export, read with nbdcopy: how the demo shows two sites hold the same bytes. */
import { createHash } from "node:crypto";
import { runTool } from "./external-tool.js";

export async function exportSha256(uri: string, signal?: AbortSignal, timeoutMs?: number): Promise<string> {
  const hash = createHash("sha256");
  // runTool fails unless nbdcopy exits 0, so a short or failed read never yields a digest.
  await runTool("nbdcopy", [uri, "-"], { signal, timeoutMs, onStdout: (chunk) => hash.update(chunk) });
  return hash.digest("hex");
}

const DIGEST_SHOWN = 16;

/** A digest as the demos' tables show it: its first 16 hex digits. */
export function shortDigest(digest: string): string {
  return `${digest.slice(0, DIGEST_SHOWN)}…`;
}
