import { describe, expect, it } from "vitest";
import { Lease } from "./lease.js";
import { twoSitesForTests } from "./two-sites.test-support.js";

const t = twoSitesForTests();

describe("the leader lease in the site's KV", () => {
  it("has one holder at a time, passes on after a missed term or a release", async () => {
    const x = await Lease.open(t.a, "x", 1_000);
    const y = await Lease.open(t.a, "y", 1_000);
    const t0 = Date.now();
    expect(await x.tryAcquire(t0)).toBe(true);
    expect(await y.tryAcquire(t0 + 10)).toBe(false);
    expect(await x.tryAcquire(t0 + 300)).toBe(true); // renewal
    expect((await y.current())?.holder).toBe("x");
    // x stops renewing; within the term y still waits, after it y takes over.
    expect(await y.tryAcquire(t0 + 1_200)).toBe(false);
    expect(await y.tryAcquire(t0 + 1_400)).toBe(true);
    // x learns on its next renewal that it lost the lease.
    expect(await x.tryAcquire(t0 + 1_500)).toBe(false);
    expect(x.held).toBe(false);
    // A clean release frees it at once.
    await y.release();
    expect(await x.tryAcquire(t0 + 1_600)).toBe(true);
    await x.release();
  });
});
