import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { dataplane } from "../dataplane.js";
import { importVolumeWithProgress } from "./volume-import.js";

let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "ferry-import-progress-"));
});

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("importVolumeWithProgress", () => {
  it("draws progress on stderr up to 100% and ends the line", async () => {
    const image = join(dir, "disk.raw");
    await writeFile(image, Buffer.alloc(4 * 2 ** 20, 0x61));
    const err: string[] = [];
    const io = { writeOut: () => {}, writeErr: (text: string) => err.push(text) };

    const request = { dataDir: join(dir, "data"), name: "imp", source: image, size: null };
    const info = await importVolumeWithProgress(await dataplane(), request, io, true);

    expect(info.size).toBe(4 * 2 ** 20);
    expect(err.at(-2)).toBe("\r\x1b[Kimporting imp: 100% (4M of 4M)");
    expect(err.at(-1)).toBe("\n");
  });

  it("writes nothing to stderr when progress is off", async () => {
    const image = join(dir, "disk.raw");
    await writeFile(image, Buffer.alloc(2 ** 20, 1));
    const err: string[] = [];
    const io = { writeOut: () => {}, writeErr: (text: string) => err.push(text) };
    await importVolumeWithProgress(
      await dataplane(),
      { dataDir: join(dir, "data"), name: "quiet", source: image, size: null },
      io,
      false,
    );
    expect(err).toEqual([]);
  });
});
