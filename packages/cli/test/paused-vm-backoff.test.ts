/**
 * ferryd's pacing of resumes for VMs paused on an I/O error (`PausedVmBackoff`): once at once, a VM
 * that keeps being paused again less and less often, and back to normal once a resume holds.
 * Plain arithmetic on times given; the resumes themselves are tested against libvirt in vm.test.ts.
 */
import { describe, expect, it } from "vitest";
import { PausedVmBackoff } from "../src/commands/daemon.js";

describe("PausedVmBackoff", () => {
  it("lets a VM be resumed at once, then waits longer each time it is paused again soon after", () => {
    const b = new PausedVmBackoff();
    expect(b.waiting(0)).toEqual(new Set());
    expect(b.resumed("db", 0)).toBe(0);
    // First resume: the next may come at the next check (2 s).
    expect(b.waiting(1_999)).toEqual(new Set(["db"]));
    expect(b.waiting(2_000)).toEqual(new Set());
    expect(b.resumed("db", 2_000)).toBe(1);
    expect(b.waiting(5_999)).toEqual(new Set(["db"]));
    expect(b.waiting(6_000)).toEqual(new Set());
    expect(b.resumed("db", 6_000)).toBe(2);
    expect(b.waiting(13_999)).toEqual(new Set(["db"]));
    // Found paused again each time its wait ends (a check or two later): the wait keeps doubling,
    // up to a minute.
    let t = 14_000;
    for (let i = 3; i < 10; i++) {
      expect(b.resumed("db", t)).toBe(i);
      t += Math.min(60_000, 2_000 * 2 ** i);
      expect(b.waiting(t - 1)).toEqual(new Set(["db"]));
      expect(b.waiting(t)).toEqual(new Set());
      t += 1_500;
    }
    // Not found paused within 30 s of its wait's end: the next resume counts as a first again.
    expect(b.resumed("db", t + 30_000)).toBe(0);
  });

  it("paces each VM on its own", () => {
    const b = new PausedVmBackoff();
    b.resumed("db", 0);
    b.resumed("db", 2_000);
    b.resumed("web", 2_000);
    expect(b.waiting(4_000)).toEqual(new Set(["db"]));
    expect(b.waiting(6_000)).toEqual(new Set());
  });
});
