import { access } from "node:fs/promises";
import { describe, expect, it } from "vitest";
import { isAlive } from "./end-process.js";
import { startSitePair } from "./site-pair.js";

interface LeafzReport {
  leafnodes?: number;
  leafs?: Array<{ port?: number }>;
}

describe("startSitePair", () => {
  it("links B straight to A's leaf port without a front, and stop ends both servers and removes their files", async () => {
    const pair = await startSitePair({ a: { name: "east", region: "eu-es" }, b: { name: "west", region: "eu-de" } });
    const pids = [pair.a.pid, pair.b.pid];
    try {
      expect([pair.a.name, pair.b.name]).toEqual(["east", "west"]);
      expect(pair.a.url).toMatch(/^nats:\/\/ferryd:[0-9a-f]+@127\.0\.0\.1:\d+$/);
      // B's view of its one leafnode connection: the remote end is A's leaf port itself.
      const leafz = await pair.b.monitor<LeafzReport>("leafz");
      expect(leafz.leafnodes).toBe(1);
      expect(leafz.leafs?.[0]?.port).toBe(pair.a.leafPort);
    } finally {
      await pair.stop();
    }
    for (const pid of pids) expect(isAlive(pid)).toBe(false);
    await expect(access(pair.dir)).rejects.toThrow(/ENOENT/);
    await pair.stop();
  });

  it("starts a third site on request, linked to A as well, and stops all three", async () => {
    const pair = await startSitePair({ c: {} });
    const c = pair.c;
    if (c === undefined) throw new Error("no third site");
    const pids = [pair.a.pid, pair.b.pid, c.pid];
    try {
      expect([c.name, c.region]).toEqual(["site-c", "us-east"]);
      expect((await pair.a.monitor<LeafzReport>("leafz")).leafnodes).toBe(2);
      expect((await c.monitor<LeafzReport>("leafz")).leafs?.[0]?.port).toBe(pair.a.leafPort);
    } finally {
      await pair.stop();
    }
    for (const pid of pids) expect(isAlive(pid)).toBe(false);
  });
});
