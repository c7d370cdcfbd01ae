/**
 * One application protected to two sites under two policies, end to end over three real sites
 * (three nats-servers, B and C linked to A, one ferryd each): each target gets its own recovery
 * points on its own schedule, a drill runs at one target while both keep replicating, a planned
 * migration to one target pauses the other, and the failback protects it again by itself, sending
 * only the blocks it lacks.
 * Bytes are checked with sha256 of the NBD exports.
 */
import { fileURLToPath } from "node:url";
import type { FerryEvent, Operation, ProtectionStatus, RecoveryPoint } from "@ferry/orchestrator";
import {
  FerryCli,
  qemuIo,
  Sandbox,
  type Site,
  exportSha256 as sha256Of,
  startTwoSites,
  type TwoSites,
} from "@ferry/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { atSite, daemonSite, pointAfter, type SiteService, waitForSites } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const VOLUMES = ["shop-db", "shop-logs"];

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;
const ferryd: Record<"a" | "b" | "c", SiteService> = {} as never;

function site(s: "a" | "b" | "c"): Site {
  const found = s === "c" ? sites.c : sites[s];
  if (found === undefined) throw new Error("no third site");
  return found;
}

const at = (s: "a" | "b" | "c", args: readonly string[]) => atSite(site(s), args);

function digests(s: "a" | "b" | "c", volumes: readonly string[] = VOLUMES): Promise<string[]> {
  return Promise.all(volumes.map((v) => sha256Of(sandbox, ferryd[s].serve.uri(v))));
}

beforeAll(async () => {
  sites = await startTwoSites({ c: { region: "eu-fr" } });
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  for (const s of ["a", "b", "c"] as const) ferryd[s] = await daemonSite(ferry, sandbox, site(s));
  await waitForSites(ferry, site("a"), 3);
});

afterAll(async () => {
  await sandbox?.cleanup();
  await sites?.stop();
});

