/**
 * Several ferryd in one site (`ferry daemon --node`), end to end over two real sites: two nodes per
 * site, one leading. An application's volumes are placed together on one node (the one with the
 * fewest volumes), the target site's leader places the replicas on one of its nodes, and every
 * call the leader makes for an application on another node goes to that node — protect, status,
 * a failover at the target — and goes on when the leader stops and the other node takes over.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  type Application,
  connectNats,
  type Operation,
  type PairStatus,
  type ProtectionStatus,
} from "@ferry/orchestrator";
import {
  FerryCli,
  qemuIo,
  Sandbox,
  exportSha256 as sha256Of,
  startTwoSites,
  type TwoSites,
  waitFor,
} from "@ferry/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { atSite, daemonSite, pointAfter, type SiteService, waitForSites } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;
const nodes: Record<string, SiteService> = {};

function at(site: "a" | "b", args: readonly string[]) {
  return atSite(sites[site], args);
}

/** The node of `site` whose data directory holds every one of `volumes` (and no other holds any). */
function holder(site: "a" | "b", volumes: readonly string[]): string {
  const names = Object.keys(nodes).filter((n) => n.startsWith(site));
  const holding = names.filter((n) => volumes.some((v) => existsSync(join(nodes[n]?.data ?? "", "volumes", v))));
  expect(holding, `the nodes of site ${site} holding ${volumes.join(", ")}`).toHaveLength(1);
  const [node] = holding;
  for (const v of volumes) expect(existsSync(join(nodes[node ?? ""]?.data ?? "", "volumes", v))).toBe(true);
  return node ?? "";
}

function digest(node: string, volume: string): Promise<string> {
  return sha256Of(sandbox, nodes[node]?.serve.uri(volume) ?? "");
}

beforeAll(async () => {
  sites = await startTwoSites();
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  // The first ferryd of each site leads it.
  for (const [name, site, node] of [
    ["a1", "a", "n1"],
    ["a2", "a", "n2"],
    ["b1", "b", "m1"],
    ["b2", "b", "m2"],
  ] as const) {
    nodes[name] = await daemonSite(ferry, sandbox, sites[site], { extra: ["--node", node] });
  }
  expect(nodes.a1?.serve.servingLine).toContain("leading site site-a");
  expect(nodes.a2?.serve.servingLine).toContain("following site site-a");
  await waitForSites(ferry, sites.a, 2);
});

afterAll(async () => {
  await sandbox?.cleanup();
  await sites?.stop();
});

