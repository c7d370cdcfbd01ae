/**
 * kill -9 of `ferry volume serve`: after an unclean stop the dirty map may over-report (every
 * extent of the activity log's hot set counts as dirty) but must never miss a write, and the
 * written data must be there after a restart.
 */
import { qemuIo } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type Extent, FerryFixture } from "./ferry-fixture.js";

const KiB = 1024;
const MiB = 2 ** 20;

let fx: FerryFixture;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  await fx.create("disk", "256M");
});

afterEach(async () => {
  await fx.cleanup();
});

function covers(extents: readonly Extent[], offset: number, length: number): boolean {
  let at = offset;
  for (const e of [...extents].sort((a, b) => a.offset - b.offset)) {
    if (e.offset <= at && at < e.offset + e.length) at = e.offset + e.length;
    if (at >= offset + length) return true;
  }
  return false;
}

/** Writes spread over the volume, each [pattern, offset, length]. */
const WRITES: Array<[number, number, number]> = Array.from({ length: 24 }, (_, i) => [
  0x10 + i,
  i * 10 * MiB + (i % 3) * 64 * KiB,
  (i % 4) * 4 * KiB + 4 * KiB,
]);

describe("crash: kill -9 of the volume service", () => {
  it("keeps every written extent in the dirty map and the data on disk", async () => {
    const serve = await fx.startServe();
    await qemuIo(
      fx.sandbox,
      fx.uri("disk"),
      WRITES.map(([p, offset, length]) => `write -P ${p} ${offset} ${length}`),
    );
    expect(await serve.kill9()).toEqual({ code: null, signal: "SIGKILL" });

    const dirty = await fx.dirty("disk");
    for (const [, offset, length] of WRITES) {
      expect(covers(dirty, offset, length), `write at ${offset}+${length} in ${JSON.stringify(dirty)}`).toBe(true);
    }

    await fx.startServe();
    await qemuIo(
      fx.sandbox,
      fx.uri("disk"),
      WRITES.map(([p, offset, length]) => `read -P ${p} ${offset} ${length}`),
    );
    const afterRestart = await fx.dirty("disk");
    for (const [, offset, length] of WRITES) expect(covers(afterRestart, offset, length)).toBe(true);
  });

  it("after a cut and a crash, still reports the writes made after the cut", async () => {
    const serve = await fx.startServe();
    await qemuIo(fx.sandbox, fx.uri("disk"), ["write -P 1 0 1M"]);
    await fx.ferry.ok(["volume", "cut", "disk", "--data", fx.data]);
    await qemuIo(fx.sandbox, fx.uri("disk"), ["write -P 2 100M 8K", "write -P 3 200M 64K"]);
    await serve.kill9();

    const dirty = await fx.dirty("disk");
    expect(covers(dirty, 100 * MiB, 8 * KiB)).toBe(true);
    expect(covers(dirty, 200 * MiB, 64 * KiB)).toBe(true);

    await fx.startServe();
    await qemuIo(fx.sandbox, fx.uri("disk"), ["read -P 1 0 1M", "read -P 2 100M 8K", "read -P 3 200M 64K"]);
  });

  it("recovers from a kill -9 in the middle of a write stream", async () => {
    const serve = await fx.startServe();
    // A long run of writes, killed while it is going; whatever was acknowledged must be dirty.
    const writer = fx.sandbox.run("qemu-io", [
      "-f",
      "raw",
      fx.uri("disk"),
      ...Array.from({ length: 200 }, (_, i) => ["-c", `write -P 0x42 ${i * MiB} 1M`]).flat(),
    ]);
    await new Promise((resolve) => setTimeout(resolve, 150));
    await serve.kill9();
    const result = await writer;
    const acknowledged = (result.stdout.match(/^wrote 1048576\/1048576 bytes at offset (\d+)$/gm) ?? []).map((line) =>
      Number(line.split(" ").at(-1)),
    );

    const dirty = await fx.dirty("disk");
    for (const offset of acknowledged) expect(covers(dirty, offset, MiB), `write at ${offset}`).toBe(true);

    await fx.startServe();
    for (const offset of acknowledged) await qemuIo(fx.sandbox, fx.uri("disk"), [`read -P 0x42 ${offset} 1M`]);
  });
});
