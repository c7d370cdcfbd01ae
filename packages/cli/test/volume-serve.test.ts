/**
 * `ferry volume serve` with real NBD clients: where it listens, qemu-io writes, the dirty map and
 * cuts while served and offline, statistics, import from a raw file, and clean stops on signals.
 */
import { writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FerryCli, freePort, qemuIo, Sandbox } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const KiB = 1024;
const MiB = 2 ** 20;

interface Extent {
  offset: number;
  length: number;
}
interface CutJson {
  volume: string;
  generation: number;
}

let sandbox: Sandbox;
let ferry: FerryCli;
let data: string;

beforeEach(async () => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  data = await sandbox.dir();
});

afterEach(async () => {
  await sandbox.cleanup();
});

describe("ferry volume serve", () => {
  it("listens on 127.0.0.1:10809 when neither --listen nor --socket is given", async () => {
    await ferry.ok(["volume", "create", "v1", "--size", "4M", "--data", data]);
    await ferry.ok(["volume", "create", "v2", "--size", "4M", "--data", data]);
    const serve = await ferry.serve(["--data", data]);
    expect(serve.servingLine).toMatch(/^ferry: serving 2 volumes .*nbd:\/\/127\.0\.0\.1:10809\//);
    await qemuIo(sandbox, "nbd://127.0.0.1:10809/v2", ["write -P 0x11 0 4K", "read -P 0x11 0 4K"]);
    expect(await serve.stop("SIGTERM")).toEqual({ code: 0, signal: null });
  });

  it("serves TCP on --listen and a unix socket on --socket at the same time", async () => {
    await ferry.ok(["volume", "create", "both", "--size", "4M", "--data", data]);
    const port = await freePort();
    const socket = join(await sandbox.dir(), "nbd.sock");
    const serve = await ferry.serve(["--data", data, "--listen", `127.0.0.1:${port}`, "--socket", socket]);
    expect(serve.tcpAddress).toBe(`127.0.0.1:${port}`);
    expect(serve.socketPath).toBe(socket);

    await qemuIo(sandbox, serve.tcpUri("both"), ["write -P 0x22 64K 64K"]);
    await qemuIo(sandbox, `nbd+unix:///both?socket=${socket}`, ["read -P 0x22 64K 64K", "read -P 0 0 64K"]);
    expect(await serve.stop("SIGINT")).toEqual({ code: 0, signal: null });
  });

  it("tracks writes in the dirty map, cuts while served and offline, and keeps data across restarts", async () => {
    await ferry.ok(["volume", "create", "vol", "--size", "64M", "--data", data]);
    const socket = join(await sandbox.dir(), "nbd.sock");
    let serve = await ferry.serve(["--data", data, "--socket", socket]);
    const uri = serve.uri("vol");

    await qemuIo(sandbox, uri, ["write -P 0xab 0 1M", "write -P 0xcd 4M 4K"]);
    expect(await ferry.json<Extent[]>(["volume", "dirty", "vol", "--data", data])).toEqual([
      { offset: 0, length: MiB },
      { offset: 4 * MiB, length: 64 * KiB },
    ]);
    const dirtyTable = await ferry.ok(["volume", "dirty", "vol", "--data", data]);
    expect(dirtyTable).toMatch(/^OFFSET\s+LENGTH/);
    expect(dirtyTable).toContain("2 dirty extents");

    const [firstCut] = await ferry.json<CutJson[]>(["volume", "cut", "vol", "--data", data]);
    expect(firstCut).toEqual({ volume: "vol", generation: expect.any(Number) });
    expect(await ferry.json<Extent[]>(["volume", "dirty", "vol", "--data", data])).toEqual([]);

    await qemuIo(sandbox, uri, ["write -P 0x5a 32M 4K"]);
    expect(await ferry.json<Extent[]>(["volume", "dirty", "vol", "--data", data])).toEqual([
      { offset: 32 * MiB, length: 64 * KiB },
    ]);

    expect(await serve.stop("SIGTERM")).toEqual({ code: 0, signal: null });

    // Offline: the same dirty map, and a cut works on the files directly.
    expect(await ferry.json<Extent[]>(["volume", "dirty", "vol", "--data", data])).toEqual([
      { offset: 32 * MiB, length: 64 * KiB },
    ]);
    const cutTable = await ferry.ok(["volume", "cut", "vol", "--data", data]);
    expect(cutTable).toMatch(/VOLUME\s+CLOSED GENERATION/);
    expect(cutTable).toMatch(new RegExp(`vol\\s+${(firstCut?.generation ?? 0) + 1}\\b`));
    expect(await ferry.json<Extent[]>(["volume", "dirty", "vol", "--data", data])).toEqual([]);

    const [listed] = await ferry.json<Array<{ generations: number[]; openGeneration: number }>>([
      "volume",
      "list",
      "--data",
      data,
    ]);
    expect(listed?.generations).toEqual(
      expect.arrayContaining([firstCut?.generation, (firstCut?.generation ?? 0) + 1]),
    );
    expect(listed?.openGeneration).toBe((firstCut?.generation ?? 0) + 2);

    serve = await ferry.serve(["--data", data, "--socket", socket]);
    await qemuIo(sandbox, uri, ["read -P 0xab 0 1M", "read -P 0xcd 4M 4K", "read -P 0x5a 32M 4K", "read -P 0 1M 3M"]);
    expect(await serve.stop()).toEqual({ code: 0, signal: null });
  });

  it("cuts several volumes in one call", async () => {
    for (const name of ["g1", "g2"]) await ferry.ok(["volume", "create", name, "--size", "4M", "--data", data]);
    const serve = await ferry.serve(["--data", data, "--socket", join(await sandbox.dir(), "s")]);
    await qemuIo(sandbox, serve.uri("g1"), ["write -P 1 0 4K"]);
    await qemuIo(sandbox, serve.uri("g2"), ["write -P 2 1M 4K"]);
    const cuts = await ferry.json<CutJson[]>(["volume", "cut", "g1", "g2", "--data", data]);
    expect(cuts.map((c) => c.volume).sort()).toEqual(["g1", "g2"]);
    for (const name of ["g1", "g2"]) {
      expect(await ferry.json<Extent[]>(["volume", "dirty", name, "--data", data])).toEqual([]);
    }
    expect(await serve.stop()).toEqual({ code: 0, signal: null });
  });

  it("reports per-volume I/O statistics of the running service", async () => {
    await ferry.ok(["volume", "create", "st", "--size", "8M", "--data", data]);
    const serve = await ferry.serve(["--data", data, "--socket", join(await sandbox.dir(), "s")]);
    await qemuIo(sandbox, serve.uri("st"), ["write -P 7 0 1M", "read -P 7 0 1M"]);
    const stats = await ferry.json<{
      volumes: Record<string, { bytesWritten: number; bytesRead: number; writes: number; reads: number }>;
    }>(["volume", "stats", "--data", data]);
    expect(stats.volumes.st?.bytesWritten).toBeGreaterThanOrEqual(MiB);
    expect(stats.volumes.st?.bytesRead).toBeGreaterThanOrEqual(MiB);
    expect(await ferry.ok(["volume", "stats", "--data", data])).toMatch(/st\s+\d+/);
    expect(await serve.stop()).toEqual({ code: 0, signal: null });
  });

  it("fails with exit 1 and names the address when the port is taken", async () => {
    await ferry.ok(["volume", "create", "v", "--size", "1M", "--data", data]);
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", resolve));
    try {
      const address = blocker.address();
      const port = address && typeof address === "object" ? address.port : 0;
      const result = await ferry.run(["volume", "serve", "--data", data, "--listen", `127.0.0.1:${port}`]);
      expect(result.code).toBe(1);
      expect(result.stderr).toMatch(new RegExp(`^ferry: .*127\\.0\\.0\\.1:${port}`));
    } finally {
      await new Promise((resolve) => blocker.close(resolve));
    }
  });
});

describe("ferry volume import", () => {
  it("imports a raw file into a new volume with the file's size", async () => {
    const image = join(await sandbox.dir(), "disk.raw");
    const bytes = Buffer.alloc(3 * MiB);
    bytes.fill(0xab, 0, MiB);
    bytes.fill(0xcd, 2 * MiB, 2 * MiB + 4 * KiB);
    await writeFile(image, bytes);

    const out = await ferry.ok(["volume", "import", "imported", "--from", image, "--data", data]);
    expect(out).toContain("imported");
    const [volume] = await ferry.json<Array<{ name: string; size: number }>>(["volume", "list", "--data", data]);
    expect(volume).toMatchObject({ name: "imported", size: 3 * MiB });

    const serve = await ferry.serve(["--data", data, "--socket", join(await sandbox.dir(), "s")]);
    await qemuIo(sandbox, serve.uri("imported"), [
      "read -P 0xab 0 1M",
      "read -P 0 1M 1M",
      "read -P 0xcd 2M 4K",
      "read -P 0 2052K 1020K",
    ]);
    expect(await serve.stop()).toEqual({ code: 0, signal: null });
  });

  it("fails with exit 1 naming a source that does not exist", async () => {
    const missing = join(data, "no-such-disk.raw");
    const result = await ferry.run(["volume", "import", "x", "--from", missing, "--data", data]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(missing);
  });
});
