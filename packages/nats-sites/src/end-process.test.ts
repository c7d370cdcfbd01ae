import { spawn } from "node:child_process";
import { describe, expect, it } from "vitest";
import { endProcess, hasExited } from "./end-process.js";

/** A node process that prints "ready" once its SIGTERM handler (if any) is in place. */
function startNode(ignoreSigterm: boolean) {
  const script = `${ignoreSigterm ? "process.on('SIGTERM', () => {});" : ""} setInterval(() => {}, 1000); console.log("ready");`;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "pipe", "ignore"] });
  const ready = new Promise<void>((resolve) => child.stdout.once("data", () => resolve()));
  return { child, ready };
}

describe("endProcess", () => {
  it("ends a process with SIGTERM", async () => {
    const { child, ready } = startNode(false);
    await ready;
    await endProcess(child, "a sleeper");
    expect(hasExited(child)).toBe(true);
    expect(child.signalCode).toBe("SIGTERM");
  });

  it("kills a process that ignores SIGTERM once the grace period is over", async () => {
    const { child, ready } = startNode(true);
    await ready;
    await endProcess(child, "a stubborn one", { graceMs: 200 });
    expect(child.signalCode).toBe("SIGKILL");
  });

  it("leaves a process that has already exited alone", async () => {
    const child = spawn(process.execPath, ["-e", ""], { stdio: "ignore" });
    await new Promise((resolve) => child.once("exit", resolve));
    await endProcess(child, "a finished one");
    expect(child.exitCode).toBe(0);
  });
});
