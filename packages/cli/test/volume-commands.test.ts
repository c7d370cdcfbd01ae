/**
 * The built `ferry` bin as a user runs it: create/list/delete, JSON shapes, error lines and exit
 * codes, help on every command. Runs against temp data directories; no service is running here.
 */
import { access, readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { FerryCli, Sandbox } from "@ferry/testkit";
import type { Command } from "commander";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { createProgram } from "../src/program.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const MiB = 2 ** 20;

interface VolumeJson {
  name: string;
  size: number;
  granularity: number;
  openGeneration: number;
  generations: number[];
  readOnly: boolean;
  fenced: boolean;
  dirtyBytes: number;
}

const { FERRY_DATA: _ignored, ...envWithoutData } = process.env;

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

describe("ferry volume create / list / delete", () => {
  it("creates a volume that list shows as a table and as JSON, and deletes it", async () => {
    const created = await ferry.ok(["volume", "create", "vol-a", "--size", "16M", "--data", data]);
    expect(created).toContain("vol-a");

    const volumes = await ferry.json<VolumeJson[]>(["volume", "list", "--data", data]);
    expect(volumes).toEqual([
      {
        name: "vol-a",
        size: 16 * MiB,
        granularity: 64 * 1024,
        openGeneration: expect.any(Number),
        generations: [],
        readOnly: false,
        dirtyBytes: 0,
        fenced: false,
      },
    ]);

    const table = await ferry.ok(["volume", "list", "--data", data]);
    expect(table).toMatch(/^NAME\s+SIZE\s+GRANULARITY/);
    expect(table).toMatch(/vol-a\s+16M\s+64K/);

    expect(await ferry.ok(["volume", "delete", "vol-a", "--data", data])).toContain("vol-a");
    expect(await ferry.json<VolumeJson[]>(["volume", "list", "--data", data])).toEqual([]);
    expect(await ferry.ok(["volume", "list", "--data", data])).toContain("no volumes");
  });

  it("honours --granularity and lists several volumes sorted by name", async () => {
    await ferry.ok(["volume", "create", "b", "--size", "1G", "--granularity", "4K", "--data", data]);
    await ferry.ok(["volume", "create", "a", "--size", "1048576", "--data", data]);
    const volumes = await ferry.json<VolumeJson[]>(["volume", "list", "--data", data]);
    expect(volumes.map((v) => [v.name, v.size, v.granularity])).toEqual([
      ["a", MiB, 64 * 1024],
      ["b", 1024 * MiB, 4096],
    ]);
  });

  it("uses $FERRY_DATA, else ./.ferry, when --data is not given", async () => {
    const fromEnv = await sandbox.dir();
    await ferry.ok(["volume", "create", "env-vol", "--size", "1M"], {
      env: { ...envWithoutData, FERRY_DATA: fromEnv },
    });
    const listed = await ferry.json<VolumeJson[]>(["volume", "list", "--data", fromEnv]);
    expect(listed.map((v) => v.name)).toEqual(["env-vol"]);

    const cwd = await sandbox.dir();
    await ferry.ok(["volume", "create", "cwd-vol", "--size", "1M"], { env: envWithoutData, cwd });
    await access(join(cwd, ".ferry"));
    const inCwd = await ferry.json<VolumeJson[]>(["volume", "list", "--data", join(cwd, ".ferry")]);
    expect(inCwd.map((v) => v.name)).toEqual(["cwd-vol"]);
  });
});

describe("ferry errors", () => {
  it("rejects a bad size with exit 1 and one line naming the input", async () => {
    const result = await ferry.run(["volume", "create", "v", "--size", "12Q", "--data", data]);
    expect(result.code).toBe(1);
    expect(result.stdout).toBe("");
    expect(result.stderr).toMatch(/^ferry: .*12Q.*\n$/);
    expect(result.stderr.split("\n")).toHaveLength(2);

    const granularity = await ferry.run([
      "volume",
      "create",
      "v",
      "--size",
      "1M",
      "--granularity",
      "lots",
      "--data",
      data,
    ]);
    expect(granularity.code).toBe(1);
    expect(granularity.stderr).toMatch(/^ferry: .*lots/);
    expect(await ferry.json<VolumeJson[]>(["volume", "list", "--data", data])).toEqual([]);
  });

  it("names an unknown volume in delete, dirty and cut", async () => {
    for (const args of [
      ["delete", "ghost"],
      ["dirty", "ghost"],
      ["cut", "ghost"],
    ]) {
      const result = await ferry.run(["volume", ...args, "--data", data]);
      expect(result.code, args.join(" ")).toBe(1);
      expect(result.stderr).toMatch(/^ferry: .*ghost.*\n$/);
    }
  });

  it("refuses to create a volume twice", async () => {
    await ferry.ok(["volume", "create", "twice", "--size", "1M", "--data", data]);
    const again = await ferry.run(["volume", "create", "twice", "--size", "2M", "--data", data]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/^ferry: .*twice.*already exists/);
    const [volume] = await ferry.json<VolumeJson[]>(["volume", "list", "--data", data]);
    expect(volume?.size).toBe(MiB);
  });

  it("rejects an invalid volume name", async () => {
    const result = await ferry.run(["volume", "create", "../escape", "--size", "1M", "--data", data]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^ferry: .*\.\.\/escape/);
  });

  it("exits 2 on bad usage: unknown flag, unknown command, missing option or argument", async () => {
    const cases: Array<[string[], RegExp]> = [
      [["volume", "list", "--bogus"], /^ferry: unknown option '--bogus'/],
      [["volume", "lst"], /^ferry: unknown command 'lst'/],
      [["volume", "create", "v", "--data", data], /^ferry: required option '--size <size>' not specified/],
      [["volume", "create", "--size", "1M"], /^ferry: missing required argument 'name'/],
      [["volume", "cut"], /^ferry: missing required argument 'names'/],
      [["volume", "import", "v"], /^ferry: required option '--from <source>' not specified/],
      [["volume", "list", "extra"], /^ferry: too many arguments/],
    ];
    for (const [args, message] of cases) {
      const result = await ferry.run(args);
      expect(result.code, args.join(" ")).toBe(2);
      expect(result.stderr, args.join(" ")).toMatch(message);
    }
  });

  it("prints usage and exits 2 when a command group gets no subcommand", async () => {
    const result = await ferry.run(["volume"]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain("Usage: ferry volume");
  });
});

describe("ferry help", () => {
  it("answers --help on every command with its own usage, exit 0", async () => {
    const paths = commandPaths(createProgram());
    expect(paths).toEqual(
      expect.arrayContaining([
        "volume create",
        "volume list",
        "volume delete",
        "volume serve",
        "volume dirty",
        "volume cut",
        "volume import",
        "volume stats",
        "demo",
      ]),
    );
    for (const path of ["", ...paths]) {
      const args = path === "" ? [] : path.split(" ");
      const result = await ferry.run([...args, "--help"]);
      expect(result.code, path).toBe(0);
      expect(result.stdout, path).toContain(`Usage: ${["ferry", ...args].join(" ")} `);
    }
  });

  it("documents the data directory default and the serve address in the help text", async () => {
    const listHelp = (await ferry.ok(["volume", "list", "--help"])).replace(/\s+/g, " ");
    expect(listHelp).toMatch(/--data <dir> .*\$FERRY_DATA or \.\/\.ferry/);
    expect(await ferry.ok(["volume", "serve", "--help"])).toContain("127.0.0.1:10809");
  });

  it("prints the package version", async () => {
    const pkg = JSON.parse(await readFile(new URL("../package.json", import.meta.url), "utf8")) as { version: string };
    expect((await ferry.ok(["--version"])).trim()).toBe(pkg.version);
  });
});

function commandPaths(command: Command, prefix: string[] = []): string[] {
  return command.commands
    .filter((child) => child.name() !== "help")
    .flatMap((child) => {
      const path = [...prefix, child.name()];
      return [path.join(" "), ...commandPaths(child, path)];
    });
}
