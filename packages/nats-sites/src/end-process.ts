/**
 * Ends one child process by its own PID: a signal, a bounded wait, then SIGKILL. Never signals
 * anything it was not handed; a process that has already exited is left alone.
 */
import type { ChildProcess } from "node:child_process";
import { ProcessSurvived } from "./errors.js";

export interface EndOptions {
  /** The first signal; default SIGTERM. */
  signal?: NodeJS.Signals;
  /** How long to wait after it before SIGKILL; default 10 s. */
  graceMs?: number;
  /** How long to wait after SIGKILL before giving up; default 5 s. */
  killWaitMs?: number;
}

/** Resolves once `child` has exited; throws `ProcessSurvived` if it is still there after SIGKILL. */
export async function endProcess(child: ChildProcess, what: string, options: EndOptions = {}): Promise<void> {
  const { signal = "SIGTERM", graceMs = 10_000, killWaitMs = 5_000 } = options;
  const pid = child.pid;
  if (pid === undefined || hasExited(child)) return;
  const exited = new Promise<void>((resolve) => {
    if (hasExited(child)) resolve();
    child.once("exit", () => resolve());
  });
  const gone = (ms: number) =>
    Promise.race([
      exited.then(() => true),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(false), ms).unref()),
    ]);
  send(pid, signal);
  if (await gone(graceMs)) return;
  send(pid, "SIGKILL");
  if (!(await gone(killWaitMs))) throw new ProcessSurvived(`${what} (pid ${pid}) survived SIGKILL`);
}

/** Whether a process with this PID exists (signal 0: nothing is sent). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** True once the process has exited (or was never started). */
export function hasExited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function send(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // Already gone; the exit event settles the wait.
  }
}
