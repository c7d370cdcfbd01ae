/**
 * A private libvirtd (with its virtlogd) for a test suite, a benchmark or the demo. Both run in a
 * mount namespace of their own in which /etc/libvirt, /run/libvirt, /var/lib/libvirt and
 * /var/log/libvirt are directories below the caller's directory, so nothing system-wide is read or
 * changed: no stock network is autostarted, domain definitions vanish with the directory, and the
 * read-write socket sits in it (`uri`). QEMU runs as root (the private qemu.conf), so a guest can
 * open the caller's files and the volume service's socket without permission changes. `stop()`
 * ends the guests, libvirtd and virtlogd by the PIDs they recorded — only what was started here —
 * and an exit guard does the same (SIGKILL) should the process exit without calling it. Removing
 * the directory is the caller's.
 */
import { spawn, spawnSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { chmod, copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { isAlive, onExit, waitFor } from "@ferry/nats-sites";

export interface LibvirtDaemon {
  /** Connect here: `qemu:///system?socket=<sandbox>/sock/libvirt-sock`. */
  readonly uri: string;
  /** Its directory (guest consoles and disks may live here too). */
  readonly dir: string;
  /** libvirtd's own log (warnings and errors), for a failing test's message. */
  readonly logFile: string;
  /** The log QEMU writes for a domain (its command line and errors). */
  qemuLog(domain: string): string;
  /** libvirtd's and virtlogd's PIDs, as they recorded them (0: not running). */
  pids(): Promise<{ libvirtd: number; virtlogd: number }>;
  stop(): Promise<void>;
}

/** Whether libvirtd, virtlogd and QEMU are installed (infra/setup-libvirt.sh). */
export function libvirtInstalled(): boolean {
  return ["libvirtd", "virtlogd", "qemu-system-x86_64", "unshare"].every(
    (tool) => spawnSync("sh", ["-c", `command -v ${tool}`], { stdio: "ignore" }).status === 0,
  );
}

const START_TIMEOUT_MS = 30_000;

/** Start libvirtd and virtlogd with their state in `dir` (an empty directory the caller owns). */
export async function startPrivateLibvirtd(dir: string): Promise<LibvirtDaemon> {
  // QEMU reads guest files below here; keep it traversable whatever the user.
  await chmod(dir, 0o755);
  const etc = join(dir, "etc");
  const sock = join(dir, "sock");
  for (const sub of ["etc/qemu", "run", "lib", "log", "sock"]) await mkdir(join(dir, sub), { recursive: true });
  await copyFile("/etc/libvirt/virtlogd.conf", join(etc, "virtlogd.conf"));
  const logFile = join(dir, "libvirtd.log");
  await writeFile(
    join(etc, "libvirtd.conf"),
    [
      `unix_sock_dir = "${sock}"`,
      'unix_sock_rw_perms = "0700"',
      'auth_unix_rw = "none"',
      'auth_unix_ro = "none"',
      `log_outputs = "3:file:${logFile}"`,
      "",
    ].join("\n"),
  );
  await writeFile(join(etc, "qemu.conf"), ['user = "root"', 'group = "root"', ""].join("\n"));

  const libvirtdPid = join(dir, "libvirtd.pid");
  const virtlogdPid = join(dir, "virtlogd.pid");
  // Both daemonize (-d), so the namespace lives on with them after this script returns.
  const script = [
    "set -e",
    "mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt",
    `mount --bind ${etc} /etc/libvirt`,
    `mount --bind ${join(dir, "run")} /run/libvirt`,
    `mount --bind ${join(dir, "lib")} /var/lib/libvirt`,
    `mount --bind ${join(dir, "log")} /var/log/libvirt`,
    `virtlogd -d -p ${virtlogdPid}`,
    `libvirtd -d -f /etc/libvirt/libvirtd.conf -p ${libvirtdPid}`,
  ].join("\n");
  const daemon = new PrivateLibvirtd(dir, logFile, virtlogdPid, libvirtdPid);
  const started = await run("unshare", ["--mount", "--propagation", "private", "sh", "-c", script]);
  if (started.code !== 0) {
    await daemon.stop();
    throw new Error(`libvirtd did not start (exit ${started.code}): ${started.stderr.trim()}`);
  }
  try {
    await waitFor(
      "libvirtd to listen on its socket",
      async () => (await readdir(sock)).includes("libvirt-sock") && isAlive(await pidOf(libvirtdPid)),
      { timeoutMs: START_TIMEOUT_MS },
    );
  } catch (error) {
    const log = await readFile(logFile, "utf8").catch(() => "");
    await daemon.stop();
    throw new Error(`${(error as Error).message}\n${log.slice(-2000)}`);
  }
  return daemon;
}

/** Run the start script to completion (it returns once both daemons have forked off). */
function run(command: string, args: readonly string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => {
      stderr += chunk;
    });
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${command} did not finish within ${START_TIMEOUT_MS / 1000} s: ${stderr.trim()}`));
    }, START_TIMEOUT_MS);
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

async function pidOf(file: string): Promise<number> {
  const pid = Number.parseInt((await readFile(file, "utf8")).trim(), 10);
  if (!Number.isInteger(pid) || pid <= 0) throw new Error(`no PID in ${file}`);
  return pid;
}

async function endPid(pid: number, what: string): Promise<void> {
  if (!isAlive(pid)) return;
  process.kill(pid, "SIGTERM");
  try {
    await waitFor(`${what} (pid ${pid}) to exit`, () => !isAlive(pid), { timeoutMs: 10_000 });
  } catch {
    if (isAlive(pid)) process.kill(pid, "SIGKILL");
    await waitFor(`${what} (pid ${pid}) to exit after SIGKILL`, () => !isAlive(pid), { timeoutMs: 5_000 });
  }
}

/** A PID recorded in `file`, read synchronously (for the exit guard); 0 if there is none. */
function pidOfNow(file: string): number {
  try {
    const pid = Number.parseInt(readFileSync(file, "utf8").trim(), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : 0;
  } catch {
    return 0;
  }
}

class PrivateLibvirtd implements LibvirtDaemon {
  readonly uri: string;
  private readonly releaseGuard: () => void;

  constructor(
    readonly dir: string,
    readonly logFile: string,
    private readonly virtlogdPid: string,
    private readonly libvirtdPid: string,
  ) {
    this.uri = `qemu:///system?socket=${join(dir, "sock", "libvirt-sock")}`;
    this.releaseGuard = onExit(() => {
      for (const pid of [...this.qemuPidFiles().map(pidOfNow), pidOfNow(libvirtdPid), pidOfNow(virtlogdPid)]) {
        if (pid > 0 && isAlive(pid)) process.kill(pid, "SIGKILL");
      }
    });
  }

  private qemuPidFiles(): string[] {
    const qemuRun = join(this.dir, "run", "qemu");
    try {
      return readdirSync(qemuRun)
        .filter((f) => f.endsWith(".pid"))
        .map((f) => join(qemuRun, f));
    } catch {
      return [];
    }
  }

  async pids(): Promise<{ libvirtd: number; virtlogd: number }> {
    return {
      libvirtd: await pidOf(this.libvirtdPid).catch(() => 0),
      virtlogd: await pidOf(this.virtlogdPid).catch(() => 0),
    };
  }

  qemuLog(domain: string): string {
    return join(this.dir, "log", "qemu", `${domain}.log`);
  }

  async stop(): Promise<void> {
    // Guests first: libvirtd leaves its QEMU processes running when it exits. libvirt records
    // each one's PID in its run directory, which is below this daemon's directory.
    for (const file of this.qemuPidFiles()) {
      const pid = await pidOf(file).catch(() => 0);
      if (pid > 0) await endPid(pid, `QEMU of ${file.slice(file.lastIndexOf("/") + 1, -4)}`);
    }
    for (const [file, what] of [
      [this.libvirtdPid, "libvirtd"],
      [this.virtlogdPid, "virtlogd"],
    ] as const) {
      const pid = await pidOf(file).catch(() => 0);
      if (pid > 0) await endPid(pid, what);
    }
    this.releaseGuard();
  }
}
