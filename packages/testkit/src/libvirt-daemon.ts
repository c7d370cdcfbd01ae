/**
 * A private libvirtd (with its virtlogd) for a test suite. Both run in a mount namespace of their
 * own in which /etc/libvirt, /run/libvirt, /var/lib/libvirt and /var/log/libvirt are directories
 * of the test's sandbox, so nothing system-wide is read or changed: no stock network is
 * autostarted, domain definitions vanish with the sandbox, and the read-write socket sits in the
 * sandbox (`uri`). QEMU runs as root (the private qemu.conf), so a guest can open the sandbox's
 * files and the volume service's socket without permission changes. `stop()` ends the guests,
 * libvirtd and virtlogd by the PIDs they recorded — only what this harness started.
 */
import { spawnSync } from "node:child_process";
import { chmod, copyFile, mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { isAlive, waitFor } from "@ferry/nats-sites";
import type { Sandbox } from "./sandbox.js";

export interface LibvirtDaemon {
  /** Connect here: `qemu:///system?socket=<sandbox>/sock/libvirt-sock`. */
  readonly uri: string;
  /** The sandbox directory (guest consoles and disks may live here too). */
  readonly dir: string;
  /** libvirtd's own log (warnings and errors), for a failing test's message. */
  readonly logFile: string;
  /** The log QEMU writes for a domain (its command line and errors). */
  qemuLog(domain: string): string;
  stop(): Promise<void>;
}

/** Whether libvirtd, virtlogd and QEMU are installed (infra/setup-libvirt.sh). */
export function libvirtInstalled(): boolean {
  return ["libvirtd", "virtlogd", "qemu-system-x86_64", "unshare"].every(
    (tool) => spawnSync("sh", ["-c", `command -v ${tool}`], { stdio: "ignore" }).status === 0,
  );
}

export async function startLibvirtDaemon(sandbox: Sandbox): Promise<LibvirtDaemon> {
  const dir = await sandbox.dir("ferry-libvirt-");
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
  const started = await sandbox.run("unshare", ["--mount", "--propagation", "private", "sh", "-c", script], {
    timeoutMs: 30_000,
  });
  const daemon = new PrivateLibvirtd(dir, logFile, virtlogdPid, libvirtdPid);
  if (started.code !== 0) {
    await daemon.stop();
    throw new Error(`libvirtd did not start (exit ${started.code}): ${started.stderr.trim()}`);
  }
  try {
    await waitFor(
      "libvirtd to listen on its socket",
      async () => (await readdir(sock)).includes("libvirt-sock") && isAlive(await pidOf(libvirtdPid)),
      { timeoutMs: 30_000 },
    );
  } catch (error) {
    const log = await readFile(logFile, "utf8").catch(() => "");
    await daemon.stop();
    throw new Error(`${(error as Error).message}\n${log.slice(-2000)}`);
  }
  return daemon;
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

class PrivateLibvirtd implements LibvirtDaemon {
  readonly uri: string;

  constructor(
    readonly dir: string,
    readonly logFile: string,
    private readonly virtlogdPid: string,
    private readonly libvirtdPid: string,
  ) {
    this.uri = `qemu:///system?socket=${join(dir, "sock", "libvirt-sock")}`;
  }

  qemuLog(domain: string): string {
    return join(this.dir, "log", "qemu", `${domain}.log`);
  }

  async stop(): Promise<void> {
    // Guests first: libvirtd leaves its QEMU processes running when it exits. libvirt records
    // each one's PID in its run directory, which is this sandbox's.
    const qemuRun = join(this.dir, "run", "qemu");
    const pidFiles = (await readdir(qemuRun).catch(() => [] as string[])).filter((f) => f.endsWith(".pid"));
    for (const f of pidFiles) {
      const pid = await pidOf(join(qemuRun, f)).catch(() => 0);
      if (pid > 0) await endPid(pid, `QEMU of ${f.slice(0, -4)}`);
    }
    for (const [file, what] of [
      [this.libvirtdPid, "libvirtd"],
      [this.virtlogdPid, "virtlogd"],
    ] as const) {
      const pid = await pidOf(file).catch(() => 0);
      if (pid > 0) await endPid(pid, what);
    }
  }
}