describe("an application protected to two sites", () => {
  it("replicates to both under their own policies, drills at one, migrates to the other and comes back", async () => {
    await ferry.ok(at("a", ["app", "create", "shop", "--volume", "shop-db", "--volume", "shop-logs", "--size", "8M"]));
    await ferry.ok(at("a", ["policy", "create", "near", "--mode", "async", "--interval", "500ms", "--rpo", "5s"]));
    await ferry.ok(at("a", ["policy", "create", "far", "--mode", "async", "--interval", "2s", "--rpo", "10s"]));
    await ferry.ok(at("a", ["policy", "create", "zero", "--mode", "sync", "--rpo", "5s"]));
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-db"), ["write -P 0x31 0 1M"]);
    let wrote = Date.now();
    await ferry.ok(at("a", ["protect", "shop", "--policy", "near", "--to", "site-b"]));
    await ferry.ok(at("a", ["protect", "shop", "--policy", "far", "--to", "site-c"]));
    // One synchronous target per application: a second one is refused, naming the first.
    await ferry.ok(at("a", ["app", "create", "ledger", "--volume", "ledger-db", "--size", "1M"]));
    await ferry.ok(at("a", ["protect", "ledger", "--policy", "zero", "--to", "site-b"]));
    const second = await ferry.run(at("a", ["protect", "ledger", "--policy", "zero", "--to", "site-c"]));
    expect(second.code).toBe(1);
    expect(second.stderr).toContain("application ledger replicates synchronously to site-b already (policy zero)");

    await pointAfter(ferry, site("a"), "shop", wrote, "site-b");
    await pointAfter(ferry, site("a"), "shop", wrote, "site-c");
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-logs"), ["write -P 0x32 2M 256K"]);
    wrote = Date.now();
    await pointAfter(ferry, site("a"), "shop", wrote, "site-b");
    await pointAfter(ferry, site("a"), "shop", wrote, "site-c");
    const atA = await digests("a");
    expect(await digests("b")).toEqual(atA);
    expect(await digests("c")).toEqual(atA);
    const rows = await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]));
    expect(rows.map((r) => [r.target, r.policy, r.rpoSeconds, r.rpoMet])).toEqual([
      ["site-b", "near", 5, true],
      ["site-c", "far", 10, true],
    ]);
    // Each target's points are its own generations (a generation is cut by one pair).
    const points = await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "shop"]));
    const bySite = (s: string) => points.filter((p) => p.site === s).map((p) => p.generation);
    expect(bySite("site-b").length).toBeGreaterThan(0);
    expect(bySite("site-c").length).toBeGreaterThan(0);
    expect(bySite("site-b").filter((g) => bySite("site-c").includes(g))).toEqual([]);

    // The low-level tools see both pairs and need --to for one of them.
    const pairs = await ferry.json<{ target: string }[]>(["replicate", "status", "--data", ferryd.a.data, "--json"]);
    expect(pairs.map((p) => p.target).sort()).toEqual(["site-b", "site-b", "site-c"]);
    const which = await ferry.run(["replicate", "sync", ...VOLUMES, "--data", ferryd.a.data]);
    expect(which.code).toBe(1);
    expect(which.stderr).toContain("replicate to several sites (site-b, site-c): name one with --to");
    const synced = await ferry.json<{ target: string; state: string }>([
      "replicate",
      "sync",
      ...VOLUMES,
      "--to",
      "site-c",
      "--data",
      ferryd.a.data,
    ]);
    expect(synced).toMatchObject({ target: "site-c", state: "idle" });

    // A drill at C while both keep replicating; its cleanup is found from the source.
    const drill = await ferry.json<Operation>(at("a", ["failover", "shop", "--to", "site-c", "--test"]));
    expect(drill.state, JSON.stringify(drill.error)).toBe("succeeded");
    expect(
      await digests(
        "c",
        VOLUMES.map((v) => `${v}-drill`),
      ),
    ).toEqual(atA);
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-db"), ["write -P 0x33 3M 64K"]);
    wrote = Date.now();
    await pointAfter(ferry, site("a"), "shop", wrote, "site-b");
    await pointAfter(ferry, site("a"), "shop", wrote, "site-c");
    const cleanup = await ferry.json<Operation>(at("a", ["drill", "cleanup", "shop"]));
    expect(cleanup.state, JSON.stringify(cleanup.error)).toBe("succeeded");

    // A planned migration to B: C's pair pauses (A's volumes become B's replicas), and says so.
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-logs"), ["write -P 0x34 4M 64K"]);
    const beforeMove = await digests("a");
    const move = await ferry.json<Operation>(at("b", ["failover", "shop", "--to", "site-b", "--planned"]));
    expect(move.state, JSON.stringify(move.error)).toBe("succeeded");
    expect(await digests("b")).toEqual(beforeMove);
    const events = (await ferry.ok(at("a", ["events", "--app", "shop", "--json"])))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as FerryEvent);
    const paused = events.find((e) => e.type === "io.ferry.protection.paused");
    expect(paused?.data).toMatchObject({ target: "site-c" });
    const afterMove = await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]));
    expect(afterMove.find((r) => r.target === "site-c")?.state).toBe("failed-over");

    // Home again with the changes made at B; C is protected again and catches up.
    await qemuIo(sandbox, ferryd.b.serve.uri("shop-db"), ["write -P 0x35 5M 64K"]);
    const atB = await digests("b");
    const back = await ferry.json<Operation>(at("a", ["failback", "shop"]));
    expect(back.state, JSON.stringify(back.error)).toBe("succeeded");
    expect(await digests("a")).toEqual(atB);
    // Home again, the paused target is protected again by itself.
    expect(back.steps.find((x) => x.name === "activate")?.detail).toContain("protecting it to site-c again");
    wrote = Date.now();
    await pointAfter(ferry, site("a"), "shop", wrote, "site-c");
    expect(await digests("c")).toEqual(atB);
    const home = await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]));
    // C held a copy from before the move (an earlier epoch of A's volumes): block hashes decide
    // what it lacks, and that is what was written since, not the 16 MiB of the two volumes.
    const c = home.find((r) => r.target === "site-c");
    expect(c?.bytesRaw).toBeGreaterThan(0);
    expect(c?.bytesRaw).toBeLessThan(1 << 20);
    // Both ship again (the pair's state: idle between generations, shipping during one).
    expect(home.map((r) => [r.source, r.target, ["idle", "shipping"].includes(r.state)])).toEqual([
      ["site-a", "site-b", true],
      ["site-a", "site-c", true],
    ]);
  });
});
