/**
 * `ferry demo` end to end: the application demo with real nats-servers, ferryd, libvirtd and a
 * real guest VM, the two-site demo with `ferry volume serve` processes, qemu-io and nbdcopy — their
 * verification, and that they leave nothing running or on disk, after success, on Ctrl-C and on
 * failure. And the single-site tour behind `--single-site`.
 */
import type { ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, mkdir, readdir, symlink, writeFile } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { fileURLToPath } from "node:url";
import { expectedGuestSha256, FerryCli, isAlive, Sandbox, waitFor } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));
const KiB = 1024;
const MiB = 1024 * KiB;
/** The orders the demo writes to its synchronously replicated volume: pattern byte, offset. */
const ORDERS = [
  { pattern: 0x01, offset: 0, shown: "0" },
  { pattern: 0x02, offset: 5 * MiB, shown: "5M" },
  { pattern: 0x03, offset: 10 * MiB, shown: "10M" },
] as const;

/** Written while site B's service is stopped. */
const ORDER_WHILE_B_IS_DOWN = { pattern: 0x04, offset: 12 * MiB } as const;

/** sha256 of what `orders` must hold at both sites: 16M of zeros but for the four orders. */
function expectedOrdersDigest(): string {
  const volume = Buffer.alloc(16 * MiB);
  for (const order of [...ORDERS, ORDER_WHILE_B_IS_DOWN]) {
    volume.fill(order.pattern, order.offset, order.offset + 64 * KiB);
  }
  return createHash("sha256").update(volume).digest("hex");
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

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

/**
 * A PATH on which `tool` is missing and everything else is found: each directory holding it is
 * replaced by one of links to all its other programs (nats-server and libvirtd share /usr/sbin).
 */
async function pathWithout(tool: string): Promise<string> {
  const dirs: string[] = [];
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (!existsSync(join(dir, tool))) {
      dirs.push(dir);
      continue;
    }
    const copy = join(await sandbox.dir("ferry-demo-path-"), "bin");
    await mkdir(copy);
    for (const name of await readdir(dir)) if (name !== tool) await symlink(join(dir, name), join(copy, name));
    dirs.push(copy);
  }
  return dirs.join(delimiter);
}

/**
 * A PATH on which `qemu-io` is the real one started 5 s late: a demo interrupted while it runs is
 * surely still running (without it, the single-site demo can finish before the signal arrives).
 */
async function pathWithSlowQemuIo(): Promise<string> {
  const real = (process.env.PATH ?? "")
    .split(delimiter)
    .map((dir) => join(dir, "qemu-io"))
    .find((file) => existsSync(file));
  if (real === undefined) throw new Error("qemu-io is not on PATH");
  const dir = await sandbox.dir("ferry-demo-slow-");
  // Its sleep ends with it when the demo stops it.
  const script = `#!/bin/sh\nsleep 5 &\ntrap 'kill $!; exit 143' TERM INT\nwait $!\nexec ${real} "$@"\n`;
  await writeFile(join(dir, "qemu-io"), script);
  await chmod(join(dir, "qemu-io"), 0o755);
  return [dir, process.env.PATH ?? ""].join(delimiter);
}

/** The guest's workload in the demo: seed 42, 4 MiB on each disk, one round. */
const GUEST_WROTE = { vda: expectedGuestSha256(42, "vda", 1, 4), vdb: expectedGuestSha256(42, "vdb", 1, 4) };

/** Every `pid N` the demo printed: its nats-servers, ferryd, libvirtd and virtlogd. */
function printedPids(stdout: string): number[] {
  return [...new Set([...stdout.matchAll(/\bpid (\d+)/g)].map((m) => Number(m[1])))];
}

/** Start the demo as a user would, collecting its output as it comes. */
function startDemo(args: readonly string[], env: NodeJS.ProcessEnv = {}) {
  const child: ChildProcess = sandbox.spawn(process.execPath, [BIN, "demo", ...args], {
    env: { ...process.env, TMPDIR: tmp, ...env },
  });
  const output = { stdout: "", stderr: "" };
  child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
    output.stdout += chunk;
  });
  child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
    output.stderr += chunk;
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  return { child, output, exited };
}

