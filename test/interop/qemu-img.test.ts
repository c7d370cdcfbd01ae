/** qemu-img convert into and out of a Ferry volume, checked with qemu-img compare. */
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { writeTestImage } from "./disk-image.js";
import { FerryFixture } from "./ferry-fixture.js";

let fx: FerryFixture;
let work: string;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  work = await fx.sandbox.dir("ferry-qemu-img-");
  await fx.create("disk", "32M");
  await fx.startServe();
});

afterEach(async () => {
  await fx.cleanup();
});

describe("qemu-img", () => {
  it("converts a raw image into the volume and out again as raw and qcow2, all identical", async () => {
    const source = join(work, "source.raw");
    await writeTestImage(source, 32);

    await fx.tool("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, fx.uri("disk")]);
    await fx.tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, fx.uri("disk")]);

    const raw = join(work, "out.raw");
    const qcow2 = join(work, "out.qcow2");
    await fx.tool("qemu-img", ["convert", "-f", "raw", "-O", "raw", fx.uri("disk"), raw]);
    await fx.tool("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", fx.uri("disk"), qcow2]);
    await fx.tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, raw]);
    await fx.tool("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", source, qcow2]);
  });

  it("reports a difference after one byte changed (the comparison can fail)", async () => {
    const source = join(work, "source.raw");
    await writeTestImage(source, 32);
    await fx.tool("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", source, fx.uri("disk")]);
    await fx.tool("qemu-io", ["-f", "raw", fx.uri("disk"), "-c", "write -P 0x01 16M 512"]);
    const result = await fx.sandbox.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, fx.uri("disk")]);
    expect(result.code).toBe(1);
    expect(result.stdout).toMatch(/Content mismatch at offset 16777216/);
  });

  it("sees the volume's size and format through qemu-img info", async () => {
    const info = JSON.parse(await fx.tool("qemu-img", ["info", "--output=json", "-f", "raw", fx.uri("disk")])) as {
      "virtual-size": number;
      format: string;
    };
    expect(info).toMatchObject({ "virtual-size": 32 * 2 ** 20, format: "raw" });
  });
});
