/** QEMU's block layer (qemu-io) against `ferry volume serve`: patterns in, the same patterns out. */
import { qemuIo } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { FerryFixture } from "./ferry-fixture.js";

const KiB = 1024;
const MiB = 2 ** 20;

let fx: FerryFixture;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  await fx.create("disk", "64M");
  await fx.startServe({ tcp: true });
});

afterEach(async () => {
  await fx.cleanup();
});

describe("qemu-io", () => {
  it("writes patterns at scattered offsets and reads them back over unix socket and TCP", async () => {
    const writes: Array<[number, string, string]> = [
      [0x11, "0", "4K"],
      [0x22, "1M", "1M"],
      [0x33, "8M", "64K"],
      [0x44, "63M", "1M"],
    ];
    await qemuIo(
      fx.sandbox,
      fx.uri("disk"),
      writes.map(([p, at, len]) => `write -P ${p} ${at} ${len}`),
    );
    const reads = writes.map(([p, at, len]) => `read -P ${p} ${at} ${len}`);
    await qemuIo(fx.sandbox, fx.uri("disk"), reads);
    await qemuIo(fx.sandbox, fx.serve?.tcpUri("disk") ?? "", [...reads, "read -P 0 4K 1020K", "read -P 0 2M 6M"]);
  });

  it("detects a pattern that was not written (the check can fail)", async () => {
    await qemuIo(fx.sandbox, fx.uri("disk"), ["write -P 0xab 0 64K"]);
    await expect(qemuIo(fx.sandbox, fx.uri("disk"), ["read -P 0xac 0 64K"])).rejects.toThrow(
      /Pattern verification failed/,
    );
  });

  // Discarded data reads back as unspecified (NBD TRIM is advisory), so only the other ranges are checked.
  it("handles writes smaller than and unaligned to the 4K block, write-zeroes, discard and flush", async () => {
    await qemuIo(fx.sandbox, fx.uri("disk"), [
      "write -P 0x77 0 1M",
      "write -P 0x88 512 512",
      "write -P 0x99 5000 3000",
      "write -z 256K 256K",
      "discard 512K 512K",
      "flush",
    ]);
    await qemuIo(fx.sandbox, fx.uri("disk"), [
      "read -P 0x77 0 512",
      "read -P 0x88 512 512",
      "read -P 0x77 1K 3976",
      "read -P 0x99 5000 3000",
      "read -P 0x77 8000 254144",
      "read -P 0 256K 256K",
    ]);
  });

  it("marks exactly the written extents dirty, rounded out to the 64K granularity", async () => {
    await qemuIo(fx.sandbox, fx.uri("disk"), ["write -P 1 100K 8K", "write -P 2 10M 130K", "write -z 20M 64K"]);
    expect(await fx.dirty("disk")).toEqual([
      { offset: 64 * KiB, length: 64 * KiB },
      { offset: 10 * MiB, length: 192 * KiB },
      { offset: 20 * MiB, length: 64 * KiB },
    ]);
  });
});