describe("ferry demo (applications across three sites)", () => {
  it("protects two applications, drills, fails over, fails back and migrates, fails over a VM with Kubernetes objects, verified, then stops everything", async () => {
    const result = await ferry.run(["demo"], { env: { ...process.env, TMPDIR: tmp }, timeoutMs: 480_000 });
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    const out = result.stdout;
    expect(out).toMatch(/^\s+site-c\s+us-east\s+pid \d+\s+127\.0\.0\.1:\d+\s+dials site-a$/m);
    expect(out).toMatch(/FERRY_NATS=nats:\/\/ferryd:…@127\.0\.0\.1:\d+ ferry daemon --socket/);
    // A and B also connect straight to each other's server, the password kept out of sight.
    expect(out).toMatch(
      /site-a\$ FERRY_NATS=nats:\/\/ferryd:…@127\.0\.0\.1:\d+ FERRY_PEER_NATS='site-b=nats:\/\/peer:…@127\.0\.0\.1:\d+' ferry daemon/,
    );
    expect(out).toMatch(/ferryd: serving 0 volumes .* as site site-a .*direct to site-b at 127\.0\.0\.1:\d+/);
    expect(out).toMatch(
      /ferryd: serving 0 volumes .* as site site-b \(region eu-de\).*orchestrator leading site site-b/,
    );
    expect(out).toContain(
      "refused (exit 1): residency: application shop may not be protected to site site-c: its region us-east is not " +
        "among the regions policy continuous-eu allows (eu-es, eu-de); nothing was changed",
    );
    expect(out).toContain("protecting shop from site-a to site-b under continuous-eu");
    expect(out).toContain("each record was read back at site B right after site A's acknowledgement");
    for (const step of ["DR drill", "Unplanned failover", "Failback", "Planned migration"]) {
      expect(out).toContain(`== ${step}`);
    }
    const verified = [
      ...out.matchAll(/^\s+site-\w:shop-\S+\s+([0-9a-f]{16})…\s+site-\w:shop-\S+\s+([0-9a-f]{16})…\s+(\w+)$/gm),
    ];
    expect(verified).toHaveLength(8); // two volumes after each of the four operations that move data
    for (const [, want, got, result] of verified) {
      expect(result).toBe("equal");
      expect(got).toBe(want);
    }
    expect(out).not.toContain("DIFFERENT");
    expect(out).toMatch(/^\s+OPERATION\s+RTO\s+DATA CHECK\s+DETAIL$/m);
    for (const op of ["DR drill \\(test failover\\)", "unplanned failover", "failback", "planned migration"]) {
      expect(out).toMatch(new RegExp(`^\\s+${op}\\s+[\\d.]+s\\s`, "m"));
    }
    expect(out).toMatch(/RPO achieved: shop \(async, continuous\) lagged at most [\d.]+ s under writes/);

    // The hybrid application: a real guest at A on a private libvirtd, adopted, protected, failed
    // over; at B it boots from the replicas and finds on its disks what it wrote at A.
    expect(out).toMatch(/^\s+site-a: libvirtd pid \d+ \(virtlogd pid \d+\), qemu:\/\/\/system\?socket=\S+$/m);
    expect(out).toMatch(/ferry daemon --socket \S+ --site site-b --region eu-de --libvirt 'qemu:\/\/\/system\?socket=/);
    expect(out).toContain("site-a$ ferry vm adopt web\n");
    expect(out).toMatch(/^\s+web vda: \S+\/web-vda\.raw -> Ferry volume web-vda$/m);
    expect(out).toMatch(/^\s+web\s+shutoff\s+vda:nbd:web-vda vdb:nbd:web-vdb\s+2\/2$/m);
    expect(out).toContain(
      "application web at site site-a: volumes web-vda, web-vdb, web-data; VMs web; Kubernetes namespace web (app=web)",
    );
    // Its Kubernetes objects: recreated in site B's cluster, the claim on B's replica, same bytes.
    expect(out).toMatch(/✓ recover-members: started web, namespace web \(5 objects, 1 volume\) from the capture/);
    expect(out).toMatch(
      /^\s+site-a:web-data \(under PVC data-web-db-0\)\s+(\S+)…\s+site-b:web-data \(PV ferry-web-data\)\s+\1…\s+equal$/m,
    );
    expect(out).toMatch(
      /^\s+site-a:namespace web \(ConfigMap, Secret data\)\s+(\S+)…\s+site-b:namespace web \(restored\)\s+\1…\s+equal$/m,
    );
    expect(out).toMatch(/protecting web to site-b: first recovery point \d+/);
    const hybrid = out.slice(out.indexOf("site-a$ virsh start web"), out.indexOf("== What happened"));
    const console = (site: string) => {
      const from = hybrid.indexOf(`${site}$ grep FERRY-GUEST`);
      return hybrid.slice(from, hybrid.indexOf("$", from + site.length + 2));
    };
    for (const disk of ["vda", "vdb"] as const) {
      const wrote = GUEST_WROTE[disk];
      expect(console("site-a")).toMatch(new RegExp(`FERRY-GUEST WROTE disk=${disk} round=1 mb=4 sha256=${wrote} `));
      expect(console("site-b")).toContain(`FERRY-GUEST FOUND disk=${disk} mb=4 sha256=${wrote}\n`);
      expect(hybrid).toMatch(
        new RegExp(
          `^\\s+site-a:web ${disk} \\(guest wrote\\)\\s+${wrote.slice(0, 16)}…\\s+site-b:web ${disk} \\(guest found\\)\\s+${wrote.slice(0, 16)}…\\s+equal$`,
          "m",
        ),
      );
    }
    expect(console("site-b")).toContain("FERRY-GUEST DONE status=ok");
    expect(hybrid).toContain("site-b$ ferry failover web --to site-b");
    expect(hybrid).toMatch(
      /✓ recover-members: started web, namespace web \(5 objects, 1 volume\) from the capture of generation \d+/,
    );
    expect(hybrid).toMatch(/^\s+\d+\s+web\s+running$/m);
    expect(out).toMatch(
      /^\s+failover of web \(hybrid\)\s+[\d.]+s\s+B = what A wrote\s+operation [\d.]+s; VM web's first console line at B [\d.]+s after `ferry failover`; namespace web recreated in B's cluster [\d.]+s after `ferry failover`$/m,
    );

    expect(out).toContain("\n== Done: every operation verified byte for byte");
    expect(out).toMatch(/stopped the libvirtd of site-a \(pid \d+\), its virtlogd and its guests/);
    const pids = printedPids(out);
    expect(pids).toHaveLength(10); // 3 nats-servers, 3 ferryd, 2 libvirtd, 2 virtlogd
    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
    expect(await readdir(tmp)).toEqual([]);
  }, 480_000);

  it("stops everything it started on SIGINT while it protects the applications, and exits 130", async () => {
    const demo = startDemo([]);
    await waitFor(
      "the demo to protect shop",
      () => demo.output.stdout.includes("ferry protect shop --policy continuous-eu --to site-b"),
      {
        timeoutMs: 120_000,
      },
    );
    demo.child.kill("SIGINT");
    expect(await demo.exited).toBe(130);
    expect(demo.output.stderr).toBe("ferry: demo interrupted by SIGINT; cleaned up\n");
    expect(demo.output.stdout).not.toContain("== Done");
    expect(demo.output.stdout).toMatch(/stopped the libvirtd of site-b \(pid \d+\), its virtlogd and its guests/);
    const pids = printedPids(demo.output.stdout);
    expect(pids).toHaveLength(10);
    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
    expect(await readdir(tmp)).toEqual([]);
  }, 180_000);

  it("fails with exit 1 and says so when libvirtd is not installed, before starting anything", async () => {
    const result = await ferry.run(["demo"], {
      env: { ...process.env, TMPDIR: tmp, PATH: await pathWithout("libvirtd") },
    });
    expect(result.code).toBe(1);
    expect(result.stderr).toBe(
      "ferry: libvirtd, virtlogd or QEMU is not installed, and the demo's hybrid application runs a VM: " +
        "run `bash infra/setup.sh` (it installs them)\n",
    );
    expect(result.stdout).not.toContain("nats-server");
    expect(result.stdout).not.toContain("== Done");
    expect(await readdir(tmp)).toEqual([]);
  });
});

describe("ferry demo --replication (two sites, volume level)", () => {
  it("replicates async and sync, fails over to site B and verifies B's bytes, then stops everything it started", async () => {
    const result = await ferry.run(["demo", "--replication"], {
      env: { ...process.env, TMPDIR: tmp },
      timeoutMs: 180_000,
    });
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    const out = result.stdout;

    // Two sites, each its own nats-server and volume service, the link up.
    expect(out).toMatch(/^\s+site-a\s+eu-es\s+pid \d+\s+127\.0\.0\.1:\d+\s+site-a\s+accepts on 127\.0\.0\.1:\d+$/m);
    expect(out).toMatch(/^\s+site-b\s+eu-de\s+pid \d+\s+127\.0\.0\.1:\d+\s+site-b\s+dials site-a$/m);
    expect(out).toContain("leafnode link site-b → site-a is up");
    expect(out).toMatch(/ferry: serving 0 volumes .* as site site-a \(region eu-es, copies only to eu-es, eu-de\)/);
    expect(out).toMatch(/ferry: serving 0 volumes .* as site site-b \(region eu-de\)/);
    expect(out).toMatch(
      /FERRY_NATS=nats:\/\/ferryd:…@127\.0\.0\.1:\d+ FERRY_PEER_NATS='site-b=nats:\/\/peer:…@127\.0\.0\.1:\d+' ferry volume serve/,
    );

    // Continuous replication with its status, then a sync.
    expect(out).toContain("site-a$ ferry replicate start web-root web-db --to site-b --mode async --interval 1s");
    expect(out).toMatch(/^\s+VOLUMES\s+TARGET\s+MODE\s+STATE\s+LAST GEN\s+LAG\s+RAW\s+WIRE\s+RATIO\s+ROUTE$/m);
    expect(out).toMatch(/^\s+web-root,web-db\s+site-b\s+async\s+\w+\s+\d+\s+[\d.]+s\s+96M\s+\S+\s+[\d.]+x\s+direct$/m);
    expect(out).toMatch(/shipped 96M of volume data as \S+ on the wire \(\d+× smaller\)/);
    expect(out).toContain("site-a$ ferry replicate sync web-root web-db");
    expect(out).toMatch(/stopped replicating web-root, web-db to site-b; it keeps generation \d+/);

    // A synchronous pair beside the group: once active, each write acknowledged at A is at B when
    // read right after, with no ferry command in between.
    expect(out).toContain("site-a$ ferry volume create orders --size 16M");
    expect(out).toContain("site-a$ ferry replicate start orders --to site-b --mode sync --interval 1s");
    expect(out).toContain("replicating orders to site-b (sync, every 1s, on peer loss suspend)");
    expect(out).toMatch(/then went synchronous \(syncState "active"\) after [\d.]+ s/);
    const ordersStart = out.indexOf("site-a$ qemu-io -f raw -c 'write -P 0x01");
    const ordersEnd = out.indexOf("== Replication status at site A: orders");
    expect(ordersStart).toBeGreaterThan(out.indexOf('(syncState "active")'));
    expect(ordersEnd).toBeGreaterThan(ordersStart);
    const orders = out.slice(ordersStart, ordersEnd);
    for (const { pattern, offset, shown } of ORDERS) {
      const hex = `0x0${pattern}`;
      const written = `site-a$ qemu-io -f raw -c 'write -P ${hex} ${shown} 64K' -c flush 'nbd+unix:///orders?socket=`;
      const readAtB = `site-b$ qemu-io -r -f raw -c 'read -P ${hex} ${shown} 64K' 'nbd+unix:///orders?socket=`;
      expect(orders).toMatch(
        new RegExp(
          `${escapeRegExp(written)}\\S+\n\\s+wrote 65536/65536 bytes at offset ${offset}\n` +
            `\\s+${escapeRegExp(readAtB)}\\S+\n\\s+read 65536/65536 bytes at offset ${offset}\n`,
        ),
      );
    }
    expect(orders).not.toContain("$ ferry");
    expect(orders).toContain(
      "all 3 orders were at site-b the moment site-a acknowledged them (read -P checks every byte): " +
        "while the pair is active, losing site A loses no acknowledged write",
    );
    expect(out).toMatch(/^\s+orders\s+site-b\s+sync \(active\)\s+\w+\s+\d+\s/m);
    expect(out).toContain("syncWrites 3: writes to orders that site-b applied before site-a acknowledged them");

    // --on-peer-loss suspend: B's service stops, a write at A still completes, the pair suspends; B's
    // service comes back, the pair resends what changed (not the whole volume) and is active again.
    const firstServiceOfB = Number(
      /\(region eu-de\) via NATS \S+, direct to site-a at \S+ \(pid (\d+)\)/.exec(out)?.[1],
    );
    const lost = out.slice(out.indexOf("== Site B's volume service stops"), out.indexOf("== Data check"));
    expect(lost).toMatch(
      new RegExp(
        `^\\s+site-b\\$ kill -TERM ${firstServiceOfB}   # its ferry volume serve\n` +
          `\\s+ferry volume serve of site-b \\(pid ${firstServiceOfB}\\) stopped\n` +
          `\\s+site-a\\$ qemu-io -f raw -c 'write -P 0x04 12M 64K' -c flush \\S+\n` +
          "\\s+wrote 65536/65536 bytes at offset 12582912\n",
        "m",
      ),
    );
    expect(lost).toMatch(/^\s+orders\s+site-b\s+sync \(suspended\)\s+/m);
    expect(lost).toContain("order 4 was acknowledged at site-a alone: the pair suspended itself (suspensions 1)");
    const secondServiceOfB = Number(
      /ferry: serving 3 volumes \(orders, web-db, web-root\) .* as site site-b .*\(pid (\d+)\)/.exec(lost)?.[1],
    );
    expect(secondServiceOfB).toBeGreaterThan(0);
    expect(secondServiceOfB).not.toBe(firstServiceOfB);
    expect(lost).toMatch(
      /site-b\$ qemu-io -r -f raw -c 'read -P 0x04 12M 64K' \S+\n\s+read 65536\/65536 bytes at offset 12582912\n/,
    );
    expect(lost).toMatch(/synchronous again: \d+K resent, not the whole 16M; order 4 is at site-b\n/);

    const ordersAtA = /^\s+site-a\s+orders\s+([0-9a-f]{64})$/m.exec(out)?.[1];
    const ordersAtB = /^\s+site-b\s+orders\s+([0-9a-f]{64})$/m.exec(out)?.[1];
    const ordersDigest = expectedOrdersDigest();
    expect(ordersAtA).toBe(ordersDigest);
    expect(ordersAtB).toBe(ordersDigest);
    expect(out).toContain(
      "equal: orders at site-b is byte for byte what site-a holds, all 4 orders, with the pair running (sha256 over all 16M)",
    );
    expect(out).toMatch(/stopped replicating orders to site-b; it keeps generation \d+/);

    // B before the failover: A's text, read-only.
    expect(out).toMatch(/^\s+00000000:\s+66 65 72 72 79 20 64 65 6d 6f .*ferry\.demo/m);
    expect(out).toContain("refused, as it must be:");

    // The failover and its verification: the full digests A printed are the ones B has.
    // Promoted at the generation the stop reported: a stop lets a commit under way finish, so what
    // it reports is what B holds. A wrote nothing after the sync, so both hold the bytes the
    // digests below check.
    const kept = Number(/replicating web-root, web-db to site-b; it keeps generation (\d+)/.exec(out)?.[1]);
    const promotedAt = (volume: string) =>
      Number(new RegExp(`"generation": (\\d+),\\s+"volume": "${volume}"`).exec(out)?.[1]);
    expect(kept).toBeGreaterThan(0);
    const generation = promotedAt("web-root");
    expect(promotedAt("web-db")).toBe(generation);
    expect(generation).toBe(kept);
    for (const volume of ["web-root", "web-db"]) {
      const fullAtA = new RegExp(`^\\s+${volume}\\s+([0-9a-f]{64})$`, "m").exec(out)?.[1];
      expect(fullAtA, volume).toBeDefined();
      const row = new RegExp(`^\\s+${volume}\\s+${generation}\\s+([0-9a-f]{16})…\\s+([0-9a-f]{16})…\\s+equal$`, "m");
      const [, shownA, shownB] = row.exec(out) ?? [];
      expect(shownA, volume).toBe(fullAtA?.slice(0, 16));
      expect(shownB, volume).toBe(shownA);
    }
    expect(out).toContain(
      `verified: web-root and web-db at site-b are byte for byte what site-a held at generation ${generation} (sha256 over all 96M)`,
    );
    expect(out).not.toContain("DIFFERENT");

    // Writable after the promote.
    expect(out).toContain("wrote 65536/65536 bytes at offset 31457280");
    expect(out).toMatch(/^\s+web-db\s+32M\s+64K\s+\d+\s+\S+\s+64K\s+rw$/m);
    expect(out).toMatch(/^\s+web-root\s+64M\s+64K\s+\d+\s+\S+\s+0\s+rw$/m);

    expect(out).toContain(
      "\n== Done: site B held every acknowledged write to orders and took over web-root and web-db, byte for byte",
    );
    const pids = printedPids(out);
    expect(pids).toHaveLength(5); // site B's volume service ran twice

    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
    expect(await readdir(tmp)).toEqual([]);
  }, 180_000);

  it.each([
    ["the sync pair", "replicating orders"],
    ["to stop site B's service", "kill -TERM"],
  ])(
    "stops everything it started on SIGINT while it starts %s and exits 130",
    async (_, started) => {
      const demo = startDemo(["--replication"]);
      await waitFor(`the demo to print '${started}'`, () => demo.output.stdout.includes(started), {
        timeoutMs: 120_000,
      });
      demo.child.kill("SIGINT");

      expect(await demo.exited).toBe(130);
      expect(demo.output.stderr).toBe("ferry: demo interrupted by SIGINT; cleaned up\n");
      expect(demo.output.stdout).toContain("== Stopping everything the demo started");
      expect(demo.output.stdout).not.toContain("== Done");
      const pids = printedPids(demo.output.stdout);
      expect(pids).toHaveLength(4);
      for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
      expect(await readdir(tmp)).toEqual([]);
    },
    180_000,
  );

  it("fails with exit 1 and one line saying what is missing when nats-server is not installed", async () => {
    const path = await pathWithout("nats-server");
    const result = await ferry.run(["demo"], { env: { ...process.env, TMPDIR: tmp, PATH: path } });
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(
      /^ferry: cannot start nats-server for site site-a: .*ENOENT \(Debian package nats-server; infra\/setup\.sh installs it\)\n$/,
    );
    expect(result.stdout).toContain("== Stopping everything the demo started");
    expect(result.stdout).not.toContain("== Done");
    expect(await readdir(tmp)).toEqual([]);
  });
});

describe("ferry demo --single-site", () => {
  it("narrates writes, the dirty map over NBD, a cut, and leaves nothing behind", async () => {
    const result = await ferry.run(["demo", "--single-site"], { env: { ...process.env, TMPDIR: tmp } });
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
    const demo = startDemo(["--single-site"], { PATH: await pathWithSlowQemuIo() });
    // Interrupted during its first qemu-io run, which the slow start keeps going for 5 s.
    await waitFor("the demo's first write", () => demo.output.stdout.includes("Write 1M of 0xab"));
    demo.child.kill("SIGINT");

    expect(await demo.exited).toBe(130);
    expect(demo.output.stderr).toMatch(/^ferry: demo interrupted by SIGINT/m);
    expect(demo.output.stdout).not.toContain("Done;");
    expect(await readdir(tmp)).toEqual([]);
  });
});
