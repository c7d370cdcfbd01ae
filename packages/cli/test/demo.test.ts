/** `ferry demo` end to end with the real qemu-io and nbdinfo, and its cleanup on Ctrl-C. */
import { readdir } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { FerryCli, Sandbox, waitFor } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));

let sandbox: Sandbox;
let ferry: FerryCli;
let tmp: string;

beforeEach(async () => {
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  tmp = await sandbox.dir("ferry-demo-tmp-");
});

afterEach(async () => {
  await sandbox.cleanup();
});

describe("ferry demo", () => {
  it("narrates writes, the dirty map over NBD, a cut, and leaves nothing behind", async () => {
    const result = await ferry.run(["demo"], { env: { ...process.env, TMPDIR: tmp } });
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    const out = result.stdout;
    expect(out).toContain("ferry volume dirty demo: 1.06M dirty in 2 extent(s)");
    expect(out).toMatch(/^\s+0\s+1048576\s+1\s+dirty$/m);
    expect(out).toMatch(/^\s+8388608\s+65536\s+1\s+dirty$/m);
    expect(out).toMatch(/closed generation \d+/);
    expect(out).toContain("ferry volume dirty demo: 64K dirty in 1 extent(s)");
    expect(out).toMatch(/^\s+33554432\s+65536\s+1\s+dirty$/m);
    expect(await readdir(tmp)).toEqual([]);
  });

  it("stops on SIGINT, removes its data directory and exits 130", async () => {
    const child = sandbox.spawn(process.execPath, [BIN, "demo"], { env: { ...process.env, TMPDIR: tmp } });
    let stdout = "";
    let stderr = "";
    child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      stdout += chunk;
    });
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      stderr += chunk;
    });
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    await waitFor("the demo to serve its volume", () => stdout.includes("nbd+unix:///demo"));
    child.kill("SIGINT");

    expect(await exited).toBe(130);
    expect(stderr).toMatch(/^ferry: demo interrupted by SIGINT/m);
    expect(stdout).not.toContain("Done;");
    expect(await readdir(tmp)).toEqual([]);
  });
});
