import { access, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { isAlive } from "@ferry/nats-sites";
import { describe, expect, it } from "vitest";
import { Sandbox } from "./sandbox.js";

describe("Sandbox", () => {
  it("ends its running processes and removes its directories on cleanup", async () => {
    const sandbox = new Sandbox();
    const dir = await sandbox.dir();
    await writeFile(join(dir, "file"), "x");
    const child = sandbox.spawn("sleep", ["1000"]);
    const pid = child.pid ?? -1;
    expect(isAlive(pid)).toBe(true);

    await sandbox.cleanup();

    expect(isAlive(pid)).toBe(false);
    await expect(access(dir)).rejects.toThrow(/ENOENT/);
  });

  it("reports exit status and output of a finished run", async () => {
    const sandbox = new Sandbox();
    try {
      const result = await sandbox.run("sh", ["-c", "echo out; echo err >&2; exit 3"]);
      expect(result).toEqual({ code: 3, signal: null, stdout: "out\n", stderr: "err\n" });
    } finally {
      await sandbox.cleanup();
    }
  });

  it("kills a run that outlives its timeout", async () => {
    const sandbox = new Sandbox();
    try {
      await expect(sandbox.run("sleep", ["1000"], { timeoutMs: 200 })).rejects.toThrow(/did not finish within 200 ms/);
    } finally {
      await sandbox.cleanup();
    }
  });
});
