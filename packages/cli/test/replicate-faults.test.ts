/**
 * `ferry replicate` through kill -9 of a site's `ferry volume serve`, with real processes: two
 * nats-servers linked by a leafnode (testkit's `startTwoSites`), one `ferry volume serve` per site,
 * incompressible data written over NBD with nbdcopy, and a rate-limited pair so that a transfer can
 * be caught half-way. A killed source comes back on its data directory and its persisted pair
 * resumes by itself; a killed target comes back still exposing its last complete generation. Either
 * way the transfer goes on from what the target had applied instead of starting over, and the
 * replica ends equal to the source (sha256 of both exports).
 */
import { createHash, randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FerryCli, Sandbox, exportSha256 as sha256Of, startTwoSites, type TwoSites, waitFor } from "@ferry/testkit";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import type { PairStatus } from "../src/commands/replicate.js";
import { type SiteService, serveSite as serveSiteWith } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const MiB = 2 ** 20;
const SIZE = 64 * MiB;
/** On the wire, per second: the 64 MiB take four seconds, long enough to kill a side half-way. */
const RATE = "16M";
const RATE_BYTES = 16 * MiB;
/** What resuming may send again on top of what the target lacks: blocks the fault left in part. */
const SLACK = MiB;

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;

beforeAll(async () => {
  sites = await startTwoSites();
});

afterAll(async () => {
  await sites?.stop();
});

beforeEach(() => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
});

// Kills every `ferry volume serve` and nbdcopy still running (by PID) and removes the data
// directories, also after a failure; a test that failed while the link was cut leaves it healed.
afterEach(async () => {
  await sandbox.cleanup();
  if (sites?.linkProxy.partitioned) await sites.heal();
});

/** `ferry volume serve` for a site, on a new data directory or again on an existing one. */
function serveSite(site: "a" | "b", data?: string): Promise<SiteService> {
  return serveSiteWith(ferry, sandbox, sites[site], { data });
}

/** Write `SIZE` random bytes over the whole volume through its NBD export; returns their sha256. */
async function writeRandom(a: SiteService, volume: string): Promise<string> {
  const bytes = randomBytes(SIZE);
  const file = join(await sandbox.dir("ferry-data-"), "random.img");
  await writeFile(file, bytes);
  const result = await sandbox.run("nbdcopy", ["--flush", file, a.serve.uri(volume)]);
  if (result.code !== 0) throw new Error(`nbdcopy ${file} ${a.serve.uri(volume)}: ${result.stderr.trim()}`);
  return createHash("sha256").update(bytes).digest("hex");
}

function exportSha256(uri: string): Promise<string> {
  return sha256Of(sandbox, uri);
}

async function pairStatus(a: SiteService): Promise<PairStatus> {
  const [pair] = await ferry.json<PairStatus[]>(["replicate", "status", "--data", a.data]);
  if (pair === undefined) throw new Error(`no replication pair in ${a.data}`);
  return pair;
}

/** Wait until the pair has shipped at least `bytes` (since its service started); returns that count. */
async function shipped(a: SiteService, bytes: number, what: string): Promise<number> {
  return waitFor(
    what,
    async () => {
      const { bytesRaw } = await pairStatus(a);
      return bytesRaw >= bytes && bytesRaw;
    },
    { timeoutMs: 30_000, intervalMs: 100 },
  );
}

async function startPair(a: SiteService): Promise<void> {
  // The interval is long: only the first cycle, retries and `replicate sync` ship anything.
  const args = ["db", "--to", "site-b", "--mode", "async", "--interval", "1h", "--rate", RATE];
  await ferry.ok(["replicate", "start", ...args, "--data", a.data]);
}

const ZEROES = createHash("sha256").update(Buffer.alloc(SIZE)).digest("hex");

describe("ferry replicate through kill -9", () => {
  it("resumes an initial sync after the source's service is killed and started again", async () => {
    let a = await serveSite("a");
    const b = await serveSite("b");
    await ferry.ok(["volume", "create", "db", "--size", "64M", "--data", a.data]);
    const data = await writeRandom(a, "db");
    await startPair(a);

    const before = await shipped(a, SIZE / 2, "half the volume shipped");
    expect(before).toBeLessThan(SIZE);
    expect(await a.serve.kill9()).toEqual({ code: null, signal: "SIGKILL" });
    // The first generation is incomplete at B: its export shows none of it.
    expect(await exportSha256(b.serve.uri("db"))).toBe(ZEROES);

    // Same data directory: the pair's configuration is persisted and it resumes by itself.
    a = await serveSite("a", a.data);
    const status = await ferry.json<PairStatus>(["replicate", "sync", "db", "--data", a.data]);
    expect(status).toMatchObject({ state: "idle", lastError: null });
    expect(await exportSha256(a.serve.uri("db"))).toBe(data);
    expect(await exportSha256(b.serve.uri("db"))).toBe(data);
    // bytesRaw counts from the restart. B held what it had applied, at least what A counted as
    // acknowledged before the kill; starting over would ship all 64 MiB again.
    expect(status.bytesRaw).toBeLessThanOrEqual(SIZE - before + SLACK);
    expect(status.bytesRaw).toBeLessThan(SIZE * 0.6);
  });

  it("resumes a delta after the target's service is killed mid-apply, showing the last complete generation meanwhile", async () => {
    const a = await serveSite("a");
    let b = await serveSite("b");
    await ferry.ok(["volume", "create", "db", "--size", "64M", "--data", a.data]);
    const first = await writeRandom(a, "db");
    await startPair(a);
    const initial = await ferry.json<PairStatus>(["replicate", "sync", "db", "--data", a.data]);
    expect(initial.bytesRaw).toBe(SIZE);
    expect(await exportSha256(b.serve.uri("db"))).toBe(first);

    // Generation two rewrites every block; it is shipped by a `replicate sync` that B's death fails.
    const second = await writeRandom(a, "db");
    const syncing = ferry.run(["replicate", "sync", "db", "--data", a.data], { timeoutMs: 30_000 });
    const before = (await shipped(a, SIZE + SIZE / 2, "half the delta shipped")) - SIZE;
    expect(before).toBeLessThan(SIZE);
    expect(await b.serve.kill9()).toEqual({ code: null, signal: "SIGKILL" });
    const failed = await syncing;
    expect(failed.code, failed.stdout).toBe(1);
    expect(failed.stderr).toMatch(/^ferry: .*site-b/);

    // Restarted with the link cut, so that A cannot resume before B's export is read.
    await sites.partition();
    b = await serveSite("b", b.data);
    expect(await exportSha256(b.serve.uri("db"))).toBe(first);
    await sites.heal();

    const status = await ferry.json<PairStatus>(["replicate", "sync", "db", "--data", a.data]);
    expect(status).toMatchObject({ state: "idle", lastError: null });
    expect(await exportSha256(b.serve.uri("db"))).toBe(second);
    // B saves its progress map every second, so after a kill -9 it may have lost up to a second
    // of transfer (RATE_BYTES) of what A counted; starting over would ship all 64 MiB again.
    const after = status.bytesRaw - SIZE - before;
    expect(after).toBeLessThanOrEqual(SIZE - before + RATE_BYTES + SLACK);
    expect(after).toBeLessThan(SIZE * 0.8);
  });
});