describe("several ferryd in one site", () => {
  it("refuses a node name that cannot address a node", async () => {
    const data = await sandbox.dir("ferry-bad-node-");
    // ferryd of site A on a fresh data directory, with these further arguments.
    const daemonA = (extra: readonly string[]) =>
      ferry.run(
        [
          "daemon",
          "--data",
          data,
          "--socket",
          join(data, "nbd.sock"),
          "--region",
          "eu-es",
          ...extra,
          "--site",
          "site-a",
          "--nats",
          sites.a.url,
        ],
        { timeoutMs: 30_000 },
      );
    const bad = await daemonA(["--node", "n.1"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain("--node 'n.1' is not a valid node name");
    const { FERRY_SITE: _site, FERRY_NATS: _nats, ...env } = process.env;
    const alone = await ferry.run(["volume", "serve", "--data", data, "--node", "n1"], { env });
    expect(alone.code).toBe(2);
    expect(alone.stderr).toContain("--node applies to a service that joins a site");
    // A ferryd without --node in a site of nodes would lead (or serve) blind to them: refused.
    const blind = await daemonA([]);
    expect(blind.code).not.toBe(0);
    expect(blind.stderr).toContain("site site-a runs ferryd on nodes n1, n2: start this one with --node NAME too");
  });

  it("places applications on nodes, protects them to the other site's nodes, and keeps going when the leader stops", async () => {
    await ferry.ok(at("a", ["app", "create", "one", "--volume", "one-db", "--volume", "one-logs", "--size", "4M"]));
    // The application's volumes share the node with the fewest volumes: n1 (a tie, by name).
    expect(holder("a", ["one-db", "one-logs"])).toBe("a1");
    await ferry.ok(at("a", ["app", "create", "two", "--volume", "two-db", "--size", "4M"]));
    // n1 has two volumes now: the next application goes to the follower's node.
    expect(holder("a", ["two-db"])).toBe("a2");
    // Only ferryd reaches a node's data plane: the CLI's NATS user may ask ferryd, nothing else.
    const cli = await connectNats(sites.a.cliUrl, "nodes test (cli user)");
    try {
      const direct = cli.request("ferry.node.site-a.n2", JSON.stringify({ method: "listVolumes", args: [] }), {
        timeout: 3_000,
      });
      await expect(direct).rejects.toThrow(/[Pp]ermissions [Vv]iolation|timeout|TIMEOUT/);
    } finally {
      await cli.close();
    }
    const shown = await ferry.json<{ node: string }>(at("a", ["app", "show", "two"]));
    expect(shown.node).toBe("n2");
    const list = await ferry.json<{ name: string; nodes?: { name: string; live: boolean }[] }[]>(
      at("a", ["site", "list"]),
    );
    expect(list.find((x) => x.name === "site-a")?.nodes).toEqual([
      { name: "n1", live: true },
      { name: "n2", live: true },
    ]);
    expect(await ferry.ok(at("a", ["site", "list"]))).toMatch(/site-a \(this\).*n1, n2/);

    await qemuIo(sandbox, nodes.a1?.serve.uri("one-db") ?? "", ["write -P 0x11 0 1M"]);
    await qemuIo(sandbox, nodes.a2?.serve.uri("two-db") ?? "", ["write -P 0x22 1M 1M"]);
    await ferry.ok(at("a", ["policy", "create", "fast", "--mode", "async", "--interval", "500ms", "--rpo", "5s"]));
    let wrote = Date.now();
    await ferry.ok(at("a", ["protect", "one", "--policy", "fast", "--to", "site-b"]));
    await pointAfter(ferry, sites.a, "one", wrote);
    // B places the second application's replicas beside no other: on its node with none.
    await ferry.ok(at("a", ["protect", "two", "--policy", "fast", "--to", "site-b"]));
    await pointAfter(ferry, sites.a, "two", wrote);
    const oneAtB = holder("b", ["one-db", "one-logs"]);
    const twoAtB = holder("b", ["two-db"]);
    expect(new Set([oneAtB, twoAtB])).toEqual(new Set(["b1", "b2"]));
    expect(await digest(twoAtB, "two-db")).toBe(await digest("a2", "two-db"));
    expect(await digest(oneAtB, "one-db")).toBe(await digest("a1", "one-db"));
    // The data plane of node n2 ships to the node of B it was given.
    const pairs = await ferry.json<PairStatus[]>(["replicate", "status", "--data", nodes.a2?.data ?? "", "--json"]);
    expect(pairs.map((p) => [p.volumes, p.target, p.targetNode])).toEqual([
      [["two-db"], "site-b", twoAtB === "b1" ? "m1" : "m2"],
    ]);
    const [status] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "two"]));
    expect(status).toMatchObject({ app: "two", target: "site-b", rpoMet: true });

    // The leader stops cleanly: the other node takes the lease at once and goes on protecting the
    // application on its own node.
    await nodes.a1?.serve.stop();
    await qemuIo(sandbox, nodes.a2?.serve.uri("two-db") ?? "", ["write -P 0x23 3M 64K"]);
    wrote = Date.now();
    await waitFor(
      "node n2 to lead site-a",
      async () => (await ferry.run(at("a", ["status", "two", "--json"]))).code === 0,
      { timeoutMs: 30_000 },
    );
    await pointAfter(ferry, sites.a, "two", wrote);
    // The application on the stopped node: its status says where its pair went.
    const [one] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "one"]));
    expect(one?.state).toBe("missing");
    expect(one?.lastError).toContain("node n1 of site site-a, which holds one-db, one-logs, is not running");
    const after = await ferry.json<{ name: string; nodes?: { name: string; live: boolean }[] }[]>(
      at("a", ["site", "list"]),
    );
    expect(after.find((x) => x.name === "site-a")?.nodes).toEqual([
      { name: "n1", live: false },
      { name: "n2", live: true },
    ]);
    // A new application can only go to the node that is left.
    await ferry.ok(at("a", ["app", "create", "three", "--volume", "three-db", "--size", "4M"]));
    expect(holder("a", ["three-db"])).toBe("a2");

    // A failover promotes the replicas on the node of B that holds them.
    const before = await digest("a2", "two-db");
    const op = await ferry.json<Operation>(at("b", ["failover", "two", "--to", "site-b", "--planned"]));
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(await digest(twoAtB, "two-db")).toBe(before);
    const apps = await ferry.json<Application[]>(at("b", ["app", "list"]));
    expect(apps.find((a) => a.name === "two")?.active).toBe("site-b");
    await qemuIo(sandbox, nodes[twoAtB]?.serve.uri("two-db") ?? "", ["write -P 0x24 0 64K"]);
  });
});
