import { describe, expect, it } from "vitest";
import { checkName, formatDuration, parseDuration, validateApplication, validatePolicy } from "./validate.js";

describe("policy validation", () => {
  it("fills defaults from the mode and interval", () => {
    expect(validatePolicy({ name: "gold", mode: "async" }, 7)).toEqual({
      name: "gold",
      mode: "async",
      rpoMs: 10_000,
      intervalMs: 5_000,
      continuous: false,
      retain: 3,
      retainAgeMs: null,
      allowedRegions: [],
      rateBytes: null,
      consistency: "crash",
      hooks: { pre: null, post: null },
      restore: { namespaceMapping: {}, storageClassMapping: {}, onConflict: "overwrite", transforms: [] },
      createdAtMs: 7,
    });
    expect(validatePolicy({ name: "zero", mode: "sync" }, 0).rpoMs).toBe(0);
    expect(validatePolicy({ name: "c", mode: "async", continuous: true }, 0)).toMatchObject({
      intervalMs: 1_000,
      rpoMs: 2_000,
      continuous: true,
    });
    expect(
      validatePolicy({ name: "r", mode: "async", allowedRegions: ["eu-de", "eu-de", "eu-es"] }, 0).allowedRegions,
    ).toEqual(["eu-de", "eu-es"]);
  });

  it("refuses what cannot work, naming the field and the value", () => {
    const cases: [Parameters<typeof validatePolicy>[0], string][] = [
      [{ name: "p", mode: "fast" }, 'policy p: mode "fast" is not one of sync, async'],
      [{ name: "p", mode: "async", rpo: "1s", interval: "5s" }, "policy p: --rpo 1s is shorter than the interval (5s)"],
      [{ name: "p", mode: "async", interval: "5x" }, "--interval '5x' is not a duration"],
      [{ name: "p", mode: "async", interval: "10ms" }, "--interval '10ms' is too short: the shortest is 100ms"],
      [{ name: "p", mode: "async", interval: "5s", continuous: true }, "either --interval or --continuous"],
      [{ name: "p", mode: "async", retain: 0 }, "--retain 0 is not a whole number from 1 to 1000"],
      [{ name: "p", mode: "async", allowedRegions: ["EU DE"] }, 'allowed region "EU DE" is not a region name'],
      [{ name: "p", mode: "async", rateBytes: 0 }, "--rate must be above 0"],
      [{ name: "p", mode: "async", consistency: "perfect" }, 'consistency "perfect" is not one of crash, application'],
      [
        { name: "p", mode: "async", interval: "1m", retainAge: "10s" },
        "--retain-age '10s' is too short: the shortest is 1m",
      ],
      [{ name: "p", mode: "async", hooks: { pre: "" } }, "policy p: the pre-hook must be a shell command"],
      [{ name: "-p", mode: "async" }, 'policy name "-p" is not valid'],
    ];
    for (const [spec, message] of cases) {
      expect(() => validatePolicy(spec, 0), JSON.stringify(spec)).toThrow(message);
    }
  });
});

describe("application validation", () => {
  it("needs members, no duplicates, a positive size", () => {
    expect(validateApplication({ name: "shop", volumes: ["a"] })).toEqual({
      name: "shop",
      volumes: ["a"],
      vms: [],
      kubernetes: null,
      sizeBytes: null,
    });
    expect(() => validateApplication({ name: "shop", volumes: [] })).toThrow("application shop has no members");
    expect(
      validateApplication({ name: "shop", volumes: [], kubernetes: { namespaces: ["shop"], labelSelector: "" } }),
    ).toMatchObject({ kubernetes: { namespaces: ["shop"], labelSelector: null } });
    expect(() => validateApplication({ name: "shop", volumes: [], kubernetes: { namespaces: [] } })).toThrow(
      "need at least one namespace",
    );
    expect(() => validateApplication({ name: "shop", volumes: [], kubernetes: { namespaces: ["Shop_1"] } })).toThrow(
      "namespace 'Shop_1' is not a Kubernetes namespace name",
    );
    expect(() =>
      validateApplication({ name: "shop", volumes: [], kubernetes: { namespaces: ["a"], labelSelector: "x?y" } }),
    ).toThrow("the label selector must be a string");
    expect(() => validateApplication({ name: "shop", volumes: ["a", "a"] })).toThrow("volume a is listed twice");
    expect(() => validateApplication({ name: "shop", volumes: ["a"], sizeBytes: -1 })).toThrow(
      "--size must be above 0",
    );
  });
});

describe("restore settings", () => {
  const policy = (restore: object) => validatePolicy({ name: "dr", mode: "async", restore }, 0).restore;

  it("maps and skips as asked", () => {
    expect(policy({ namespaceMapping: { shop: "shop-dr" }, onConflict: "skip" })).toMatchObject({
      namespaceMapping: { shop: "shop-dr" },
      onConflict: "skip",
    });
  });

  it("refuses mappings, conflicts and patches it cannot apply, naming them", () => {
    expect(() => policy({ namespaceMapping: { shop: "Shop_DR" } })).toThrow("namespace mapping");
    expect(() => policy({ onConflict: "merge" })).toThrow('--on-conflict "merge" is not overwrite or skip');
    expect(() => policy({ transforms: [{ patch: [{ op: "move", path: "/a" }] }] })).toThrow("is not an operation");
    expect(() => policy({ transforms: [{ patch: [{ op: "add", path: "/a" }] }] })).toThrow("add /a needs a value");
    expect(() => policy({ transforms: [{ kind: "pod", patch: [{ op: "remove", path: "/a" }] }] })).toThrow(
      'kind "pod" is not a Kubernetes kind',
    );
  });
});

describe("names and durations", () => {
  it("accepts DNS labels only", () => {
    expect(checkName("site", "site-a")).toBe("site-a");
    for (const bad of ["", "A", "a_b", "a-", "x".repeat(64), 7]) expect(() => checkName("site", bad)).toThrow();
  });

  it("parses and formats", () => {
    expect(parseDuration("--rpo", "1.5m")).toBe(90_000);
    expect(parseDuration("--rpo", "2d")).toBe(172_800_000);
    expect(formatDuration(90_000)).toBe("90s");
    expect(formatDuration(3_600_000)).toBe("1h");
    expect(formatDuration(250)).toBe("250ms");
  });
});
