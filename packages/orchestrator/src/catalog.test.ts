import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { Catalog } from "./catalog.js";
import { type PointMetadata, PointStore } from "./points.js";
import { twoSitesForTests } from "./two-sites.test-support.js";

const t = twoSitesForTests();

describe("the catalog in the site's KV", () => {
  it("loads what another ferryd of the site wrote, deletes included", async () => {
    const writer = await Catalog.open(t.a);
    for (const name of ["p1", "p2", "p3"]) await writer.locks.put(name, `op-${name}`);
    await writer.locks.delete("p2");
    await writer.locks.put("p3", "op-p3-again");
    const reader = await Catalog.open(t.a);
    await reader.load();
    expect(reader.locks.entries().sort()).toEqual([
      ["p1", "op-p1"],
      ["p3", "op-p3-again"],
    ]);
    // An empty bucket loads as empty (no watcher waits for an entry that never comes).
    expect(reader.apps.list()).toEqual([]);
  });
});

describe("recovery-point metadata in the target's object store", () => {
  const meta = (generation: number, captures = 0): PointMetadata => ({
    app: "crm",
    source: "site-a",
    target: "site-b",
    generation,
    generations: { "crm-db": generation },
    atMs: 1_000 + generation,
    consistency: captures > 0 ? "application" : "crash",
    reason: captures > 0 ? null : "pre-hook exited with 1",
    captures: Array.from({ length: captures }, (_, i) => ({
      kind: "vm" as const,
      name: `vm${i}`,
      // Big and repetitive, like domain XML: compressed, and chunked beyond one message.
      metadata: { xml: `<domain><name>vm${i}</name>${"<disk/>".repeat(300_000)}</domain>` },
    })),
    hooks: { pre: null, post: null },
    heldMs: 3,
  });

  it("is written by the source into the target's domain and read there, compressed", async () => {
    const target = new PointStore(t.b, "site-b");
    await target.ensureOwn();
    const source = new PointStore(t.a, "site-a");
    const stored = await source.put(meta(7, 2));
    expect(stored).toBeLessThan(100_000);
    await source.put(meta(9));
    await source.put(meta(12, 1));

    const listed = await target.list("crm", "site-a");
    expect([...listed.keys()].sort((x, y) => x - y)).toEqual([7, 9, 12]);
    expect(listed.get(9)).toMatchObject({ consistency: "crash", reason: "pre-hook exited with 1", members: 0 });
    expect(listed.get(7)).toMatchObject({ consistency: "application", reason: null, members: 2 });
    const got = await target.get("crm", "site-a", 7);
    expect(got).toEqual(meta(7, 2));
    expect(await target.get("crm", "site-a", 8)).toBeNull();
    // A point captured without metadata recovers with the newest capture before it.
    expect((await target.forRecovery("crm", "site-a", 11))?.generation).toBe(9);
    expect(await target.forRecovery("crm", "site-a", 5)).toBeNull();

    // Larger than a message once compressed: stored in chunks, read back whole.
    const big = {
      ...meta(13),
      captures: [{ kind: "kubernetes" as const, name: "ns", metadata: randomBytes(2_000_000).toString("base64") }],
    };
    expect(await source.put(big)).toBeGreaterThan(2_000_000);
    expect(await target.get("crm", "site-a", 13)).toEqual(big);

    // Pruning keeps the newest capture older than the oldest kept point (its fallback).
    expect(await target.prune("crm", "site-a", 12)).toBe(1);
    expect([...(await target.list("crm", "site-a")).keys()].sort((x, y) => x - y)).toEqual([9, 12, 13]);
  });
});
