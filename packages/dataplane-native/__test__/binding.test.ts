/**
 * The napi binding as JavaScript sees it: the generated API, its errors (stable `.code`, message
 * naming the input), and an in-process VolumeService that real qemu-io writes to. The data plane
 * logic itself is tested by `cargo test` in core/.
 */
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { qemuIo, Sandbox } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  checkPeerNats,
  createVolume,
  cutVolumes,
  deleteVolume,
  dirtyExtents,
  type ImportProgress,
  importVolume,
  listVolumes,
  parseSize,
  replicate,
  startVolumeService,
  type VolumeService,
  volumeStats,
} from "../binding.js";

const KiB = 1024;
const MiB = 2 ** 20;

let sandbox: Sandbox;
let data: string;
const services: VolumeService[] = [];

beforeEach(async () => {
  sandbox = new Sandbox();
  data = await sandbox.dir("ferry-binding-");
});

afterEach(async () => {
  for (const service of services.splice(0)) await service.stop();
  await sandbox.cleanup();
});

async function start(options: { listen?: string; socket?: string }): Promise<VolumeService> {
  const service = await startVolumeService({ dataDir: data, ...options });
  services.push(service);
  return service;
}

/** The rejection of a promise or the throw of a call, for asserting on `.code`. */
async function failure(work: () => unknown): Promise<Error & { code?: string }> {
  try {
    await work();
  } catch (error) {
    return error as Error & { code?: string };
  }
  throw new Error("expected a failure, but the call succeeded");
}

describe("parseSize", () => {
  it("parses bytes and binary suffixes", () => {
    expect(parseSize("4096")).toBe(4096);
    expect(parseSize("64K")).toBe(64 * KiB);
    expect(parseSize("1G")).toBe(1024 * MiB);
    expect(parseSize("2TiB")).toBe(2 * 2 ** 40);
  });

  it("throws ERR_BAD_SIZE naming the input", async () => {
    const error = await failure(() => parseSize("12Q"));
    expect(error.code).toBe("ERR_BAD_SIZE");
    expect(error.message).toContain("12Q");
  });
});

describe("checkPeerNats", () => {
  it("accepts other sites' NATS servers", () => {
    expect(checkPeerNats("site-a", ["site-b=nats://peer:pw@127.0.0.1:4222", "site-c=tls://h:1"])).toBeUndefined();
  });

  it("throws ERR_INVALID_ARGUMENT naming the value, its password masked", async () => {
    const error = await failure(() => checkPeerNats("site-a", ["site-b=http://peer:secret@h:1"]));
    expect(error.code).toBe("ERR_INVALID_ARGUMENT");
    expect(error.message).toBe(
      "invalid argument: --peer-nats site-b: 'http://peer:***@h:1' is not a NATS URL; use nats://peer:PASSWORD@host:port",
    );
  });
});

describe("volumes in a data directory", () => {
  it("creates, lists and deletes volumes", async () => {
    const info = await createVolume(data, "v1", 16 * MiB, null);
    expect(info).toMatchObject({ name: "v1", size: 16 * MiB, granularity: 64 * KiB, readOnly: false, dirtyBytes: 0 });
    expect(info.generations).toEqual([]);
    await createVolume(data, "v0", MiB, 4 * KiB);

    const listed = await listVolumes(data);
    expect(listed.map((v) => [v.name, v.size, v.granularity])).toEqual([
      ["v0", MiB, 4 * KiB],
      ["v1", 16 * MiB, 64 * KiB],
    ]);

    await deleteVolume(data, "v0");
    expect((await listVolumes(data)).map((v) => v.name)).toEqual(["v1"]);
  });

  it("reports stable error codes that name the input", async () => {
    await createVolume(data, "dup", MiB);
    const exists = await failure(() => createVolume(data, "dup", MiB));
    expect(exists.code).toBe("ERR_VOLUME_EXISTS");
    expect(exists.message).toContain("dup");

    for (const call of [
      () => deleteVolume(data, "ghost"),
      () => dirtyExtents(data, "ghost"),
      () => cutVolumes(data, ["ghost"]),
    ]) {
      const unknown = await failure(call);
      expect(unknown.code).toBe("ERR_UNKNOWN_VOLUME");
      expect(unknown.message).toContain("ghost");
    }
  });

  it("rejects a data directory that is a file with ERR_DATA_DIR", async () => {
    const file = join(data, "not-a-dir");
    await writeFile(file, "x");
    const error = await failure(() => createVolume(file, "v", MiB));
    expect(error.code).toBe("ERR_DATA_DIR");
    expect(error.message).toContain(file);
  });

  it("imports a raw file and reports progress up to the total", async () => {
    const image = join(data, "src.raw");
    await writeFile(image, Buffer.alloc(2 * MiB, 0x42));
    const progress: ImportProgress[] = [];
    const info = await importVolume(data, "imp", image, null, (p) => progress.push(p));
    expect(info).toMatchObject({ name: "imp", size: 2 * MiB });
    expect(progress.at(-1)).toEqual({ done: 2 * MiB, total: 2 * MiB });
  });
});

