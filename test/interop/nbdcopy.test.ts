/** nbdcopy with several connections, into and out of a Ferry volume. */
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { writeTestImage } from "./disk-image.js";
import { FerryFixture } from "./ferry-fixture.js";

let fx: FerryFixture;
let work: string;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  work = await fx.sandbox.dir("ferry-nbdcopy-");
  await fx.create("disk", "64M");
  await fx.create("copy", "64M");
  await fx.startServe();
});

afterEach(async () => {
  await fx.cleanup();
});

async function sha256(path: string): Promise<string> {
  return createHash("sha256")
    .update(await readFile(path))
    .digest("hex");
}

describe("nbdcopy", () => {
  it("copies a file into a volume and back with 4 connections, byte for byte", async () => {
    expect((await fx.sandbox.run("nbdinfo", ["--can", "multi-conn", fx.uri("disk")])).code).toBe(0);
    const source = join(work, "source.raw");
    await writeTestImage(source, 64);

    await fx.tool("nbdcopy", ["--connections=4", "--requests=16", "--flush", source, fx.uri("disk")]);
    const back = join(work, "back.raw");
    await fx.tool("nbdcopy", ["--connections=4", "--requests=16", fx.uri("disk"), back]);

    expect(await sha256(back)).toBe(await sha256(source));
    await fx.tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, fx.uri("disk")]);
  });

  it("copies volume to volume over NBD on both ends", async () => {
    const source = join(work, "source.raw");
    await writeTestImage(source, 64);
    await fx.tool("nbdcopy", ["--connections=4", source, fx.uri("disk")]);
    await fx.tool("nbdcopy", ["--connections=4", "--flush", fx.uri("disk"), fx.uri("copy")]);
    await fx.tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, fx.uri("copy")]);
  });

  it("fails when the destination is smaller than the source", async () => {
    await fx.create("small", "1M");
    await fx.serve?.stop();
    await fx.startServe();
    const result = await fx.sandbox.run("nbdcopy", [fx.uri("disk"), fx.uri("small")]);
    expect(result.code).not.toBe(0);
  });
});
