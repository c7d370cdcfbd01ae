/**
 * kill -9 of `ferry volume serve`: after an unclean stop the dirty map may over-report (every
 * extent of the activity log's hot set counts as dirty) but must never miss a write, and the
 * written data must be there after a restart.
 */
import { qemuIo, waitFor } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type Extent, FerryFixture } from "./ferry-fixture.js";

const KiB = 1024;
const MiB = 2 ** 20;
/** ActivityLog's hot-region size in the core (activity_log.rs). */
const HOT_REGION = 4 * MiB;

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
    // Over-reporting is bounded: at most the activity log's hot regions (4 MiB each) that were written.
    const hotRegions = new Set(WRITES.map(([, offset]) => Math.floor(offset / HOT_REGION)));
    expect(dirty.reduce((sum, e) => sum + e.length, 0)).toBeLessThanOrEqual(hotRegions.size * HOT_REGION);

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
    // 200 sequential 1M writes; the service is killed once a few have been acknowledged, and
    // whatever was acknowledged must then be dirty and readable. stdbuf makes qemu-io report each
    // write as it completes instead of at exit.
    const writer = fx.sandbox.spawn("stdbuf", [
      "-oL",
      "qemu-io",
      "-f",
      "raw",
      fx.uri("disk"),
      ...Array.from({ length: 200 }, (_, i) => ["-c", `write -P 0x42 ${i * MiB} 1M`]).flat(),
    ]);
    let output = "";
    writer.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      output += chunk;
    });
    const writerExited = new Promise((resolve) => writer.once("exit", resolve));
    const acknowledged = () =>
      [...output.matchAll(/^wrote 1048576\/1048576 bytes at offset (\d+)$/gm)].map((m) => Number(m[1]));
    await waitFor("qemu-io to complete a few writes", () => acknowledged().length >= 5);
    await serve.kill9();
    await writerExited;
    const done = acknowledged();
    expect(done.length).toBeLessThan(200);

    const dirty = await fx.dirty("disk");
    for (const offset of done) expect(covers(dirty, offset, MiB), `write at ${offset}`).toBe(true);

    await fx.startServe();
    await qemuIo(
      fx.sandbox,
      fx.uri("disk"),
      done.map((offset) => `read -P 0x42 ${offset} 1M`),
    );
  });
});