describe("VolumeService", () => {
  it("serves on a unix socket only when no listen address is given, and tracks writes", async () => {
    await createVolume(data, "served", 32 * MiB);
    const socket = join(data, "nbd.sock");
    const service = await start({ socket });
    expect(service.tcpAddress).toBeNull();
    expect(service.socketPath).toBe(socket);
    expect(service.volumeNames).toEqual(["served"]);

    const uri = `nbd+unix:///served?socket=${socket}`;
    await qemuIo(sandbox, uri, ["write -P 0xab 0 1M", "write -P 0xcd 16M 4K"]);
    expect(await dirtyExtents(data, "served")).toEqual([
      { offset: 0, length: MiB },
      { offset: 16 * MiB, length: 64 * KiB },
    ]);

    const [cut] = await cutVolumes(data, ["served"]);
    expect(cut).toEqual({ volume: "served", generation: expect.any(Number) });
    expect(await dirtyExtents(data, "served")).toEqual([]);
    const [info] = await listVolumes(data);
    expect(info?.generations).toContain(cut?.generation);

    const stats = JSON.parse(await volumeStats(data)) as { volumes: Record<string, { bytesWritten: number }> };
    expect(stats.volumes.served?.bytesWritten).toBeGreaterThanOrEqual(MiB + 4 * KiB);

    await qemuIo(sandbox, uri, ["read -P 0xab 0 1M", "read -P 0xcd 16M 4K"]);
  });

  it("serves TCP and reports the bound address", async () => {
    await createVolume(data, "tcp", 4 * MiB);
    const service = await start({ listen: "127.0.0.1:0" });
    expect(service.tcpAddress).toMatch(/^127\.0\.0\.1:[1-9]\d*$/);
    await qemuIo(sandbox, `nbd://${service.tcpAddress}/tcp`, ["write -P 1 0 4K", "read -P 1 0 4K"]);
  });

  it("fails to start with ERR_LISTEN on an address it cannot bind", async () => {
    const error = await failure(() => startVolumeService({ dataDir: data, listen: "not-an-address" }));
    expect(error.code).toBe("ERR_LISTEN");
    expect(error.message).toContain("not-an-address");
  });
});

describe("the data plane's log", () => {
  /** A process that serves a volume, reads it once through NBD and stops; its stderr. */
  async function serveAndRead(env: NodeJS.ProcessEnv): Promise<string> {
    const binding = new URL("../binding.js", import.meta.url).href;
    const script = `
      import { execFileSync } from "node:child_process";
      import { createVolume, startVolumeService } from ${JSON.stringify(binding)};
      const [data, socket] = process.argv.slice(1);
      await createVolume(data, "logged", 1048576);
      const service = await startVolumeService({ dataDir: data, socket });
      execFileSync("qemu-io", ["-f", "raw", "nbd+unix:///logged?socket=" + socket, "-c", "read 0 4k"]);
      await service.stop();
    `;
    const dir = await sandbox.dir("ferry-log-");
    const result = await sandbox.run(
      process.execPath,
      ["--input-type=module", "-e", script, dir, join(dir, "nbd.sock")],
      { env },
    );
    expect(result.code, result.stderr).toBe(0);
    return result.stderr;
  }

  it("is quiet by default and tells what it does at FERRY_LOG=debug, on stderr", async () => {
    const { FERRY_LOG: _, ...quiet } = process.env;
    expect(await serveAndRead(quiet)).toBe("");
    expect(await serveAndRead({ ...quiet, FERRY_LOG: "debug" })).toMatch(
      /^ferry data plane: DEBUG: NBD connection from .*nbd\.sock.* ended/m,
    );
    // A filter naming the data plane's modules.
    expect(await serveAndRead({ ...quiet, FERRY_LOG: "ferry_dataplane::nbd=debug" })).toMatch(/NBD connection/);
    expect(await serveAndRead({ ...quiet, FERRY_LOG: "ferry_dataplane::replication=debug" })).toBe("");
  });

  it("says so when FERRY_LOG is not a level, and logs warnings only", async () => {
    const { FERRY_LOG: _, ...env } = process.env;
    expect(await serveAndRead({ ...env, FERRY_LOG: "verbose" })).toBe(
      "ferry data plane: FERRY_LOG='verbose' is not a level (off, error, warn, info, debug, trace): logging warnings only\n",
    );
  });
});

describe("recovery operations through replicate()", () => {
  it("fences a served volume against writes, keeps reads, and lifts the fence", async () => {
    await createVolume(data, "moving", 4 * MiB);
    const socket = join(data, "nbd.sock");
    await start({ socket });
    const uri = `nbd+unix:///moving?socket=${socket}`;
    await qemuIo(sandbox, uri, ["write -P 0x11 0 4K"]);

    const request = (fenced: boolean) => JSON.stringify({ op: "fence", volumes: ["moving"], fenced });
    expect(JSON.parse(await replicate(data, request(true)))).toEqual([{ volume: "moving", fenced: true }]);
    expect((await listVolumes(data))[0]).toMatchObject({ name: "moving", fenced: true, readOnly: false });
    const refused = await qemuIo(sandbox, uri, ["write -P 0x22 0 4K"]).catch((error: unknown) => String(error));
    expect(refused).toContain("Operation not permitted");
    await qemuIo(sandbox, uri, ["read -P 0x11 0 4K"]);

    expect(JSON.parse(await replicate(data, request(false)))).toEqual([{ volume: "moving", fenced: false }]);
    await qemuIo(sandbox, uri, ["write -P 0x22 0 4K", "read -P 0x22 0 4K"]);
  });

  it("refuses to clone a volume that is not a replica, creating nothing", async () => {
    await createVolume(data, "plain", 4 * MiB);
    const request = { op: "replicaClone", volumes: ["plain"], back: 0, names: ["plain-drill"] };
    const error = await failure(() => replicate(data, JSON.stringify(request)));
    expect(error.code).toBe("ERR_INVALID_ARGUMENT");
    expect(error.message).toContain("volume 'plain' is not a replica");
    expect((await listVolumes(data)).map((v) => v.name)).toEqual(["plain"]);
  });
});
