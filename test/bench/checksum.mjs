/**
 * sha256 of what a bench copied — a file, or a whole NBD export read with nbdcopy — and the check
 * that a copy equals its source. A benchmark of a copy that is wrong is worthless, so every bench
 * fails on a mismatch instead of reporting a number.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { spawnLogged } from "./processes.mjs";

export async function sha256File(file) {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) hash.update(chunk);
  return hash.digest("hex");
}

/** sha256 of a whole NBD export, read with nbdcopy into a pipe; killed after `timeoutMs`. */
export async function sha256Export(uri, log, timeoutMs = 600_000) {
  const child = spawnLogged("nbdcopy (checksum)", "nbdcopy", [uri, "-"], log, { stdout: "pipe" });
  const hash = createHash("sha256");
  child.stdout.on("data", (chunk) => hash.update(chunk));
  const timer = setTimeout(() => process.kill(child.pid, "SIGKILL"), timeoutMs);
  const [{ code, signal }] = await Promise.all([child.exited, new Promise((r) => child.stdout.once("end", r))]);
  clearTimeout(timer);
  if (code !== 0) throw new Error(`nbdcopy ${uri} - exited with ${code ?? signal}`);
  return hash.digest("hex");
}

export function expectSame(what, got, want) {
  if (got !== want) throw new Error(`${what} differs from its source after the copy (sha256 ${got} ≠ ${want})`);
}
