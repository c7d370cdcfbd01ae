import { describe, expect, it } from "vitest";
import { type PointMetadata, PointStore, pointsKey } from "./points.js";
import { twoSitesForTests } from "./two-sites.test-support.js";

const t = twoSitesForTests();

function point(app: string, generation: number, consistency: "crash" | "application" = "crash"): PointMetadata {
  return {
    app,
    source: "site-a",
    target: t.sites.b.name,
    generation,
    generations: { [`${app}-data`]: generation },
    atMs: 1_000 * generation,
    consistency,
    reason: consistency === "crash" ? "no agent" : null,
    captures: [],
    hooks: { pre: null, post: null },
    heldMs: 0,
  };
}

describe("recovery-point metadata in the target's object store", () => {
  it("lists every application's points in one pass and prunes from that listing", async () => {
    const store = new PointStore(t.b, t.sites.b.name);
    await store.ensureOwn();
    for (const g of [3, 4, 5, 6]) await store.put(point("web", g));
    for (const g of [7, 8]) await store.put(point("db", g, "application"));

    const all = await store.listAll();
    expect([...all.keys()].sort()).toEqual([pointsKey("db", "site-a"), pointsKey("web", "site-a")]);
    expect([...(all.get(pointsKey("web", "site-a"))?.keys() ?? [])].sort()).toEqual([3, 4, 5, 6]);
    expect(all.get(pointsKey("db", "site-a"))?.get(8)).toMatchObject({
      generation: 8,
      consistency: "application",
      reason: null,
      members: 0,
    });
    expect(await store.list("db", "site-a")).toEqual(all.get(pointsKey("db", "site-a")));

    // Kept from 6 on: 3 and 4 go, 5 stays as the fallback of points captured without metadata.
    expect(await store.prune("web", "site-a", 6, all.get(pointsKey("web", "site-a")))).toBe(2);
    expect([...(await store.list("web", "site-a")).keys()].sort()).toEqual([5, 6]);
    expect((await store.forRecovery("web", "site-a", 9))?.generation).toBe(6);
    expect((await store.get("web", "site-a", 5))?.reason).toBe("no agent");
    expect(await store.get("web", "site-a", 4)).toBeNull();
    // The other application's points are untouched.
    expect([...(await store.list("db", "site-a")).keys()].sort()).toEqual([7, 8]);
  });
});
