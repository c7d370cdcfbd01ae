/** libnbd's nbdinfo reading what a Ferry export advertises: exports, size, allocation, CBT, multi-conn. */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { FerryFixture } from "./ferry-fixture.js";

const KiB = 1024;
const MiB = 2 ** 20;

let fx: FerryFixture;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  await fx.create("alpha", "64M");
  await fx.create("beta", "1G");
  await fx.startServe();
});

afterEach(async () => {
  await fx.cleanup();
});

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

/**
 * `nbdinfo --map` lines ("offset length type description"), with adjacent runs of the same type
 * merged: a server may split its answer wherever it likes.
 */
function parseMap(text: string): MapEntry[] {
  const entries = text
    .trim()
    .split("\n")
    .filter((line) => line.trim() !== "")
    .map((line) => {
      const [offset, length, type, ...description] = line.trim().split(/\s+/);
      return { offset: Number(offset), length: Number(length), type: Number(type), description: description.join(" ") };
    });
  const merged: MapEntry[] = [];
  for (const entry of entries) {
    const last = merged.at(-1);
    if (last && last.type === entry.type && last.offset + last.length === entry.offset) last.length += entry.length;
    else merged.push({ ...entry });
  }
  return merged;
}

describe("nbdinfo", () => {
  it("lists every volume as an export", async () => {
    const listed = JSON.parse(await fx.tool("nbdinfo", ["--list", "--json", `nbd+unix:///?socket=${fx.socket}`])) as {
      exports: Array<{ "export-name": string; "export-size": number }>;
    };
    expect(listed.exports.map((e) => [e["export-name"], e["export-size"]]).sort()).toEqual([
      ["alpha", 64 * MiB],
      ["beta", 1024 * MiB],
    ]);
  });

  it("reports the size of an export", async () => {
    expect((await fx.tool("nbdinfo", ["--size", fx.uri("beta")])).trim()).toBe(String(1024 * MiB));
  });

  it("offers multi-conn", async () => {
    const result = await fx.sandbox.run("nbdinfo", ["--can", "multi-conn", fx.uri("alpha")]);
    expect(result.code).toBe(0);
  });

  it("maps allocation: written data as data, the rest as holes reading zero", async () => {
    await fx.tool("qemu-io", ["-f", "raw", fx.uri("alpha"), "-c", "write -P 0xee 4M 1M"]);
    const map = parseMap(await fx.tool("nbdinfo", ["--map", fx.uri("alpha")]));
    expect(map.reduce((sum, e) => sum + e.length, 0)).toBe(64 * MiB);
    const data = map.filter((e) => (e.type & 1) === 0);
    expect(data).toEqual([expect.objectContaining({ offset: 4 * MiB, length: MiB })]);
    expect(map.filter((e) => e.type === 3).reduce((sum, e) => sum + e.length, 0)).toBe(63 * MiB);
  });

  it("maps qemu:dirty-bitmap:open exactly as `ferry volume dirty` reports it, before and after a cut", async () => {
    await fx.tool("qemu-io", ["-f", "raw", fx.uri("alpha"), "-c", "write -P 1 0 4K", "-c", "write -P 2 40M 200K"]);
    const dirtyOverNbd = async () =>
      parseMap(await fx.tool("nbdinfo", ["--map=qemu:dirty-bitmap:open", fx.uri("alpha")]))
        .filter((e) => e.type & 1)
        .map(({ offset, length }) => ({ offset, length }));

    const expected = [
      { offset: 0, length: 64 * KiB },
      { offset: 40 * MiB, length: 256 * KiB },
    ];
    expect(await dirtyOverNbd()).toEqual(expected);
    expect(await fx.dirty("alpha")).toEqual(expected);

    await fx.ferry.ok(["volume", "cut", "alpha", "--data", fx.data]);
    expect(await dirtyOverNbd()).toEqual([]);
    await fx.tool("qemu-io", ["-f", "raw", fx.uri("alpha"), "-c", "write -P 3 63M 4K"]);
    expect(await dirtyOverNbd()).toEqual([{ offset: 63 * MiB, length: 64 * KiB }]);
    expect(await fx.dirty("alpha")).toEqual([{ offset: 63 * MiB, length: 64 * KiB }]);
  });

  it("lists the meta contexts it offers, including the open dirty bitmap", async () => {
    const info = JSON.parse(await fx.tool("nbdinfo", ["--json", fx.uri("alpha")])) as {
      exports: Array<{ contexts: string[]; block_size_minimum?: number }>;
    };
    expect(info.exports[0]?.contexts).toEqual(expect.arrayContaining(["base:allocation", "qemu:dirty-bitmap:open"]));
  });
});
