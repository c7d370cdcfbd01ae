/**
 * Ferry's test guest (infra/guest): building it, a domain XML that boots it under TCG with its
 * serial console in a file, and reading what it printed there. The guest writes a deterministic
 * workload on its virtio disks and prints sha256 checksums, so a test checks from outside what
 * the guest wrote and saw. With `agent`, it runs qemu-ga on a virtio-serial channel, and prints
 * FROZEN and THAWED when the agent freezes and thaws its filesystems.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { waitFor } from "@ferry/nats-sites";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

export interface TestGuestKernel {
  vmlinuz: string;
  initrd: string;
}

/** Build (or find cached) the guest kernel and initramfs; the first build fetches a Debian kernel. */
export async function buildTestGuest(): Promise<TestGuestKernel> {
  const { stdout } = await promisify(execFile)("bash", [join(repoRoot, "infra/guest/build-guest.sh")], {
    timeout: 300_000,
  });
  const dir = stdout.trim().split("\n").pop() ?? "";
  return { vmlinuz: join(dir, "vmlinuz"), initrd: join(dir, "initrd.img") };
}

export interface TestGuestOptions {
  name: string;
  kernel: TestGuestKernel;
  /** `<disk>` elements, vda first. */
  disks: readonly string[];
  /** The serial console's file (appended to). */
  console: string;
  seed: number;
  /** MiB written per disk. */
  mb: number;
  /** Rounds of writing (0: only report what the disks hold). */
  rounds?: number;
  /** Keep running after the workload instead of powering off. */
  stayUp?: boolean;
  /** Run the guest agent (qemu-ga) on the channel `org.qemu.guest_agent.0`, which the domain gets. */
  agent?: boolean;
  memoryMiB?: number;
}

/** The guest agent's channel; libvirt picks the host side's socket and adds the virtio-serial controller. */
const AGENT_CHANNEL = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>";

/** A TCG domain (KVM runs only firmware here) without graphics or NICs. */
export function testGuestXml(o: TestGuestOptions): string {
  const cmdline = [
    "console=ttyS0",
    "loglevel=3",
    "panic=-1",
    `ferry.seed=${o.seed}`,
    `ferry.mb=${o.mb}`,
    `ferry.rounds=${o.rounds ?? 1}`,
    `ferry.halt=${o.stayUp ? 0 : 1}`,
    ...(o.agent ? ["ferry.agent=1"] : []),
  ].join(" ");
  return `<domain type='qemu'>
  <name>${o.name}</name>
  <memory unit='MiB'>${o.memoryMiB ?? 256}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${o.kernel.vmlinuz}</kernel>
    <initrd>${o.kernel.initrd}</initrd>
    <cmdline>${cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    ${o.disks.join("\n    ")}
    <serial type='file'><source path='${o.console}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='${o.console}' append='on'/><target type='serial' port='0'/></console>${o.agent ? `\n    ${AGENT_CHANNEL}` : ""}
  </devices>
</domain>`;
}

/** A raw file disk. */
export function fileDiskXml(target: string, path: string, format = "raw"): string {
  return `<disk type='file' device='disk'><driver name='qemu' type='${format}'/><source file='${path}'/><target dev='${target}' bus='virtio'/></disk>`;
}

export interface GuestReport {
  ready: boolean;
  done: boolean;
  status: string | null;
  /** Seconds since the guest kernel started, at READY and at DONE. */
  readyUptime: number | null;
  doneUptime: number | null;
  /** What each disk held before the workload: disk → sha256. */
  found: Record<string, string>;
  /** The checksum after each round: disk → sha256 per round (index 0 = round 1). */
  wrote: Record<string, string[]>;
  /** Guest uptime (s) when each round's checksum was printed: disk → per round. */
  wroteAt: Record<string, number[]>;
  /** Whether the guest agent started. */
  agent: boolean;
  /** Guest uptime (s) at each freeze and each thaw the agent ran, in order. */
  frozenAt: number[];
  thawedAt: number[];
  errors: string[];
  lines: string[];
}

export function parseGuestConsole(text: string): GuestReport {
  const report: GuestReport = {
    ready: false,
    done: false,
    status: null,
    readyUptime: null,
    doneUptime: null,
    found: {},
    wrote: {},
    wroteAt: {},
    agent: false,
    frozenAt: [],
    thawedAt: [],
    errors: [],
    lines: [],
  };
  for (const line of text.split(/\r?\n/)) {
    const m = /FERRY-GUEST (\w+)(.*)$/.exec(line);
    if (!m) continue;
    report.lines.push(line.slice(line.indexOf("FERRY-GUEST")));
    const fields = Object.fromEntries(
      [...(m[2] ?? "").matchAll(/(\w+)=(\S+)/g)].map((f) => [f[1] as string, f[2] as string]),
    );
    switch (m[1]) {
      case "READY":
        report.ready = true;
        report.readyUptime = Number(fields.uptime);
        break;
      case "FOUND":
        report.found[fields.disk as string] = fields.sha256 as string;
        break;
      case "WROTE": {
        const list = report.wrote[fields.disk as string] ?? [];
        const at = report.wroteAt[fields.disk as string] ?? [];
        list[Number(fields.round) - 1] = fields.sha256 as string;
        at[Number(fields.round) - 1] = Number(fields.uptime);
        report.wrote[fields.disk as string] = list;
        report.wroteAt[fields.disk as string] = at;
        break;
      }
      case "AGENT":
        report.agent = true;
        break;
      case "FROZEN":
        report.frozenAt.push(Number(fields.uptime));
        break;
      case "THAWED":
        report.thawedAt.push(Number(fields.uptime));
        break;
      case "ERROR":
        report.errors.push((m[2] ?? "").trim());
        break;
      case "DONE":
        report.done = true;
        report.status = fields.status ?? null;
        report.doneUptime = Number(fields.uptime);
        break;
    }
  }
  return report;
}

export async function readGuestConsole(path: string): Promise<GuestReport> {
  return parseGuestConsole(await readFile(path, "utf8").catch(() => ""));
}

/** Wait until the guest's console shows `until` (default: DONE). */
export async function waitForGuest(
  path: string,
  until: (r: GuestReport) => boolean = (r) => r.done,
  timeoutMs = 120_000,
): Promise<GuestReport> {
  return waitFor(
    `the test guest's console ${path}`,
    async () => {
      const r = await readGuestConsole(path);
      return until(r) ? r : undefined;
    },
    { timeoutMs, intervalMs: 200 },
  );
}

/**
 * The bytes the guest writes in round `round` on `disk`, computed here: each MiB is the line
 * "ferry seed=S disk=D round=R block=B\n" repeated (as `yes` prints it) and cut at 1 MiB.
 */
export function expectedGuestSha256(seed: number, disk: string, round: number, mb: number): string {
  const hash = createHash("sha256");
  for (let b = 0; b < mb; b++) {
    const line = `ferry seed=${seed} disk=${disk} round=${round} block=${b}\n`;
    const block = Buffer.alloc(1 << 20);
    block.fill(line);
    hash.update(block);
  }
  return hash.digest("hex");
}
