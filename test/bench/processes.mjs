/**
 * The child processes of a bench run: every server, fio and nbdcopy is spawned here, remembered
 * by PID until it exits, and stopped by that PID — never by name, so nothing else on the machine
 * is touched. `killAll` is the last resort for Ctrl-C and crashes.
 */
import { execFile, execFileSync, spawn } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

/** pid → name of every child still running. */
const live = new Map();

/**
 * Spawn `command` with stdout and stderr going to the file `log`. Options: `env` for the child;
 * `stdout`: `"pipe"` to read it as `child.stdout`, or a file path to keep it apart from the log.
 */
export function spawnLogged(name, command, args, log, options = {}) {
  const fd = openSync(log, "a");
  const outFd = typeof options.stdout === "string" && options.stdout !== "pipe" ? openSync(options.stdout, "w") : fd;
  let child;
  try {
    const stdout = options.stdout === "pipe" ? "pipe" : outFd;
    child = spawn(command, args, { stdio: ["ignore", stdout, fd], ...(options.env ? { env: options.env } : {}) });
  } finally {
    closeSync(fd);
    if (outFd !== fd) closeSync(outFd);
  }
  if (child.pid === undefined) throw new Error(`${name}: cannot start ${command} (is it installed?)`);
  live.set(child.pid, name);
  child.once("exit", () => live.delete(child.pid));
  child.exited = new Promise((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
    child.once("error", (error) => resolve({ code: null, signal: null, error }));
  });
  child.log = log;
  child.label = name;
  return child;
}

export function hasExited(child) {
  return child.exitCode !== null || child.signalCode !== null;
}

/** The last lines of a child's log, for error messages. */
export function logTail(child, lines = 15) {
  try {
    return readFileSync(child.log, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

/**
 * Run a command to completion; fails with its log when it exits non-zero or outlives `timeoutMs`.
 * `options` as for `spawnLogged`.
 */
export async function runLogged(name, command, args, log, timeoutMs, options = {}) {
  const child = spawnLogged(name, command, args, log, options);
  const timer = setTimeout(() => process.kill(child.pid, "SIGKILL"), timeoutMs);
  const { code, signal, error } = await child.exited;
  clearTimeout(timer);
  if (error) throw new Error(`${name}: ${command} failed to run: ${error.message}`);
  if (code !== 0) {
    const why = signal === "SIGKILL" ? `was killed after ${timeoutMs / 1000} s` : `exited with ${code ?? signal}`;
    throw new Error(`${name}: ${command} ${why}; its output:\n${logTail(child)}`);
  }
}

/** Stop a child: SIGTERM (servers finish cleanly), then SIGKILL if it is still there after `graceMs`. */
export async function stop(child, graceMs = 15_000) {
  if (hasExited(child)) return;
  process.kill(child.pid, "SIGTERM");
  const timer = sleep(graceMs).then(() => "timeout");
  if ((await Promise.race([child.exited, timer])) === "timeout" && !hasExited(child)) {
    process.stderr.write(
      `bench: ${child.label} (pid ${child.pid}) ignored SIGTERM for ${graceMs / 1000} s; killing it\n`,
    );
    process.kill(child.pid, "SIGKILL");
    await child.exited;
  }
}

/** Kill every child still running, at once (Ctrl-C, crash). Synchronous so exit handlers can use it. */
export function killAll() {
  for (const pid of live.keys()) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
  live.clear();
}

/**
 * A bench run's own temp dir under `parent`, and the way out of it: `cleanup()` kills every child
 * still running and removes the dir. It also runs at exit and on SIGINT/SIGTERM (then exit 130),
 * so an interrupted or crashed run leaves no process and no file behind.
 */
export function runDir(parent, prefix) {
  const root = mkdtempSync(join(parent, prefix));
  const cleanup = () => {
    killAll();
    rmSync(root, { recursive: true, force: true });
  };
  process.once("exit", cleanup);
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.once(signal, () => {
      process.stderr.write(`\nbench: ${signal}: stopping servers and removing ${root}\n`);
      cleanup();
      process.exit(130);
    });
  }
  return { root, cleanup };
}

let clockTicks;

/** CPU time (user + system, all threads) a running process has used so far, in seconds. */
export function cpuSeconds(pid) {
  clockTicks ??= Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  // Fields after the parenthesised command name; utime and stime are fields 14 and 15 of stat(5).
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(rest[11]) + Number(rest[12])) / clockTicks;
}

/** Wait until an NBD server answers `nbdinfo --size` at `uri`, or fail: it exited, or the deadline passed. */
export async function waitForExport(child, uri, deadlineMs = 20_000) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    if (hasExited(child)) throw new Error(`${child.label} exited before serving ${uri}:\n${logTail(child)}`);
    if (await answers(uri)) return;
    if (Date.now() > deadline)
      throw new Error(`${child.label} did not serve ${uri} within ${deadlineMs / 1000} s:\n${logTail(child)}`);
    await sleep(100);
  }
}

function answers(uri) {
  return new Promise((resolve) => {
    execFile("nbdinfo", ["--size", uri], { timeout: 5_000 }, (error) => resolve(!error));
  });
}

/** First line of `command args` (tool versions for the record); "unknown" if it fails. */
export function firstLine(command, args) {
  return new Promise((resolve) => {
    execFile(command, args, { timeout: 10_000 }, (error, stdout) =>
      resolve(error ? "unknown" : String(stdout).split("\n")[0].trim()),
    );
  });
}

/** Poll `check` every half second until it holds, or fail naming `what` once `timeoutMs` passed. */
export async function waitUntil(what, check, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} after ${timeoutMs / 1000} s`);
    await sleep(500);
  }
}

/** Wait until a child's log has a line matching `pattern` (returned), or fail: it exited, or the deadline passed. */
export async function waitForLine(child, pattern, deadlineMs = 20_000) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const line = readLog(child)
      .split("\n")
      .find((l) => pattern.test(l));
    if (line !== undefined) return line;
    if (hasExited(child)) throw new Error(`${child.label} exited before printing ${pattern}:\n${logTail(child)}`);
    if (Date.now() > deadline)
      throw new Error(`${child.label} did not print ${pattern} within ${deadlineMs / 1000} s:\n${logTail(child)}`);
    await sleep(50);
  }
}

function readLog(child) {
  try {
    return readFileSync(child.log, "utf8");
  } catch {
    // Not created yet: nothing printed yet either.
    return "";
  }
}
