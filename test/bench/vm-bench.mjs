#!/usr/bin/env node
/**
 * VMs (issue 5): live adoption and recovery of a real guest. Two sites (two nats-servers linked by a
 * leafnode), each with a private libvirtd (@ferry/test-guest) and a ferryd with `--libvirt`. Ferry's
 * test guest boots at site A on a raw file and writes its workload round after round, printing the
 * uptime at the end of each round. It measures:
 *
 *   adopt     `ferry vm adopt db --live` while the guest writes: the command's wall time, and the
 *             guest's MiB/s (write + read-back per round, its own clock) before, during and after
 *             the adoption — on the file, during the block copy, on the Ferry volume
 *   recovery  the application (the VM) protected to B; site A's guest stopped; from `ferry failover`
 *             at B to the first line of the guest's console at B (its READY), and the operation's
 *             own duration
 *
 * What the guest finds on its disk at B must be what it wrote last at A, or the run fails. It
 * measures and reports; it never fails because a number is low. It owns its temp dir and every
 * process it starts (libvirtd and its guests included), and stops/removes them on every way out.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { rename } from "node:fs/promises";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { startSitePair } from "@ferry/nats-sites";
import {
  buildTestGuest,
  expectedGuestSha256,
  fileDiskXml,
  libvirtInstalled,
  readGuestConsole,
  startPrivateLibvirtd,
  testGuestXml,
} from "@ferry/test-guest";
import { benchArgs, positiveEnv } from "./bench-options.mjs";
import { environment } from "./environment.mjs";
import { ferry, startFerryd } from "./ferry-site.mjs";
import { adoptionPhases, roundRates } from "./guest-rounds.mjs";
import { hasExited, runDir, runLogged, stop, waitUntil } from "./processes.mjs";
import { align, timed } from "./report.mjs";

const USAGE = `usage: node test/bench/vm-bench.mjs [--json FILE]

environment (defaults in brackets):
  BENCH_GUEST_MIB        MiB the guest writes (and reads back) per round        [4]
  BENCH_ROUNDS           rounds of its workload                                  [20]
  BENCH_BASELINE_ROUNDS  rounds on the raw file before the live adoption starts  [4]
  BENCH_DISK_MIB         size of the guest's disk                                [64]
  BENCH_DIR              where the temp dir goes                                 [${tmpdir()}]
`;

const DOMAIN = "db";
const SEED = 5;
const GUEST_TIMEOUT_MS = 300_000;
const CONSOLE_POLL_MS = 50;

async function main() {
  const { json } = benchArgs(USAGE);
  const mib = positiveEnv("BENCH_GUEST_MIB", 4);
  const rounds = positiveEnv("BENCH_ROUNDS", 20);
  const baseline = positiveEnv("BENCH_BASELINE_ROUNDS", 4);
  const diskMib = positiveEnv("BENCH_DISK_MIB", 64);
  if (baseline + 3 > rounds) throw new Error(`BENCH_ROUNDS must be at least BENCH_BASELINE_ROUNDS + 3, got ${rounds}`);
  if (mib > diskMib) throw new Error(`BENCH_GUEST_MIB (${mib}) must fit BENCH_DISK_MIB (${diskMib})`);
  if (!libvirtInstalled()) throw new Error("libvirtd, virtlogd or QEMU is not installed: run `bash infra/setup.sh`");
  const env = await environment({ natsServer: "nats-server", qemu: "qemu-system-x86_64", libvirtd: "libvirtd" });
  const loadBefore = loadavg();
  const { root } = runDir(process.env.BENCH_DIR ?? tmpdir(), "ferry-vm-bench-");
  // libvirt's state lives apart from the run dir: the exit guard of each libvirtd reads its guests'
  // PIDs there, after the run dir's own exit handler has removed that.
  const libvirtRoot = mkdtempSync(join(process.env.BENCH_DIR ?? tmpdir(), "ferry-vm-bench-libvirt-"));
  console.log(
    `vm bench: guest writes ${mib} MiB × ${rounds} rounds on a ${diskMib} MiB disk; live adoption after round ${baseline}; in ${root}`,
  );

  const daemons = {};
  const ferryd = {};
  let sites;
  try {
    const [kernel, pair, libvirtA, libvirtB] = await Promise.all([
      buildTestGuest(),
      startSitePair({ parentDir: root }),
      startLibvirtd(libvirtRoot, "site-a"),
      startLibvirtd(libvirtRoot, "site-b"),
    ]);
    sites = pair;
    daemons.a = libvirtA;
    daemons.b = libvirtB;
    ferryd.a = await startFerryd(root, sites.a, { args: ["--libvirt", libvirtA.uri] });
    ferryd.b = await startFerryd(root, sites.b, { args: ["--libvirt", libvirtB.uri] });
    const at = (s, ...args) => [...args, "--nats", sites[s].cliUrl, "--site", sites[s].name];
    await waitUntil("both sites to know each other", async () => {
      const list = JSON.parse(await ferry(root, "site-list", at("a", "site", "list", "--json")));
      return list.length === 2;
    });

    // The guest at A, on a raw file, writing round after round and staying up.
    const disk = join(root, `${DOMAIN}.raw`);
    await runLogged("truncate", "truncate", ["-s", `${diskMib}M`, disk], join(root, "truncate.log"), 10_000);
    const consoleLog = join(root, `${DOMAIN}.console`);
    const xml = join(root, `${DOMAIN}.xml`);
    writeFileSync(
      xml,
      testGuestXml({
        name: DOMAIN,
        kernel,
        disks: [fileDiskXml("vda", disk)],
        console: consoleLog,
        seed: SEED,
        mb: mib,
        rounds,
        stayUp: true,
      }),
    );
    const virsh = (d, name, ...args) =>
      runLogged(`virsh ${args[0]}`, "virsh", ["-c", d.uri, ...args], join(root, `virsh-${name}.log`), 60_000);
    await virsh(daemons.a, "define", "define", xml);
    await virsh(daemons.a, "start", "start", DOMAIN);
    // When each round's line appears (host clock), to place the rounds around the adoption.
    const roundEndsAtMs = [];
    const watcher = (async () => {
      for (;;) {
        const n = wrote(await readGuestConsole(consoleLog));
        while (roundEndsAtMs.length < n) roundEndsAtMs.push(Date.now());
        if (n >= rounds || hasExited(ferryd.a.child)) return;
        await sleep(CONSOLE_POLL_MS);
      }
    })();
    await waitForConsole(consoleLog, `round ${baseline} of the guest at site A`, (r) => wrote(r) >= baseline);

    // (a) Live adoption while it writes.
    const adopt = await timed(() =>
      ferry(root, "adopt", [
        "vm",
        "adopt",
        DOMAIN,
        "--live",
        "--json",
        "--libvirt",
        daemons.a.uri,
        "--socket",
        ferryd.a.socket,
        "--data",
        ferryd.a.data,
      ]),
    );
    const adoptedAtMs = Date.now();
    const doneAtEnd = wrote(await readGuestConsole(consoleLog));
    const adopted = JSON.parse(adopt.result);
    if (doneAtEnd >= rounds) {
      throw new Error(`the guest finished its ${rounds} rounds before the adoption returned: raise BENCH_ROUNDS`);
    }
    const atA = await waitForConsole(consoleLog, "the guest at site A to finish its workload", (r) => r.done);
    await watcher;
    if (atA.status !== "ok") throw new Error(`the guest at site A failed: ${atA.errors.join("; ")}`);
    const last = expectedGuestSha256(SEED, "vda", rounds, mib);
    if (atA.wrote.vda?.[rounds - 1] !== last)
      throw new Error(`the guest at site A wrote ${atA.wrote.vda?.at(-1)}, not ${last}`);
    // The block copy and pivot: the adapter's own time, ending when the command returned.
    const copyWindow = { fromMs: adoptedAtMs - adopted.seconds * 1000, toMs: adoptedAtMs };
    const phases = adoptionPhases(
      roundRates(atA.wroteAt.vda ?? [], mib),
      roundEndsAtMs,
      copyWindow.fromMs,
      copyWindow.toMs,
    );

    // (b) Recovery at B: the VM as an application, protected; a recovery point after its last write.
    await ferry(root, "app", at("a", "app", "create", DOMAIN, "--vm", DOMAIN, "--json"));
    await ferry(root, "policy", at("a", "policy", "create", "bench", "--mode", "async", "--interval", "1s"));
    await ferry(root, "protect", at("a", "protect", DOMAIN, "--policy", "bench", "--to", sites.b.name, "--wait"));
    const since = Date.now();
    await waitUntil(
      "a recovery point at site B after the guest's last write",
      async () => {
        const rows = JSON.parse(await ferry(root, "status", at("a", "status", DOMAIN, "--json")));
        const row = rows.find((r) => r.source === sites.a.name);
        return (row?.lastRecoveryPoint?.atMs ?? 0) > since;
      },
      120_000,
    );
    // Site A is lost with its VM; its console is set aside (the captured definition names the same file).
    await virsh(daemons.a, "destroy", "destroy", DOMAIN);
    await rename(consoleLog, `${consoleLog}.site-a`);
    const started = Date.now();
    let readyAtMs = 0;
    const ready = (async () => {
      await waitForConsole(consoleLog, "the guest's first line at site B", (r) => r.ready);
      readyAtMs = Date.now();
    })();
    const op = JSON.parse(await ferry(root, "failover", at("b", "failover", DOMAIN, "--to", sites.b.name, "--json")));
    if (op.state !== "succeeded") throw new Error(`ferry failover did not succeed: ${JSON.stringify(op.error)}`);
    await ready;
    const atB = await waitForConsole(consoleLog, "the guest at site B to check its disk", (r) => r.found.vda);
    if (atB.found.vda !== last) throw new Error(`the guest at site B found ${atB.found.vda} on vda, not ${last}`);
    const recoverySeconds = (readyAtMs - started) / 1000;
    const operationSeconds = ((op.endedAtMs ?? 0) - op.startedAtMs) / 1000;
    const loadAfter = loadavg();

    const f = (x, digits = 2) => (Number.isFinite(x) ? x.toFixed(digits) : "?");
    const ratio = (x) => (Number.isFinite(x) ? `${(x / phases.before.mibPerSecond).toFixed(2)}x` : "?");
    const rows = (p) => {
      if (p.rounds.length === 0) return "no round";
      return p.rounds.length === 1 ? `round ${p.rounds[0]}` : `rounds ${p.rounds[0]}–${p.rounds.at(-1)}`;
    };
    console.log(
      `\n${align([
        ["measure", "value", "vs before", "detail"],
        ["live adoption, `ferry vm adopt --live` wall time, s", f(adopt.seconds), "-", "CLI start-up included"],
        [
          "  of which block copy + pivot (the adapter), s",
          f(adopted.seconds),
          "-",
          `${diskMib} MiB disk, ${mib} MiB of it written`,
        ],
        ["guest MiB/s before, on the raw file", f(phases.before.mibPerSecond), "1.00x", rows(phases.before)],
        [
          "guest MiB/s during the block copy + pivot",
          f(phases.during.mibPerSecond),
          ratio(phases.during.mibPerSecond),
          rows(phases.during),
        ],
        [
          "guest MiB/s after, on the Ferry volume",
          f(phases.after.mibPerSecond),
          ratio(phases.after.mibPerSecond),
          rows(phases.after),
        ],
        ["recovery: ferry failover → guest's first line at B, s", f(recoverySeconds), "-", "CLI start-up included"],
        ["  of which the failover operation, s", f(operationSeconds), "-", "check, promote, define + start the VM"],
        ["  the guest's uptime at its first line (READY), s", f(atB.readyUptime), "-", "kernel boot under TCG"],
      ])}`,
    );
    const load = (l) => l.map((x) => x.toFixed(1)).join(" ");
    console.log(
      `(guest MiB/s: write + read-back of ${mib} MiB per round, O_DIRECT, by the guest's clock under TCG; the ` +
        `guest found at B what it wrote last at A; load ${load(loadBefore)} → ${load(loadAfter)} on ${env.cpus} CPUs; Ferry ${env.commit})`,
    );
    if (json) {
      mkdirSync(join(json, ".."), { recursive: true });
      const results = {
        environment: { ...env, loadBefore, loadAfter },
        config: { mib, rounds, baseline, diskMib },
        adopt: { seconds: adopt.seconds, adapterSeconds: adopted.seconds },
        guestMibPerSecond: phases,
        wroteAt: atA.wroteAt.vda,
        recovery: { seconds: recoverySeconds, operationSeconds, guestReadyUptime: atB.readyUptime },
        roundEndsAtMs,
        copyWindow,
      };
      writeFileSync(json, `${JSON.stringify(results, null, 2)}\n`);
    }
  } finally {
    for (const d of [daemons.b, daemons.a]) await d?.stop();
    for (const s of [ferryd.b, ferryd.a]) if (s) await stop(s.child, 60_000);
    await sites?.stop();
    rmSync(libvirtRoot, { recursive: true, force: true });
  }
}

function wrote(report) {
  return report.wrote.vda?.length ?? 0;
}

/** A private libvirtd in `parent`/`site`; `parent` is removed at exit too (after the libvirtd guard ended its processes). */
async function startLibvirtd(parent, site) {
  const dir = join(parent, site);
  mkdirSync(dir);
  const daemon = await startPrivateLibvirtd(dir);
  process.once("exit", () => rmSync(parent, { recursive: true, force: true }));
  return daemon;
}

async function waitForConsole(path, what, until) {
  const deadline = Date.now() + GUEST_TIMEOUT_MS;
  for (;;) {
    const report = await readGuestConsole(path);
    if (until(report)) return report;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} after ${GUEST_TIMEOUT_MS / 1000} s`);
    await sleep(CONSOLE_POLL_MS);
  }
}

main().catch((error) => {
  console.error(`vm bench failed: ${error.message}`);
  process.exitCode = 1;
});
